"""The DynamicBatcher on its own: batches run side by side up to ``concurrency``, every request gets its
own values back, and the stall clock follows the oldest running batch."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from crfiqa.service.api.batching import DynamicBatcher


def _values(crops: np.ndarray) -> np.ndarray:
    return crops.reshape(len(crops), -1)[:, 0].astype(np.float64)


def _run_two_batches(concurrency: int) -> list:
    """Two one-face requests in batches of one whose function only returns once both run at the same time."""
    barrier = threading.Barrier(2, timeout=1.5)

    def fn(crops: np.ndarray) -> np.ndarray:
        barrier.wait()
        return _values(crops)

    async def main() -> list:
        with ThreadPoolExecutor(2) as pool:
            b = DynamicBatcher(fn, pool, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=8,
                               concurrency=concurrency)
            b.start()
            crops = [np.full((1, 2, 2, 3), k, np.uint8) for k in (3, 7)]
            out = await asyncio.gather(*(b.submit(c) for c in crops), return_exceptions=True)
            await b.stop()
            return out

    return asyncio.run(main())


def test_two_batches_run_at_once_with_concurrency_two() -> None:
    out = _run_two_batches(2)
    assert [list(v) for v in out] == [[3.0], [7.0]]


def test_one_batch_at_a_time_with_concurrency_one() -> None:
    out = _run_two_batches(1)
    assert all(isinstance(v, threading.BrokenBarrierError) for v in out), out


@pytest.mark.parametrize("concurrency", [1, 3])
def test_every_request_gets_its_own_values(concurrency: int) -> None:
    rng = np.random.default_rng(0)

    def fn(crops: np.ndarray) -> np.ndarray:
        time.sleep(0.002 * len(crops))  # long enough for batches to overlap
        return _values(crops)

    async def main() -> tuple[list, list, int]:
        with ThreadPoolExecutor(concurrency) as pool:
            b = DynamicBatcher(fn, pool, max_batch_size=8, max_queue_delay_s=0.001, max_queue_size=10_000,
                               concurrency=concurrency)
            b.start()
            requests = [rng.integers(0, 255, (int(rng.integers(1, 12)), 2, 2, 3)).astype(np.uint8) for _ in range(60)]
            out = await asyncio.gather(*(b.submit(r) for r in requests))
            pending = b.pending
            await b.stop()
            return requests, out, pending

    requests, out, pending = asyncio.run(main())
    for r, v in zip(requests, out):
        np.testing.assert_array_equal(v, _values(r))
    assert pending == 0


def test_stall_clock_follows_the_oldest_running_batch() -> None:
    release = threading.Event()

    def fn(crops: np.ndarray) -> np.ndarray:
        release.wait(5)
        return _values(crops)

    async def main() -> tuple[float, float, float]:
        with ThreadPoolExecutor(2) as pool:
            b = DynamicBatcher(fn, pool, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=8, concurrency=2)
            b.start()
            idle = b.stall_s()
            first = asyncio.ensure_future(b.submit(np.zeros((1, 2, 2, 3), np.uint8)))
            await asyncio.sleep(0.3)
            second = asyncio.ensure_future(b.submit(np.ones((1, 2, 2, 3), np.uint8)))
            await asyncio.sleep(0.1)
            running = b.stall_s()
            release.set()
            await asyncio.gather(first, second)
            await b.stop()
            return idle, running, b.stall_s()

    idle, running, done = asyncio.run(main())
    assert idle == 0.0 and done == 0.0
    assert running >= 0.35  # the first batch's age, not the second's


def test_without_a_delay_what_is_already_queued_still_joins_the_batch() -> None:
    release = threading.Event()

    def fn(crops: np.ndarray) -> np.ndarray:
        release.wait(5)
        return _values(crops)

    async def main() -> list[int]:
        sizes: list[int] = []
        with ThreadPoolExecutor(1) as pool:
            b = DynamicBatcher(fn, pool, max_batch_size=32, max_queue_delay_s=0.0, max_queue_size=64,
                               on_batch=sizes.append, concurrency=1)
            b.start()
            first = asyncio.ensure_future(b.submit(np.zeros((1, 2, 2, 3), np.uint8)))
            await asyncio.sleep(0.1)  # the first batch (one face) is running; five more requests queue behind it
            rest = [asyncio.ensure_future(b.submit(np.full((1, 2, 2, 3), k, np.uint8))) for k in range(5)]
            await asyncio.sleep(0.1)
            release.set()
            await asyncio.gather(first, *rest)
            await b.stop()
            return sizes

    assert asyncio.run(main()) == [1, 5]


def test_stop_gives_up_on_a_stuck_batch_and_answers_every_request() -> None:
    """A batch that never returns holds neither ``stop`` (past its timeout) nor the requests behind it."""
    from crfiqa.service.errors import InferenceError

    release = threading.Event()

    def fn(crops: np.ndarray) -> np.ndarray:
        release.wait(10)
        return _values(crops)

    async def main() -> tuple[float, list]:
        pool = ThreadPoolExecutor(1)
        b = DynamicBatcher(fn, pool, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=8, concurrency=1)
        b.start()
        futures = [asyncio.ensure_future(b.submit(np.full((1, 2, 2, 3), k, np.uint8))) for k in range(3)]
        await asyncio.sleep(0.1)  # one batch stuck in fn, one forming or queued behind it
        t0 = time.monotonic()
        await b.stop(timeout_s=0.3)
        took = time.monotonic() - t0
        out = await asyncio.gather(*futures, return_exceptions=True)
        assert b.stall_s() > 0  # the thread still runs: stop answered its request without it
        release.set()
        pool.shutdown(wait=True)
        return took, out

    took, out = asyncio.run(main())
    assert 0.3 <= took < 2.0
    assert all(isinstance(e, InferenceError) and "stopped" in e.message for e in out), out
