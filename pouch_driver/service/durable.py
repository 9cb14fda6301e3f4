"""The order every change follows: the store commits first, memory follows, failures compensate.

A request is answered only after its change is fsynced (``write_behind`` is the one exception,
for a fact the engine never asks back); if the commit fails, memory is rolled back; if a later
kernel step fails, compensation undoes what was done, and its own failures are logged, never
masking the cause (start-up reconciliation finishes what they leave).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from ..store import Op, Store

log = logging.getLogger(__name__)


async def durably(
    store: Store,
    ops: Sequence[Op],
    *,
    undo: Callable[[], object] | None = None,
    after: Callable[[], object] | None = None,
) -> None:
    """Commit ``ops``, then ``after()`` (memory follows the store); on failure ``undo()``.

    The unit runs to its end even when the request is cancelled (its deadline): a commit that
    landed while memory was rolled back would leave the two disagreeing, and a restart would
    then resurrect or release what the engine was told otherwise.
    """

    async def unit() -> None:
        try:
            await store.commit(ops)
        except BaseException:
            if undo is not None:
                undo()
            raise
        if after is not None:
            after()

    task = asyncio.ensure_future(unit())
    # Retrieve the result even if nobody awaits it any more (a cancelled request).
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    await asyncio.shield(task)


async def compensate(*steps: Callable[[], Awaitable[object]]) -> None:
    """Undo steps after a failure; their own failures are logged, never masking the cause."""
    for step in steps:
        try:
            await asyncio.shield(step())
        except Exception:
            log.exception("compensation step failed; start-up reconcile will finish it")


def write_behind(store: Store, ops: Sequence[Op], *, what: str) -> None:
    """Queue ``ops`` without waiting for their fsync: memory is already changed and the answer
    goes out at once. Only for facts the engine never asks back and no other record depends
    on (a Join's sandbox key): they ride in the next group commit, in order with everything
    queued after them, and are written by a clean shutdown. What a kill -9 can take is the last
    few milliseconds of such facts, never a network, an endpoint or an address."""

    def report(fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.error("recording %s failed: %s", what, fut.exception())

    store.submit(ops).add_done_callback(report)
