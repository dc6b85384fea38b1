"""Micro-batching: many concurrent single-item requests -> few model calls.

Requests `submit` items; one collector task gathers them into batches (at most `max_batch_size`
items, waiting at most `max_wait_s` after the first one) and runs `fn(batch)` on one dedicated
worker thread, so the event loop never blocks on the model and the model is never called from two
threads at once. While the model is busy new items queue up, so under load the next batch is
taken full at once without waiting: throughput approaches the bulk pipeline's, and the wait only
costs latency when traffic is light.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatcherFull(RuntimeError):
    """The queue holds `max_queue` items already: the caller should answer 503 and retry later."""


class BatcherClosed(RuntimeError):
    """The batcher is not running (not started yet, or shutting down)."""


@dataclass
class BatchStats:
    """What the batcher did: how many model calls, how many items, and the batch sizes seen."""

    batches: int = 0
    items: int = 0
    failed_batches: int = 0
    dropped: int = 0  # items whose caller went away before their batch started: never computed
    sizes: Counter = field(default_factory=Counter)
    model_seconds: float = 0.0

    def record(self, size: int, seconds: float, ok: bool) -> None:
        self.batches += 1
        self.items += size
        self.sizes[size] += 1
        self.model_seconds += seconds
        self.failed_batches += 0 if ok else 1

    def as_dict(self) -> dict:
        return {
            "batches": self.batches,
            "items": self.items,
            "failed_batches": self.failed_batches,
            "dropped_items": self.dropped,
            "mean_batch_size": self.items / self.batches if self.batches else 0.0,
            "max_batch_size_seen": max(self.sizes, default=0),
            "batch_size_counts": {str(k): v for k, v in sorted(self.sizes.items())},
            "model_seconds": round(self.model_seconds, 6),
        }


@dataclass
class Submission:
    """What became of one `submit_many` call's items when its caller went away."""

    dropped: int = 0  # cancelled while still queued (those in a running batch are computed anyway)


class MicroBatcher(Generic[T, R]):
    """`await submit(item)` -> `fn([..., item, ...])[i]`, with concurrent submissions batched.

    `fn` takes a list of items and returns one result per item, in order. If it raises, every
    item of that batch gets the exception. Items whose caller went away (cancelled future) before
    their batch started are dropped, not computed.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int = 16,
        max_wait_s: float = 0.01,
        max_queue: int = 512,
        name: str = "model",
    ):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_s >= 0")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.name = name
        self.stats = BatchStats()
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._collector: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running: set[asyncio.Future] = set()  # the futures of the batch the model is computing

    @property
    def running(self) -> bool:
        return self._collector is not None and not self._collector.done()

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        if self.running:
            return
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        # One thread: the model is called from one place only, and calls never overlap.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-worker")
        self._collector = asyncio.create_task(self._collect(), name=f"{self.name}-batcher")

    async def stop(self) -> None:
        """Stop taking items; let the running batch finish and answer; fail what is still queued."""
        if self._collector is not None:
            self._collector.cancel()
            try:
                await self._collector
            except asyncio.CancelledError:
                pass
            self._collector = None
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(BatcherClosed(f"{self.name} batcher stopped"))
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # idle: _collect has awaited the last call
            self._executor = None

    async def submit(self, item: T) -> R:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[T], submission: Submission | None = None) -> list[R]:
        """Queue several items at once (all or none: never half a request) and await their results.

        Each item may land in a different batch, with other requests' items. If the caller is
        cancelled (its client went away), its items still queued are dropped, counted in
        `submission.dropped` and `stats.dropped`.
        """
        if not self.running or self._queue is None:
            raise BatcherClosed(f"{self.name} batcher is not running")
        if self._queue.qsize() + len(items) > self.max_queue:
            raise BatcherFull(
                f"{self._queue.qsize()} images are waiting for the {self.name}; the limit is {self.max_queue}"
            )
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, fut in zip(items, futures, strict=True):
            self._queue.put_nowait((item, fut))  # cannot block: room was checked, and no await between
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            # gather cancels them all on the way out: those not in the running batch were still queued
            queued = [f for f in futures if (f.cancelled() or not f.done()) and f not in self._running]
            for fut in futures:  # the caller went away or one item failed: drop the rest
                fut.cancel()
            self.stats.dropped += len(queued)
            if submission is not None:
                submission.dropped = len(queued)
            raise

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch: list[tuple[T, asyncio.Future]] = []
            try:
                batch.append(await self._queue.get())
                deadline = loop.time() + self.max_wait_s
                while len(batch) < self.max_batch_size:
                    try:
                        batch.append(self._queue.get_nowait())
                        continue
                    except asyncio.QueueEmpty:
                        pass
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except TimeoutError:
                        break
            except asyncio.CancelledError:
                # stop() while gathering: these items are off the queue, so stop() cannot fail them
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(BatcherClosed(f"{self.name} batcher stopped"))
                raise
            live = [(item, fut) for item, fut in batch if not fut.done()]
            if live:
                await self._run(live)

    async def _run(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        items = [item for item, _ in batch]
        self._running = {fut for _, fut in batch}
        start = time.perf_counter()
        call = asyncio.get_running_loop().run_in_executor(self._executor, self.fn, items)
        stopping = False
        try:
            try:
                results = await asyncio.shield(call)
            except asyncio.CancelledError:
                # stop() while the model runs: the thread cannot be interrupted, so let this
                # batch finish and answer its callers, then stop.
                stopping = True
                results = await call
            results = list(results)
            if len(results) != len(items):
                raise RuntimeError(f"{self.name} returned {len(results)} results for {len(items)} inputs")
        except Exception as err:  # noqa: BLE001 - handed to every waiting caller
            self.stats.record(len(items), time.perf_counter() - start, ok=False)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
        else:
            self.stats.record(len(items), time.perf_counter() - start, ok=True)
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
        self._running = set()
        if stopping:
            raise asyncio.CancelledError
