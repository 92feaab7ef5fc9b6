"""Micro-batching of concurrent requests: one backend call for everything that arrives together.

Requests are queued with a batch key (the sampling parameters for ``generate``; one key for
``score``). A collector waits ``window_ms`` after the first request of a round (or until
``max_batch`` rows are waiting), groups the queue by key, and runs each group as one batched
backend call on a single worker thread, so the event loop keeps accepting requests meanwhile.

A request whose caller goes away (the HTTP client disconnected, so aiohttp cancelled its
handler) is dropped from the queue; once every request of a running call is gone, the call's
``cancelled`` event is set and the backend stops at its next forward step
(:func:`megatron_vpmoe.inference.backend.stop_when`), so a dropped ``n=64, max_tokens=1000``
request does not hold the model for the requests behind it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass
class _Pending:
    key: tuple
    rows: list
    fn: object  # callable(rows, cancelled: threading.Event) -> results, same length as rows
    future: asyncio.Future


@dataclass
class BatchStats:
    calls: int = 0
    rows: int = 0
    max_rows: int = 0
    busy_s: float = 0.0
    cancelled: int = 0  # calls stopped early because every request of the call went away


class BatchQueue:
    def __init__(self, window_ms: float = 5.0, max_batch: int = 32):
        self.window_s = window_ms / 1000.0
        self.max_batch = max_batch
        self.stats = BatchStats()
        self._queue: list[_Pending] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vpmoe-serve")

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, key: tuple, rows: list, fn) -> list:
        """Queue ``rows`` for ``fn(rows, cancelled)`` under ``key``; resolves to their results in
        order. Cancelling the awaiting task withdraws the request (see the module docstring)."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(key, rows, fn, fut))
        self._wake.set()
        return await fut

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            deadline = loop.time() + self.window_s
            while sum(len(p.rows) for p in self._queue) < self.max_batch and loop.time() < deadline:
                await asyncio.sleep(min(0.001, max(0.0, deadline - loop.time())))
            taken, self._queue = self._queue, []
            self._wake.clear()
            groups: dict = defaultdict(list)
            for p in taken:
                if not p.future.cancelled():
                    groups[p.key].append(p)  # one key, one kind of call: run with the first fn
            for members in groups.values():
                for chunk in _chunks(members, self.max_batch):
                    await self._run(loop, chunk)

    async def _run(self, loop, members: list[_Pending]) -> None:
        rows = [r for p in members for r in p.rows]
        cancelled = threading.Event()  # read by the worker thread

        def on_done(_fut) -> None:
            if all(p.future.cancelled() for p in members):
                cancelled.set()

        for p in members:
            p.future.add_done_callback(on_done)
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, members[0].fn, rows, cancelled)
        except Exception as err:  # noqa: BLE001 - the error goes to every waiting request
            if cancelled.is_set():
                self.stats.cancelled += 1
            for p in members:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        finally:
            self.stats.busy_s += time.perf_counter() - start
        self.stats.calls += 1
        self.stats.rows += len(rows)
        self.stats.max_rows = max(self.stats.max_rows, len(rows))
        i = 0
        for p in members:
            if not p.future.done():
                p.future.set_result(results[i: i + len(p.rows)])
            i += len(p.rows)


def _chunks(members: list[_Pending], max_rows: int):
    """Split requests into groups of at most ``max_rows`` rows (a request is never split)."""
    chunk, size = [], 0
    for p in members:
        if chunk and size + len(p.rows) > max_rows:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += len(p.rows)
    if chunk:
        yield chunk
