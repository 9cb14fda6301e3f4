"""Deferred link deletion: interfaces deleted in the background, after the answer went out.

A veth delete costs the kernel ~16 ms (RTNL and RCU waits) that the engine need not wait for.
The record is always gone before the delete is queued, so a crash in between leaves only an
orphan carrying our prefix, which reconciliation removes.
"""

from __future__ import annotations

import asyncio
import logging

from ..errors import DriverError
from ..kernel import Links

log = logging.getLogger(__name__)


class DeferredDeletes:
    def __init__(self, links: Links) -> None:
        self._links = links
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def queue(self, ifname: str) -> None:
        """Delete a link in the background; deleting a veth's host end deletes the pair."""
        if ifname in self._tasks:
            return
        task = asyncio.create_task(self._delete(ifname), name=f"delete {ifname}")
        self._tasks[ifname] = task
        task.add_done_callback(lambda _t: self._tasks.pop(ifname, None))

    async def _delete(self, ifname: str) -> None:
        try:
            await self._links.ensure_link_absent(ifname)
        except DriverError as exc:  # reconciliation removes it as an orphan later
            log.warning("deferred delete of %s failed: %s", ifname, exc)

    def pending(self) -> frozenset[str]:
        return frozenset(self._tasks)

    async def settled(self, ifname: str) -> None:
        """Wait for a queued delete of ``ifname``: a re-created name must not be deleted
        under our feet."""
        task = self._tasks.get(ifname)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def drain(self) -> None:
        """Wait for every queued delete (shutdown, tests, benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)
