"""Benchmark readers, id matching, `geosurge eval` and `geosurge coverage` on a small real index."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _eval_fixtures import world  # noqa: F401  (the shared fixture)
from geopy.distance import great_circle

from geosurge_index.benchmarks import match_ids, read_truth, truth_table
from geosurge_index.cli import main
from geosurge_index.errors import UserError
from geosurge_index.evaluation import evaluate_predictions
from geosurge_index.metrics import EARTH_RADIUS_KM, THRESHOLDS_KM

DATA = Path(__file__).parent / "data"


# --- readers ------------------------------------------------------------------------------------

def test_read_im2gps3k_format():
    t = read_truth(DATA / "im2gps3k_head40.csv")
    assert len(t) == 40 and t.id_column == "IMG_ID"
    assert t.ids[0] == "1000269685_e60e9cdfb4_1125_78841376@N00.jpg"
    assert (t.lat[0], t.lon[0]) == (32.325436, -64.764404)


def test_read_yfcc4k_format_lon_before_lat():
    t = read_truth(DATA / "yfcc4k_head40.csv")
    assert len(t) == 40 and t.id_column == "name" and (t.lat_column, t.lon_column) == ("lat", "lon")
    assert t.ids[0] == "10201275523.jpg"
    assert (t.lat[0], t.lon[0]) == (43.649708, -79.365637)  # Toronto, not a point in Antarctica


def test_read_yfcc26k_format_path_ids():
    t = read_truth(DATA / "yfcc26k_head40.csv")
    assert t.ids[0] == "45/77/3228511372.jpg" and t.lat[0] == pytest.approx(46.778991)


def test_read_truth_errors(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("lat,lon\n1,2\n")
    with pytest.raises(UserError, match="no id column"):
        read_truth(p)
    p.write_text("id,lat,lon\na,95,2\n")
    with pytest.raises(UserError, match="latitude 95"):
        read_truth(p)
    assert len(read_truth(p, skip_invalid=True)) == 0
    with pytest.raises(UserError, match="no such file"):
        read_truth(tmp_path / "nope.csv")


# --- matching -----------------------------------------------------------------------------------

def test_match_ids_exact_suffix_and_extension():
    truth = ["a.jpg", "45/77/123.jpg", "x/b.png", "c.jpg", "lost.jpg"]
    pred_ids = ["zzz", "c.jpg", "run/45/77/123.jpg", "b", "other/a.jpg"]
    paths = [None, "/p/c.jpg", "/data/run/45/77/123.jpg", "/imgs/x/b.jpeg", "/q/a.jpg"]
    rows = match_ids(truth, pred_ids, paths)
    assert rows.tolist() == [4, 2, 3, 1, -1]


def test_match_ids_refuses_ambiguous_keys():
    # two truth ids end with the same file name: a bare 'img.jpg' prediction matches neither
    rows = match_ids(["a/img.jpg", "b/img.jpg"], ["img.jpg"])
    assert rows.tolist() == [-1, -1]
    rows = match_ids(["a/img.jpg", "b/img.jpg"], ["x/b/img.jpg", "y/a/img.jpg"])
    assert rows.tolist() == [1, 0]


def test_truth_table_joins_on_prediction_ids():
    t = read_truth(DATA / "im2gps3k_head40.csv")
    pred_ids = [f"run/{i}" for i in t.ids[:5]]
    table = truth_table(t, pred_ids, None, np.full((len(t), 2), -1))
    assert table.column("id").to_pylist()[:6] == pred_ids + [t.ids[5]]
    assert table.column("truth_id").to_pylist() == list(t.ids)
    assert table.column("true_cell_l2").null_count == len(t)


# --- eval ---------------------------------------------------------------------------------------

def _independent(world):  # noqa: F811
    """Distances computed without our code: geopy, on rows joined by the known id scheme."""
    rows = {}
    for shard in sorted(world.pred_dir.glob("part-*.parquet")):
        for r in pq.read_table(shard).to_pylist():
            rows[r["id"]] = r
    km, preds = [], []
    for i, a, b in zip(world.ids, world.lat, world.lon, strict=True):
        r = rows.get(f"photos/{i}")
        preds.append(r)
        ok = r is not None and r["lat"] is not None
        km.append(great_circle((r["lat"], r["lon"]), (a, b), radius=EARTH_RADIUS_KM).km if ok else np.inf)
    return np.array(km), preds


def test_eval_matches_geopy(world):  # noqa: F811
    from geosurge_index.cells import assign_points
    from geosurge_index.sql import index_cells

    km, preds = _independent(world)
    truth = read_truth(world.truth_csv)
    r = evaluate_predictions(world.pred_dir, truth, world.index_dir)
    assert (r.n_truth, r.n_missing, r.n_errors, r.n_predictions) == (300, world.n_missing, world.n_errors, 288)
    for t in THRESHOLDS_KM:
        assert r.accuracy_pct[t] == pytest.approx(100 * np.mean(km <= t))
    assert r.median_km == pytest.approx(np.median(km))
    assert r.geoguessr == pytest.approx(np.mean(np.where(np.isfinite(km), 5000 * np.exp(-km / 1492.7), 0)))
    assert 0 < r.accuracy_pct[25.0] < 100  # the fixture is neither perfect nor hopeless
    # per-level cell accuracy: the index's cells holding the true point vs the predicted ones
    true_cells = assign_points(index_cells(world.index_dir), world.lat, world.lon)
    for lv in range(1, 8):
        same = [p is not None and p["lat"] is not None and p[f"cell_l{lv}"] == tc and tc >= 0
                for p, tc in zip(preds, true_cells[:, lv - 1], strict=True)]
        assert r.cell_accuracy_pct[lv] == pytest.approx(100 * np.mean(same))
    assert r.cell_accuracy_pct[1] > r.cell_accuracy_pct[7] > 0


def test_eval_skip_missing(world):  # noqa: F811
    km, _ = _independent(world)
    truth = read_truth(world.truth_csv)
    r = evaluate_predictions(world.pred_dir, truth, skip_missing=True)
    assert r.n_evaluated == 300 - world.n_missing and r.n_missing == 0 and r.n_errors == world.n_errors
    assert r.accuracy_pct[200.0] == pytest.approx(100 * np.mean(km[:-world.n_missing] <= 200))
    assert r.cell_accuracy_pct == {}  # no index given


def test_eval_same_with_yfcc4k_column_order(world, tmp_path):  # noqa: F811
    # the same truth written as YFCC4k writes it: id in `name`, `lon` before `lat`
    p = tmp_path / "as_yfcc4k.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["RecordNumber", "name", "Title", "lon", "lat", "Accuracy"])
        for k, (i, a, b) in enumerate(zip(world.ids, world.lat, world.lon, strict=True)):
            w.writerow([k, i, "a, title", f"{b:.6f}", f"{a:.6f}", 16])
    a = evaluate_predictions(world.pred_dir, read_truth(p))
    b = evaluate_predictions(world.pred_dir, read_truth(world.truth_csv))
    assert a.to_dict() == b.to_dict()


def test_eval_cli_table_and_json(world, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval.json"
    code = main(["eval", str(world.pred_dir), "--truth", str(world.truth_csv),
                 "--index", str(world.index_dir), "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "% within 25 km (city)" in printed and "% correct cell, level 7" in printed
    data = json.loads(out.read_text())
    expect = evaluate_predictions(world.pred_dir, read_truth(world.truth_csv), world.index_dir).to_dict()
    for key in ("accuracy_pct", "median_km", "geoguessr", "cell_accuracy_pct", "n_missing", "n_errors"):
        assert data[key] == expect[key]


def test_eval_cli_bad_inputs(world, tmp_path, capsys):  # noqa: F811
    assert main(["eval", str(tmp_path), "--truth", str(world.truth_csv)]) == 2
    assert "no part-*.parquet shards" in capsys.readouterr().err
    assert main(["eval", str(world.pred_dir), "--truth", str(tmp_path / "none.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", str(world.pred_dir), "--truth", str(world.truth_csv), "--index", str(tmp_path)]) == 2
    assert "cells.duckdb" in capsys.readouterr().err
    missing = tmp_path / "no" / "out.json"  # a missing output folder: a clear error, no traceback
    for argv in (["eval", str(world.pred_dir), "--truth", str(world.truth_csv), "--json", str(missing)],
                 ["coverage", str(world.cells_dir), "--truth", str(world.truth_csv), "--json", str(missing)],
                 ["map", "predictions", str(world.pred_dir), "--output", str(missing)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "does not exist" in err and "Traceback" not in err


def _webdataset_shard(path: Path, samples: list[tuple[str, bytes]]) -> Path:
    """An img2dataset / webdataset TarWriter-like shard: KEY.jpg + KEY.json per sample."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, meta in samples:
            for name, blob in ((f"{key}.jpg", b"\xff\xd8 not decoded here"), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return path


def test_eval_truth_from_webdataset_shard(world, tmp_path, capsys):  # noqa: F811
    """`eval --truth SHARD.tar`: the lat/lon in each sample's JSON are the truth, the sample key the
    id (as `geosurge locate SHARD.tar` names predictions); the same figures as the CSV truth."""
    samples = [(f"photos/{i.rsplit('.', 1)[0]}", json.dumps({"caption": "x", "lat": round(float(a), 6), "LON": round(float(b), 6)}).encode())
               for i, a, b in zip(world.ids, world.lat, world.lon, strict=True)]
    shard = _webdataset_shard(tmp_path / "shard-00000.tar", samples)
    truth = read_truth(shard)
    assert len(truth) == 300 and truth.ids[0] == samples[0][0] and truth.lat[0] == round(world.lat[0], 6)
    out_tar, out_csv = tmp_path / "tar.json", tmp_path / "csv.json"
    assert main(["eval", str(world.pred_dir), "--truth", str(shard), "--json", str(out_tar)]) == 0
    assert main(["eval", str(world.pred_dir), "--truth", str(world.truth_csv), "--json", str(out_csv)]) == 0
    a, b = json.loads(out_tar.read_text()), json.loads(out_csv.read_text())
    for key in ("accuracy_pct", "median_km", "geoguessr", "n_truth", "n_missing", "n_errors"):
        assert a[key] == b[key], key
    folder = tmp_path / "shards"  # the shards of a data set, as img2dataset writes them
    folder.mkdir()
    _webdataset_shard(folder / "00000.tar", samples[:150])
    _webdataset_shard(folder / "00001.tar", samples[150:])
    (folder / "00000_stats.json").write_text("{}")
    assert main(["eval", str(world.pred_dir), "--truth", str(folder), "--json", str(out_tar)]) == 0
    assert json.loads(out_tar.read_text())["accuracy_pct"] == b["accuracy_pct"]
    assert main(["eval", str(world.pred_dir), "--truth", str(tmp_path / "imgs")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_eval_truth_shard_without_coordinates_says_what_it_expected(world, tmp_path, capsys):  # noqa: F811
    shard = _webdataset_shard(tmp_path / "plain.tar", [("a", b'{"caption": "x"}'), ("b", b"{}")])
    assert main(["eval", str(world.pred_dir), "--truth", str(shard)]) == 2
    err = capsys.readouterr().err
    assert "plain.tar" in err and "2 JSON members, none with both" in err
    assert '"lat"' in err and "KEY.json" in err and "Traceback" not in err
    partial = _webdataset_shard(tmp_path / "partial.tar", [("a", b'{"lat": 1, "lon": 2}'), ("b", b"{}")])
    assert main(["eval", str(world.pred_dir), "--truth", str(partial)]) == 2
    assert "latitude is missing" in capsys.readouterr().err  # --skip-invalid leaves such samples out
    assert len(read_truth(partial, skip_invalid=True)) == 1


# --- coverage -----------------------------------------------------------------------------------

def test_coverage_cli(world, tmp_path, capsys):  # noqa: F811
    from geosurge_index.cells import read_cells
    from geosurge_index.evaluation import partition_coverage

    out = tmp_path / "cov.json"
    code = main(["coverage", str(world.cells_dir), "--truth", str(world.truth_csv),
                 "--truth", str(DATA / "yfcc4k_head40.csv"), "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "[oracle]" in printed and "[nearest]" in printed and "yfcc4k_head40.csv" in printed
    data = json.loads(out.read_text())
    assert [b["n_points"] for b in data["benchmarks"]] == [300, 40]
    expect = partition_coverage(read_cells(world.cells_dir), world.lat, world.lon).to_dict()
    got = data["benchmarks"][0]
    assert got["inside_pct"] == expect["inside_pct"]
    assert got["oracle"]["accuracy_pct"] == expect["oracle"]["accuracy_pct"]
    assert got["nearest"]["median_km"] == pytest.approx(expect["nearest"]["median_km"], rel=1e-4)  # CSV: 6 decimals


@pytest.mark.parametrize("argv", [["sql"], ["eval"], ["coverage"], ["map"], ["map", "cells"],
                                  ["map", "predictions"], []])
def test_help_renders(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: geosurge" in capsys.readouterr().out
