"""Slow and stuck operations (issue 7): a slow kernel call holds up only what depends on it,
and the per-request deadline answers a stuck one with a clear 504, leaving consistent state.

Over the fakes: ``FakeLinks.faults.delay`` makes one verb slow; the store is slowed by wrapping
its writer (it runs on the store's own thread, so a blocking sleep there is what a slow disk
looks like).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from pouch_driver.kernel import VethSpec
from pouch_driver.kernel.fake import FakeLinks

from . import hostile as h
from .conftest import Plugin, PluginFactory

EID2 = "ab" * 32


async def timed(plugin: Plugin, method: str, body: Any = None) -> tuple[int, float, dict[str, Any]]:
    t0 = time.perf_counter()
    resp = (
        await plugin.client.post(f"/{method}", json=body)
        if body is not None
        else await plugin.client.post(f"/{method}")
    )
    doc = await resp.json()
    return resp.status, time.perf_counter() - t0, doc


def new_endpoint(address: str = "10.1.0.50/24", eid: str = EID2) -> dict[str, Any]:
    return {
        "NetworkID": h.NID,
        "EndpointID": eid,
        "Options": {},
        "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": ""},
    }


async def test_slow_kernel_call_does_not_block_unrelated_requests(
    make_plugin: PluginFactory,
) -> None:
    """ensure_veth takes 5 s; while one CreateEndpoint waits for it, IPAM, other endpoints of
    the same network, another network and the admin calls all answer at once. The stuck
    call itself is answered by the deadline (1.5 s here), not after 5 s."""
    links = FakeLinks()
    plugin = await make_plugin(links=links, request_timeout=1.5)
    await h.baseline(plugin)
    links.faults.delay["ensure_veth"] = 5.0
    stuck = asyncio.create_task(timed(plugin, "NetworkDriver.CreateEndpoint", new_endpoint()))
    await asyncio.sleep(0.1)
    assert not stuck.done()
    other_net = {**h.D["CreateNetworkInternalDualStack"], "IPv6Data": []}
    unrelated = [
        ("IpamDriver.RequestAddress", h.D["RequestAddressEndpoint"]),
        ("IpamDriver.RequestPool", {"AddressSpace": "PouchLocal", "Pool": "10.30.0.0/24"}),
        ("IpamDriver.ReleaseAddress", {"PoolID": "PouchLocal/10.1.0.0/24", "Address": "10.1.0.3"}),
        ("NetworkDriver.Join", {**h.D["Join"], "SandboxKey": "/var/run/docker/netns/z"}),
        ("NetworkDriver.Leave", h.D["Leave"]),
        ("NetworkDriver.EndpointOperInfo", h.D["EndpointOperInfo"]),
        ("NetworkDriver.Join", h.P["Join"]),
        ("NetworkDriver.CreateNetwork", other_net),
        ("NetworkDriver.DeleteEndpoint", h.P["DeleteEndpointPreCreate"]),
        ("Pouch.Status", None),
        ("Plugin.Activate", None),
    ]
    answers = [await timed(plugin, method, body) for method, body in unrelated]
    slow = [
        (m, round(t, 3), doc)
        for (m, _), (status, t, doc) in zip(unrelated, answers, strict=True)
        if status != 200 or t > 0.2
    ]
    assert slow == [], f"held up by the slow ensure_veth: {slow}"
    assert not stuck.done(), "the unrelated calls were answered only after the stuck one"
    status, elapsed, doc = await stuck
    print(
        f"\nunrelated calls while ensure_veth hung: max "
        f"{max(t for _, t, _ in answers) * 1000:.1f} ms; stuck call: {status} after "
        f"{elapsed:.2f}s"
    )
    assert status == 504 and 1.4 < elapsed < 3.0
    assert doc["Err"] == (
        "NetworkDriver.CreateEndpoint did not finish within 1.5s; see the plugin log"
    )


async def test_stuck_create_endpoint_leaves_nothing_half_made(make_plugin: PluginFactory) -> None:
    """After the 504 the endpoint exists nowhere (memory, store, kernel); the engine's retry
    then succeeds, and the address it requested is still its own to release."""
    links = FakeLinks()
    plugin = await make_plugin(links=links, request_timeout=0.5)
    await h.baseline(plugin)
    addr = (await plugin.call("IpamDriver.RequestAddress", h.D["RequestAddressEndpoint"]))[
        "Address"
    ]
    before = h.snapshot(plugin)
    links.faults.delay["ensure_veth"] = 5.0
    status, _, doc = await timed(plugin, "NetworkDriver.CreateEndpoint", new_endpoint(addr))
    assert status == 504, doc
    await h.settle(plugin)
    assert not h.diff(before, h.snapshot(plugin)), "a timed-out CreateEndpoint left state"
    assert "puh" + EID2[:12] not in links.links
    del links.faults.delay["ensure_veth"]
    created = await plugin.call("NetworkDriver.CreateEndpoint", new_endpoint(addr))
    assert created["Interface"]["MacAddress"]


async def test_stuck_create_network_leaves_nothing(make_plugin: PluginFactory) -> None:
    links = FakeLinks()
    plugin = await make_plugin(links=links, request_timeout=0.5)
    await h.baseline(plugin)
    before = h.snapshot(plugin)
    links.faults.delay["ensure_bridge"] = 5.0
    body = {**h.D["CreateNetworkInternalDualStack"], "IPv6Data": []}
    status, _, doc = await timed(plugin, "NetworkDriver.CreateNetwork", body)
    assert status == 504, doc
    assert not h.diff(before, h.snapshot(plugin))
    del links.faults.delay["ensure_bridge"]
    assert await plugin.call("NetworkDriver.CreateNetwork", body) == {}


async def test_stuck_delete_network_is_finished_by_the_next_reconcile(
    make_plugin: PluginFactory,
) -> None:
    """DeleteNetwork forgets the record first; if removing the bridge then hangs, the 504
    leaves an orphan bridge (our prefix, no record) that the next sweep removes."""
    links = FakeLinks()
    plugin = await make_plugin(links=links, request_timeout=0.5)
    await h.baseline(plugin)
    bridge = plugin.service.state.networks[h.P["CreateNetwork"]["NetworkID"]].bridge
    await plugin.call(
        "NetworkDriver.DeleteEndpoint", {"NetworkID": h.POUCH_NID, "EndpointID": h.POUCH_EID}
    )
    await h.settle(plugin)
    links.faults.delay["ensure_link_absent"] = 5.0
    status, _, _ = await timed(plugin, "NetworkDriver.DeleteNetwork", {"NetworkID": h.POUCH_NID})
    assert status == 504
    assert h.POUCH_NID not in plugin.service.state.networks
    assert h.POUCH_NID not in {
        row[0] for row in h.store_rows(plugin.service.store.path)["networks"]
    }
    assert bridge in links.links
    del links.faults.delay["ensure_link_absent"]
    assert await plugin.call("NetworkDriver.DeleteNetwork", {"NetworkID": h.POUCH_NID}) == {}
    report = await plugin.call("Pouch.Reconcile", {"DryRun": False})
    assert any(bridge in line for line in report["Repaired"]), report
    assert bridge not in links.links


class LateLinks(FakeLinks):
    """ensure_veth as the real adapter behaves: the kernel work runs on a worker thread and
    still happens after the awaiting request was cancelled by its deadline."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.late: list[asyncio.Task[None]] = []

    async def ensure_veth(self, spec: VethSpec) -> None:
        async def work() -> None:
            await asyncio.sleep(self.delay)
            await FakeLinks.ensure_veth(self, spec)

        task = asyncio.create_task(work())
        self.late.append(task)
        await asyncio.shield(task)


