"""Reading stored visual embeddings in batches, for re-querying an index (`geosurge search`).

Inputs: a .npy file (n, dim) float (ids = row numbers), or a Parquet file or folder with an
`embedding` list<float> column and optional `id`, `path` and `error` columns (e.g. a PRED_DIR
written with `geosurge locate --save-embeddings`). Rows that cannot be searched (missing,
wrong-length, non-finite or all-zero embeddings) come back as error rows, never exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from geosurge_index.errors import UserError


@dataclass
class EmbeddingBatch:
    ids: list[str]
    paths: list[str | None]
    errors: list[str | None]  # one per row
    embeddings: np.ndarray  # (rows without error, dim) float32


def _check_rows(emb: np.ndarray, errors: list[str | None], ok_rows: np.ndarray) -> np.ndarray:
    """Error rows for non-finite embeddings and ones the engine cannot normalise (a float32 norm
    of 0, e.g. all zeros or tiny values, or inf); returns the rows still fine."""
    finite = np.isfinite(emb).all(axis=1)
    with np.errstate(over="ignore", under="ignore"):
        norms = np.linalg.norm(np.where(finite[:, None], emb, 0), axis=1)  # float32, as the engine
    normal = (norms > 0) & np.isfinite(norms)
    for r in ok_rows[~finite].tolist():
        errors[r] = "bad_embedding: non-finite values"
    for r in ok_rows[finite & ~normal].tolist():
        errors[r] = "bad_embedding: all zeros, or a norm too small or too large for float32"
    return finite & normal


def read_embedding_batches(path, dim: int, batch_size: int, *, id_column: str = "id",
                           embedding_column: str = "embedding"):
    """-> (iterator of EmbeddingBatch, total rows) for a .npy file or Parquet file/folder."""
    import pyarrow.dataset as pads

    path = Path(path)
    if not path.exists():
        raise UserError(f"--embeddings {path} does not exist")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise UserError(f"--embeddings {path}: not a readable .npy file ({err})") from err
        if arr.ndim != 2 or arr.dtype.kind != "f" or arr.shape[1] != dim:
            raise UserError(f"--embeddings {path}: a ({arr.shape}) {arr.dtype} array; the index "
                            f"takes float (n, {dim})")

        def npy_batches():
            for a in range(0, arr.shape[0], batch_size):
                emb = np.asarray(arr[a:a + batch_size], dtype=np.float32)
                errors: list[str | None] = [None] * emb.shape[0]
                keep = _check_rows(emb, errors, np.arange(emb.shape[0]))
                yield EmbeddingBatch([str(i) for i in range(a, a + emb.shape[0])], [None] * emb.shape[0],
                                     errors, emb[keep])

        return npy_batches(), arr.shape[0]
    try:
        ds = pads.dataset(str(path), format="parquet")
        names = ds.schema.names
    except (OSError, ValueError) as err:
        raise UserError(f"--embeddings {path}: not a Parquet file or folder ({err})") from err
    if embedding_column not in names:
        raise UserError(f"--embeddings {path}: no {embedding_column!r} column (columns: {names})")
    cols = [c for c in (id_column, "path", "error") if c in names] + [embedding_column]

    def parquet_batches():
        import pyarrow.compute as pc

        row0 = 0
        for rb in ds.to_batches(columns=cols, batch_size=batch_size):
            n = rb.num_rows
            if n == 0:
                continue
            ids = (rb.column(id_column).cast("string").to_pylist() if id_column in cols else [None] * n)
            ids = [str(row0 + i) if v is None else v for i, v in enumerate(ids)]
            paths = rb.column("path").cast("string").to_pylist() if "path" in cols else [None] * n
            errors = rb.column("error").cast("string").to_pylist() if "error" in cols else [None] * n
            col = rb.column(embedding_column)
            if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
                    or pa.types.is_fixed_size_list(col.type)):
                raise UserError(f"--embeddings {path}: column {embedding_column!r} is {col.type}, "
                                "expected a list of floats")
            lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32)
            starts = np.cumsum(lengths) - lengths
            present = col.is_valid().to_numpy(zero_copy_only=False)
            no_error = np.array([e is None for e in errors], dtype=bool)
            for r in np.flatnonzero(no_error & ~present).tolist():
                errors[r] = "missing_embedding: the row has no embedding"
            for r in np.flatnonzero(no_error & present & (lengths != dim)).tolist():
                errors[r] = f"bad_embedding: {lengths[r]} values, the index takes {dim}"
            ok_rows = np.flatnonzero([e is None for e in errors])
            emb = flat[starts[ok_rows, None] + np.arange(dim)[None, :]] if ok_rows.size else \
                np.zeros((0, dim), np.float32)
            keep = _check_rows(emb, errors, ok_rows)
            row0 += n
            yield EmbeddingBatch(ids, paths, errors, emb[keep])

    return parquet_batches(), ds.count_rows()
