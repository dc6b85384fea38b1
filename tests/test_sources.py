"""Input readers: folders, manifests, WebDataset shards, ids, fingerprints, byte ranges."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _locate_fixtures import class_map_png, encode, good_images, photo, write_folder, write_tar

from geosurge_index import sources
from geosurge_index.errors import UserError
from geosurge_index.images import ImageDecodeError


def test_folder_is_recursive_sorted_and_skips_non_images(tmp_path):
    expected = write_folder(tmp_path / "imgs", n_extra=2)
    (tmp_path / "imgs" / "a.classmap.png").write_bytes(class_map_png())
    t = sources.read_folder(tmp_path / "imgs")
    paths = t.column("path").to_pylist()
    assert paths == sorted(expected)
    assert t.column("id").to_pylist() == paths
    assert set(t.column("offset").to_pylist()) == {-1}
    assert sources.input_kind(tmp_path / "imgs") == "folder"


def test_csv_manifest_relative_paths_and_string_ids(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.jpg").write_bytes(good_images()["a.jpg"])
    (tmp_path / "m.csv").write_text("id,path,other\n00012,img/x.jpg,1\n7,/abs/missing.jpg,2\n")
    t = sources.enumerate_inputs([tmp_path / "m.csv"])
    assert t.column("id").to_pylist() == ["00012", "7"]  # leading zeros kept
    assert t.column("path").to_pylist() == [str((tmp_path / "img" / "x.jpg").resolve()), "/abs/missing.jpg"]


def test_parquet_manifest_custom_columns_and_no_id(tmp_path):
    pq.write_table(pa.table({"file": ["a.jpg", "b.jpg"], "n": [1, 2]}), tmp_path / "m.parquet")
    t = sources.read_manifest(tmp_path / "m.parquet", sources.ManifestColumns(path="file"))
    assert t.column("id").to_pylist() == t.column("path").to_pylist()
    pq.write_table(pa.table({"file": ["a.jpg", "b.jpg"], "key": [10, 11]}), tmp_path / "k.parquet")
    t = sources.read_manifest(tmp_path / "k.parquet", sources.ManifestColumns(path="file", id="key"))
    assert t.column("id").to_pylist() == ["10", "11"]
    # polars writes large strings, pandas categoricals come back as dictionaries: both are paths
    paths = pa.array(["a.jpg", "b.jpg"])
    for col in (paths.cast(pa.large_string()), paths.dictionary_encode()):
        pq.write_table(pa.table({"path": col}), tmp_path / "l.parquet")
        t = sources.read_manifest(tmp_path / "l.parquet")
        assert t.column("path").to_pylist() == [str(tmp_path.resolve() / n) for n in ("a.jpg", "b.jpg")]


@pytest.mark.parametrize(
    "text, match",
    [
        ("name,id\na.jpg,1\n", "no 'path' column"),
        ("path,id\na.jpg,1\nb.jpg,1\n", "duplicate ids"),
        ("path,id\na.jpg,1\n,2\n", "empty 'path'"),
    ],
)
def test_bad_manifests_are_user_errors(tmp_path, text, match):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(UserError, match=match):
        sources.enumerate_inputs([tmp_path / "m.csv"])


def test_duplicate_ids_across_inputs_and_bad_arguments(tmp_path):
    write_folder(tmp_path / "f", bad=False)
    with pytest.raises(UserError, match="duplicate ids"):
        sources.enumerate_inputs([tmp_path / "f", tmp_path / "f"])
    with pytest.raises(UserError, match="does not exist"):
        sources.enumerate_inputs([tmp_path / "nope"])
    (tmp_path / "x.tar.gz").write_bytes(b"")
    with pytest.raises(UserError, match="compressed tar"):
        sources.enumerate_inputs([tmp_path / "x.tar.gz"])
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(UserError, match="neither a folder"):
        sources.enumerate_inputs([tmp_path / "x.bin"])
    with pytest.raises(UserError, match="no inputs"):
        sources.enumerate_inputs([])


def test_tar_rows_point_at_the_right_bytes(tmp_path):
    keys = write_tar(tmp_path / "shard-0.tar", 3, with_class_maps=True)
    t = sources.enumerate_inputs([tmp_path / "shard-0.tar"])
    assert t.column("id").to_pylist() == keys  # the orphan .json sample is not an input
    with tarfile.open(tmp_path / "shard-0.tar") as tar:
        for row in t.to_pylist():
            data = sources.read_bytes(row["file"], row["offset"], row["size"])
            assert data == tar.extractfile(f"{row['id']}.jpg").read()
            cmap = sources.class_map_source(row["file"], row["offset"], row["cmap_offset"], row["cmap_size"])
            assert cmap == class_map_png()
            assert row["path"].endswith(f"::{row['id']}.jpg")


def test_tar_without_class_maps_and_truncated_shard(tmp_path):
    write_tar(tmp_path / "s.tar", 2)
    t = sources.read_tar(tmp_path / "s.tar")
    assert t.column("cmap_offset").to_pylist() == [-1, -1]
    row = t.to_pylist()[1]
    raw = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(raw[: row["offset"] + 10])  # the shard ends inside member 2
    with pytest.raises(ImageDecodeError) as err:
        sources.read_bytes(row["file"], row["offset"], row["size"])
    assert err.value.kind == "truncated"
    with pytest.raises(ImageDecodeError) as err:
        sources.read_bytes(str(tmp_path / "gone.jpg"), -1, -1)
    assert err.value.kind == "unreadable"


def test_fingerprint_is_stable_and_sees_changes(tmp_path):
    write_folder(tmp_path / "f", bad=False)
    a = sources.fingerprint(sources.enumerate_inputs([tmp_path / "f"]))
    assert a == sources.fingerprint(sources.enumerate_inputs([tmp_path / "f"]))
    (tmp_path / "f" / "new.png").write_bytes(encode(photo(), "PNG"))
    assert a != sources.fingerprint(sources.enumerate_inputs([tmp_path / "f"]))


def test_class_map_beside_a_file(tmp_path):
    img = tmp_path / "x.jpg"
    img.write_bytes(good_images()["a.jpg"])
    assert sources.class_map_source(str(img), -1, -1, -1) is None
    (tmp_path / "x.classmap.png").write_bytes(class_map_png())
    assert sources.class_map_source(str(img), -1, -1, -1) == tmp_path / "x.classmap.png"


def test_tar_of_other_names(tmp_path):
    """Members in folders inside the tar keep their folder in the key."""
    with tarfile.open(tmp_path / "d.tar", "w") as tar:
        for name in ("a/1.webp", "a/1.txt", "b/1.png"):
            blob = encode(photo(), "WEBP" if name.endswith("webp") else "PNG") if "txt" not in name else b"t"
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    t = sources.read_tar(tmp_path / "d.tar")
    assert t.column("id").to_pylist() == ["a/1", "b/1"]


def test_gzipped_manifests_and_single_images_are_inputs(tmp_path):
    import gzip

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.jpg").write_bytes(good_images()["a.jpg"])
    with gzip.open(tmp_path / "m.csv.gz", "wt") as f:
        f.write("id,path\n00012,img/x.jpg\n")
    with gzip.open(tmp_path / "m.tsv.gz", "wt") as f:
        f.write("id\tpath\nt1\timg/x.jpg\n")
    assert [sources.input_kind(tmp_path / n) for n in ("m.csv.gz", "m.tsv.gz", "img/x.jpg", "img")] == [
        "manifest", "manifest", "image", "folder"]
    t = sources.enumerate_inputs([tmp_path / "m.csv.gz", tmp_path / "m.tsv.gz", tmp_path / "img" / "x.jpg"])
    x = str((tmp_path / "img" / "x.jpg").resolve())
    assert t.column("id").to_pylist() == ["00012", "t1", str(tmp_path / "img" / "x.jpg")]
    assert t.column("path").to_pylist()[:2] == [x, x]
    (tmp_path / "img" / "x.classmap.png").write_bytes(class_map_png())
    with pytest.raises(UserError, match="is a class map"):
        sources.input_kind(tmp_path / "img" / "x.classmap.png")


def test_image_files_for_per_file_work(tmp_path):
    write_folder(tmp_path / "f", bad=False)
    (tmp_path / "m.csv").write_text("path\nf/a.jpg\nf/a.jpg\n")
    files = sources.image_files([tmp_path / "f", tmp_path / "m.csv", tmp_path / "f" / "a.jpg"])
    assert len(files) == len(set(files))  # each file once, whichever input named it
    assert files[: len(sources.read_folder(tmp_path / "f"))] == sources.read_folder(tmp_path / "f").column(
        "file").to_pylist()
    write_tar(tmp_path / "s.tar", 1)
    with pytest.raises(UserError, match="WebDataset shard"):
        sources.image_files([tmp_path / "s.tar"])


def test_tar_coordinates_from_each_samples_json(tmp_path):
    """WebDataset samples carry their point in KEY.json (img2dataset, webdataset's TarWriter)."""
    blobs = {"s/a.jpg": encode(photo(seed=1), "JPEG"), "s/a.json": b'{"lat": 48.85, "lon": 2.35}',
             "s/b.jpg": encode(photo(seed=2), "JPEG"), "s/b.json": b'{"Latitude": "-33.9", "lng": 151.2}',
             "s/c.jpg": encode(photo(seed=3), "JPEG"), "s/c.json": b'{"caption": "no point"}',
             "s/d.json": b"not json"}
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    t = sources.read_tar_coordinates(path)
    assert t.column("id").to_pylist() == ["s/a", "s/b", "s/c", "s/d"]
    assert t.column("id").to_pylist()[:3] == sources.read_tar(path).column("id").to_pylist()  # locate's ids
    lat, lon = t.column("lat").to_pylist(), t.column("lon").to_pylist()
    assert lat[:2] == [48.85, -33.9] and lon[:2] == [2.35, 151.2]
    assert all(x != x for x in lat[2:] + lon[2:])  # NaN: no point in the JSON
    with pytest.raises(UserError, match="cannot be read"):
        sources.read_tar_coordinates(tmp_path / "missing.tar")


def test_folder_scan_counts_what_it_skips_and_takes_heic(tmp_path):
    from collections import Counter

    write_folder(tmp_path / "f", bad=False)
    (tmp_path / "f" / "a.classmap.png").write_bytes(class_map_png())
    (tmp_path / "f" / "scan.TIF").write_bytes(b"x")
    (tmp_path / "f" / "phone.HEIC").write_bytes(b"x")  # an input, decodable or not: never silent
    (tmp_path / "f" / "README").write_text("x")
    (tmp_path / "f" / ".git").mkdir()
    (tmp_path / "f" / ".git" / "x.jpg").write_bytes(b"x")
    skipped = Counter()
    t = sources.read_folder(tmp_path / "f", skipped)
    assert str(tmp_path / "f" / "phone.HEIC") in t.column("id").to_pylist()
    assert skipped == {"hidden": 1, "hidden_folder": 1, "class_map": 1, "extension:.tif": 1, "extension:.txt": 1,
                       "extension:.json": 1, "no_extension": 1}
    inputs = sources.collect_inputs([tmp_path / "f"])
    assert inputs.skipped == skipped and inputs.table.equals(t)


def test_quoted_globs_expand_sorted_and_several_files_are_inputs(tmp_path):
    for name in ("b.jpg", "a.jpg", "c.png"):
        (tmp_path / name).write_bytes(good_images()["a.jpg"])
    assert sources.expand_globs([f"{tmp_path}/*.jpg", tmp_path / "c.png"]) == [
        str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), str(tmp_path / "c.png")]
    with pytest.raises(UserError, match="no file matches"):
        sources.expand_globs([f"{tmp_path}/*.gif"])
    t = sources.enumerate_inputs(sources.expand_globs([f"{tmp_path}/[ab].jpg"]))
    assert t.column("id").to_pylist() == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]


