"""What the service's routes share (routes: `service/routes.py`): `ServiceState` (the locator
once loaded, the micro-batcher, the decode pool and its pixel budget, the cells, the connection
figures), the model thread's unit of work (`ModelJob`), the one prediction -> JSON mapping, and
opening the index.

A client that goes away: while its body is read, starlette's `ClientDisconnect`; afterwards
`answer` watches the connection and, when it closes, cancels the request's images still queued
for the model (the batcher drops cancelled items before a batch starts). Either way the app logs
one line (`log_client_gone`), not a traceback."""

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

from geosurge_index.batcher import BatcherClosed, BatcherFull, MicroBatcher, Submission
from geosurge_index.calibration import WITHIN_COLUMNS
from geosurge_index.errors import UserError
from geosurge_index.index import PLACE_COLUMNS as PLACE_FIELDS  # of the best finest cell
from geosurge_index.index import IndexCells
from geosurge_index.locate.decode import Decoded
from geosurge_index.privacy import Cap, coarsest
from geosurge_index.service.budget import PixelBudget, return_decoded_memory_to_the_os
from geosurge_index.service.guard import GuardStats
from geosurge_index.service.requests import ApiError, DecodedImage, LocatorLike, Upload, decode_upload
from geosurge_index.settings import ServiceSettings

log = logging.getLogger("geosurge.server")


class ClientGone(Exception):
    """The client closed its connection before its answer: nothing is sent, one line is logged."""

    def __init__(self, dropped: int = 0):
        super().__init__(f"{dropped} images dropped")
        self.dropped = dropped


def log_client_gone(scope: dict, when: str, dropped: int = 0) -> None:
    client = scope.get("client")
    who = f"{client[0]}:{client[1]}" if client else "a client"
    what = f"; {dropped} of its images dropped before the model" if dropped else ""
    log.info("client %s disconnected %s (%s %s)%s", who, when, scope.get("method"), scope.get("path"), what)


