"""asyncio locks keyed by ID, with a shared/exclusive mode. Pure asyncio, no I/O.

A network is held shared by its endpoints' calls (so creates, joins and deletes on one network
run in parallel) and exclusively by network create/delete, which must see no endpoint call
half-done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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
