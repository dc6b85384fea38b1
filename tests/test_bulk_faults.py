"""Bulk locate under hostile inputs and faults (issue 15, "Bulk locate"; issue 14, §4 and §6):
nothing hangs, nothing reads without bound, a dying decoder or a full disk does not lose or
double a row, a damaged shard is recomputed, and a rerun resumes whatever the input's spelling."""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _locate_fixtures import encode, photo, write_tar

from geosurge_index import pred_store, sources
from geosurge_index.cli import main as cli_main
from geosurge_index.images import ImageDecodeError
from geosurge_index.locate import decode

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from geosurge_index.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from geosurge_index.synthetic import random_index

    return random_index(tmp_path_factory.mktemp("idx") / "index", n_points=600, place_names=False)


def preds(out: Path) -> list[dict]:
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()


def images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        p = folder / f"img{i:03d}.jpg"
        p.write_bytes(encode(photo(64, 48, seed=i), "JPEG"))
        out.append(p)
    return out


def locate_argv(index_dir, *inputs, out, chunk=2, workers=0, extra=()):
    return ["locate", str(index_dir), *map(str, inputs), "--out", str(out), "--chunk-size", str(chunk),
            "--batch-size", str(chunk), "--workers", str(workers), "--device", "cpu", *extra]


def once_each(rows: list[dict], ids) -> None:
    got = Counter(r["id"] for r in rows)
    assert got == Counter(map(str, ids)), "a row lost or doubled"


# -- files that are not files ---------------------------------------------------------------------


