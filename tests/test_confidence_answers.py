"""Confidence in every answer (issue 16): an index without a calibration says so everywhere; after
`geosurge calibrate` the index carries a checksummed calibration.json, and the confidence and the
radii of one photo are identical in the bulk Parquet rows, the Python API and the HTTP answer."""

from __future__ import annotations

import csv
import json

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from _service_fixtures import class_map_png, jpeg

from geosurge_index.calibration import WITHIN_COLUMNS
from geosurge_index.cli import main as cli_main
from geosurge_index.errors import FormatError

N_PHOTOS = 40


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A real exported index and N_PHOTOS photos (with class maps) whose truth lies in its cells."""
    from geosurge_index.index import IndexCells
    from geosurge_index.synthetic import random_index

    root = tmp_path_factory.mktemp("conf")
    index_dir = random_index(root / "index", n_points=1500)
    with IndexCells.open(index_dir) as cells:
        finest = cells.table(7)
    rng = np.random.default_rng(0)
    pick = rng.integers(0, finest.num_rows, N_PHOTOS)
    lat = finest["mean_lat"].to_numpy()[pick]
    lon = finest["mean_lon"].to_numpy()[pick]
    photos = root / "photos"
    photos.mkdir()
    with open(root / "truth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "lat", "lon"])
        for i in range(N_PHOTOS):
            (photos / f"p{i:02d}.jpg").write_bytes(jpeg(100 + i, 96, 72))
            (photos / f"p{i:02d}.classmap.png").write_bytes(class_map_png(96, 72, seed=i))
            w.writerow([f"p{i:02d}", str(photos / f"p{i:02d}.jpg"), lat[i], lon[i]])
    return index_dir, root


def _bulk(index_dir, root, out) -> dict:
    assert cli_main(["locate", str(index_dir), str(root / "truth.csv"), "--out", str(out), "--workers", "0",
                     "--device", "cpu", "--batch-size", str(N_PHOTOS)]) == 0
    t = pq.read_table(sorted(out.glob("part-*.parquet")))
    return {r["id"]: r for r in t.to_pylist()}


def test_an_uncalibrated_index_says_so_everywhere(world, tmp_path):
    from geosurge_index.locate import Locator
    from geosurge_index.service.state import manifest_summary, prediction_json

    index_dir, root = world
    rows = _bulk(index_dir, root, tmp_path / "preds")
    r = rows["p00"]
    assert r["calibrated"] is False
    assert r["confidence"] == pytest.approx(r["probability"])  # the model's own probability
    assert 0 < r["r50_km"] <= r["r90_km"] and len(r["level_confidence"]) == 7
    assert all(a >= b - 1e-6 for a, b in zip(r["level_confidence"], r["level_confidence"][1:], strict=False))
    with Locator.open(index_dir, device="cpu") as loc:
        pred = loc.locate([root / "photos" / "p00.jpg"])[0]
    # one image here, a batch of 40 in bulk: the encoder's float sums differ in the last digits
    assert pred.calibrated is False and pred.confidence == pytest.approx(r["confidence"], rel=1e-4)
    summary = manifest_summary(index_dir)
    assert summary["calibration"]["calibrated"] is False and "uncalibrated" in summary["calibration"]["note"]
    assert prediction_json(pred, _Decoded(), top_k=5, include_cells=True)["calibrated"] is False


class _Decoded:
    name, width, height = "p00.jpg", 96, 72


@pytest.fixture(scope="module")
def calibrated(world, tmp_path_factory):
    """The index copied and calibrated on the photos with `geosurge calibrate`."""
    import shutil

    index_dir, root = world
    cal_dir = tmp_path_factory.mktemp("cal") / "index"
    shutil.copytree(index_dir, cal_dir)
    report = cal_dir.parent / "report.json"
    assert cli_main(["calibrate", str(cal_dir), "--truth", str(root / "truth.csv"), "--workers", "0",
                     "--device", "cpu", "--json", str(report)]) == 0
    return cal_dir, json.loads(report.read_text())


def test_calibrate_writes_a_listed_checksummed_calibration(calibrated):
    from geosurge_index.calibration import Calibration
    from geosurge_index.index import GeoIndex, read_manifest

    cal_dir, report = calibrated
    manifest = read_manifest(cal_dir)
    assert "calibration.json" in manifest["files"] and manifest["calibration"]["calibrated"] is True
    cal = Calibration.read(cal_dir / "calibration.json")
    assert len(cal.levels) == 7 and cal.meta["n"] == N_PHOTOS == report["n"]
    assert set(report["radius_scale"]) == {"50", "90"}
    assert cli_main(["verify", str(cal_dir)]) == 0
    # a calibration changed after the fact is refused like any other index file
    path = cal_dir / "calibration.json"
    original = path.read_bytes()
    try:
        path.write_bytes(original.replace(b'"top_k": 10', b'"top_k": 11'))
        with pytest.raises(FormatError, match="calibration.json"):
            GeoIndex.open(cal_dir, device="cpu")
    finally:
        path.write_bytes(original)


def test_the_same_photo_has_the_same_confidence_in_bulk_api_and_http(calibrated, world, tmp_path):
    from geosurge_index.locate import Locator
    from geosurge_index.service.app import create_app
    from geosurge_index.service.runner import ServerThread
    from geosurge_index.settings import ServiceSettings

    cal_dir, _ = calibrated
    _, root = world
    rows = _bulk(cal_dir, root, tmp_path / "preds")
    names = [f"p{i:02d}" for i in range(N_PHOTOS)]
    paths = [root / "photos" / f"{n}.jpg" for n in names]
    locator = Locator.open(cal_dir, device="cpu")
    api = locator.locate(paths)
    app = create_app(ServiceSettings(index_dir=cal_dir, max_batch_size=64, max_images_per_request=2 * N_PHOTOS), locator)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        files = [("images", (f"{n}.jpg", p.read_bytes(), "image/jpeg")) for n, p in zip(names, paths, strict=True)]
        files += [("class_maps", (f"{n}.classmap.png", (root / "photos" / f"{n}.classmap.png").read_bytes(),
                                  "image/png")) for n in names]
        resp = c.post("/v1/locate", files=files)
        assert resp.status_code == 200, resp.text
        http = resp.json()["results"]
        index_info = c.get("/v1/index").json()
    locator.close()
    assert index_info["calibration"]["calibrated"] is True
    for name, pred, ans in zip(names, api, http, strict=True):
        row = rows[name]
        assert row["calibrated"] is True and pred.calibrated is True and ans["calibrated"] is True
        assert pred.confidence == row["confidence"] == ans["confidence"], name
        assert pred.r50_km == row["r50_km"] == ans["r50_km"] and pred.r90_km == row["r90_km"] == ans["r90_km"]
        assert [c.confidence for c in pred.cells] == row["level_confidence"] == [c["confidence"] for c in ans["cells"]]
        assert pred.cells[-1].confidence == pred.confidence == pytest.approx(row["level_confidence"][-1])
        assert 0 <= row["confidence"] <= 1 and 0 < row["r50_km"] <= row["r90_km"]
        within = [row[k] for k in WITHIN_COLUMNS]  # P(within 1 .. 2500 km): the same three ways
        assert within == [getattr(pred, k) for k in WITHIN_COLUMNS] == [ans[k] for k in WITHIN_COLUMNS], name
        assert all(0 <= a <= b <= 1 for a, b in zip(within, within[1:], strict=False)), name


def test_eval_reports_ece_coverage_and_the_selective_curve(calibrated, world, tmp_path):
    cal_dir, _ = calibrated
    _, root = world
    _bulk(cal_dir, root, tmp_path / "preds")
    out, png = tmp_path / "eval.json", tmp_path / "conf.png"
    assert cli_main(["eval", str(tmp_path / "preds"), "--truth", str(root / "truth.csv"), "--index", str(cal_dir),
                     "--json", str(out), "--plot", str(png)]) == 0
    conf = json.loads(out.read_text())["confidence"]
    assert conf["calibrated"] is True and conf["n"] == N_PHOTOS and 0 <= conf["ece"] <= 1
    assert 0 <= conf["r50_coverage"] <= conf["r90_coverage"] <= 1
    assert set(conf["selective_accuracy_pct"]) == {"1", "25", "200", "750", "2500"}
    assert all(len(v) == 10 for v in conf["selective_accuracy_pct"].values())
    assert len(conf["ece_per_level"]) == 7 and png.read_bytes()[:4] == b"\x89PNG"
    assert conf["selective_ranking"] == "p_within" and set(conf["within_ece"]) == set(conf["selective_accuracy_pct"])
