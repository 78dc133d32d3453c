"""One device call at a time, and everything that queued meanwhile rides in the next call.

``@serve.batch`` collects requests that arrive within its wait window, but it forms the next batch while the
previous one still runs: behind a device call of seconds, batches are only as large as the arrivals of one
window, and they queue up small. :class:`DeviceQueue` sits between ``@serve.batch`` and the device: batches are
submitted to it, and whenever the device becomes free it takes every waiting item, up to the batch size, into
one call. At low load a request runs at once; under sustained load every call is full.

:func:`outside_request` lets requests of different subjects share one ``@serve.batch`` batch, and gives each
cell of a grid its own Serve request ids (``app.Ingress._grid_lines``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")
T = TypeVar("T")


def outside_request(call: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run ``call`` as a task outside the current request's context, e.g. to enqueue into ``@serve.batch``.

    Serve splits every ``@serve.batch`` batch by the multiplexed model id of the request that enqueued each item
    (documented with ``serve.get_multiplexed_model_id``): one model per batch. The generator multiplexes subject
    caches, not models, and its pipeline takes one cache per sample, so that split would only shrink batches to
    one subject each. A call made outside any request (a fresh ``contextvars.Context``, plain Python) has no
    multiplexed id, so its items share batches whatever their subject. No Serve internals are touched; what is
    lost for the enqueue is the request's context (its id in Serve's logs, its tracing context).

    Cancelling the awaiting request cancels the task too (an awaited task is cancelled with its awaiter), and
    ``@serve.batch`` drops cancelled items from the batch. tests/test_serve.py checks both halves: this function
    (a unit test), and batches that do mix subjects on a real Serve app, which fails if a Ray upgrade takes the
    batch's model id from somewhere a fresh context does not clear.
    """
    return contextvars.Context().run(asyncio.ensure_future, call)


class DeviceQueue(Generic[Item, Result]):
    def __init__(self, run: Callable[[list[Item]], Awaitable[list[Result]]], max_size: int,
                 size_of: Callable[[Item], int] = lambda item: 1) -> None:
        self._run = run  # one device call for a list of items; returns one result per item
        self._max_size = max_size
        self._size_of = size_of
        self._pending: deque[tuple[Item, asyncio.Future]] = deque()
        self._worker: asyncio.Task | None = None

    async def submit(self, items: list[Item]) -> list[Result]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    def _next_call(self) -> list[tuple[Item, asyncio.Future]]:
        """FIFO up to max_size; an item larger than max_size alone still runs (alone)."""
        call, size = [], 0
        while self._pending:
            item, future = self._pending[0]
            if future.cancelled():  # the caller is gone: nothing to compute
                self._pending.popleft()
                continue
            if call and size + self._size_of(item) > self._max_size:
                break
            self._pending.popleft()
            call.append((item, future))
            size += self._size_of(item)
        return call

    async def _drain(self) -> None:
        while call := self._next_call():
            try:
                results = await self._run([item for item, _ in call])
            except Exception as exc:  # noqa: BLE001 - delivered to every caller of this call
                logger.exception("device call of %d item(s) failed", len(call))
                for _, future in call:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(call, results):
                if not future.done():
                    future.set_result(result)