async def _disconnected(receive) -> None:
    """Returns when the ASGI server says the client has gone (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass



@dataclass(frozen=True)
class ModelJob:
    """One image for the model thread: its decoded pixels and the top_k its request asked for.
    (Not the bulk `geosurge_index.locate.job.LocateJob`.)"""

    decoded: Decoded
    top_k: int
    include_cells: bool = True  # per-level cells (and their probabilities) are wanted
    cap: Cap | None = None  # the precision cap in force for this image (`ServiceState.cap_for`)


class ServiceState:
    """What the routes share: the locator once loaded, the batcher, the decode pool, the cells."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.locator: LocatorLike | None = None
        self.load_error: str | None = None
        self.cells: IndexCells | None = None  # /v1/cells
        self.decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        self.pixels = PixelBudget(settings.decode_pixel_budget)  # decoding memory, across requests
        return_decoded_memory_to_the_os()
        self.connections = GuardStats()  # filled by the uvicorn protocol (`service.guard`)
        self.disconnects = 0
        self.dropped_images = 0  # queued images of clients that went away, never computed
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
        caps = {"cap": [job.cap for job in jobs]} if any(job.cap for job in jobs) else {}
        return self.locator.locate([job.decoded for job in jobs], top_k=max(job.top_k for job in jobs),
                                   cell_probabilities=any(job.include_cells for job in jobs), **caps)

    def cap_for(self, km: float | None = None, level: int | None = None) -> Cap | None:
        """The cap of one request: the service's (its settings), made coarser by the request's
        `cap_km` / `cap_level` where they ask for it; never finer."""
        return coarsest(Cap.from_settings(self.settings), Cap.of(km, level))

    @property
    def ready(self) -> bool:
        return self.locator is not None and self.batcher.running

    def _not_ready(self) -> ApiError:
        reason = self.load_error or "the index is still loading"
        return ApiError(503, "not_ready", f"not ready: {reason}", headers={"Retry-After": "5"})

    async def answer(self, uploads: Sequence[Upload | tuple[str, bytes]], top_k: int,
                     include_cells: bool = True, receive=None, cap: Cap | None = None,
                     ) -> tuple[list[DecodedImage | ApiError], list[Any]]:
        """Read uploads -> (per image: decoded image or its refusal; predictions of the decoded
        ones, in order), timed into `latencies`. Every route that locates calls this once its
        request is read, so all are timed from the same point. When no image is usable the
        first refusal is raised (a one-image request answers that image's 4xx). `receive`: the
        request's ASGI receive; when given, a client that goes away has its queued images
        dropped (`ClientGone`). `cap`: the request's precision cap (`cap_for`); the service's own
        applies whatever is given."""
        t0 = time.perf_counter()
        submission = Submission()
        cap = coarsest(Cap.from_settings(self.settings), cap)
        work = self._answer([Upload.of(u) for u in uploads], top_k, include_cells, submission, cap)
        if receive is None:
            out = await work
        else:
            out = await self._unless_gone(work, receive, submission)
        self.latencies.append(time.perf_counter() - t0)
        return out

    async def _answer(self, uploads: list[Upload], top_k: int, include_cells: bool, submission: Submission,
                      cap: Cap | None = None):
        decoded = await self.decode_all(uploads)
        good = [d for d in decoded if isinstance(d, DecodedImage)]
        if not good:
            raise next(d for d in decoded if isinstance(d, ApiError))
        preds = await self.predict([ModelJob(d.decoded, top_k, include_cells, cap) for d in good], submission)
        return decoded, preds

    async def _unless_gone(self, work, receive, submission: Submission):
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task in done:
            return task.result()
        task.cancel()  # cancels the batcher's futures: their items are skipped, not computed
        try:
            await task
        except BaseException:  # noqa: BLE001 - cancelled, or failed on its way out: both moot now
            pass
        self.disconnects += 1
        self.dropped_images += submission.dropped
        raise ClientGone(submission.dropped)

    async def decode_all(self, uploads: Sequence[Upload | tuple[str, bytes]]) -> list[DecodedImage | ApiError]:
        """Decode every upload on the decode threads (in parallel, off the event loop and off the
        model thread, within the pixel budget): each a `DecodedImage` or the `ApiError` naming it."""
        locator = self.locator
        if locator is None:
            raise self._not_ready()
        loop = asyncio.get_running_loop()
        cap, hold = self.settings.max_pixels, self.pixels.hold
        tasks = [
            loop.run_in_executor(self.decode_pool,
                                 lambda u=Upload.of(u): decode_upload(locator, u.data, u.name, max_pixels=cap,
                                                                      class_map=u.class_map, hold=hold))
            for u in uploads
        ]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, ApiError):
                raise r
        return list(results)

    async def predict(self, jobs: list[ModelJob], submission: Submission | None = None) -> list[Any]:
        if not self.ready:
            raise self._not_ready()
        try:
            return await self.batcher.submit_many(jobs, submission)
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


def prediction_json(pred: Any, image: DecodedImage | ApiError, *, top_k: int, include_cells: bool,
                    name: str | None = None) -> dict:
    """A `locate.Prediction` -> one image's JSON answer (one mapping, shared by all routes); an
    image refused (`ApiError`) -> its error entry, with the same fields."""
    if isinstance(image, ApiError):
        return error_json(name or "image", image.message, image.kind, include_cells)
    out: dict[str, Any] = {
        "name": image.name,
        "width": image.width,
        "height": image.height,
        "lat": _num(pred.lat),
        "lon": _num(pred.lon),
        "probability": _num(pred.probability),
        "place": {k: getattr(pred, k) for k in PLACE_FIELDS},
        "error": pred.error,
        "error_kind": None if pred.error is None else pred.error.split(":", 1)[0],
        **confidence_json(pred),
    }
    info = getattr(pred, "cap", None)
    if info is not None:
        out["cap"] = {"km": info.km, "level": info.level, "answered_level": info.answered_level,
                      "s2_token": info.s2_token, "extent_km": _num(info.extent_km)}
    if getattr(pred, "point_source", None) is not None:  # how lat/lon were made (galleries: gallery.refine)
        out["point_source"] = pred.point_source
        out["cell_point"] = {"lat": _num(pred.cell_lat), "lon": _num(pred.cell_lon)}
        out["neighbour"] = None if pred.neighbour_id is None else {
            "gallery": pred.neighbour_gallery, "id": pred.neighbour_id, "similarity": _num(pred.neighbour_similarity)}
    if include_cells:
        out["cells"] = [
            {"level": int(c.level), "cell_index": int(c.cell_index), "s2_token": c.s2_token,
             "probability": _num(c.probability), "confidence": _num(getattr(c, "confidence", None))}
            for c in pred.cells
        ]
    out["alternatives"] = [
        {"cell_index": int(a.cell_index), "s2_token": a.s2_token, "probability": _num(a.probability),
         "lat": _num(a.lat), "lon": _num(a.lon),
         **({"level": a.level} if getattr(a, "level", None) is not None else {})}
        for a in list(pred.alternatives)[:top_k]
    ]
    return out


