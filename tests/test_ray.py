"""`geosurge locate --ray`: the same rows and the same resume ledger as a local run, on a local
Ray instance (2 CPUs). `make test` runs pytest inside `unshare -n` with loopback only."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from _locate_fixtures import write_folder, write_tar

from geosurge_index import locate, pred_store

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from geosurge_index.synthetic import random_index

    return random_index(tmp_path_factory.mktemp("idx") / "index", n_points=1500)


def _job(index_dir, inputs, out, **kw) -> locate.LocateJob:
    return locate.LocateJob(index_dir=str(index_dir), inputs=[str(p) for p in inputs], out_dir=str(out),
                            chunk_size=4, batch_size=3, workers=0, device="cpu", **kw)


def test_ray_run_matches_local_run_and_resumes_it(ray_local, index_dir, tmp_path):
    expected = write_folder(tmp_path / "imgs", n_extra=2)
    keys = write_tar(tmp_path / "s.tar", 4, with_class_maps=True, bad_key=1)
    inputs = [tmp_path / "imgs", tmp_path / "s.tar"]
    n = len(expected) + len(keys)

    local = locate.run_job(_job(index_dir, inputs, tmp_path / "local"))
    assert local["complete"] and local["images"] == n
    want = pq.read_table(sorted((tmp_path / "local").glob("part-*.parquet"))).to_pylist()

    on_ray = locate.run_job(_job(index_dir, inputs, tmp_path / "ray"), ray_address="local")
    assert on_ray["complete"] and on_ray["this_run"]["strategy"] == "ray"
    got = pq.read_table(sorted((tmp_path / "ray").glob("part-*.parquet"))).to_pylist()
    assert [r["id"] for r in got] == [r["id"] for r in want]  # every input once, in input order
    for g, w in zip(got, want, strict=True):
        assert g["error"] == w["error"]
        assert g["cell_l7"] == w["cell_l7"] and g["topk_cells"] == w["topk_cells"]
        if w["lat"] is not None:
            assert g["lat"] == pytest.approx(w["lat"]) and g["probability"] == pytest.approx(w["probability"], rel=1e-4)

    # Ray resumes a local run's ledger: only the missing shards are computed
    out = tmp_path / "local"
    (out / "part-00001.parquet").unlink()
    (out / "part-00003.parquet").unlink()
    (out / pred_store.META_DIR / pred_store.META_SUMMARY).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    resumed = locate.run_job(_job(index_dir, inputs, out), ray_address="local")
    assert resumed["this_run"]["images"] == 8 and resumed["complete"]
    assert all((out / k).stat().st_mtime_ns == v for k, v in kept.items())
    again = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()
    assert [r["id"] for r in again] == [r["id"] for r in want]
    assert [r["cell_l7"] for r in again] == [r["cell_l7"] for r in want]
    assert pred_store.read_summary(out)["errors"] == local["errors"]


def test_ray_ten_crop_matches_local(ray_local, index_dir, tmp_path):
    from _locate_fixtures import encode, photo

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(encode(photo(100, 75, seed=40 + i), "JPEG"))
    (folder / "bad.jpg").write_bytes(b"")
    runs = {}
    for name, address in (("local", None), ("ray", "local")):
        summary = locate.run_job(_job(index_dir, [folder], tmp_path / name, ten_crop=True, save_embeddings=True),
                                 ray_address=address)
        assert summary["complete"] and summary["errors"] == 1
        runs[name] = pq.read_table(sorted((tmp_path / name).glob("part-*.parquet"))).to_pylist()
    assert [r["id"] for r in runs["ray"]] == [r["id"] for r in runs["local"]]
    for g, w in zip(runs["ray"], runs["local"], strict=True):
        assert g["error"] == w["error"] and g["cell_l7"] == w["cell_l7"]
        if w["embedding"]:
            assert g["embedding"] == pytest.approx(w["embedding"], abs=1e-5)
