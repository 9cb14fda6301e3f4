"""Keyed shared/exclusive locks and the coalescer behind batched firewall applies."""

from __future__ import annotations

import asyncio

import pytest

from pouch_driver.locks import Coalescer, KeyedLocks


async def test_shared_holders_run_together_and_exclusive_waits() -> None:
    locks = KeyedLocks()
    events: list[str] = []
    inside = 0
    peak = 0

    async def reader(i: int) -> None:
        nonlocal inside, peak
        async with locks.shared("n"):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.01)
            inside -= 1
            events.append(f"r{i}")

    async def writer() -> None:
        async with locks.exclusive("n"):
            assert inside == 0
            events.append("w")

    await asyncio.gather(*(reader(i) for i in range(5)), writer(), reader(9))
    assert peak >= 2, "shared holders overlap"
    assert events.index("w") < events.index("r9"), "a waiting writer goes before later readers"
    assert not locks.busy("n")


async def test_coalescer_serves_a_burst_with_few_runs_and_each_caller_sees_its_change() -> None:
    state = {"value": 0}
    applied: list[int] = []

    async def job() -> None:
        snapshot = state["value"]
        await asyncio.sleep(0.01)
        applied.append(snapshot)

    co = Coalescer(job)

    async def change(i: int) -> None:
        state["value"] = i
        await co.sync()
        assert applied[-1] >= i or i in applied

    await asyncio.gather(*(change(i) for i in range(1, 51)))
    assert len(applied) <= 3
    assert applied[-1] == 50


async def test_coalescer_hands_the_error_to_the_callers_of_that_run() -> None:
    calls = 0

    async def job() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")

    co = Coalescer(job)
    with pytest.raises(RuntimeError, match="boom"):
        await co.sync()
    await co.sync()
    await co.idle()
