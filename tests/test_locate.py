"""Bulk locate and the Locator API on a real (tiny, config-built, random-weight) exported index."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _locate_fixtures import bad_images, class_map_png, encode, good_images, photo, write_folder, write_tar
from PIL import Image

from geosurge_index import locate, pred_store
from geosurge_index.cli import main as cli_main
from geosurge_index.errors import FormatError, UserError
from geosurge_index.images import class_map_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from geosurge_index.synthetic import random_index

    return random_index(tmp_path_factory.mktemp("idx") / "index", n_points=1500, place_names=True)


@pytest.fixture(scope="module")
def locator(index_dir):
    return locate.Locator.open(index_dir, device="cpu", top_k=3)


def read_preds(out: Path) -> pa.Table:
    return pq.read_table(sorted(out.glob("part-*.parquet")))


# -- the ledger and the writer -----------------------------------------------------------------


def _config(**kw) -> pred_store.RunConfig:
    base = dict(inputs=["/x"], n_inputs=10, fingerprint="f", chunk_size=4, index_dir="/i", index_id="a",
                settings={"top_k": 5})
    base.update(kw)
    return pred_store.RunConfig(**base)


def _rows(ids) -> pa.Table:
    return pa.table({"id": pa.array([str(i) for i in ids]), "error": pa.nulls(len(ids), pa.string())})


def test_ledger_resumes_and_refuses_other_runs(tmp_path):
    store = pred_store.PredStore(tmp_path / "out")
    cfg = _config()
    assert cfg.n_chunks == 3
    assert store.begin(cfg) == set()
    store.write_chunk(1, _rows([4, 5, 6, 7]))
    (tmp_path / "out" / ".part-00002.parquet.tmp-123").write_bytes(b"half a shard")
    (tmp_path / "out" / "._summary.json.tmp-123").write_bytes(b"{")
    assert store.begin(cfg) == {1}
    assert not list((tmp_path / "out").glob(".*"))  # the killed run's temporaries are gone
    with pytest.raises(UserError, match=r"settings.top_k: was 5, now 7"):
        store.begin(_config(settings={"top_k": 7}))
    with pytest.raises(UserError, match="inputs' ids, paths or tar contents changed"):
        store.begin(_config(fingerprint="g"))
    with pytest.raises(UserError, match="n_inputs"):
        store.begin(_config(n_inputs=11, fingerprint="g"))
    run = pred_store.read_run(tmp_path / "out")
    run["format_version"] = 99
    pred_store.write_run(tmp_path / "out", run)
    with pytest.raises(FormatError, match="upgrade"):
        store.begin(cfg)
    # shards without a ledger: not a run folder
    stray = pred_store.PredStore(tmp_path / "stray")
    (tmp_path / "stray").mkdir()
    pq.write_table(_rows([1]), tmp_path / "stray" / "part-00000.parquet")
    with pytest.raises(UserError, match="no _run.json"):
        stray.begin(cfg)


def test_one_writer_per_pred_dir(tmp_path):
    first = pred_store.PredStore(tmp_path / "out")
    assert first.begin(_config()) == set()
    with pytest.raises(UserError, match="another running"):
        pred_store.PredStore(tmp_path / "out").begin(_config())
    first.release()  # as when the first run ends, or the kernel when its process dies
    assert pred_store.PredStore(tmp_path / "out").begin(_config()) == set()


def test_chunk_assembler_writes_whole_chunks_in_row_order(tmp_path):
    store = pred_store.PredStore(tmp_path)
    cfg = _config()
    store.begin(cfg)
    asm = locate.ChunkAssembler(store, cfg)
    # rows arrive out of order and across chunk boundaries
    assert asm.add(np.array([9, 1, 0]), _rows([9, 1, 0])) == 0
    assert asm.add(np.array([8, 3, 2]), _rows([8, 3, 2])) == 2  # chunk 0 (0..3) and chunk 2 (8, 9)
    assert store.done_chunks() == {0, 2}
    assert pq.read_table(tmp_path / "part-00000.parquet").column("id").to_pylist() == ["0", "1", "2", "3"]
    assert asm.pending == 0
    with pytest.raises(RuntimeError, match="duplicates or gaps"):
        asm.add(np.array([4, 4, 5, 6]), _rows([4, 4, 5, 6]))


def test_batches_never_span_chunks():
    rows = np.concatenate([np.arange(0, 10), np.arange(20, 25)])
    batches = locate.batches_of(rows, batch_size=4, chunk_size=10)
    assert np.array_equal(np.concatenate(batches), rows)
    assert all(len(set(b // 10)) == 1 and len(b) <= 4 for b in batches)


# -- the encoder stage ---------------------------------------------------------------------------


def test_device_normalisation_matches_preprocess(locator):
    """uint8 pixels normalised in `Predictor.encode` == CLIP normalisation in float64 on the CPU."""
    import torch

    from geosurge_index.geometry import CLIP_MEAN, CLIP_STD
    from geosurge_index.images import Preprocess

    img = photo(120, 90, seed=3)
    s = locator.image_size
    pre = Preprocess(s)
    ref64 = (np.asarray(pre.resize_crop(img), np.float64) / 255 - CLIP_MEAN) / CLIP_STD
    ref = torch.from_numpy(ref64.transpose(2, 0, 1).astype(np.float32))[None]
    cmap = torch.full((1, s, s), 4, dtype=torch.int64)
    with torch.inference_mode():
        want = locator.predictor.encoder(ref, cmap).numpy()
    u8 = torch.from_numpy(np.array(pre.resize_crop(img), dtype=np.uint8))[None]
    got = locator.predictor.encode(u8, cmap.to(torch.uint8), np.array([True]))
    np.testing.assert_allclose(got, want, atol=1e-5)


# -- the Locator API -------------------------------------------------------------------------------


def test_locator_takes_paths_bytes_and_pil_and_reports_errors(locator, tmp_path):
    good = good_images()
    p = tmp_path / "rotated.jpg"
    p.write_bytes(good["rotated.jpg"])
    inputs = [p, good["cmyk.jpg"], Image.open(tmp_path / "rotated.jpg"), bad_images()["text.jpg"][0], b""]
    preds = locator.locate(inputs)
    assert [x.ok for x in preds] == [True, True, True, False, False]
    assert preds[3].error.startswith("not_an_image:") and preds[4].error.startswith("zero_bytes:")
    assert preds[0].id == str(p) and preds[1].id is None
    assert (preds[0].width, preds[0].height) == (72, 96)  # EXIF orientation applied
    assert (preds[2].width, preds[2].height) == (72, 96)  # a PIL image's EXIF too
    tree = locator.index.tree
    for x in preds[:3]:
        assert -90 <= x.lat <= 90 and -180 <= x.lon <= 180
        assert [c.level for c in x.cells] == list(range(1, 8))
        for lv in range(1, 7):  # the cells form one path down the tree
            assert tree.parents[lv][x.cells[lv].cell_index] == x.cells[lv - 1].cell_index
        assert all(0 < c.probability <= 1 for c in x.cells)
        assert len(x.alternatives) == 3 and x.alternatives[0].cell_index == x.cells[-1].cell_index
        probs = [a.probability for a in x.alternatives]
        assert probs == sorted(probs, reverse=True) and x.probability == pytest.approx(probs[0])
        assert x.cells[-1].s2_token == tree.tokens[6][x.cells[-1].cell_index].as_py()
        assert x.country_code is None or len(x.country_code) == 2
        assert x.town  # the nearest town always exists
    assert locator.locate([p], top_k=5)[0].alternatives.__len__() == 5


def test_locator_computes_cell_probabilities_only_when_asked(locator, monkeypatch):
    img = Image.new("RGB", (64, 48), (40, 120, 200))
    calls = []
    real = locator.index.engine.level_probabilities
    monkeypatch.setattr(locator.index.engine, "level_probabilities",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    lean = locator.locate([img], cell_probabilities=False)[0]
    assert calls == [] and [c.probability for c in lean.cells] == [None] * 7
    full = locator.locate([img])[0]
    assert calls == [1] and all(0 < c.probability <= 1 for c in full.cells)
    assert [c.cell_index for c in lean.cells] == [c.cell_index for c in full.cells]
    assert (lean.lat, lean.lon, lean.probability) == (full.lat, full.lon, full.probability)


def test_locator_uses_class_map_beside_the_image(locator, tmp_path, monkeypatch):
    """A precomputed class map replaces the segmenter; the segmenter runs once per other image."""
    import torch

    from geosurge_index.images import Preprocess, load_class_map

    encoder = locator.predictor.encoder
    calls = []
    real_segment = encoder.segment
    monkeypatch.setattr(encoder, "segment", lambda px: calls.append(px.shape[0]) or real_segment(px))
    img = photo(80, 80, seed=12)
    p = tmp_path / "x.png"
    img.save(p)
    (tmp_path / "x.classmap.png").write_bytes(class_map_png(40))
    with_map = locator.locate([p], return_embeddings=True)[0].embedding
    assert calls == []
    locator.locate([p.read_bytes(), p, encode(photo(), "PNG")])
    assert calls == [2]  # one segmenter call for the two images without a map
    s = locator.image_size
    u8 = torch.from_numpy(np.array(Preprocess(s).resize_crop(img.convert("RGB")), dtype=np.uint8))[None]
    cmap = torch.from_numpy(load_class_map(tmp_path / "x.classmap.png", s).astype(np.uint8))[None]
    want = locator.predictor.encode(u8, cmap, np.array([True]))[0]
    np.testing.assert_allclose(with_map, want, atol=1e-5)


def test_locator_from_a_worker_thread(locator):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("p", locator.locate([encode(photo(), "PNG")] * 3)))
    t.start()
    t.join(60)
    assert len(out["p"]) == 3 and all(p.ok for p in out["p"])
    assert len({(p.lat, p.lon) for p in out["p"]}) == 1  # the same image, the same answer


# -- the bulk job ----------------------------------------------------------------------------------


def test_bulk_run_every_input_once_readable_everywhere(index_dir, locator, tmp_path):
    expected = write_folder(tmp_path / "imgs", n_extra=3)
    large = tmp_path / "imgs" / "large.jpg"  # decoded by DCT scaling (draft): its true size is reported
    large.write_bytes(encode(photo(640, 480, seed=4), "JPEG"))
    expected[str(large)] = None
    keys = write_tar(tmp_path / "shard-a.tar", 5, with_class_maps=True, bad_key=2)
    (tmp_path / "m.csv").write_text("id,path\nm1,imgs/a.jpg\nm2,imgs/does-not-exist.jpg\n")
    out = tmp_path / "preds"
    argv = ["locate", str(index_dir), str(tmp_path / "imgs"), str(tmp_path / "shard-a.tar"),
            str(tmp_path / "m.csv"), "--out", str(out), "--chunk-size", "4", "--batch-size", "3",
            "--workers", "2", "--device", "cpu", "--top-k", "4", "--save-embeddings"]
    assert cli_main(argv) == 0
    t = read_preds(out)
    n = len(expected) + len(keys) + 2
    assert t.num_rows == n and len(set(t.column("id").to_pylist())) == n
    assert len(list(out.glob("part-*.parquet"))) == -(-n // 4)
    rows = {r["id"]: r for r in t.to_pylist()}
    for path, kind in expected.items():
        err = rows[path]["error"]
        assert (err is None) if kind is None else err.startswith(kind + ":"), (path, err)
    assert rows["m2"]["error"].startswith("unreadable:")
    assert rows[keys[2]]["error"].startswith("not_an_image:")
    ok = [r for r in rows.values() if r["error"] is None]
    assert all(r["lat"] is not None and len(r["topk_cells"]) == 4 and len(r["embedding"]) == 768 and
               r["token_l7"] and r["cell_l7"] == r["topk_cells"][0] for r in ok)
    bad = [r for r in rows.values() if r["error"] is not None]
    assert all(r["lat"] is None and r["cell_l1"] is None and r["embedding"] is None for r in bad)
    assert rows[str(tmp_path / "imgs" / "sub" / "rotated.jpg")]["width"] == 72
    assert (rows[str(large)]["width"], rows[str(large)]["height"]) == (640, 480)
    # the same image through the Locator API gives the same answer
    direct = locator.locate([tmp_path / "imgs" / "a.jpg"])[0]
    assert rows["m1"]["lat"] == pytest.approx(direct.lat) and rows["m1"]["cell_l7"] == direct.cells[-1].cell_index
    summary = pred_store.read_summary(out)
    assert summary["images"] == n and summary["errors"] == len(bad) and summary["complete"]
    assert summary["errors_by_kind"]["not_an_image"] == 2

    # readable by DuckDB, pandas and polars
    import duckdb
    import pandas as pd
    import polars as pl

    glob = str(out / "*.parquet")
    assert duckdb.sql(f"SELECT count(*), count(error) FROM read_parquet('{glob}')").fetchall() == [(n, len(bad))]
    assert len(pd.read_parquet(out)) == n
    assert pl.read_parquet(glob).height == n
    assert pl.scan_parquet(out).collect().height == n  # the folder itself: only Parquet under it

    # a second run of the same command has nothing left to do and changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert cli_main(argv) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    # other inputs or settings are refused, before any work
    (tmp_path / "imgs" / "new.jpg").write_bytes(encode(photo(), "JPEG"))
    assert cli_main(argv) == 2
    argv[argv.index("--top-k") + 1] = "3"
    assert cli_main(argv) == 2


def test_bad_manifest_is_refused_before_any_work(index_dir, tmp_path, capsys):
    (tmp_path / "m.csv").write_text("file,id\na.jpg,1\n")
    out = tmp_path / "preds"
    assert cli_main(["locate", str(index_dir), str(tmp_path / "m.csv"), "--out", str(out)]) == 2
    assert "no 'path' column" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "d.csv").write_text("path,id\na.jpg,1\nb.jpg,1\n")
    assert cli_main(["locate", str(index_dir), str(tmp_path / "d.csv"), "--out", str(out)]) == 2
    assert "duplicate ids" in capsys.readouterr().err


def test_gzipped_manifest_and_single_image_are_located(index_dir, tmp_path):
    """`geosurge locate` reads what training reads (`sources.input_kind`): a .csv.gz manifest."""
    import gzip

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(encode(photo(seed=1), "JPEG"))
    (tmp_path / "b.png").write_bytes(encode(photo(seed=2), "PNG"))
    with gzip.open(tmp_path / "m.csv.gz", "wt") as f:
        f.write("id,path\nm1,imgs/a.jpg\n")
    out = tmp_path / "preds"
    argv = ["locate", str(index_dir), str(tmp_path / "m.csv.gz"), str(tmp_path / "b.png"), "--out", str(out),
            "--workers", "0", "--device", "cpu"]
    assert cli_main(argv) == 0
    rows = {r["id"]: r for r in read_preds(out).to_pylist()}
    assert set(rows) == {"m1", str(tmp_path / "b.png")}
    assert all(r["error"] is None and r["lat"] is not None for r in rows.values())


def test_killed_run_resumes_without_duplicates_or_gaps(index_dir, tmp_path):
    """A real kill -9 in the middle of a run, then the same command again."""
    folder = tmp_path / "many"
    folder.mkdir()
    big = encode(photo(1024, 768, seed=1), "JPEG", quality=95)  # full-size decode: slow enough to kill
    n, chunk = 160, 8
    for i in range(n):
        (folder / f"{i:04d}.jpg").write_bytes(big)
    out = tmp_path / "preds"
    cmd = [sys.executable, "-c", "import sys; from geosurge_index.cli import main; sys.exit(main())", "locate", str(index_dir), str(folder), "--out", str(out),
           "--chunk-size", str(chunk), "--batch-size", str(chunk), "--workers", "0", "--draft-size", "0",
           "--device", "cpu"]
    env = dict(os.environ, GEOSURGE_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(out.glob("part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done_at_kill = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 0 < len(done_at_kill) < n // chunk, "the kill was meant to land mid-run"
    assert pred_store.read_summary(out) is None

    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "chunks were already done" in res.stderr
    shards = sorted(out.glob("part-*.parquet"))
    assert [p.name for p in shards] == [f"part-{c:05d}.parquet" for c in range(n // chunk)]
    for name, mtime in done_at_kill.items():  # finished shards were kept, not recomputed
        assert (out / name).stat().st_mtime_ns == mtime
    t = read_preds(out)
    ids = t.column("id").to_pylist()
    assert ids == sorted(str(p) for p in folder.iterdir())  # every input once, in input order
    assert t.column("error").null_count == n
    assert not list(out.glob(".*tmp*"))
    assert pred_store.read_summary(out)["this_run"]["resumed_chunks"] == len(done_at_kill)
    shutil.rmtree(folder)


# -- test-time ten-crop ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locator10(index_dir):
    return locate.Locator.open(index_dir, device="cpu", top_k=3, ten_crop=True)


def _ten_crop_reference(locator, img: Image.Image, class_map: Image.Image | None) -> np.ndarray:
    """The definition: the L2-normalised mean of the encoder's embeddings of the 10 crops."""
    import torch

    from geosurge_index.geometry import clip_normalise
    from geosurge_index.images import Preprocess
    from geosurge_index.model import ten_crop_class_maps

    s = locator.image_size
    crops = clip_normalise(Preprocess(s).ten_crop_pixels(img))
    maps = None if class_map is None else torch.from_numpy(ten_crop_class_maps(class_map, s))
    with torch.inference_mode():
        each = locator.predictor.encoder(crops, maps)
    assert each.shape == (10, 768)
    return torch.nn.functional.normalize(each.mean(0), dim=0).numpy()


