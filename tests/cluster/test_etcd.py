"""EtcdClient against a real three-member etcd: round trips, races, leases, and faults.

Latencies are printed (run with ``-s`` to see them), never asserted. ``asyncio.timeout`` around
a faulty-member call is a hang detector, not a performance bound.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from pouch_driver.cluster.etcd import EtcdClient, EventType, WatchEvent
from pouch_driver.errors import LeaseExpired, StoreUnavailable

from .conftest import EtcdCluster

TIMEOUT = 0.5
DEADLINE = 5.0  # above the ~1.3 s a stopped leader makes writes wait (../shared/ENV.md)
HANG = DEADLINE + 3.0


def _client(endpoints: list[str], **kwargs: float) -> EtcdClient:
    opts: dict[str, float] = {"timeout": TIMEOUT, "deadline": DEADLINE, "heartbeat": 0.5}
    opts.update(kwargs)
    return EtcdClient(endpoints, **opts)


@pytest.fixture
async def client(etcd: EtcdCluster) -> AsyncIterator[EtcdClient]:
    async with _client(etcd.endpoints) as c:
        yield c


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"/pdtest/{request.node.name}/{time.time_ns()}/"


def _ms(samples: list[float]) -> str:
    return f"p50 {statistics.median(samples) * 1000:.2f} ms (n={len(samples)})"


async def test_put_get_range_delete_round_trip(client: EtcdClient, prefix: str) -> None:
    assert await client.get(prefix + "a") is None
    rev = await client.put(prefix + "a", b"\x00\xffbinary")
    await client.put(prefix + "b", "text")
    await client.put(prefix[:-1] + "0", "outside the prefix")  # '0' sorts right after '/'
    kv = await client.get(prefix + "a")
    assert kv is not None
    assert kv.value == b"\x00\xffbinary"
    assert kv.mod_revision == kv.create_revision == rev
    assert kv.lease == 0
    kvs, at = await client.range_prefix(prefix)
    assert [k.key for k in kvs] == [prefix + "a", prefix + "b"]
    assert at >= rev + 2
    assert await client.delete(prefix + "a")
    assert not await client.delete(prefix + "a")
    kv_b = await client.get(prefix + "b")
    assert kv_b is not None
    assert not await client.delete(prefix + "b", mod_revision=kv_b.mod_revision - 1)
    assert await client.delete(prefix + "b", mod_revision=kv_b.mod_revision)
    assert (await client.range_prefix(prefix))[0] == []


async def test_create_race_has_exactly_one_winner_named_by_its_value(
    client: EtcdClient, prefix: str
) -> None:
    key = prefix + "claim"

    async def claim(i: int) -> bool:
        return await client.create(key, f"owner-{i}")

    won = await asyncio.gather(*(claim(i) for i in range(50)))
    winners = [i for i, w in enumerate(won) if w]
    assert len(winners) == 1
    kv = await client.get(key)
    assert kv is not None
    assert kv.value == f"owner-{winners[0]}".encode()

    creates, gets = [], []
    for i in range(50):
        t0 = time.perf_counter()
        assert await client.create(f"{prefix}seq/{i}", "me")
        creates.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert await client.get(f"{prefix}seq/{i}") is not None
        gets.append(time.perf_counter() - t0)
    print(f"\n[etcd] create {_ms(creates)}; get {_ms(gets)}")


async def test_compare_and_swap_races(client: EtcdClient, prefix: str) -> None:
    """One CAS per revision wins; read-modify-write loops over CAS lose no increment."""
    key = prefix + "cas"
    assert await client.compare_and_swap(key, 0, "first")
    assert not await client.compare_and_swap(key, 0, "second")
    kv = await client.get(key)
    assert kv is not None
    won = await asyncio.gather(
        *(client.compare_and_swap(key, kv.mod_revision, f"racer-{i}") for i in range(20))
    )
    winners = [i for i, w in enumerate(won) if w]
    assert len(winners) == 1
    current = await client.get(key)
    assert current is not None
    assert current.value == f"racer-{winners[0]}".encode()

    counter = prefix + "counter"
    await client.put(counter, "0")

    async def increment(times: int) -> None:
        for _ in range(times):
            while True:
                kv = await client.get(counter)
                assert kv is not None
                if await client.compare_and_swap(counter, kv.mod_revision, str(int(kv.value) + 1)):
                    break

    await asyncio.gather(*(increment(5) for _ in range(8)))
    final = await client.get(counter)
    assert final is not None
    assert int(final.value) == 40


async def test_lease_expiry_deletes_keys_and_keepalive_keeps_them(
    client: EtcdClient, prefix: str
) -> None:
    kept, left = await client.grant(2), await client.grant(2)
    assert await client.create(prefix + "kept", "me", lease=kept)
    await client.put(prefix + "left", "me", lease=left)
    kv = await client.get(prefix + "kept")
    assert kv is not None
    assert kv.lease == kept
    t0 = time.monotonic()
    while await client.get(prefix + "left") is not None:
        assert await client.keepalive(kept) > 0
        assert time.monotonic() - t0 < 15, "an expired lease kept its key"
        await asyncio.sleep(0.3)
    print(f"\n[etcd] a 2 s lease's key vanished after {time.monotonic() - t0:.2f}s")
    await asyncio.sleep(0.5)
    assert await client.get(prefix + "kept") is not None
    with pytest.raises(LeaseExpired):
        await client.keepalive(left)
    await client.revoke(kept)
    assert await client.get(prefix + "kept") is None
    await client.revoke(kept)  # already gone: not an error


async def test_stopped_first_member_does_not_hang_calls(etcd: EtcdCluster, prefix: str) -> None:
    """SIGSTOP keeps the socket open and silent: only a deadline gets a call past it."""
    async with _client(etcd.endpoints) as client:
        await client.put(prefix + "warm", "up")  # a pooled connection to member 0
        etcd.stop(0)
        t0 = time.monotonic()
        async with asyncio.timeout(HANG):
            await client.put(prefix + "k", "v")
            first = time.monotonic() - t0
            kv = await client.get(prefix + "k")
            assert kv is not None
            assert kv.value == b"v"
            assert await client.create(prefix + "c", "me")
            assert (await client.range_prefix(prefix))[0]
            assert await client.delete(prefix + "k")
        assert client.current_endpoint != etcd.endpoints[0]
        print(f"\n[etcd] first call past a stopped member: {first * 1000:.0f} ms")
        # A fresh client still lists the stopped member first: it must get past it too.
    async with _client(etcd.endpoints) as fresh, asyncio.timeout(HANG):
        assert (await fresh.get(prefix + "c")) is not None


async def _collect(
    client: EtcdClient,
    prefix: str,
    start: int,
    count: int,
    seen: list[tuple[WatchEvent, float]],
    *,
    halfway: asyncio.Event | None = None,
) -> None:
    async with aclosing(client.watch(prefix, start)) as events:
        async for event in events:
            seen.append((event, time.perf_counter()))
            if halfway is not None and len(seen) == count // 4:
                halfway.set()
            if len(seen) == count:
                return


async def test_watch_sees_puts_made_through_another_member(etcd: EtcdCluster, prefix: str) -> None:
    watcher = _client([etcd.endpoints[1]])
    writer = _client([etcd.endpoints[2]])
    async with watcher, writer:
        _, rev = await writer.range_prefix(prefix)
        seen: list[tuple[WatchEvent, float]] = []
        task = asyncio.create_task(_collect(watcher, prefix, rev + 1, 21, seen))
        sent = {}
        for i in range(20):
            await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            revision = await writer.put(f"{prefix}{i}", f"v{i}")
            sent[revision] = t0
        deleted_at = time.perf_counter()
        await writer.delete(f"{prefix}0")
        async with asyncio.timeout(10):
            await task
    events = [e for e, _ in seen]
    assert [e.kv.key for e in events[:20]] == [f"{prefix}{i}" for i in range(20)]
    assert [e.kv.value for e in events[:20]] == [f"v{i}".encode() for i in range(20)]
    assert events[20].type is EventType.DELETE
    assert events[20].kv.key == f"{prefix}0"
    delays = [at - sent[e.revision] for e, at in seen[:20]]
    print(f"\n[etcd] watch delay (put called -> event seen, other member) {_ms(delays)}")
    print(f"[etcd] delete seen after {(seen[20][1] - deleted_at) * 1000:.2f} ms")


async def test_watch_survives_stopping_the_member_it_listens_to(
    etcd: EtcdCluster, prefix: str
) -> None:
    """No event lost, none repeated, in revision order, across a member that goes silent."""
    watcher = _client(etcd.endpoints)  # listens through member 0
    writer = _client(etcd.endpoints[1:])
    async with watcher, writer:
        _, rev = await writer.range_prefix(prefix)
        seen: list[tuple[WatchEvent, float]] = []
        live = asyncio.Event()
        task = asyncio.create_task(_collect(watcher, prefix, rev + 1, 40, seen, halfway=live))
        for i in range(20):
            await writer.put(f"{prefix}{i:02}", "before")
        async with asyncio.timeout(10):
            await live.wait()  # the watch is delivering through member 0
        etcd.stop(0)
        stopped_at = time.perf_counter()
        for i in range(20, 40):
            await writer.put(f"{prefix}{i:02}", "after")
        async with asyncio.timeout(20):
            await task
        assert watcher.current_endpoint != etcd.endpoints[0]
    revisions = [e.revision for e, _ in seen]
    assert revisions == sorted(set(revisions))
    assert [e.kv.key for e, _ in seen] == [f"{prefix}{i:02}" for i in range(40)]
    resumed = seen[-1][1] - stopped_at
    print(f"\n[etcd] watch resumed on another member; last event {resumed:.2f}s after SIGSTOP")


async def test_all_members_away_fails_within_deadline_then_recovers(
    etcd: EtcdCluster, prefix: str
) -> None:
    async with _client(etcd.endpoints, deadline=2.0) as client:
        await client.put(prefix + "k", "v")
        for i in range(3):
            etcd.stop(i)
        t0 = time.monotonic()
        async with asyncio.timeout(HANG):
            with pytest.raises(StoreUnavailable) as stopped:
                await client.get(prefix + "k")
        silent = time.monotonic() - t0
        message = str(stopped.value)
        assert "etcd" in message
        assert all(e in message for e in etcd.endpoints)
        for i in range(3):
            etcd.kill(i)
        t0 = time.monotonic()
        async with asyncio.timeout(HANG):
            with pytest.raises(StoreUnavailable, match="etcd"):
                await client.create(prefix + "c", "me")
        refused = time.monotonic() - t0
        print(f"\n[etcd] all stopped: failed after {silent:.2f}s; all dead: {refused:.2f}s")
        for i in range(3):
            etcd.start(i)
        await asyncio.to_thread(etcd.wait_healthy)
        async with asyncio.timeout(HANG):
            kv = await client.get(prefix + "k")
            assert kv is not None
            assert kv.value == b"v"
            assert await client.create(prefix + "c", "me")
