"""The adaptive hierarchy: the split/drop rule, the tree, determinism, CELLS_DIR, the CLI."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from geosurge_index import cells, s2
from geosurge_index.cli import main
from geosurge_index.errors import FormatError, UserError
from geosurge_index.sampler import sample_mp16_like

SETTINGS = cells.PartitionSettings(tau_min=5, tau_max=(2000, 1000, 500, 250, 120, 60, 30), max_s2_level=16)


@pytest.fixture(scope="module")
def points():
    return sample_mp16_like(20_000, seed=3)


@pytest.fixture(scope="module")
def part(points):
    return cells.partition(*points, SETTINGS)


def test_hand_made_case():
    """Face 2 (north pole) holds 3 + 1 points in its child 0 and 2 in child 1; face 0 holds 1.
    tau_max (5, 2), tau_min 2, max S2 level 3:
      level 1: face 2 (6 > 5) splits; child 0 (4) and child 1 (2) stay; face 0 (1 < 2) is dropped.
      level 2: child 0 (4 > 2) splits: its child 0 (3 > 2) splits to S2 level 3 and stops there
               (3 points in one level-3 cell); its child 1 (1) is dropped; child 1 (2) stays."""
    face2 = np.array([5 << 60], dtype=np.uint64)
    c0, c1 = s2.child_ids(face2)[0, :2]
    c00, c01 = s2.child_ids([c0])[0, :2]
    c000 = s2.child_ids([c00])[0, 0]
    c10 = s2.child_ids([c1])[0, 0]
    centre = {k: s2.cell_centers(np.array([v])) for k, v in
              {"c000": c000, "c01": c01, "c10": c10}.items()}
    lat = np.concatenate([np.repeat(centre["c000"][0], 3), centre["c01"][0], np.repeat(centre["c10"][0], 2), [0.0]])
    lon = np.concatenate([np.repeat(centre["c000"][1], 3), centre["c01"][1], np.repeat(centre["c10"][1], 2), [0.0]])
    p = cells.partition(lat, lon, cells.PartitionSettings(tau_min=2, tau_max=(5, 2), max_s2_level=3))
    l1, l2 = p.cells.levels
    assert l1.s2_id.tolist() == [c0, c1] and l1.n_samples.tolist() == [4, 2]
    assert l2.s2_id.tolist() == [c000, c1] and l2.n_samples.tolist() == [3, 2]
    assert l2.parent_index.tolist() == [0, 1] and l1.parent_index.tolist() == [-1, -1]
    assert l2.s2_level.tolist() == [3, 1]
    assert p.assignments.tolist() == [[0, 0]] * 3 + [[0, -1]] + [[1, 1]] * 2 + [[-1, -1]]
    assert l2.mean_lat[0] == pytest.approx(centre["c000"][0][0]) and l2.mean_lon[0] == pytest.approx(centre["c000"][1][0])
    assert l1.s2_token.tolist() == s2.ids_to_tokens(np.array([c0, c1])).tolist()


def test_thresholds_and_split_rule(points, part):
    leaves = np.sort(s2.latlon_to_leaf_ids(*points))

    def count(ids):
        return np.searchsorted(leaves, s2.range_max(ids), "right") - np.searchsorted(leaves, s2.range_min(ids), "left")

    for lc, tau in zip(part.cells.levels, SETTINGS.tau_max, strict=True):
        assert np.array_equal(count(lc.s2_id), lc.n_samples)
        assert (lc.n_samples >= SETTINGS.tau_min).all()
        over = lc.n_samples > tau
        assert (lc.s2_level[over] == SETTINGS.max_s2_level).all()  # only unsplittable cells exceed tau_max
        # a cell exists only because its S2 parent held more than tau_max (else it would not split)
        inner = lc.s2_level > 0
        assert (count(s2.parent_ids(lc.s2_id[inner], lc.s2_level[inner] - 1)) > tau).all()
        assert np.all(np.diff(lc.s2_id.astype(np.float64)) > 0)  # cell_index follows s2_id
        gaps = s2.range_min(lc.s2_id[1:]) > s2.range_max(lc.s2_id[:-1])
        assert gaps.all()  # disjoint


def test_tree(part):
    table = part.cells
    for upper, lower in zip(table.levels, table.levels[1:], strict=False):
        assert lower.parent_index.min() >= 0 and lower.parent_index.max() < len(upper)
        assert s2.contains(upper.s2_id[lower.parent_index], lower.s2_id).all()
        assert (lower.s2_level >= upper.s2_level[lower.parent_index]).all()
        indptr, indices = table.children(upper.level)
        kids = np.repeat(np.arange(len(upper)), np.diff(indptr))
        assert np.array_equal(lower.parent_index[indices], kids)
    a = part.assignments
    for li in range(1, table.n_levels):
        has = a[:, li] >= 0
        assert (a[has, li - 1] >= 0).all()  # a finer cell implies a coarser one
        assert np.array_equal(table.levels[li].parent_index[a[has, li]], a[has, li - 1])


def test_assignments_counts_and_assign_points(points, part):
    for li, lc in enumerate(part.cells.levels):
        col = part.assignments[:, li]
        assert np.array_equal(np.bincount(col[col >= 0], minlength=len(lc)), lc.n_samples)
    assert np.array_equal(cells.assign_points(part.cells, *points), part.assignments)
    # anywhere on Earth, against brute-force containment (-1 where no cell holds the point)
    rng = np.random.default_rng(5)
    lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, 500))), rng.uniform(-180, 180, 500)
    leaves = s2.latlon_to_leaf_ids(lat, lon)
    got = cells.assign_points(part.cells, lat, lon)
    for li, lc in enumerate(part.cells.levels):
        inside = (s2.range_min(lc.s2_id)[None] <= leaves[:, None]) & (leaves[:, None] <= s2.range_max(lc.s2_id)[None])
        assert (inside.sum(1) <= 1).all()
        assert np.array_equal(got[:, li], np.where(inside.any(1), inside.argmax(1), -1))
    assert (got == -1).any() and (got >= 0).any()


def test_refining_equals_partitioning_from_scratch(points, part):
    for li in (2, 6):
        alone = cells.partition(*points, cells.PartitionSettings(SETTINGS.tau_min, (SETTINGS.tau_max[li],), 16))
        assert np.array_equal(alone.cells.levels[0].s2_id, part.cells.levels[li].s2_id)


def test_deterministic_and_order_independent(points, part, tmp_path):
    order = np.random.default_rng(0).permutation(len(points[0]))
    shuffled = cells.partition(points[0][order], points[1][order], SETTINGS)
    for a, b in zip(part.cells.levels, shuffled.cells.levels, strict=True):
        assert np.array_equal(a.s2_id, b.s2_id) and np.array_equal(a.n_samples, b.n_samples)
        assert np.allclose(a.mean_lat, b.mean_lat, atol=1e-9) and np.allclose(a.mean_lon, b.mean_lon, atol=1e-9)
    assert np.array_equal(shuffled.assignments, part.assignments[order])
    again = cells.partition(*points, SETTINGS)
    cells.write_cells_dir(tmp_path / "a", part.cells, part.assignments)
    cells.write_cells_dir(tmp_path / "b", again.cells, again.assignments)
    for name in ("cells.parquet", "assignments.parquet", "partition.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_mean_across_the_antimeridian():
    lat = np.array([10.0, 10.0, 10.1, 10.1])
    lon = np.array([179.99, -179.99, 179.98, -179.98])
    p = cells.partition(lat, lon, cells.PartitionSettings(tau_min=1, tau_max=(100,)))
    lc = p.cells.levels[0]
    assert len(lc) == 1 and abs(abs(lc.mean_lon[0]) - 180) < 1e-6 and lc.mean_lat[0] == pytest.approx(10.05, abs=1e-3)


def test_cells_dir_round_trip(part, tmp_path):
    rows = np.arange(len(part.assignments)) * 2
    cells.write_cells_dir(tmp_path, part.cells, part.assignments, rows=rows)
    back = cells.read_cells(tmp_path)
    assert back.tau_max == SETTINGS.tau_max and back.max_s2_level == 16 and back.n_levels == 7
    for a, b in zip(part.cells.levels, back.levels, strict=True):
        for name in ("s2_id", "s2_token", "s2_level", "parent_index", "n_samples", "mean_lat", "area_km2"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    read_rows, assignments = cells.read_assignments(tmp_path)
    assert np.array_equal(read_rows, rows) and np.array_equal(assignments, part.assignments)
    table = pq.read_table(tmp_path / "cells.parquet")
    assert [str(t) for t in table.schema.types] == ["int8", "int32", "uint64", "string", "int8", "int32", "int64",
                                                    "double", "double", "double", "double", "double"]
    assert table.column("parent_index").null_count == len(part.cells.levels[0])
    assign = pq.read_table(tmp_path / "assignments.parquet")
    assert assign.column_names == ["row"] + [f"level_{k}" for k in range(1, 8)]
    assert assign.column("level_7").null_count == int((part.assignments[:, 6] < 0).sum())


def test_read_cells_refuses_bad_dirs(part, tmp_path):
    with pytest.raises(FormatError, match="partition.json missing"):
        cells.read_cells(tmp_path)
    cells.write_cells_dir(tmp_path, part.cells, part.assignments)
    meta = json.loads((tmp_path / "partition.json").read_text())
    (tmp_path / "partition.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(FormatError, match="newer"):
        cells.read_cells(tmp_path)
    (tmp_path / "partition.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(FormatError, match="not a geosurge-cells"):
        cells.read_cells(tmp_path)
    (tmp_path / "partition.json").write_text(json.dumps(meta))
    (tmp_path / "cells.parquet").unlink()
    with pytest.raises(FormatError, match="cells.parquet missing"):
        cells.read_cells(tmp_path)
    (tmp_path / "assignments.parquet").write_bytes(b"not parquet")
    with pytest.raises(FormatError, match="assignments.parquet: unreadable"):
        cells.read_assignments(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"tau_max": (100, 200)}, "must not increase"),
    ({"tau_min": 600}, "must not exceed"),
    ({"max_s2_level": 31}, "0..30"),
    ({"tau_max": ()}, "at least one"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(UserError, match=message):
        cells.PartitionSettings(**kwargs)


def test_cli_partition(points, tmp_path, capsys):
    csv = tmp_path / "coords.csv"
    lat, lon = points
    csv.write_text("IMG_ID,LAT,LON\n" + "".join(f"im{k},{a!r},{b!r}\n" for k, (a, b) in
                                                enumerate(zip(lat[:5000].tolist(), lon[:5000].tolist(), strict=True))))
    out = tmp_path / "cells"
    args = ["partition", str(csv), "--out", str(out), "--tau-min", "5", "--tau-max", "2000,1000,500,250,120,60,30"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "median/cell" in printed and "5,000 points partitioned" in printed
    table = cells.read_cells(out)
    assert table.n_input == 5000 and table.tau_min == 5
    assert pq.read_table(out / "assignments.parquet").column("id").to_pylist()[:2] == ["im0", "im1"]
    assert main(args) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_cli_partition_bad_rows(tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("lat,lon\n1,2\nnan,3\n91,0\n")
    assert main(["partition", str(csv), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "row 1: latitude is missing/NaN" in err and "row 2: latitude 91.0 outside" in err
    assert main(["partition", str(csv), "--out", str(tmp_path / "c"), "--skip-invalid", "--tau-min", "1"]) == 0
    meta = json.loads((tmp_path / "c" / "partition.json").read_text())
    assert meta["n_input"] == 3 and meta["n_skipped_invalid"] == 2
    assert cells.read_assignments(tmp_path / "c")[0].tolist() == [0]
    # too few points for --tau-min: an error, not an empty (useless) partition
    assert main(["partition", str(csv), "--out", str(tmp_path / "d"), "--skip-invalid"]) == 2
    assert "no cell holds --tau-min 50 of the 1 valid points" in capsys.readouterr().err
    assert not (tmp_path / "d" / "partition.json").exists()


def test_bench_partition_runs(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "partition", "--n", "3000", "--s2sphere-n", "200", "--repeats", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["leaf_ids"]["mismatches"] == 0 and figures["partition"]["peak_rss_mib"] > 0
    assert "machine:" in capsys.readouterr().out