def test_ten_crop_is_the_normalised_mean_over_the_crops(locator, locator10, tmp_path):
    img = photo(120, 80, seed=21)
    p = tmp_path / "x.png"
    img.save(p)
    other = encode(photo(90, 100, seed=22), "PNG")
    ten = locator10.locate([p, other], return_embeddings=True)  # no class map: the segmenter runs per crop
    np.testing.assert_allclose(ten[0].embedding, _ten_crop_reference(locator10, img, None), atol=1e-5)
    other_img = Image.open(io.BytesIO(other)).convert("RGB")
    np.testing.assert_allclose(ten[1].embedding, _ten_crop_reference(locator10, other_img, None), atol=1e-5)
    one = locator.locate([p], return_embeddings=True)[0]
    assert np.linalg.norm(np.subtract(ten[0].embedding, one.embedding)) > 1e-3  # it changes the embedding
    assert np.linalg.norm(ten[0].embedding) == pytest.approx(1.0, abs=1e-5)
    assert (ten[0].width, ten[0].height) == (120, 80) and len(ten[0].alternatives) == 3

    # with a precomputed class map, cut with the same ten boxes (mixed in one batch with an image without)
    cmap = Image.fromarray(np.random.default_rng(0).integers(0, 150, (80, 120), dtype=np.uint8), "L")
    cmap.save(class_map_path(p))
    mixed = locator10.locate([other, p], return_embeddings=True)
    np.testing.assert_allclose(mixed[1].embedding, _ten_crop_reference(locator10, img, cmap), atol=1e-5)
    np.testing.assert_allclose(mixed[0].embedding, ten[1].embedding, atol=1e-5)


