"""asyncio coordination: locks keyed by ID with a shared/exclusive mode, and a coalescer.

Pure asyncio, no I/O.

A network is held shared by its endpoints' calls (so creates, joins and deletes on one network
run in parallel) and exclusively by network create/delete, which must see no endpoint call
half-done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager


class RWLock:
    """Writer-preferring: once a writer waits, new readers queue behind it."""

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._cond = asyncio.Condition()

    @property
    def idle(self) -> bool:
        return not self._readers and not self._writer and not self._writers_waiting

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()


class KeyedLocks:
    """One ``RWLock`` per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, RWLock] = {}
        self._users: dict[str, int] = {}

    def busy(self, key: str) -> bool:
        return self._users.get(key, 0) > 0

    @asynccontextmanager
    async def _use(self, key: str) -> AsyncIterator[RWLock]:
        lock = self._locks.setdefault(key, RWLock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            yield lock
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                del self._locks[key]

    @asynccontextmanager
    async def shared(self, key: str) -> AsyncIterator[None]:
        async with self._use(key) as lock, lock.shared():
            yield

    @asynccontextmanager
    async def exclusive(self, key: str) -> AsyncIterator[None]:
        async with self._use(key) as lock, lock.exclusive():
            yield


class Coalescer:
    """Run ``job`` for every caller, but once for all callers that asked while it ran.

    A caller returns after a run that *started* after its call, so it sees its own change
    applied. Used for the firewall: one iptables-restore serves a burst of requests.
    """

    def __init__(self, job: Callable[[], Awaitable[None]]) -> None:
        self._job = job
        self._wanted = 0
        self._done = 0
        self._task: asyncio.Task[None] | None = None
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}

    async def sync(self) -> None:
        self._wanted += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(self._wanted, []).append(fut)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())
        await asyncio.shield(fut)

    async def _loop(self) -> None:
        while self._done < self._wanted:
            gen = self._wanted
            error: BaseException | None = None
            try:
                await self._job()
            except Exception as exc:  # noqa: BLE001 - handed to every waiter below
                error = exc
            self._done = gen
            for g in [g for g in self._waiters if g <= gen]:
                for fut in self._waiters.pop(g):
                    if fut.done():
                        continue
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(error)

    async def idle(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