async def test_kernel_work_finishing_after_the_deadline_is_reaped(
    make_plugin: PluginFactory,
) -> None:
    """The 504'd CreateEndpoint is undone at once, but its veth appears later: an orphan
    (our prefix, no record) holding a bridge port until the next sweep removes it."""
    links = LateLinks(delay=0.0)
    plugin = await make_plugin(links=links, request_timeout=0.3)
    await h.baseline(plugin)
    links.delay = 1.0
    status, _, _ = await timed(plugin, "NetworkDriver.CreateEndpoint", new_endpoint())
    assert status == 504
    assert EID2 not in plugin.service.state.endpoints
    await asyncio.gather(*links.late)
    veth = "puh" + EID2[:12]
    assert veth in links.links, "expected: the late kernel work left an orphan veth"
    report = await plugin.call("Pouch.Reconcile", {"DryRun": False})
    assert any(veth in line for line in report["Repaired"]), report
    await h.settle(plugin)
    assert veth not in links.links


def slow_store(plugin: Plugin, seconds: float, when: Callable[[Any], bool]) -> None:
    """Make the store's writes of matching batches take ``seconds`` (on the store thread)."""
    store = plugin.service.store
    write = store._write_sync

    def slow(batch: Any) -> None:
        if any(when(op) for p in batch for op in p.ops):
            time.sleep(seconds)
        write(batch)

    store._write_sync = slow  # type: ignore[method-assign]


@pytest.mark.parametrize("call", ["CreateEndpoint", "RequestAddress"])
async def test_deadline_during_a_store_write_keeps_store_and_memory_equal(
    make_plugin: PluginFactory, call: str
) -> None:
    plugin = await make_plugin(request_timeout=0.3)
    await h.baseline(plugin)
    op_name = {"CreateEndpoint": "PutEndpoint", "RequestAddress": "PutAddress"}[call]
    slow_store(plugin, 1.0, lambda op: type(op).__name__ == op_name)
    if call == "CreateEndpoint":
        status, _, _ = await timed(plugin, "NetworkDriver.CreateEndpoint", new_endpoint())
    else:
        status, _, _ = await timed(
            plugin,
            "IpamDriver.RequestAddress",
            {**h.D["RequestAddressEndpoint"], "Address": "10.1.0.77"},
        )
    assert status == 504
    await asyncio.sleep(1.2)  # the shielded write lands
    await h.settle(plugin)
    rows = h.store_rows(plugin.service.store.path)
    stored_eps = {r[0] for r in rows["endpoints"]}
    stored_addrs = {r[1] for r in rows["addresses"] if r[0] == "PouchLocal/10.1.0.0/24"}
    held = {str(h_) for h_ in plugin.service.ipam.pools["PouchLocal/10.1.0.0/24"].allocated}
    assert stored_eps == set(plugin.service.state.endpoints), (
        f"store has endpoints {stored_eps - set(plugin.service.state.endpoints)} memory lacks"
    )
    assert len(stored_addrs) == len(held), (
        f"store holds {sorted(stored_addrs)}, memory {len(held)} addresses"
    )
