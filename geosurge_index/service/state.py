"""What the service's routes share (routes: `service/routes.py`): `ServiceState` (the locator
once loaded, the micro-batcher, the decode pool, the cells), the model thread's unit of work
(`ModelJob`), the one prediction -> JSON mapping, and opening the index."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geosurge_index.batcher import BatcherClosed, BatcherFull, MicroBatcher
from geosurge_index.errors import UserError
from geosurge_index.index import PLACE_COLUMNS as PLACE_FIELDS  # of the best finest cell
from geosurge_index.index import IndexCells
from geosurge_index.locate.decode import Decoded
from geosurge_index.service.requests import ApiError, DecodedImage, LocatorLike, decode_upload
from geosurge_index.settings import ServiceSettings

log = logging.getLogger("geosurge.server")



@dataclass(frozen=True)
class ModelJob:
    """One image for the model thread: its decoded pixels and the top_k its request asked for.
    (Not the bulk `geosurge_index.locate.job.LocateJob`.)"""

    decoded: Decoded
    top_k: int
    include_cells: bool = True  # per-level cells (and their probabilities) are wanted


class ServiceState:
    """What the routes share: the locator once loaded, the batcher, the decode pool, the cells."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.locator: LocatorLike | None = None
        self.load_error: str | None = None
        self.cells: IndexCells | None = None  # /v1/cells
        self.decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        self.batcher = MicroBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            name="locator",
        )
        self.started = time.time()
        # Server-side seconds of recent successful /v1/locate and /predict requests, both timed
        # by `answer`: from the request body read and parsed to the predictions (decoding, queueing
        # and the model; not the client's upload, not the JSON encoding of the answer).
        self.latencies: deque[float] = deque(maxlen=2048)

    def latency_summary(self) -> dict:
        xs = sorted(self.latencies)
        if not xs:
            return {"requests": 0}
        pick = lambda q: round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1)  # noqa: E731
        return {"requests": len(xs), "p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99),
                "max_ms": round(xs[-1] * 1000, 1)}

    def attach(self, locator: LocatorLike) -> None:
        self.locator = locator

    def _run_batch(self, jobs: list[ModelJob]) -> list[Any]:
        """On the model thread: one `locate` call for the whole batch, with the largest top_k asked;
        per-level probabilities (a softmax over every cell of every level) only when a job wants them."""
        assert self.locator is not None
        return self.locator.locate([job.decoded for job in jobs], top_k=max(job.top_k for job in jobs),
                                   cell_probabilities=any(job.include_cells for job in jobs))

    @property
    def ready(self) -> bool:
        return self.locator is not None and self.batcher.running

    def _not_ready(self) -> ApiError:
        reason = self.load_error or "the index is still loading"
        return ApiError(503, "not_ready", f"not ready: {reason}", headers={"Retry-After": "5"})

    async def answer(self, uploads: Sequence[tuple[str, bytes]], top_k: int,
                     include_cells: bool = True) -> tuple[list[DecodedImage], list[Any]]:
        """Read uploads -> (decoded images, predictions), timed into `latencies`. Every route
        that locates calls this once its request is read, so all are timed from the same point."""
        t0 = time.perf_counter()
        decoded = await self.decode_all(uploads)
        preds = await self.predict([ModelJob(d.decoded, top_k, include_cells) for d in decoded])
        self.latencies.append(time.perf_counter() - t0)
        return decoded, preds

    async def decode_all(self, uploads: Sequence[tuple[str, bytes]]) -> list[DecodedImage]:
        """Decode every upload on the decode threads (in parallel, off the event loop and off the
        model thread); the first unusable one fails the request, naming it."""
        locator = self.locator
        if locator is None:
            raise self._not_ready()
        loop = asyncio.get_running_loop()
        cap = self.settings.max_pixels
        tasks = [
            loop.run_in_executor(self.decode_pool,
                                 lambda d=data, n=name: decode_upload(locator, d, n, max_pixels=cap))
            for name, data in uploads
        ]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return list(results)

    async def predict(self, jobs: list[ModelJob]) -> list[Any]:
        if not self.ready:
            raise self._not_ready()
        try:
            return await self.batcher.submit_many(jobs)
        except BatcherFull as err:
            raise ApiError(503, "overloaded", str(err), headers={"Retry-After": "1"}) from None
        except BatcherClosed as err:
            raise ApiError(503, "shutting_down", str(err)) from None


# -- results -------------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def prediction_json(pred: Any, image: DecodedImage, *, top_k: int, include_cells: bool) -> dict:
    """A `locate.Prediction` -> one image's JSON answer (one mapping, shared by all routes)."""
    out: dict[str, Any] = {
        "name": image.name,
        "width": image.width,
        "height": image.height,
        "lat": _num(pred.lat),
        "lon": _num(pred.lon),
        "probability": _num(pred.probability),
        "place": {k: getattr(pred, k) for k in PLACE_FIELDS},
        "error": pred.error,
    }
    if getattr(pred, "point_source", None) is not None:  # how lat/lon were made (galleries: gallery.refine)
        out["point_source"] = pred.point_source
        out["cell_point"] = {"lat": _num(pred.cell_lat), "lon": _num(pred.cell_lon)}
        out["neighbour"] = None if pred.neighbour_id is None else {
            "gallery": pred.neighbour_gallery, "id": pred.neighbour_id, "similarity": _num(pred.neighbour_similarity)}
    if include_cells:
        out["cells"] = [
            {"level": int(c.level), "cell_index": int(c.cell_index), "s2_token": c.s2_token,
             "probability": _num(c.probability)}
            for c in pred.cells
        ]
    out["alternatives"] = [
        {"cell_index": int(a.cell_index), "s2_token": a.s2_token, "probability": _num(a.probability),
         "lat": _num(a.lat), "lon": _num(a.lon)}
        for a in list(pred.alternatives)[:top_k]
    ]
    return out


# -- the index -----------------------------------------------------------------------------------


def manifest_summary(index_dir: Path) -> dict:
    """manifest.json without its per-file checksums (what a client wants to know about the index)."""
    from geosurge_index.index import read_manifest

    manifest = read_manifest(index_dir)
    return {"index_dir": str(index_dir), "manifest": {k: v for k, v in manifest.items() if k != "files"}}


def open_locator(settings: ServiceSettings) -> LocatorLike:
    """`Locator.open` with the service's settings: the shared inference knobs pass straight through
    (device, beam, default top_k, draft size, pixel cap, ten-crop)."""
    from geosurge_index.locate.locator import Locator

    if settings.index_dir is None or not Path(settings.index_dir).is_dir():
        raise UserError(f"INDEX_DIR {settings.index_dir} is not a folder")
    return Locator.open(settings.index_dir, settings=settings)


def open_cells(settings: ServiceSettings) -> IndexCells | None:
    """The cells table for /v1/cells; a damaged one costs that route only (404s), not the service."""
    if settings.index_dir is None:
        return None
    try:
        return IndexCells.open(settings.index_dir)
    except Exception as err:  # noqa: BLE001
        log.error("cannot open %s/cells.duckdb: %s", settings.index_dir, err)
        return None


async def load_in_background(state: ServiceState) -> None:
    try:
        locator = await asyncio.to_thread(open_locator, state.settings)
        state.cells = await asyncio.to_thread(open_cells, state.settings)
        state.attach(locator)
        log.info("index %s loaded", state.settings.index_dir)
    except Exception as err:  # noqa: BLE001 - reported by /readyz, the process stays up
        state.load_error = f"{type(err).__name__}: {err}"
        log.error("cannot load index %s: %s", state.settings.index_dir, state.load_error)
