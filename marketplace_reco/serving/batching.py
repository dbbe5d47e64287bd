"""Micro-batching: concurrent requests for one model are gathered into one model call.

Each request puts its inputs on the model's queue and awaits a future. One worker task per model takes
the first waiting input, waits at most ``max_wait_s`` for up to ``max_batch_size`` inputs, and runs the
batch in a thread pool, so the event loop keeps accepting and parsing requests meanwhile. While a batch
runs, new inputs queue up, so under load the next batch starts full without waiting at all. The queue is
bounded (``max_queued``): inputs that would overflow it are refused at once (``BatcherFullError``), so under
overload requests fail fast instead of waiting longer and longer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosedError(RuntimeError):
    """The batcher was stopped (server shutting down) before the input was processed."""


class BatcherFullError(RuntimeError):
    """The queue holds ``max_queued`` inputs already: the inputs were not queued."""


class MicroBatcher(Generic[T, R]):
    """Gathers single inputs into batches for ``process(list[T]) -> Sequence[R]`` (one result per input)."""

    def __init__(self, process: Callable[[list[T]], Sequence[R]], *, executor: Executor, max_batch_size: int,
                 max_wait_s: float, max_queued: int | None = None,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        if max_queued is not None and max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, not {max_queued}")
        self._process = process
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_queued = max_queued
        self._on_batch = on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._worker is None:
            self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the worker; inputs still waiting fail with ``BatcherClosedError``."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        waiting = []
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        _fail(waiting, BatcherClosedError("the server is shutting down"))

    def check_room(self, count: int) -> None:
        """Raise ``BatcherFullError`` unless ``count`` more inputs fit in the queue now."""
        if self._max_queued is not None and self._queue.qsize() + count > self._max_queued:
            raise BatcherFullError(f"{self._queue.qsize()} inputs are waiting already, at most {self._max_queued}")

    async def submit(self, item: T) -> R:
        """The result for one input, computed in some batch."""
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """Results for several inputs, in order; they may be spread over several batches.

        All or none of them are queued: ``BatcherFullError`` when they do not fit in the queue.
        """
        if self._worker is None:
            raise BatcherClosedError("the batcher is not running")
        self.check_room(len(items))
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            future: asyncio.Future[R] = loop.create_future()
            self._queue.put_nowait((item, future))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    async def _next_batch(self) -> list[tuple[T, asyncio.Future[R]]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self._max_wait_s
        while len(batch) < self._max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            # A future is already done when its request was cancelled (client gone): skip that input.
            batch = [(item, future) for item, future in await self._next_batch() if not future.done()]
            if batch:
                await self._run_batch(batch)
            # Not held while waiting for the next batch: the inputs may be large (decoded photos).
            del batch

    async def _run_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            results = await loop.run_in_executor(self._executor, self._process, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} inputs")
        except asyncio.CancelledError:
            _fail(batch, BatcherClosedError("the server is shutting down"))
            raise
        except Exception as exc:
            _fail(batch, exc)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        if self._on_batch is not None:
            self._on_batch(len(batch), loop.time() - started)


def _fail(batch: Sequence[tuple[object, asyncio.Future[Any]]], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