def confidence_json(pred: Any) -> dict:
    """The confidence fields of an answer (`confidence.py`): the probability that the true point is
    in the reported finest cell, the error radii, whether the index's calibration made them, and the
    probability that the true point lies within each distance (`p_within_*km`)."""
    cal = getattr(pred, "calibrated", None)
    return {"confidence": _num(getattr(pred, "confidence", None)), "r50_km": _num(getattr(pred, "r50_km", None)),
            "r90_km": _num(getattr(pred, "r90_km", None)), "calibrated": None if cal is None else bool(cal),
            **{k: _num(getattr(pred, k, None)) for k in WITHIN_COLUMNS}}


def error_json(name: str, message: str, kind: str, include_cells: bool) -> dict:
    out: dict[str, Any] = {
        "name": name, "width": None, "height": None, "lat": None, "lon": None, "probability": None,
        "place": dict.fromkeys(PLACE_FIELDS), "error": message, "error_kind": kind,
        **confidence_json(None),
    }
    if include_cells:
        out["cells"] = []
    out["alternatives"] = []
    return out


def results_json(uploads: Sequence[Upload], decoded: Sequence[DecodedImage | ApiError], preds: Sequence[Any],
                 *, top_k: int, include_cells: bool) -> list[dict]:
    """Every image's answer in the order sent: the predictions go to the images that decoded."""
    it = iter(preds)
    return [prediction_json(None if isinstance(d, ApiError) else next(it), d, top_k=top_k,
                            include_cells=include_cells, name=u.name)
            for u, d in zip(uploads, decoded, strict=True)]


# -- the index -----------------------------------------------------------------------------------


def cap_json(settings: ServiceSettings) -> dict:
    """The service-wide precision cap, for /v1/index (None parts: no cap of that kind)."""
    return {"km": settings.cap_km, "level": settings.cap_level, "capped": Cap.from_settings(settings) is not None,
            "note": "a request may ask a coarser answer (cap_km, cap_level), never a finer one"}


def manifest_summary(index_dir: Path) -> dict:
    """manifest.json without its per-file checksums (what a client wants to know about the index),
    and whether its segmenter was trained (`locate.locator.segmenter_warning`)."""
    from geosurge_index.calibration import CALIBRATION_FILE
    from geosurge_index.index import read_manifest
    from geosurge_index.locate.locator import segmenter_warning

    manifest = read_manifest(index_dir)
    note = segmenter_warning(index_dir)
    calibration = manifest.get("calibration") if CALIBRATION_FILE in manifest["files"] else None
    return {"index_dir": str(index_dir), "manifest": {k: v for k, v in manifest.items() if k != "files"},
            "segmenter": {"trained": note is None, "warning": note},
            "calibration": calibration or {"calibrated": False, "note": "probabilities are the model's own "
                                           "(uncalibrated): fit a calibration with `geosurge calibrate`"}}


def open_locator(settings: ServiceSettings, *, warn_untrained: bool = True) -> LocatorLike:
    """`Locator.open` with the service's settings: the shared inference knobs pass straight through
    (device, beam, default top_k, draft size, pixel cap, ten-crop). `warn_untrained`: as
    `Locator.open`'s (it logs one line when the index's segmenter was never trained)."""
    from geosurge_index.locate.locator import Locator

    if settings.index_dir is None or not Path(settings.index_dir).is_dir():
        raise UserError(f"INDEX_DIR {settings.index_dir} is not a folder")
    return Locator.open(settings.index_dir, settings=settings, warn_untrained=warn_untrained)


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