def test_fingerprint_does_not_depend_on_the_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "in", bad=False)
    write_tar(tmp_path / "s.tar", 2)
    first = sources.collect_inputs(["in", "s.tar"])
    for spelled in (["./in", "./s.tar"], ["in/", str(tmp_path / "s.tar")], [str(tmp_path / "in"), "s.tar"]):
        again = sources.collect_inputs(spelled, spell_as=["in", "s.tar"])
        assert again.fingerprint == first.fingerprint
        assert again.table.select(["id", "path"]).equals(first.table.select(["id", "path"]))
    assert sources.collect_inputs(["./in", "s.tar"]).legacy_fingerprint != first.legacy_fingerprint


def test_tar_members_that_are_not_files_are_counted(tmp_path):
    from collections import Counter

    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        for name, kind in [("k", tarfile.DIRTYPE), ("k/a.jpg", tarfile.REGTYPE), ("k/a.webp", tarfile.REGTYPE),
                           ("k/a.jpg", tarfile.REGTYPE), ("k/b.jpg", tarfile.SYMTYPE), ("k/c.jpg", tarfile.BLKTYPE)]:
            info = tarfile.TarInfo(name)
            info.type = kind
            blob = good_images()["a.jpg"] if kind == tarfile.REGTYPE else b""
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob) if blob else None)
    skipped = Counter()
    t = sources.read_tar(tmp_path / "x.tar", skipped)
    assert t.column("id").to_pylist() == ["k/a"] and t.column("path").to_pylist()[0].endswith("::k/a.jpg")
    assert t.column("offset").to_pylist()[0] < 2048  # the first k/a.jpg, not its duplicate
    assert skipped == {"tar_directory": 1, "tar_second_image": 2, "tar_link": 1, "tar_special": 1}
