"""MicroBatcher: concurrent inputs are gathered into batches, results and errors reach the right callers; its
queue is bounded. PixelBudget: the decoded pixels requests may hold at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from marketplace_reco.serving.batching import BatcherClosedError, BatcherFullError, MicroBatcher
from marketplace_reco.serving.pool import PixelBudget

Batcher = MicroBatcher[int, int]


class _Recorder:
    """A batch function that squares its inputs and remembers each batch and the thread it ran on."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.delay_s = delay_s

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.get_ident())
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        if any(item < 0 for item in items):
            raise ValueError(f"negative input in {items}")
        return [item * item for item in items]


async def _with_batcher(process: Callable[[list[int]], Sequence[int]], max_batch_size: int, max_wait_s: float,
                        body: Callable[[Batcher], Awaitable[Any]]) -> tuple[Any, list[int]]:
    """Run ``body`` against a started batcher; its result and the sizes of the batches that ran."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        sizes: list[int] = []
        batcher = MicroBatcher(process, executor=executor, max_batch_size=max_batch_size, max_wait_s=max_wait_s,
                               on_batch=lambda size, seconds: sizes.append(size))
        batcher.start()
        try:
            return await body(batcher), sizes
        finally:
            await batcher.stop()


def test_concurrent_inputs_are_gathered_into_batches_and_answered_in_order() -> None:
    recorder = _Recorder()

    async def body(batcher: Batcher) -> Any:
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    results, sizes = asyncio.run(_with_batcher(recorder, 4, 0.05, body))
    assert results == [i * i for i in range(10)]
    assert recorder.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sizes == [4, 4, 2]
    assert threading.get_ident() not in recorder.threads  # never on the event loop's thread


def test_a_lone_input_waits_at_most_max_wait() -> None:
    recorder = _Recorder()

    async def body(batcher: Batcher) -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await batcher.submit(3)
        return result, loop.time() - started

    (result, elapsed), sizes = asyncio.run(_with_batcher(recorder, 32, 0.05, body))
    assert result == 9 and sizes == [1]
    assert 0.04 <= elapsed < 1.0


def test_inputs_arriving_while_a_batch_runs_form_the_next_batch() -> None:
    recorder = _Recorder(delay_s=0.2)

    async def body(batcher: Batcher) -> Any:
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)  # the first batch is running now
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 6)]
        return await asyncio.gather(first, *rest)

    results, _ = asyncio.run(_with_batcher(recorder, 8, 0.0, body))
    assert results == [1, 4, 9, 16, 25]
    assert recorder.batches == [[1], [2, 3, 4, 5]]


def test_submit_many_spreads_over_batches_and_keeps_order() -> None:
    recorder = _Recorder()

    async def body(batcher: Batcher) -> Any:
        return await batcher.submit_many(list(range(7)))

    results, sizes = asyncio.run(_with_batcher(recorder, 3, 0.01, body))
    assert results == [i * i for i in range(7)]
    assert sizes == [3, 3, 1]


def test_an_error_fails_only_the_inputs_of_its_batch_and_the_worker_goes_on() -> None:
    recorder = _Recorder()

    async def body(batcher: Batcher) -> Any:
        with pytest.raises(ValueError, match="negative input"):
            await batcher.submit(-1)
        return await batcher.submit(5)

    result, _ = asyncio.run(_with_batcher(recorder, 4, 0.0, body))
    assert result == 25


def test_a_batch_function_returning_the_wrong_number_of_results_fails_the_batch() -> None:
    async def body(batcher: Batcher) -> Any:
        with pytest.raises(RuntimeError, match="returned 1 results for 2 inputs"):
            await batcher.submit_many([1, 2])
        return None

    asyncio.run(_with_batcher(lambda items: items[:1], 4, 0.01, body))


def test_stop_fails_waiting_inputs_and_a_stopped_batcher_refuses_new_ones() -> None:
    async def body() -> None:
        release = threading.Event()
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(lambda items: release.wait(5) and items, executor=executor,
                                   max_batch_size=1, max_wait_s=0.0)
            batcher.start()
            running = asyncio.ensure_future(batcher.submit(1))
            await asyncio.sleep(0.05)
            waiting = asyncio.ensure_future(batcher.submit(2))
            await asyncio.sleep(0.01)
            await batcher.stop()
            release.set()
            with pytest.raises(BatcherClosedError):
                await waiting
            with pytest.raises(BatcherClosedError):
                await running
            with pytest.raises(BatcherClosedError):
                await batcher.submit(3)

    asyncio.run(body())


def test_max_batch_size_must_be_positive() -> None:
    with ThreadPoolExecutor(max_workers=1) as executor, pytest.raises(ValueError, match="at least 1"):
        MicroBatcher(lambda items: items, executor=executor, max_batch_size=0, max_wait_s=0.0)


def test_inputs_that_would_overflow_the_queue_are_refused_at_once() -> None:
    async def body() -> None:
        release = threading.Event()
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(lambda items: release.wait(5) and items, executor=executor,
                                   max_batch_size=1, max_wait_s=0.0, max_queued=2)
            batcher.start()
            try:
                running = asyncio.ensure_future(batcher.submit(1))
                await asyncio.sleep(0.05)  # taken by the worker, which now waits for the release
                queued = asyncio.ensure_future(batcher.submit_many([2, 3]))
                await asyncio.sleep(0.01)
                with pytest.raises(BatcherFullError, match="2 inputs are waiting already, at most 2"):
                    await batcher.submit(4)
                with pytest.raises(BatcherFullError):
                    batcher.check_room(1)
                release.set()
                assert await running == 1 and await queued == [2, 3]
                assert await batcher.submit_many([5, 6]) == [5, 6]  # room again
            finally:
                release.set()
                await batcher.stop()

    asyncio.run(body())


def test_a_pixel_budget_lets_requests_in_first_come_first_served_as_room_frees() -> None:
    async def body() -> list[str]:
        budget = PixelBudget(100)
        events = []

        async def request(name: str, pixels: int, hold_s: float) -> None:
            async with budget.hold(pixels):
                events.append(f"{name} in ({budget.held} held)")
                await asyncio.sleep(hold_s)
            events.append(f"{name} out")

        first = asyncio.ensure_future(request("a", 60, 0.1))
        await asyncio.sleep(0.01)
        large = asyncio.ensure_future(request("b", 70, 0.01))  # waits for a
        await asyncio.sleep(0.01)
        small = asyncio.ensure_future(request("c", 10, 0.01))  # would fit now, but b came first
        await asyncio.gather(first, large, small)
        assert budget.held == 0
        return events

    events = asyncio.run(body())
    assert events[:3] == ["a in (60 held)", "a out", "b in (70 held)"]
    assert events.index("c in (80 held)") < events.index("b out")


def test_a_request_that_gives_up_waiting_takes_no_room() -> None:
    async def body() -> int:
        budget = PixelBudget(100)
        async with budget.hold(90):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    async with budget.hold(20):
                        pass
            async with budget.hold(10):
                return budget.held

    assert asyncio.run(body()) == 100
