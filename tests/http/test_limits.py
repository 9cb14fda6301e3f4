"""Limits answered with clear errors: exhausted pools, the bridge port limit, addresses outside
their pool, overlapping pools (issue 7). Over the fakes; the real kernel's limit is checked in
tests/kernel/test_stress.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from typing import Any

import pytest

from pouch_driver.kernel.fake import FakeLinks

from . import hostile as h
from .conftest import Plugin, PluginFactory

GATEWAY = {"RequestAddressType": "com.docker.network.gateway"}
NID = hashlib.sha256(b"limits").hexdigest()


def eid(i: int) -> str:
    return hashlib.sha256(f"limit-ep-{i}".encode()).hexdigest()


async def small_network(plugin: Plugin, subnet: str = "10.9.0.0/29") -> str:
    pool = await plugin.call(
        "IpamDriver.RequestPool", {"AddressSpace": "PouchLocal", "Pool": subnet, "V6": False}
    )
    gw = await plugin.call(
        "IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": GATEWAY}
    )
    await plugin.call(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": NID,
            "Options": {},
            "IPv4Data": [{"AddressSpace": "PouchLocal", "Pool": subnet, "Gateway": gw["Address"]}],
        },
    )
    return str(pool["PoolID"])


async def test_exhausted_pool_is_a_clear_507_and_recovers(plugin: Plugin) -> None:
    pool_id = await small_network(plugin)  # 10.9.0.0/29: .1 gateway, .2-.6 for endpoints
    got = [
        (await plugin.call("IpamDriver.RequestAddress", {"PoolID": pool_id}))["Address"]
        for _ in range(5)
    ]
    assert got == [f"10.9.0.{i}/29" for i in range(2, 7)]
    before = h.snapshot(plugin)
    doc = await plugin.call("IpamDriver.RequestAddress", {"PoolID": pool_id}, status=507)
    assert doc["Err"] == "no free address left in pool 10.9.0.0/29"
    assert not h.diff(before, h.snapshot(plugin))
    # The gateway request of a second network on a full pool fails the same way.
    await plugin.call(
        "IpamDriver.RequestAddress", {"PoolID": pool_id, "Options": GATEWAY}, status=507
    )
    await plugin.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": "10.9.0.4"})
    again = await plugin.call("IpamDriver.RequestAddress", {"PoolID": pool_id})
    assert again["Address"] == "10.9.0.4/29"


async def test_exhausted_ip_range_names_the_range(plugin: Plugin) -> None:
    pool = await plugin.call(
        "IpamDriver.RequestPool",
        {"AddressSpace": "PouchLocal", "Pool": "10.9.0.0/24", "SubPool": "10.9.0.8/30"},
    )
    for _ in range(4):  # a /30 inside a /24 has no reserved address of its own
        await plugin.call("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})
    doc = await plugin.call("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]}, status=507)
    assert "range 10.9.0.8/30" in doc["Err"]


async def test_exhausted_automatic_pools(make_plugin: PluginFactory) -> None:
    from pouch_driver.config import parse_pools  # noqa: PLC0415

    plugin = await make_plugin(pools_v4=parse_pools("10.250.0.0/23:24", v6=False))
    for _ in range(2):
        await plugin.call("IpamDriver.RequestPool", h.D["RequestPoolAuto"])
    doc = await plugin.call("IpamDriver.RequestPool", h.D["RequestPoolAuto"], status=507)
    assert "no free IPv4 pool left in 10.250.0.0/23 (/24)" in doc["Err"]


@pytest.mark.parametrize(
    ("address", "status", "message"),
    [
        ("10.10.0.1", 400, "Address 10.10.0.1 is not in pool 10.9.0.0/29"),
        ("10.9.0.0", 400, "is the network address of pool"),
        ("10.9.0.7", 400, "is the broadcast address of pool"),
        ("fd00::1", 400, "is not in pool"),
        ("10.9.0.1", 409, "already in use"),
    ],
)
async def test_address_outside_its_pool(
    plugin: Plugin, address: str, status: int, message: str
) -> None:
    pool_id = await small_network(plugin)
    before = h.snapshot(plugin)
    doc = await plugin.call(
        "IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": address}, status=status
    )
    assert message in doc["Err"]
    assert not h.diff(before, h.snapshot(plugin))


async def test_endpoint_address_outside_the_network_is_refused_before_the_kernel(
    plugin: Plugin,
) -> None:
    await small_network(plugin)
    before, calls = h.snapshot(plugin), list(plugin.links.calls)
    doc = await plugin.call(
        "NetworkDriver.CreateEndpoint",
        {"NetworkID": NID, "EndpointID": eid(0), "Interface": {"Address": "10.10.0.2/24"}},
        status=400,
    )
    assert (
        "Interface.Address 10.10.0.2/24 is outside the network's subnets 10.9.0.0/29" in doc["Err"]
    )
    assert not h.diff(before, h.snapshot(plugin)) and plugin.links.calls == calls


async def test_overlapping_pools_and_networks(plugin: Plugin) -> None:
    await small_network(plugin)
    # (0.0.0.0/0 is a size since engine 29, not a subnet: tests/http/test_engine29.py)
    for subnet in ("10.9.0.0/24", "10.9.0.4/30", "10.0.0.0/8"):
        doc = await plugin.call(
            "IpamDriver.RequestPool", {"AddressSpace": "PouchLocal", "Pool": subnet}, status=409
        )
        assert f"Pool {ipaddress.ip_network(subnet)} overlaps with pool 10.9.0.0/29" in doc["Err"]
    # Another address space may hold the same range (as Docker's own IPAM allows).
    await plugin.call(
        "IpamDriver.RequestPool", {"AddressSpace": "PouchGlobal", "Pool": "10.9.0.0/24"}
    )
    # CreateNetwork is checked on its own: the engine may use another IPAM driver.
    before, calls = h.snapshot(plugin), list(plugin.links.calls)
    doc = await plugin.call(
        "NetworkDriver.CreateNetwork",
        {"NetworkID": "b" * 64, "IPv4Data": [{"Pool": "10.9.0.0/28"}]},
        status=409,
    )
    assert "subnet 10.9.0.0/28 overlaps with subnet 10.9.0.0/29 of network" in doc["Err"]
    assert not h.diff(before, h.snapshot(plugin)) and plugin.links.calls == calls


async def fill_network(plugin: Plugin, count: int, subnet: str = "10.64.0.0/20") -> None:
    """``count`` endpoints (no addresses needed for the bridge limit), 64 at a time."""
    await plugin.call(
        "NetworkDriver.CreateNetwork",
        {"NetworkID": NID, "IPv4Data": [{"Pool": subnet, "Gateway": "10.64.0.1/20"}]},
    )
    for start in range(0, count, 64):
        await asyncio.gather(
            *(
                plugin.call(
                    "NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": eid(i)}
                )
                for i in range(start, min(count, start + 64))
            )
        )


async def test_bridge_port_limit_is_answered_before_the_kernel(plugin: Plugin) -> None:
    """BR_MAX_PORTS is 1024 and port 0 is reserved: 1023 veths fit on one bridge. The next
    endpoint gets a clear 507 and the kernel is never asked (it would answer EXFULL,
    "Exchange full")."""
    await fill_network(plugin, 1023)
    assert len(plugin.service.state.endpoints_of(NID)) == 1023
    before, calls = h.snapshot(plugin), list(plugin.links.calls)
    doc = await plugin.call(
        "NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": eid(5000)}, status=507
    )
    assert "has 1023 endpoints" in doc["Err"] and "limit of 1023 ports per bridge" in doc["Err"]
    assert plugin.links.calls == calls, "the kernel must not be asked"
    assert not h.diff(before, h.snapshot(plugin))
    # One leaves, one more fits.
    await plugin.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": eid(0)})
    await plugin.call("NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": eid(5000)})


async def test_bridge_port_limit_holds_while_veth_deletes_are_pending(
    make_plugin: PluginFactory,
) -> None:
    links = FakeLinks()
    plugin = await make_plugin(links=links)
    await fill_network(plugin, 1023)
    # Ten deletes whose veth removal (deferred, off the request path) takes a while.
    links.faults.delay["ensure_link_absent"] = 0.3
    for i in range(10):
        await plugin.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": eid(i)})
    assert len(plugin.service.deletes.pending()) == 10
    # 1013 endpoints and 10 veths still on the bridge: 1023 ports. Twelve creates arrive.
    answers = await asyncio.gather(
        *(
            plugin.client.post(
                "/NetworkDriver.CreateEndpoint",
                json={"NetworkID": NID, "EndpointID": eid(2000 + i)},
            )
            for i in range(12)
        )
    )
    statuses = sorted(r.status for r in answers)
    on_bridge = len(plugin.service.state.endpoints_of(NID)) + len(plugin.service.deletes.pending())
    assert len(plugin.service.state.endpoints_of(NID)) <= 1023, (
        f"{len(plugin.service.state.endpoints_of(NID))} endpoints admitted on one bridge "
        f"(answers {statuses}, {on_bridge} ports in use)"
    )
    assert statuses == [200] * 10 + [507] * 2


async def test_duplicate_address_check_holds_while_veth_deletes_are_pending(
    make_plugin: PluginFactory,
) -> None:
    links = FakeLinks()
    plugin = await make_plugin(links=links)
    await fill_network(plugin, 1023)
    links.faults.delay["ensure_link_absent"] = 0.3
    for i in range(3):  # 1020 endpoints + 3 veths being deleted: creates wait for a drain
        await plugin.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": eid(i)})
    body: dict[str, Any] = {"NetworkID": NID, "Interface": {"Address": "10.64.9.9/20"}}
    answers = await asyncio.gather(
        *(
            plugin.client.post(
                "/NetworkDriver.CreateEndpoint", json={**body, "EndpointID": eid(3000 + i)}
            )
            for i in range(2)
        )
    )
    holders = [
        e
        for e in plugin.service.state.endpoints.values()
        if e.address and str(e.address) == "10.64.9.9/20"
    ]
    assert len(holders) == 1, (
        f"address 10.64.9.9 given to {len(holders)} endpoints "
        f"(answers {[r.status for r in answers]})"
    )