def _in_thread(fn, timeout=20):
    """fn() in a daemon thread: a hang fails the test instead of hanging it."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001
            box["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung"
    return box


def test_read_bytes_reads_only_regular_files_and_never_past_the_cap(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "random.jpg").symlink_to("/dev/urandom")
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:  # 500 MB, sparse: refused on its size before a byte is read
        f.truncate(500 * 2**20)
    for name, kind in [("x.jpg", "not_a_regular_file"), ("zero.jpg", "not_a_regular_file"),
                       ("random.jpg", "not_a_regular_file"), ("big.jpg", "too_large")]:
        box = _in_thread(lambda n=name: sources.read_bytes(str(tmp_path / n), -1, -1))
        err = box.get("error")
        assert isinstance(err, ImageDecodeError) and err.kind == kind, (name, box)
        assert name in err.message
    small = tmp_path / "small.jpg"
    small.write_bytes(b"x" * 1000)
    with pytest.raises(ImageDecodeError, match="too_large"):
        sources.read_bytes(str(small), -1, -1, max_bytes=999)
    assert sources.read_bytes(str(small), -1, -1, max_bytes=1000) == b"x" * 1000
    with pytest.raises(ImageDecodeError, match="too_large"):  # a tar member is capped too
        sources.read_bytes(str(small), 10, 500, max_bytes=100)
    # a FIFO or device passed as a manifest or shard argument is refused, not read
    os.mkfifo(tmp_path / "m.csv")
    box = _in_thread(lambda: sources.input_kind(tmp_path / "m.csv"))
    assert "not a regular file" in str(box.get("error"))


def test_bulk_run_with_fifos_device_links_and_huge_files_ends(index_dir, tmp_path):
    folder = tmp_path / "in"
    good = images(folder, 3)
    os.mkfifo(folder / "x.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    (folder / "urandom.png").symlink_to("/dev/urandom")
    with open(folder / "huge.jpg", "wb") as f:
        f.truncate(300 * 2**20)
    out = tmp_path / "preds"
    argv = locate_argv(index_dir, folder, out=out, workers=1, extra=["--max-image-bytes", str(200 * 2**20)])
    res = subprocess.run(CLI + argv, cwd=REPO, capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, GEOSURGE_NO_PROGRESS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {Path(r["id"]).name: r for r in preds(out)}
    once_each(preds(out), [*map(str, good), *(str(folder / n) for n in
                                               ("x.jpg", "zero.jpg", "urandom.png", "huge.jpg"))])
    for name in ("x.jpg", "zero.jpg", "urandom.png"):
        assert rows[name]["error"].startswith("not_a_regular_file:"), rows[name]["error"]
    assert rows["huge.jpg"]["error"].startswith("too_large:")
    assert all(rows[p.name]["error"] is None for p in good)
    # the cap is a setting that changes rows: recorded, so a resume with another one is refused
    assert pred_store.read_run(out)["settings"]["max_image_bytes"] == 200 * 2**20


# -- a decoder that dies --------------------------------------------------------------------------


def test_a_decoding_worker_killed_by_an_input_becomes_one_error_row(index_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "in"
    good = images(folder, 9)
    crash = folder / "img004.jpg"  # the one that kills whichever process decodes it
    monkeypatch.setenv(decode.KILL_ENV, crash.name)
    out = tmp_path / "preds"
    argv = locate_argv(index_dir, folder, out=out, chunk=3, workers=2)
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "a decoding process died" in err
    rows = preds(out)
    once_each(rows, good)
    by_id = {r["id"]: r for r in rows}
    assert by_id[str(crash)]["error"].startswith(f"worker_crashed: {crash}: the decoding process died (killed by SIGKILL)")
    assert all(r["error"] is None for r in rows if r["id"] != str(crash))
    summary = pred_store.read_summary(out)
    assert summary["complete"] and summary["errors_by_kind"] == {"worker_crashed": 1}
    # the rerun has nothing left to do: no loop on the input that kills
    assert cli_main(argv) == 0
    assert "chunks were already done" in capsys.readouterr().err


def test_isolated_decoding_goes_on_after_each_crash(tmp_path, monkeypatch):
    files = images(tmp_path, 4)
    table = sources.enumerate_inputs([tmp_path])
    monkeypatch.setenv(decode.KILL_ENV, files[1].name)
    import numpy as np

    batch = decode.decode_rows_isolated(table, np.arange(4), decode.DecodeSpec(32), as_torch=False)
    assert [e is None for e in batch.errors] == [True, False, True, True]
    assert batch.errors[1].startswith("worker_crashed:") and batch.pixels.shape == (3, 32, 32, 3)


# -- a full disk ----------------------------------------------------------------------------------


def test_disk_full_stops_with_one_line_and_resumes(index_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "in"
    good = images(folder, 6)
    out = tmp_path / "preds"
    real = pred_store.pq.write_table
    calls = []

    def full_after_two(table, where, **kw):
        calls.append(where)
        if len(calls) > 2:  # the ledger and one shard fit
            Path(where).write_bytes(b"PAR1 half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pred_store.pq, "write_table", full_after_two)
    argv = locate_argv(index_dir, folder, out=out)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    line = err[-1]
    assert "is full" in line and "rerun the same command to resume" in line, line
    assert not list(out.glob(".*tmp*"))  # the half-written temporary is gone
    assert len(list(out.glob("part-*.parquet"))) == 1
    monkeypatch.setattr(pred_store.pq, "write_table", real)
    assert cli_main(argv) == 0
    once_each(preds(out), good)


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` and a tmpfs mount")
def test_a_real_full_tmpfs_stops_and_resumes(index_dir, tmp_path):
    folder = tmp_path / "in"
    good = images(folder, 40)
    out = tmp_path / "preds"
    out.mkdir()
    cmd = " ".join(f"'{a}'" for a in CLI + locate_argv(index_dir, folder, out=out, extra=["--top-k", "50"]))
    script = (f"mount -t tmpfs -o size=40k tmpfs '{out}' && "
              f"{cmd} 2> '{tmp_path}/first.err'; echo $? > '{tmp_path}/first.rc'; "
              f"mount -o remount,size=8m '{out}' && {cmd} 2> '{tmp_path}/second.err'; echo $? > '{tmp_path}/second.rc'; "
              f"cp '{out}'/part-*.parquet '{tmp_path}/kept/'")
    (tmp_path / "kept").mkdir()
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, timeout=400,
                   env=dict(os.environ, GEOSURGE_NO_PROGRESS="1"))
    first = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "2", first[-2000:]
    assert "is full" in first and "Traceback" not in first
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()[-2000:]
    once_each(pq.read_table(sorted((tmp_path / "kept").glob("*.parquet"))).to_pylist(), good)


# -- damaged shards -------------------------------------------------------------------------------


def test_damaged_shards_are_found_and_computed_again(index_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    good = images(folder, 7)
    out = tmp_path / "preds"
    argv = locate_argv(index_dir, folder, out=out)
    assert cli_main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    (out / "part-00000.parquet").write_bytes(b"")  # zero bytes
    raw = before["part-00001.parquet"]
    (out / "part-00001.parquet").write_bytes(raw[: len(raw) - 20])  # the footer cut
    pq.write_table(pq.read_table(out / "part-00002.parquet").slice(0, 1), out / "part-00002.parquet")  # a row short
    capsys.readouterr()
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("was damaged") == 3 and "part-00001.parquet" in err
    once_each(preds(out), good)
    assert pred_store.read_summary(out)["recomputed_damaged_shards"][0].startswith("part-00000.parquet")
    assert (out / "part-00003.parquet").read_bytes() == before["part-00003.parquet"]  # whole shards kept


# -- resuming whatever the spelling ---------------------------------------------------------------


def test_resume_does_not_depend_on_how_the_input_is_spelled(index_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = images(tmp_path / "in", 6)
    argv = locate_argv(index_dir, "in", out="preds")
    assert cli_main(argv) == 0
    first = preds(tmp_path / "preds")
    assert {r["id"] for r in first} == {f"in/{p.name}" for p in good}
    for spelled in ("./in", "in/", str(tmp_path / "in"), "./in/../in"):
        (tmp_path / "preds" / "part-00002.parquet").unlink()  # as if killed before the last chunk
        capsys.readouterr()
        assert cli_main(locate_argv(index_dir, spelled, out="preds")) == 0, capsys.readouterr().err
        assert "2 chunks were already done" in capsys.readouterr().err
        assert preds(tmp_path / "preds") == first  # the first run's spelling, every row once
    # other inputs are still refused
    images(tmp_path / "in", 1, start=50)
    assert cli_main(locate_argv(index_dir, "in", out="preds")) == 2


# -- WebDataset shards ----------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), link
    tar.addfile(info, io.BytesIO(data) if data else None)


def test_damaged_shards_give_error_rows_and_the_run_goes_on(index_dir, tmp_path):
    keys_ok = write_tar(tmp_path / "ok.tar", 3)
    keys_cut = write_tar(tmp_path / "cut.tar", 4)
    raw = (tmp_path / "cut.tar").read_bytes()
    rows = sources.read_tar(tmp_path / "cut.tar").to_pylist()
    (tmp_path / "cut.tar").write_bytes(raw[: rows[2]["offset"] + 50])  # inside sample 3's image
    write_tar(tmp_path / "edge.tar", 3)
    raw = (tmp_path / "edge.tar").read_bytes()
    rows = sources.read_tar(tmp_path / "edge.tar").to_pylist()
    (tmp_path / "edge.tar").write_bytes(raw[: rows[2]["offset"] - 512])  # at sample 3's header
    (tmp_path / "empty.tar").write_bytes(b"")
    with tarfile.open(tmp_path / "odd.tar", "w") as tar:
        jpg = encode(photo(seed=3), "JPEG")
        _add(tar, "d", kind=tarfile.DIRTYPE)
        _add(tar, "d/k1.jpg", jpg)
        _add(tar, "d/k1.png", encode(photo(seed=4), "PNG"))  # a second image under one key
        _add(tar, "d/k2.jpg", kind=tarfile.SYMTYPE, link="k1.jpg")
        _add(tar, "d/k3.jpg", kind=tarfile.LNKTYPE, link="d/k1.jpg")
        _add(tar, "d/k4.jpg", kind=tarfile.CHRTYPE)
        _add(tar, "d/k5.jpg", kind=tarfile.FIFOTYPE)
    out = tmp_path / "preds"
    argv = locate_argv(index_dir, *(tmp_path / f"{n}.tar" for n in ("ok", "cut", "edge", "empty", "odd")),
                       out=out, chunk=4)
    assert cli_main(argv) == 0
    by_id = {r["id"]: r for r in preds(out)}
    assert all(by_id[k]["error"] is None for k in keys_ok)
    assert all(by_id[k]["error"] is None for k in keys_cut[:2])
    assert by_id[keys_cut[2]]["error"].startswith("truncated:")  # the member the cut went through
    for shard in ("cut", "edge", "empty"):  # what each lost is an error row, not silence
        assert by_id[f"{tmp_path / shard}.tar#truncated"]["error"].startswith("truncated:"), shard
    assert by_id["d/k1"]["error"] is None and len(by_id) == 3 + 4 + 3 + 1 + 1
    s = pred_store.read_summary(out)
    assert s["skipped_inputs"] == {"tar_directory": 1, "tar_link": 2, "tar_second_image": 1, "tar_special": 2,
                                   "tar_truncated": 3}


# -- inputs and messages (issue 14) ---------------------------------------------------------------


def test_files_globs_and_skipped_counts(index_dir, tmp_path, capsys):
    good = images(tmp_path / "in", 4)
    (tmp_path / "in" / "scan.tif").write_bytes(encode(photo(), "TIFF"))
    (tmp_path / "in" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "in" / "img000.classmap.png").write_bytes(b"x")
    out = tmp_path / "p1"
    assert cli_main(locate_argv(index_dir, tmp_path / "in", out=out)) == 0
    err = capsys.readouterr().err
    assert "class_map 1, extension:.tif 1, hidden 1" in err
    assert pred_store.read_summary(out)["skipped_inputs"] == {"class_map": 1, "extension:.tif": 1, "hidden": 1}
    # several files, and a glob the shell did not expand
    assert cli_main(locate_argv(index_dir, good[0], good[1], out=tmp_path / "p2")) == 0
    once_each(preds(tmp_path / "p2"), good[:2])
    assert cli_main(locate_argv(index_dir, f"{tmp_path}/in/img00[23].jpg", out=tmp_path / "p3")) == 0
    once_each(preds(tmp_path / "p3"), good[2:])
    assert cli_main(locate_argv(index_dir, f"{tmp_path}/in/*.gif", out=tmp_path / "p4")) == 2
    assert "no file matches" in capsys.readouterr().err


def test_all_error_runs_exit_non_zero_and_the_rate_is_a_setting(index_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"bad{i}.jpg").write_bytes(b"not an image")
    assert cli_main(locate_argv(index_dir, folder, out=tmp_path / "p1")) == 1
    assert "every one of the 3 rows is an error" in capsys.readouterr().err
    images(folder, 3)  # 3 bad of 6
    assert cli_main(locate_argv(index_dir, folder, out=tmp_path / "p2")) == 0
    assert cli_main(locate_argv(index_dir, folder, out=tmp_path / "p3", extra=["--max-error-rate", "0.4"])) == 1
    assert "above --max-error-rate 0.4" in capsys.readouterr().err
    assert cli_main(locate_argv(index_dir, folder, out=tmp_path / "p3", extra=["--max-error-rate", "0.5"])) == 0


def test_a_bad_index_dir_leaves_out_untouched_and_out_must_hold_a_run(index_dir, tmp_path, capsys):
    images(tmp_path / "in", 2)
    broken = tmp_path / "broken"
    shutil.copytree(index_dir, broken)
    (broken / "manifest.json").unlink()
    out = tmp_path / "preds"
    assert cli_main(locate_argv(broken, tmp_path / "in", out=out)) == 2
    assert not out.exists()
    (broken / "manifest.json").write_text("{not json")
    assert cli_main(locate_argv(broken, tmp_path / "in", out=out)) == 2
    assert not out.exists()
    capsys.readouterr()
    assert cli_main(locate_argv(index_dir, tmp_path / "in", out=out)) == 0  # the corrected rerun works
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli_main(locate_argv(index_dir, tmp_path / "in", out=other)) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_interrupt_says_how_to_resume(index_dir, tmp_path, monkeypatch, capsys):
    from geosurge_index.locate import runner

    images(tmp_path / "in", 2)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_job", interrupted)
    assert cli_main(locate_argv(index_dir, tmp_path / "in", out=tmp_path / "p")) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_export_to_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "index.txt").write_text("x")
    (tmp_path / "ckpt").mkdir()
    assert cli_main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "index.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err
