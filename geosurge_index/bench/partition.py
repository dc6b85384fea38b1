"""`geosurge bench partition`: time and memory of sampling + partitioning MP-16-sized input, and
lat/lon -> S2 leaf ids against s2sphere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from geosurge_index.errors import UserError

DEFAULT_N = 4_720_000  # MP-16's size

DESCRIPTION = """\
Measure the partition stage on N points with MP-16's real density (sampled inside the shipped
TransLocator cells of MP-16 in proportion to their image counts; N defaults to MP-16's 4.72 M):

  1. sampling the points                (wall time; peak memory)
  2. partitioning them (7 levels)       (wall time; peak memory), then writing CELLS_DIR
  3. lat/lon -> S2 leaf ids: this library's numpy code on all N points vs s2sphere (one point
     at a time) on a subsample, checking that the ids are equal

Method: phases 1 and 2 each run in a fresh Python process; wall time is time.perf_counter()
around the phase alone (not imports, not loading the input), peak memory is that process's
maximum resident set size (getrusage ru_maxrss via os.wait4), printed beside the RSS of a process
that only imports the library (the baseline). The code is single-threaded numpy.
"""


@dataclass(frozen=True)
class PartitionBench:
    n: int = DEFAULT_N  # points sampled and partitioned
    seed: int = 0
    s2sphere_n: int = 20_000  # points converted one at a time with s2sphere
    repeats: int = 3  # timed runs of the numpy leaf-id conversion (median reported)
    tau_min: int | None = None  # None: the partition defaults
    tau_max: tuple[int, ...] | None = None
    max_s2_level: int | None = None


_CHILD = r"""
import json, sys, time
import numpy as np
phase, work, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
from geosurge_index import cells, sampler
out = {}
if phase == "sample":
    t = time.perf_counter()
    lat, lon = sampler.sample_mp16_like(args["n"], args["seed"])
    out["seconds"] = time.perf_counter() - t
    np.save(work + "/lat.npy", lat); np.save(work + "/lon.npy", lon)
elif phase == "partition":
    lat, lon = np.load(work + "/lat.npy"), np.load(work + "/lon.npy")
    settings = cells.PartitionSettings(args["tau_min"], tuple(args["tau_max"]), args["max_s2_level"])
    t = time.perf_counter()
    part = cells.partition(lat, lon, settings, source="bench")
    out["seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    cells.write_cells_dir(work + "/cells", part.cells, part.assignments)
    out["write_seconds"] = time.perf_counter() - t
    out["summary"] = cells.format_summary(part.cells, len(lat))
with open(work + "/" + phase + ".json", "w") as f:
    json.dump(out, f)
"""

_CHILD_BASELINE = "import numpy, geosurge_index.cells, geosurge_index.sampler"


def _run_child(phase: str, work: str, params: dict) -> dict:
    """Run one phase in a fresh interpreter; returns its figures plus its peak RSS in MiB."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, phase, work, json.dumps(params)])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"bench phase {phase!r} failed with exit code {proc.returncode}")
    figures = json.loads(Path(work, f"{phase}.json").read_text())
    figures["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return figures


def run_partition_bench(b: PartitionBench) -> dict:
    """Run the benchmark, printing the machine, the method and the figures; returns the figures
    (`leaf_ids.mismatches` > 0 means the S2 ids disagree with s2sphere's)."""
    import numpy as np

    from geosurge_index import s2
    from geosurge_index.cells import DEFAULT_MAX_S2_LEVEL, DEFAULT_TAU_MAX, DEFAULT_TAU_MIN, PartitionSettings
    from geosurge_index.machine import describe_machine

    if b.n < 1 or b.s2sphere_n < 0 or b.repeats < 1:
        raise UserError("--n and --repeats must be positive and --s2sphere-n non-negative")
    settings = PartitionSettings(DEFAULT_TAU_MIN if b.tau_min is None else b.tau_min,
                                 tuple(DEFAULT_TAU_MAX if b.tau_max is None else b.tau_max),
                                 DEFAULT_MAX_S2_LEVEL if b.max_s2_level is None else b.max_s2_level)
    params = {"n": b.n, "seed": b.seed, "tau_min": settings.tau_min,
              "tau_max": list(settings.tau_max), "max_s2_level": settings.max_s2_level}
    machine = describe_machine(libraries=("numpy", "s2sphere"))  # no torch here
    print(f"machine: {machine}")
    print(f"method: each phase in a fresh process; wall = perf_counter around the phase; "
          f"peak memory = ru_maxrss of that process (os.wait4); input: {b.n:,} points sampled with "
          f"MP-16's density (seed {b.seed}); tau_min {settings.tau_min}, tau_max "
          f"{','.join(map(str, settings.tau_max))}, max S2 level {settings.max_s2_level}")
    results: dict = {"machine": machine, "params": params}
    with tempfile.TemporaryDirectory(prefix="geosurge-bench-") as work:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD_BASELINE])
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = 0
        results["baseline_rss_mib"] = usage.ru_maxrss / 1024
        results["sample"] = _run_child("sample", work, params)
        results["partition"] = _run_child("partition", work, params)
        print(results["partition"].pop("summary"))
        lat, lon = np.load(Path(work, "lat.npy")), np.load(Path(work, "lon.npy"))

    s2.latlon_to_leaf_ids(lat[:1000], lon[:1000])  # warm-up
    times = []
    for _ in range(b.repeats):
        start = time.perf_counter()
        leaves = s2.latlon_to_leaf_ids(lat, lon)
        times.append(time.perf_counter() - start)
    numpy_s = float(np.median(times))
    m = min(b.s2sphere_n, b.n)
    ref_s = None
    mismatches = 0
    if m:
        import s2sphere

        pick = np.random.default_rng(b.seed).choice(b.n, size=m, replace=False)
        start = time.perf_counter()
        ref = [s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(a, c)).id()
               for a, c in zip(lat[pick].tolist(), lon[pick].tolist(), strict=True)]
        ref_s = time.perf_counter() - start
        mismatches = int((np.array(ref, dtype=np.uint64) != leaves[pick]).sum())
    results["leaf_ids"] = {"numpy_seconds": numpy_s, "numpy_s_per_million": numpy_s / b.n * 1e6,
                           "s2sphere_points": m, "s2sphere_seconds": ref_s,
                           "s2sphere_s_per_million": None if ref_s is None else ref_s / m * 1e6,
                           "mismatches": mismatches}

    base = results["baseline_rss_mib"]
    sam, par, leaf = results["sample"], results["partition"], results["leaf_ids"]
    print(f"baseline (python + imports): {base:,.0f} MiB RSS")
    print(f"sampling {b.n:,} points:      {sam['seconds']:7.2f} s   peak RSS {sam['peak_rss_mib']:,.0f} MiB")
    print(f"partitioning ({len(settings.tau_max)} levels):     {par['seconds']:7.2f} s   peak RSS "
          f"{par['peak_rss_mib']:,.0f} MiB (incl. the {b.n * 16 / 2**20:,.0f} MiB input)")
    print(f"writing CELLS_DIR:           {par['write_seconds']:7.2f} s")
    print(f"leaf ids, numpy:             {numpy_s:7.2f} s  ({leaf['numpy_s_per_million']:.2f} s per million, "
          f"median of {b.repeats})")
    if ref_s is not None:
        print(f"leaf ids, s2sphere:          {ref_s:7.2f} s for {m:,} points ({leaf['s2sphere_s_per_million']:.1f} s "
              f"per million; {leaf['s2sphere_s_per_million'] / leaf['numpy_s_per_million']:.0f}x slower); "
              f"ids differing from numpy's: {mismatches}")
    return results
