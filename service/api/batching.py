"""Cross-request dynamic batching of quality inference (Triton-style), with a bounded queue.

Requests submit their face crops; one collector gathers crops from concurrent requests until
``max_batch_size`` faces or ``max_queue_delay`` has passed since the first, runs the model once in an
executor thread (off the event loop), and splits the result back per request. Up to ``concurrency``
batches run at once (like Triton's model instances): while one batch computes, the next one forms and
starts, so a core is never idle waiting for the previous batch's results to be split and answered. A
failure fails only the requests in that batch; a full queue is refused at once so the caller can answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from crfiqa.service.errors import CrfiqaError, InferenceError


class QueueFullError(CrfiqaError):
    """More faces are waiting than ``max_queue_size`` allows."""

    code = "queue_full"


@dataclass
class _Item:
    crops: np.ndarray
    future: asyncio.Future


class DynamicBatcher:
    """Gathers crops across requests into batches for ``fn`` (a pure batch-in, values-out function)."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], executor: Executor, max_batch_size: int,
                 max_queue_delay_s: float, max_queue_size: int,
                 on_batch: Callable[[int], None] = lambda n: None,
                 on_depth: Callable[[int], None] = lambda n: None, concurrency: int = 1) -> None:
        self.fn, self.executor = fn, executor
        self.concurrency = concurrency
        self.max_batch_size, self.max_delay, self.max_queue_size = max_batch_size, max_queue_delay_s, max_queue_size
        self.on_batch, self.on_depth = on_batch, on_depth
        self.pending = 0  # faces submitted and not yet answered
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._carry: _Item | None = None
        self._task: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None  # one per batch that may run at once
        self._batches: set[asyncio.Task] = set()  # running batches (held so they are not collected)
        self._started: dict[int, float] = {}  # running batch -> time.monotonic() when its thread started it
        self._forming: list[_Item] = []  # the batch the collector is filling (failed by restart if it dies)

    @property
    def alive(self) -> bool:
        """The collector task is running (it ends only on ``stop`` or a bug)."""
        return self._task is not None and not self._task.done()

    def stall_s(self) -> float:
        """How long the oldest batch now running has run (0 when none is)."""
        started = list(self._started.values())
        return time.monotonic() - min(started) if started else 0.0

    def start(self) -> None:
        """Start the collector on the running loop."""
        self._slots = asyncio.Semaphore(self.concurrency)
        self._task = asyncio.get_running_loop().create_task(self._collect())

    def restart(self) -> None:
        """Start a new collector after the old one ended unexpectedly; the requests it held fail (typed).
        Batches still running answer their own requests and free their own slots."""
        items = self._take_waiting()
        _fail(items, InferenceError("the inference worker stopped and was restarted; retry the request"))
        self.pending -= sum(len(it.crops) for it in items)
        self.on_depth(self.pending)
        self.start()  # fresh slots: a slot the dead collector held is not lost

    async def stop(self, timeout_s: float | None = None) -> None:
        """Answer what is queued, waiting at most ``timeout_s``, then stop the collector. Requests still
        waiting then (behind a batch stuck in the model, say) fail, typed, instead of holding shutdown."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.pending and self.alive and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.01)
        tasks = [*([self._task] if self._task is not None else []), *self._batches]
        for task in tasks:
            task.cancel()  # a running batch's thread cannot be stopped; its requests are answered now
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        _fail(self._take_waiting(), _stopped())

    def _take_waiting(self) -> list[_Item]:
        """Take every item not yet in a running batch: the one forming, the held-over one and the queue."""
        items = [*self._forming, *([self._carry] if self._carry is not None else [])]
        self._forming, self._carry = [], None
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    async def submit(self, crops: np.ndarray) -> np.ndarray:
        """Values for ``crops`` [N,...] once their batch has run; raises ``QueueFullError`` when full."""
        n = len(crops)
        if n == 0:
            return np.zeros(0)
        if self.pending + n > self.max_queue_size:
            raise QueueFullError(f"{self.pending} faces queued; the limit is {self.max_queue_size}")
        future = asyncio.get_running_loop().create_future()
        self.pending += n
        self.on_depth(self.pending)
        self._queue.put_nowait(_Item(crops, future))
        return await future

    def _ready(self) -> _Item | None:
        """The held-over item, else a queued one, without waiting (None when there is none)."""
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def _next(self, timeout: float | None) -> _Item:
        """The held-over or a queued item if any, else the next one to arrive (waiting at most ``timeout``)."""
        item = self._ready()
        if item is not None:
            return item
        if timeout is None:
            return await self._queue.get()
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _collect(self) -> None:
        """Form batches forever: wait for a free slot and a first item, then fill until full or the delay
        passes, and start the batch without waiting for it (at most ``concurrency`` run at once)."""
        loop = asyncio.get_running_loop()
        assert self._slots is not None, "start() first"
        while True:
            await self._slots.acquire()
            try:
                first = await self._next(None)
            except BaseException:
                self._slots.release()
                raise
            items, size = [first], len(first.crops)
            self._forming = items
            deadline = loop.time() + self.max_delay
            while size < self.max_batch_size:
                # What is already queued joins at once; only then wait, at most until the deadline
                # (``wait_for`` with no time left times out even when an item is ready).
                item = self._ready()
                if item is None:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await self._next(left)
                    except TimeoutError:
                        break
                if size + len(item.crops) > self.max_batch_size:
                    self._carry = item  # keep it for the next batch rather than overfill this one
                    break
                items.append(item)
                size += len(item.crops)
            self._forming = []
            task = loop.create_task(self._run(items, size, self._slots))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run(self, items: list[_Item], size: int, slots: asyncio.Semaphore) -> None:
        """Run one batch in the executor, hand each request its slice, free the batch's slot."""
        loop = asyncio.get_running_loop()
        live = [it for it in items if not it.future.done()]  # skip requests that went away
        key = id(items)
        try:
            if live:
                batch = np.concatenate([it.crops for it in live])
                self.on_batch(len(batch))
                values = await loop.run_in_executor(self.executor, self._chunked, batch, key)
                offset = 0
                for it in live:
                    n = len(it.crops)
                    if not it.future.done():
                        it.future.set_result(values[offset:offset + n])
                    offset += n
        except asyncio.CancelledError:
            _fail(live, _stopped())
            raise
        except Exception as exc:
            _fail(live, exc)
        finally:
            self.pending -= size
            self.on_depth(self.pending)
            slots.release()

    def _chunked(self, batch: np.ndarray, key: int) -> np.ndarray:
        """Call ``fn`` in chunks of ``max_batch_size`` (one oversized request can exceed it). Runs in an
        executor thread, which starts and stops the batch's stall clock: time spent waiting for a free
        thread is not a stall."""
        self._started[key] = time.monotonic()
        try:
            step = self.max_batch_size
            return np.concatenate([self.fn(batch[i:i + step]) for i in range(0, len(batch), step)])
        finally:
            self._started.pop(key, None)


def _fail(items: list[_Item], error: BaseException) -> None:
    """Answer every item not yet answered with ``error``."""
    for it in items:
        if not it.future.done():
            it.future.set_exception(error)


def _stopped() -> InferenceError:
    """The error of a request that ``stop`` answered before its batch ran or returned."""
    return InferenceError("the service stopped before this image's batch was answered; retry the request")
