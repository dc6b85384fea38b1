"""Images -> predictions, as clip-retrieval's inference runner splits it: swappable stages around
one unchanged worker, and the distributor as a separate strategy.

  reader     `locate.decode`     input rows / paths / bytes / PIL -> `DecodedBatch` (CPU workers)
  mapper     `locate.predictor`  `Predictor`: encoder + the index's search -> PRED_DIR rows
  writer     `pred_store`        `ChunkAssembler` + `PredStore`: one atomic shard per chunk
  job        `locate.job`        `LocateJob`, `Plan` (the ledger's pending work), batching, defaults
  runner     `locate.runner`     `run_job`: the local strategy (DataLoader workers)
  ray        `locate.ray_runner` the Ray Data strategy around the same stages (an extra)
  API        `locate.locator`    `Locator` and `Prediction`: the same stages on images in memory

The stages never import a runner. Names are re-exported here lazily (so that importing a stage
does not import the others): `from geosurge_index.locate import Locator, run_job, LocateJob`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "decode": ("TEN_CROPS", "DecodeSpec", "Decoded", "DecodedBatch", "collate", "decode_any",
               "decode_input_row", "decode_rows", "InputDataset"),
    "predictor": ("Predictor", "SearchSettings"),
    "job": ("LocateJob", "Plan", "RunStats", "plan_job", "batches_of", "default_batch_size",
            "default_workers", "summarize"),
    "runner": ("run_job", "run_local"),
    "locator": ("Locator", "Prediction", "CellPrediction", "Alternative", "PLACE_COLUMNS"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name == "ChunkAssembler":
        from geosurge_index.pred_store import ChunkAssembler

        return ChunkAssembler
    if name not in _WHERE:
        raise AttributeError(f"module 'geosurge_index.locate' has no attribute {name!r}")
    return getattr(importlib.import_module(f"geosurge_index.locate.{_WHERE[name]}"), name)
