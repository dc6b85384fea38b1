"""XMP sidecars (issue 13, part 3), read back with an independent XMP implementation: exiftool
(Debian's libimage-exiftool-perl; `make install` installs it)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_exif_gps import TAGGED, gps_ifd, jpeg_with

from geosurge_index.cli import main as cli_main
from geosurge_index.privacy import Cap
from geosurge_index.sidecars import TMP_MARK, parse_xmp_coordinate, xmp_coordinate

EXIFTOOL = shutil.which("exiftool")
if EXIFTOOL is None:  # not a skip: the project's install step provides it
    raise RuntimeError("exiftool is missing: `make install` installs Debian's libimage-exiftool-perl")


def exiftool(*args: str) -> list[dict]:
    out = subprocess.run([EXIFTOOL, "-j", "-n", "-G1", *args], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def located(tmp_path_factory):
    """An index and a located archive: 2 tagged photos, 6 untagged."""
    from geosurge_index.synthetic import random_index

    root = tmp_path_factory.mktemp("sidecars")
    index_dir = random_index(root / "index", n_points=1500, place_names=True)
    photos = root / "photos"
    (photos / "trip").mkdir(parents=True)
    for i, (name, (lat, lon)) in enumerate(list(TAGGED.items())[:2]):
        (photos / name).write_bytes(jpeg_with(gps_ifd(lat, lon), seed=i))
    for i in range(6):
        (photos / "trip" / f"u{i}.jpg").write_bytes(jpeg_with(None, seed=30 + i))
    preds = root / "preds"
    assert cli_main(["locate", str(index_dir), str(photos), "--out", str(preds), "--device", "cpu",
                     "--workers", "0"]) == 0
    return index_dir, photos, preds


@pytest.fixture
def archive(located, tmp_path):
    """A fresh copy of the photos (sidecars are written beside them) and of the predictions,
    whose paths point at the copy."""
    import pyarrow as pa

    index_dir, photos, preds = located
    copy = tmp_path / "photos"
    shutil.copytree(photos, copy)
    out = tmp_path / "preds"
    shutil.copytree(preds, out)
    for shard in out.glob("part-*.parquet"):
        t = pq.read_table(shard)
        paths = [p.replace(str(photos), str(copy)) for p in t.column("path").to_pylist()]
        t = t.set_column(t.schema.get_field_index("path"), "path", pa.array(paths, pa.string()))
        pq.write_table(t, shard)
    from geosurge_index import pred_store

    run = pred_store.read_run(out)
    run["inputs"] = [str(copy)]
    pred_store.write_run(out, run)
    return index_dir, copy, out


def rows(preds: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in pq.read_table(sorted(preds.glob("part-*.parquet"))).to_pylist()}


def test_xmp_coordinate_form_and_round_trip():
    assert xmp_coordinate(48.8566, "N", "S") == "48,51.396000N"
    assert xmp_coordinate(-0.0000001, "E", "W").endswith("W")
    for v in (0.0, 12.999999999, -77.0428, 179.9999999, -89.99999999):
        assert parse_xmp_coordinate(xmp_coordinate(v, "N", "S")) == pytest.approx(v, abs=1e-7)


def test_sidecars_written_merged_skipped_and_read_back_by_exiftool(archive, capsys):
    index_dir, photos, preds = archive
    trip = photos / "trip"
    # an existing sidecar with other tags (written by exiftool itself): merged, its tags kept
    subprocess.run([EXIFTOOL, "-q", "-o", str(trip / "u1.jpg.xmp"), "-XMP-dc:Description=Holiday",
                    "-XMP-xmp:Rating=4", "-XMP-dc:Subject=beach", "-XMP-dc:Subject=sea"], check=True)
    # a Lightroom-style sidecar that already has GPS: left alone
    subprocess.run([EXIFTOOL, "-q", "-o", str(trip / "u2.xmp"), "-XMP-exif:GPSLatitude=10.5",
                    "-XMP-exif:GPSLongitude=20.25", "-XMP-dc:Title=kept"], check=True)
    # not valid XMP: left untouched, reported
    (trip / "u3.jpg.xmp").write_text("<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF>")
    # a stray temporary of a killed run: removed
    (trip / f".u4.jpg.xmp{TMP_MARK}999").write_text("half")
    originals = {p: digest(p) for p in photos.rglob("*.jpg")}
    before = {p: digest(p) for p in (trip / "u2.xmp", trip / "u3.jpg.xmp")}

    assert cli_main(["sidecars", str(preds), "--dry-run", "--min-probability", "0"]) == 0
    assert "4 would be written" in capsys.readouterr().err
    assert not (trip / "u0.jpg.xmp").exists()

    assert cli_main(["sidecars", str(preds), "--min-probability", "0", "--json", str(photos / "s.json")]) == 0
    err = capsys.readouterr().err
    summary = json.loads((photos / "s.json").read_text())["counts"]
    assert summary["written"] == 4 and summary["merged"] == 1, err  # u0, u1 (merged), u4, u5
    assert summary["tagged"] == 2 and summary["gps_present"] == 1 and summary["invalid_xmp"] == 1
    assert "u3.jpg.xmp" in err and "gps_present 1" in err
    assert {p: digest(p) for p in originals} == originals  # originals never touched
    assert {p: digest(p) for p in before} == before
    assert not list(trip.glob(f".*{TMP_MARK}*"))
    assert not any((photos / f"{n}.xmp").exists() or (photos / f"{n}.jpg.xmp").exists()
                   for n in ("paris", "sydney"))

    r = rows(preds)
    written = [trip / f"u{i}.jpg.xmp" for i in (0, 1, 4, 5)]
    for tags in exiftool(*map(str, written)):
        row = r[Path(tags["SourceFile"]).name.removesuffix(".xmp")]
        assert tags["XMP-exif:GPSLatitude"] == pytest.approx(row["lat"], abs=1e-6)
        assert tags["XMP-exif:GPSLongitude"] == pytest.approx(row["lon"], abs=1e-6)
        assert tags["XMP-geosurge:Estimated"] is True
        assert tags["XMP-geosurge:Probability"] == pytest.approx(row["probability"], abs=1e-6)
        assert tags["XMP-geosurge:CellToken"] == row["token_l7"] and tags["XMP-geosurge:CellLevel"] == 7
        assert tags["XMP-geosurge:IndexId"] and tags["XMP-geosurge:Date"]
    merged = exiftool(str(trip / "u1.jpg.xmp"))[0]
    assert merged["XMP-dc:Description"] == "Holiday" and merged["XMP-xmp:Rating"] == 4
    assert merged["XMP-dc:Subject"] == ["beach", "sea"]

    # a rerun finds our own GPS there: nothing rewritten
    assert cli_main(["sidecars", str(preds), "--min-probability", "0"]) == 0
    assert "0 written" in capsys.readouterr().err
    # --force replaces GPS already present, keeping the rest
    assert cli_main(["sidecars", str(preds), "--min-probability", "0", "--force", "--only",
                     str(_only(photos, [str(trip / "u2.jpg")]))]) == 0
    forced = exiftool(str(trip / "u2.xmp"))[0]
    assert forced["XMP-exif:GPSLatitude"] == pytest.approx(r["u2.jpg"]["lat"], abs=1e-6)
    assert forced["XMP-dc:Title"] == "kept" and forced["XMP-geosurge:Estimated"] is True


def _only(folder: Path, lines: list[str]) -> Path:
    p = folder / "only.txt"
    p.write_text("# selection\n" + "\n".join(lines) + "\n")
    return p


def test_only_cap_naming_and_dest(archive, capsys):
    index_dir, photos, preds = archive
    r = rows(preds)
    dest = photos.parent / "side"
    assert cli_main(["sidecars", str(preds), "--min-probability", "0", "--dest", str(dest), "--naming", "photo.xmp",
                     "--cap-km", "750", "--only", str(_only(photos, [r["u0.jpg"]["id"], r["u5.jpg"]["path"]]))]) == 0
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.xmp")) == ["trip/u0.xmp", "trip/u5.xmp"]
    assert not list((photos / "trip").glob("*.xmp"))  # --dest: nothing beside the photos
    from geosurge_index.index import read_tree
    from geosurge_index.locate import Locator

    with Locator.open(index_dir, device="cpu") as loc:
        want = {Path(p.id).name: p for p in loc.locate([photos / "trip" / "u0.jpg", photos / "trip" / "u5.jpg"],
                                                        cap=Cap(750.0))}
    for tags in exiftool(*map(str, sorted(dest.rglob("*.xmp")))):
        p = want[Path(tags["SourceFile"]).stem + ".jpg"]
        assert (tags["XMP-exif:GPSLatitude"], tags["XMP-exif:GPSLongitude"]) == pytest.approx((p.lat, p.lon), abs=1e-6)
        assert tags["XMP-geosurge:CapKm"] == 750 and tags["XMP-geosurge:CellLevel"] == p.cap.answered_level
        assert tags["XMP-geosurge:CellToken"] == p.cap.s2_token
    assert read_tree(index_dir, 7).levels == 7


def test_read_only_destination_is_a_clear_error(archive, capsys, monkeypatch):
    index_dir, photos, preds = archive
    dest = photos.parent / "ro"
    dest.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: a read-only file system, as the kernel says it
        def refuse(*a, **k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        monkeypatch.setattr("geosurge_index.sidecars.os.replace", refuse)
    else:
        dest.chmod(0o555)
    try:
        code = cli_main(["sidecars", str(preds), "--min-probability", "0", "--dest", str(dest)])
    finally:
        dest.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and "cannot write sidecars in" in err and str(dest) in err
    assert not [p for p in dest.rglob("*") if p.is_file()]  # no half-written file
