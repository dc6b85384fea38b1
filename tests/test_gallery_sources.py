"""Galleries from image sources (EXIF GPS folders, manifests, WebDataset shards) through the real
encoder; the same answer from bulk locate, the Locator and the HTTP service; kill -9 during add."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _locate_fixtures import encode, photo
from PIL import Image

from geosurge_index.cli import main
from geosurge_index.errors import UserError
from geosurge_index.gallery.build import add_gallery, list_galleries
from geosurge_index.index import GeoIndex

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_index(tmp_path_factory):
    from geosurge_index.synthetic import random_index

    return random_index(tmp_path_factory.mktemp("gidx") / "index", n_points=1500)


@pytest.fixture
def index_dir(base_index, tmp_path):
    d = tmp_path / "index"
    shutil.copytree(base_index, d)
    return d


def gps_jpeg(seed: int, lat: float | None, lon: float | None) -> bytes:
    ex = Image.Exif()
    if lat is not None:
        gps = ex.get_ifd(0x8825)
        gps[1], gps[3] = ("N" if lat >= 0 else "S"), ("E" if lon >= 0 else "W")
        gps[2], gps[4] = (abs(lat), 0.0, 0.0), (abs(lon), 0.0, 0.0)
    buf = io.BytesIO()
    photo(seed=seed).save(buf, "JPEG", quality=90, exif=ex)
    return buf.getvalue()


def best_cell_points(index_dir: Path, files: list[Path]) -> np.ndarray:
    """(n, 2) mean points of the best finest cell of each photo (without galleries): a reference
    placed there lies inside a cell its own search picks."""
    from geosurge_index.locate import Locator
    from geosurge_index.settings import InferenceSettings

    loc = Locator.open(index_dir, settings=InferenceSettings(device="cpu", galleries="none"))
    return np.array([(p.lat, p.lon) for p in loc.locate(files)])


def archive(root: Path, index_dir: Path, n_tagged=8, n_untagged=4) -> tuple[list[Path], list[Path]]:
    root.mkdir(parents=True)
    files = [root / f"p{i:03d}.jpg" for i in range(n_tagged + n_untagged)]
    for i, f in enumerate(files):
        f.write_bytes(gps_jpeg(i, None, None))
    pts = best_cell_points(index_dir, files[:n_tagged])
    for i, f in enumerate(files[:n_tagged]):
        f.write_bytes(gps_jpeg(i, float(pts[i, 0]), float(pts[i, 1])))
    return files[:n_tagged], files[n_tagged:]


def test_exif_folder_gallery_bulk_locator_and_service_agree(index_dir, tmp_path):
    tagged, untagged = archive(tmp_path / "archive", index_dir)
    rep = add_gallery(index_dir, [tmp_path / "archive"], "mine", progress=False)
    assert rep.n_added == len(tagged) and rep.not_geotagged == len(untagged) and not rep.rejected
    # bulk: every tagged photo finds itself (it lies in a cell its search picked)
    out = tmp_path / "preds"
    assert main(["locate", str(index_dir), str(tmp_path / "archive"), "--out", str(out), "--device", "cpu",
                 "--workers", "0"]) == 0
    t = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()
    rows = {r["id"]: r for r in t}
    for f in tagged:
        r = next(v for k, v in rows.items() if k.endswith(f.name))
        assert r["point_source"] == "neighbour" and r["neighbour_gallery"] == "mine"
        assert r["neighbour_id"].endswith(f.name) and r["neighbour_similarity"] == pytest.approx(1.0, abs=1e-4)
    # the Locator (the service's path) gives the same answers as the bulk run, image by image
    from geosurge_index.locate import Locator

    loc = Locator.open(index_dir, device="cpu")
    preds = loc.locate([*tagged, *untagged], ids=[next(k for k in rows if k.endswith(f.name))
                                                  for f in [*tagged, *untagged]])
    for p in preds:
        r = rows[p.id]
        assert (p.lat, p.lon) == pytest.approx((r["lat"], r["lon"]), abs=1e-9)
        assert (p.point_source, p.neighbour_id) == (r["point_source"], r["neighbour_id"])
        assert (p.cell_lat, p.cell_lon) == pytest.approx((r["cell_lat"], r["cell_lon"]), abs=1e-9)
    # --galleries none: the cell means, as without galleries
    out2 = tmp_path / "preds-none"
    assert main(["locate", str(index_dir), str(tmp_path / "archive"), "--out", str(out2), "--device", "cpu",
                 "--workers", "0", "--galleries", "none"]) == 0
    t2 = pq.read_table(sorted(out2.glob("part-*.parquet")))
    assert set(t2["point_source"].to_pylist()) == {"cell_mean"}
    assert t2["lat"].to_pylist() == t2["cell_lat"].to_pylist()
    # the HTTP service's JSON, through the real app
    pytest.importorskip("httpx")
    import httpx

    from geosurge_index.service.app import create_app
    from geosurge_index.service.runner import ServerThread
    from geosurge_index.settings import ServiceSettings

    app = create_app(ServiceSettings(index_dir=index_dir), loc)
    try:
        srv = ServerThread(app).__enter__()
    except OSError as err:  # no loopback network here
        pytest.skip(f"cannot serve: {err}")
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            f = tagged[0]
            ans = c.post("/v1/locate", files={"images": (f.name, f.read_bytes(), "image/jpeg")}).json()
    finally:
        srv.__exit__(None, None, None)
    one = ans["results"][0] if "results" in ans else ans["predictions"][0]
    r = next(v for k, v in rows.items() if k.endswith(f.name))
    assert (one["lat"], one["lon"]) == pytest.approx((r["lat"], r["lon"]), abs=1e-9)
    assert one["point_source"] == "neighbour" and one["neighbour"]["id"] == r["neighbour_id"]


def test_manifest_and_tar_sources_count_their_bad_rows(index_dir, tmp_path):
    (tmp_path / "img").mkdir()
    good = [tmp_path / "img" / f"m{i}.jpg" for i in range(6)]
    for i, f in enumerate(good):
        f.write_bytes(encode(photo(seed=50 + i), "JPEG"))
    trunc = tmp_path / "img" / "trunc.jpg"
    whole = encode(photo(seed=60), "JPEG")
    trunc.write_bytes(whole[: len(whole) // 2])
    pts = best_cell_points(index_dir, good[:4])
    manifest = tmp_path / "refs.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "lat", "lon"])
        for f, (a, b) in zip(good, pts, strict=False):
            w.writerow([f"img/{f.name}", a, b])
        w.writerow(["img/m4.jpg", "", "3.0"])  # no latitude
        w.writerow(["img/m5.jpg", "200", "3.0"])
        w.writerow(["img/trunc.jpg", "10", "10"])
    # a WebDataset shard: lat/lon in the JSON; one sample without, one out of range
    shard = tmp_path / "refs.tar"
    with tarfile.open(shard, "w") as tar:
        for i, meta in enumerate([{"lat": float(pts[0, 0]), "lon": float(pts[0, 1])}, {"caption": "x"},
                                  {"latitude": 95.0, "longitude": 0.0}]):
            for name, blob in ((f"s{i}.jpg", encode(photo(seed=70 + i), "JPEG")),
                               (f"s{i}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    rep = add_gallery(index_dir, [manifest, shard], "m", progress=False)
    assert rep.n_inputs == 7 + 3
    assert rep.rejected == {"bad_coordinates": 3, "truncated": 1, "no_coordinates": 1} | (
        {"no_cell": rep.rejected["no_cell"]} if "no_cell" in rep.rejected else {})
    assert rep.n_added + sum(rep.rejected.values()) == 10
    # a folder without GPS gives no references: said, naming the photos left out
    with pytest.raises(UserError, match="7 photos not geotagged"):
        add_gallery(index_dir, [tmp_path / "img"], "m2", progress=False)
    entry = list_galleries(index_dir)[0]
    assert entry.n_refs == rep.n_added and entry.rejected == dict(rep.rejected)


@pytest.mark.slow
def test_kill_9_during_gallery_add_then_a_rerun_completes(index_dir, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    from geosurge_index.index import IndexCells

    with IndexCells.open(index_dir) as ic:
        finest = ic.table(ic.level_sizes().__len__())
    lat, lon = finest["mean_lat"].to_numpy(), finest["mean_lon"].to_numpy()
    for i in range(60):  # points inside finest cells
        (folder / f"q{i:03d}.jpg").write_bytes(gps_jpeg(i, float(lat[i % len(lat)]), float(lon[i % len(lat)])))
    before = (index_dir / "manifest.json").read_text()
    cmd = [sys.executable, "-c", "import sys; from geosurge_index.cli import main; sys.exit(main(sys.argv[1:]))",
           "gallery", "add", str(index_dir), str(folder), "--name", "k", "--device", "cpu", "--workers", "0",
           "--batch-size", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for delay in (1.5, 4.0):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        index = GeoIndex.open(index_dir, device="cpu")  # usable whenever it died
        assert index.selected_galleries in ((), ("k",))
        if index.selected_galleries == ():
            assert (index_dir / "manifest.json").read_text() == before
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    entries = list_galleries(index_dir)
    assert [e.name for e in entries] == ["k"] and len(entries[0].additions) == 1
    index = GeoIndex.open(index_dir, device="cpu")
    assert len(index.galleries()[0]) == entries[0].n_refs
    assert entries[0].n_refs + sum(entries[0].rejected.values()) == 60
    assert not (index_dir / ".staging").exists()
