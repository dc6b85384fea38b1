"""Index integrity: the structural check on open (what a skipped checksum would miss),
`geosurge verify`, and `geosurge search` reading only the files it uses."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from geosurge_index.cli import main
from geosurge_index.errors import FormatError
from geosurge_index.index import CELLS_DB, MANIFEST, GeoIndex, _sha256, export_index, verify_index
from geosurge_index.index_check import check_index
from geosurge_index.synthetic import synthetic_hierarchy, synthetic_queries


@pytest.fixture(scope="module")
def hierarchy():
    return synthetic_hierarchy(400, dim=24, seed=7)


@pytest.fixture(scope="module")
def exported(hierarchy, tmp_path_factory):
    h = hierarchy
    out = tmp_path_factory.mktemp("integrity") / "index"

    def encoder_writer(d):  # stands in for model.save_encoder
        (d / "encoder.safetensors").write_bytes(b"weights")
        (d / "encoder.json").write_text("{}")

    export_index(h.tables, h.temperatures, h.cells_table(), out, encoder_writer=encoder_writer,
                 place_names=False)
    return out


def _copy(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _hash(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _flip_vector_bytes(path: Path, n_vectors: int, dim: int, step: int = 97) -> None:
    """Flip every `step`-th byte of the vector storage (the file's last n*dim*4 bytes), as the
    attack did: same size, FAISS still reads it."""
    data = bytearray(path.read_bytes())
    start = len(data) - n_vectors * dim * 4
    for k in range(start, len(data), step):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite_cells(index: Path, *statements: str) -> None:
    """Change cells.duckdb and re-checksum it: only the structural check can tell."""
    db = index / CELLS_DB
    con = duckdb.connect(str(db))
    for s in statements:
        con.execute(s)
    con.execute("CHECKPOINT")
    con.close()
    m = json.loads((index / MANIFEST).read_text())
    m["files"][CELLS_DB] = {"sha256": _sha256(db), "bytes": db.stat().st_size}
    (index / MANIFEST).write_text(json.dumps(m))


# --- the structural check on open ----------------------------------------------------------------

def test_flipped_vector_bytes_without_checksums_are_refused(exported, hierarchy, tmp_path, capsys):
    d = _copy(exported, tmp_path)
    _flip_vector_bytes(d / "level_7.faiss", hierarchy.sizes[6], 24)
    verify_index(d, checksums=False)  # sizes agree: only the structure can tell
    with pytest.raises(FormatError, match=r"level_7\.faiss: \d+ vector\(s\) are not unit-norm"):
        GeoIndex.open(d, device="cpu", verify=False)
    with pytest.raises(FormatError, match="level_7.faiss does not match its sha256"):
        GeoIndex.open(d, device="cpu")
    q, _ = synthetic_queries(hierarchy, 20, seed=1)
    np.save(tmp_path / "q.npy", q)
    code = main(["search", str(d), "--embeddings", str(tmp_path / "q.npy"), "--out", str(tmp_path / "o.parquet"),
                 "--no-verify", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "level_7.faiss" in err and "unit-norm" in err
    assert not (tmp_path / "o.parquet").exists()


def test_nan_vectors_are_refused(exported, tmp_path):
    d = _copy(exported, tmp_path)
    path = d / "level_2.faiss"
    data = bytearray(path.read_bytes())
    data[-4:] = np.array([np.nan], dtype=np.float32).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="level_2.faiss: 1 vector"):
        GeoIndex.open(d, device="cpu", verify=False)


@pytest.mark.parametrize(("statements", "message"), [
    (["UPDATE cells SET cell_index = cell_index + 1 WHERE level = 4 AND cell_index >= 3"],
     "cell_index is not dense"),
    (["UPDATE cells SET parent_index = 10000 WHERE level = 5 AND cell_index = 0"],
     "parent_index out of range"),
    (["DELETE FROM cells WHERE level = 6 AND cell_index = 0",
      "UPDATE cells SET cell_index = cell_index - 1 WHERE level = 6"],
     "the levels table says"),
    (["UPDATE levels SET n_cells = n_cells + 1 WHERE level = 2"], "the levels table counts"),
    (["UPDATE cells SET level = 0 WHERE level = 1 AND cell_index = 0"], "rows at level 0"),
])
def test_cells_table_that_is_not_the_manifests_tree_is_refused(exported, tmp_path, statements, message):
    d = _copy(exported, tmp_path)
    _rewrite_cells(d, *statements)
    verify_index(d)  # the checksums agree: the file was replaced along with them
    with pytest.raises(FormatError, match=f"{CELLS_DB}: .*{message}"):
        GeoIndex.open(d, device="cpu")


def test_manifest_file_names_stay_inside_the_folder(exported, tmp_path):
    d = _copy(exported, tmp_path)
    m = json.loads((d / MANIFEST).read_text())
    m["levels"][0]["file"] = "../../etc/passwd"
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FormatError, match="plain names"):
        GeoIndex.open(d, device="cpu")


# --- geosurge verify --------------------------------------------------------------------------------

def test_verify_passes_a_good_index_and_changes_nothing(exported, capsys):
    before = _hash(exported)
    assert main(["verify", str(exported)]) == 0
    out = capsys.readouterr().out
    for name in [MANIFEST, CELLS_DB, "encoder.json", *(f"level_{i}.faiss" for i in range(1, 8))]:
        assert name in out
    assert "sha256 matches" in out and "unit-norm" in out and "parents in range" in out
    assert "FAIL" not in out and "all 19 checks passed" in out
    assert _hash(exported) == before


def test_verify_reports_every_failure_and_exits_non_zero(exported, hierarchy, tmp_path, capsys):
    d = _copy(exported, tmp_path)
    _flip_vector_bytes(d / "level_7.faiss", hierarchy.sizes[6], 24)
    (d / "encoder.json").unlink()
    assert main(["verify", str(d)]) == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 3, captured.out  # the checksum and the vectors of level 7, encoder.json
    assert any("level_7.faiss" in f and "sha256" in f for f in failed)
    assert any("level_7.faiss (vectors)" in f and "unit-norm" in f for f in failed)
    assert any("encoder.json" in f and "missing" in f for f in failed)
    assert "3 of 19 checks failed" in captured.err

    checks = check_index(d, checksums=False)  # the library call: no sha256, structure still checked
    assert [c.what for c in checks if not c.ok] == ["encoder.json", "level_7.faiss (vectors)"]


def test_verify_damaged_cells_and_missing_manifest(exported, tmp_path, capsys):
    d = _copy(exported, tmp_path)
    _rewrite_cells(d, "UPDATE cells SET cell_index = cell_index * 2 WHERE level = 7")
    assert main(["verify", str(d)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  cells.duckdb (tables)" in out and "not dense" in out
    assert "FAIL  level_7.faiss (vectors)" not in out  # the vectors themselves are fine
    (d / MANIFEST).unlink()
    assert main(["verify", str(d)]) == 1
    assert "FAIL  manifest.json" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_verify_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    out = capsys.readouterr().out
    assert "geosurge verify index/" in out and "Exit status" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "verify" in capsys.readouterr().out


# --- search reads only what it uses ------------------------------------------------------------------

def _search(index: Path, emb: Path, out: Path, *extra: str) -> int:
    return main(["search", str(index), "--embeddings", str(emb), "--out", str(out), "--device", "cpu",
                 "--exhaustive", *extra])


def test_search_needs_no_encoder_files(exported, hierarchy, tmp_path):
    q, _ = synthetic_queries(hierarchy, 25, seed=3)
    np.save(tmp_path / "q.npy", q)
    assert _search(exported, tmp_path / "q.npy", tmp_path / "full.parquet") == 0
    want = pq.read_table(tmp_path / "full.parquet")

    # listed in the manifest, then deleted (the folder was copied without them)
    d = _copy(exported, tmp_path)
    for name in ("encoder.safetensors", "encoder.json"):
        (d / name).unlink()
    for extra in ((), ("--no-verify",)):
        out = tmp_path / f"deleted{len(extra)}.parquet"
        assert _search(d, tmp_path / "q.npy", out, *extra) == 0
        _same_answers(pq.read_table(out), want)
    # a command that encodes images still needs them
    with pytest.raises(FormatError, match="encoder.safetensors is missing"):
        GeoIndex.open(d, device="cpu")
    assert GeoIndex.open(d, device="cpu", encoder=False).levels == 7

    # exported without an encoder at all
    h = hierarchy
    bare = export_index(h.tables, h.temperatures, h.cells_table(), tmp_path / "bare", place_names=False)
    assert _search(bare, tmp_path / "q.npy", tmp_path / "bare.parquet") == 0
    _same_answers(pq.read_table(tmp_path / "bare.parquet"), want)


def _same_answers(got, want) -> None:
    # cells exactly; probabilities to float32 rounding (BLAS may sum in another order under load)
    assert got.column("topk_cells").to_pylist() == want.column("topk_cells").to_pylist()
    np.testing.assert_allclose(got.column("probability").to_numpy(), want.column("probability").to_numpy(),
                               rtol=1e-5)
