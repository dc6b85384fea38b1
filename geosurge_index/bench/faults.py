"""`geosurge bench faults`: `geosurge locate` against hostile inputs and faults, one case at a time,
with the figures issue 15 asks for: exit status, rows lost or doubled, hangs, peak RSS."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

DESCRIPTION = """\
Run `geosurge locate` (a small config-built index, synthetic JPEGs, CPU) once per hostile case, each
in its own process tree, and print per case: exit status, inputs, rows lost and rows doubled
(against the enumerated inputs), error kinds, whether it hung (--timeout), wall time and the peak
RSS of the largest process of the run (the CLI or a decoding worker; getrusage of the children).
Cases: good images only; a FIFO named x.jpg; links to /dev/zero and /dev/urandom; a 500 MB file
(over the 256 MiB cap); a 200 MB non-image under the cap; an input that SIGKILLs its decoder, run
twice; WebDataset shards cut inside a member, cut at a member boundary, and emptied; a rerun after
emptying one shard and cutting another's footer; a rerun with the input spelled differently.
Needs ~1 GB of temporary disk; nothing is downloaded.
"""


@dataclass(frozen=True)
class FaultsBench:
    images: int = 8  # good images per case
    timeout: float = 300.0  # seconds before a case counts as a hang
    workers: int = 1  # decoding processes (the crash case uses 2)
    json: str | None = None


_WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
         "sys.exit(r.returncode)")
_CLI = [sys.executable, "-c", "import sys; from geosurge_index.cli import main; sys.exit(main())"]


def run_faults_bench(s: FaultsBench) -> list[dict]:
    from geosurge_index.machine import describe_machine
    from geosurge_index.synthetic import random_index, write_synthetic_jpegs

    print(describe_machine(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="geosurge-faults-"))
    try:
        index = random_index(work / "index", n_points=600, place_names=False)

        def good(folder: Path, n: int = s.images, seed: int = 0) -> None:
            write_synthetic_jpegs(folder, n, 640, 480, seed)

        def case(name, inputs, out, workers=s.workers, env=None, cwd=work) -> dict:
            argv = ["locate", str(index), *map(str, inputs), "--out", str(out), "--chunk-size", "4",
                    "--batch-size", "4", "--device", "cpu", "--workers", str(workers)]
            t = time.perf_counter()
            try:
                r = subprocess.run([sys.executable, "-c", _WRAP, *_CLI, *argv], capture_output=True, text=True,
                                   timeout=s.timeout, cwd=cwd,
                                   env={**os.environ, "GEOSURGE_NO_PROGRESS": "1", **(env or {})})
            except subprocess.TimeoutExpired:
                return {"case": name, "hang": True}
            rss = int(r.stderr.rsplit("MAXRSS", 1)[1].split()[0]) // 1024 if "MAXRSS" in r.stderr else None
            res = {"case": name, "rc": r.returncode, "hang": False, "peak_rss_mib": rss,
                   "wall_s": round(time.perf_counter() - t, 1)}
            return _count(res, Path(cwd) / out, inputs, cwd)

        results = []
        base = work / "base"
        good(base)
        results.append(case("good images only", [base], "p-base"))
        hostile = [
            ("a FIFO named x.jpg", lambda d: os.mkfifo(d / "x.jpg")),
            ("a link to /dev/zero", lambda d: (d / "zero.jpg").symlink_to("/dev/zero")),
            ("a link to /dev/urandom", lambda d: (d / "rand.jpg").symlink_to("/dev/urandom")),
            ("a 500 MB file (random bytes)", lambda d: _random_file(d / "big.jpg", 500 << 20)),
            ("a 200 MB non-image under the cap", lambda d: _random_file(d / "mid.jpg", 200 << 20)),
        ]
        for i, (name, make) in enumerate(hostile):
            d = work / f"h{i}"
            good(d)
            make(d)
            results.append(case(name, [d], f"p-h{i}"))
            shutil.rmtree(d)
        d = work / "crash"
        good(d, s.images + 4)
        kill = {"GEOSURGE_TEST_KILL_DECODER_ON": "img000005.jpg"}
        results.append(case("an input that SIGKILLs its decoder", [d], "p-crash", workers=2, env=kill))
        results.append(case("  the same command again", [d], "p-crash", workers=2, env=kill))
        shards = _damaged_tars(work)
        results.append(case("tar shards: good, cut in a member, cut at a boundary, empty", shards, "p-tar"))
        out = work / "p-base"
        (out / "part-00000.parquet").write_bytes(b"")
        cut = (out / "part-00001.parquet").read_bytes()
        (out / "part-00001.parquet").write_bytes(cut[:-20])
        results.append(case("rerun after emptying a shard and cutting a footer", [base], "p-base"))
        (out / f"part-{(s.images - 1) // 4:05d}.parquet").unlink()
        results.append(case("rerun spelled ./base (first run: an absolute path)", ["./base"], "p-base"))
        _print(results)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _random_file(path: Path, n: int) -> None:
    with open(path, "wb") as f:
        for _ in range(n >> 20):
            f.write(os.urandom(1 << 20))


def _damaged_tars(work: Path) -> list[Path]:
    from geosurge_index.synthetic import synthetic_jpegs

    paths = []
    for name in ("ok", "cut", "edge", "empty"):
        p = work / f"{name}.tar"
        with tarfile.open(p, "w") as tar:
            for i, data in enumerate(synthetic_jpegs(6, (320, 240), seed=len(paths))):
                info = tarfile.TarInfo(f"{name}{i:04d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        raw = p.read_bytes()
        with tarfile.open(p) as tar:
            members = tar.getmembers()
        if name == "cut":
            p.write_bytes(raw[: members[3].offset_data + 100])
        elif name == "edge":
            p.write_bytes(raw[: members[4].offset])
        elif name == "empty":
            p.write_bytes(b"")
        paths.append(p)
    return paths


def _count(res: dict, out: Path, inputs, cwd) -> dict:
    """Rows lost and doubled against the enumerated inputs, and the error kinds."""
    import pyarrow.parquet as pq

    from geosurge_index import sources

    here = os.getcwd()
    os.chdir(cwd)
    try:
        expected = Counter(sources.enumerate_inputs([str(i) for i in inputs]).column("id").to_pylist())
    finally:
        os.chdir(here)
    shards = sorted(out.glob("part-*.parquet"))
    rows = pq.read_table(shards, columns=["id", "error"]).to_pylist() if shards else []
    got = Counter(r["id"] for r in rows)
    # rows are written with the first run's spelling of the inputs: compare by file name
    if sum(got.values()) and not set(got) & set(expected):
        got = Counter(Path(k).name for k in got.elements())
        expected = Counter(Path(k).name for k in expected.elements())
    res.update(inputs=sum(expected.values()), lost=sum((expected - got).values()),
               doubled=sum((got - expected).values()),
               errors=dict(Counter(r["error"].split(":", 1)[0] for r in rows if r["error"])))
    return res


def _print(results: list[dict]) -> None:
    print(f"{'case':58s} {'exit':>4s} {'inputs':>6s} {'lost':>4s} {'doubled':>7s} {'hang':>4s} "
          f"{'peak RSS':>9s}  errors")
    for r in results:
        rss = f"{r['peak_rss_mib']} MiB" if r.get("peak_rss_mib") is not None else "-"
        print(f"{r['case'][:58]:58s} {r.get('rc', '-')!s:>4s} {r.get('inputs', '-')!s:>6s} {r.get('lost', '-')!s:>4s} "
              f"{r.get('doubled', '-')!s:>7s} {'yes' if r['hang'] else 'no':>4s} {rss:>9s}  "
              + ", ".join(f"{k} {v}" for k, v in sorted(r.get("errors", {}).items())))