def test_bulk_ten_crop_is_recorded_and_matches_the_locator(index_dir, locator10, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(encode(photo(100, 75, seed=30 + i), "JPEG"))
    (folder / "bad.jpg").write_bytes(b"")
    out = tmp_path / "preds"
    argv = ["locate", str(index_dir), str(folder), "--out", str(out), "--workers", "0", "--device", "cpu",
            "--top-k", "3", "--save-embeddings", "--ten-crop", "--chunk-size", "2"]
    assert cli_main(argv) == 0
    run = pred_store.read_run(out)
    assert run["settings"]["ten_crop"] is True
    rows = {r["id"]: r for r in read_preds(out).to_pylist()}
    assert rows[str(folder / "bad.jpg")]["error"].startswith("zero_bytes:")
    direct = locator10.locate(sorted(folder.glob("[0-9].jpg")), return_embeddings=True)
    for d in direct:
        np.testing.assert_allclose(rows[d.id]["embedding"], d.embedding, atol=1e-5)
        assert rows[d.id]["cell_l7"] == d.cells[-1].cell_index
    # a rerun without --ten-crop would mix settings: refused, naming it
    argv.remove("--ten-crop")
    capsys.readouterr()
    assert cli_main(argv) == 2
    assert "settings.ten_crop" in capsys.readouterr().err


def test_odd_paths_become_error_rows_or_skip_the_class_map(tmp_path):
    """A worker must never raise: a NUL in a manifest path is an error row; an image whose name is
    too long for a `.classmap.png` sibling is decoded without one."""
    spec = locate.DecodeSpec(32, 32)
    bad = locate.decode_input_row("/tmp/a\0b.jpg", -1, -1, -1, -1, spec)
    assert bad.pixels is None and bad.error.startswith("unreadable:")
    long = tmp_path / ("x" * 245 + ".jpg")
    long.write_bytes(good_images()["a.jpg"])
    ok = locate.decode_input_row(str(long), -1, -1, -1, -1, spec)
    assert ok.error is None and ok.pixels.shape == (32, 32, 3) and ok.class_map is None
    broken = tmp_path / "b.jpg"  # an unreadable class map fails its image, as an error row
    broken.write_bytes(good_images()["a.jpg"])
    class_map_path(broken).write_bytes(b"not a png")
    assert locate.decode_input_row(str(broken), -1, -1, -1, -1, spec).error.startswith("decode_failed:")


def test_geosurge_locate_says_once_that_the_segmenter_is_untrained(index_dir, tmp_path, capsys):
    from geosurge_index.cli import main as cli_main
    from geosurge_index.locate.locator import segmenter_warning

    assert segmenter_warning(index_dir)  # random_index: a config-built segmenter, never trained
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (40, 30), (90, 140, 60)).save(src / "a.jpg")
    code = cli_main(["locate", str(index_dir), str(src), "--out", str(tmp_path / "out"), "--workers", "0",
                     "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0 and err.count("untrained segmenter") == 1
