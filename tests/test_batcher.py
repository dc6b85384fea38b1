"""MicroBatcher: concurrent submissions become few calls, on one thread off the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from geosurge_index.batcher import BatcherClosed, BatcherFull, MicroBatcher


class Recorder:
    """fn(batch) -> squares; records batch sizes and the threads it ran on."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.gate = gate

    def __call__(self, items: list[int]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if any(x < 0 for x in items):
            raise ValueError(f"negative input in {items}")
        return [x * x for x in items]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_are_batched_and_answered_in_order():
    async def main():
        fn = Recorder()
        b = MicroBatcher(fn, max_batch_size=8, max_wait_s=0.05)
        await b.start()
        try:
            results = await asyncio.gather(*(b.submit(i) for i in range(40)))
        finally:
            await b.stop()
        return fn, b, results

    fn, b, results = run(main())
    assert results == [i * i for i in range(40)]
    assert sorted(x for batch in fn.batches for x in batch) == list(range(40))  # each item once
    assert max(len(batch) for batch in fn.batches) == 8  # batches fill up to the bound, never beyond
    assert len(fn.batches) < 40
    assert b.stats.items == 40 and b.stats.batches == len(fn.batches)
    assert max(b.stats.sizes) > 1


def test_model_runs_on_one_worker_thread_not_the_event_loop():
    async def main():
        fn = Recorder()
        b = MicroBatcher(fn, max_batch_size=2, max_wait_s=0.0)
        await b.start()
        try:
            for i in range(3):
                await asyncio.gather(*(b.submit(i * 10 + j) for j in range(5)))
        finally:
            await b.stop()
        return fn

    fn = run(main())
    assert len(fn.threads) == 1
    assert threading.main_thread().name not in fn.threads


def test_event_loop_stays_responsive_while_the_model_runs():
    gate = threading.Event()

    async def main():
        b = MicroBatcher(Recorder(gate), max_batch_size=4, max_wait_s=0.0)
        await b.start()
        pending = asyncio.ensure_future(b.submit(3))
        ticks = 0
        for _ in range(5):  # the loop keeps running while the worker thread is blocked
            await asyncio.sleep(0.01)
            ticks += 1
        assert not pending.done()
        gate.set()
        result = await pending
        await b.stop()
        return ticks, result

    assert run(main()) == (5, 9)


def test_an_exception_reaches_every_caller_of_its_batch_and_the_batcher_goes_on():
    async def main():
        fn = Recorder()
        b = MicroBatcher(fn, max_batch_size=2, max_wait_s=5.0)  # the pair fills the batch at once
        await b.start()
        bad = await asyncio.gather(b.submit(2), b.submit(-1), return_exceptions=True)
        after = await asyncio.gather(b.submit(4), b.submit(5))
        await b.stop()
        return b, bad, after

    b, bad, after = run(main())
    assert [type(x) for x in bad] == [ValueError, ValueError]
    assert after == [16, 25]
    assert b.stats.failed_batches == 1 and b.stats.batches == 2


def test_full_queue_is_refused_whole_request_at_once():
    gate = threading.Event()

    async def main():
        b = MicroBatcher(Recorder(gate), max_batch_size=1, max_wait_s=0.0, max_queue=3)
        await b.start()
        running = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)  # 0 is in the worker; the queue is empty again
        queued = asyncio.ensure_future(b.submit_many([1, 2]))
        await asyncio.sleep(0)
        with pytest.raises(BatcherFull):
            await b.submit_many([3, 4])  # 2 + 2 > 3: none of them is queued
        assert b.queued == 2
        gate.set()
        out = await asyncio.gather(running, queued)
        await b.stop()
        return out

    assert run(main()) == [0, [1, 4]]


def test_wrong_result_count_is_an_error_not_a_misalignment():
    async def main():
        b = MicroBatcher(lambda items: items[:-1], max_batch_size=4, max_wait_s=0.05)
        await b.start()
        try:
            return await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        finally:
            await b.stop()

    results = run(main())
    assert all(isinstance(r, RuntimeError) for r in results)


def test_cancelled_callers_are_not_computed():
    gate = threading.Event()

    async def main():
        fn = Recorder(gate)
        b = MicroBatcher(fn, max_batch_size=1, max_wait_s=0.0)
        await b.start()
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(b.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        gate.set()
        await first
        assert await b.submit(3) == 9
        await b.stop()
        return fn

    fn = run(main())
    assert [x for batch in fn.batches for x in batch] == [1, 3]


def test_stopped_batcher_refuses_and_fails_what_was_queued():
    gate = threading.Event()

    async def main():
        b = MicroBatcher(Recorder(gate), max_batch_size=1, max_wait_s=0.0)
        with pytest.raises(BatcherClosed):
            await b.submit(1)
        await b.start()
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit(2))
        await asyncio.sleep(0)
        stopping = asyncio.ensure_future(b.stop())
        await asyncio.sleep(0.05)
        gate.set()
        await stopping
        return await asyncio.gather(first, queued, return_exceptions=True)

    first, queued = run(main())
    assert isinstance(queued, BatcherClosed)
    assert first == 1  # the batch in the model when stop() came was finished and answered


def test_stop_while_a_batch_is_being_gathered_fails_its_items_instead_of_hanging():
    async def main():
        fn = Recorder()
        b = MicroBatcher(fn, max_batch_size=4, max_wait_s=30.0)  # the collector waits for more
        await b.start()
        waiting = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.05)  # taken off the queue into the batch being gathered
        assert b.queued == 0
        await b.stop()
        done, _ = await asyncio.wait([waiting], timeout=2)
        return fn, waiting, bool(done)

    fn, waiting, answered = run(main())
    assert answered and isinstance(waiting.exception(), BatcherClosed)
    assert fn.batches == []
