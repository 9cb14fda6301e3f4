"""Engine 29's IPAM requests, replayed from tests/http/payloads/dockerd-29.json.

New in 29 (docs/protocol.md §4.3, §4.5): a size-only Pool ("0.0.0.0/N", "::/N") asks for any
free pool of that size, and every endpoint's RequestAddress names the endpoint in Options.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import re

import pytest

from pouch_driver.config import parse_pools
from pouch_driver.kernel.fake import FakeLinks

from .conftest import Plugin, PluginFactory, payloads

E = payloads("dockerd-29")
NID = E["CreateNetwork"]["NetworkID"]
EID = E["CreateEndpoint"]["EndpointID"]


async def test_size_only_network_lifecycle(
    plugin: Plugin, caplog: pytest.LogCaptureFixture
) -> None:
    """`--subnet 0.0.0.0/26`, run (the endpoint named in RequestAddress), run --ip, rm, rm."""
    caplog.set_level(logging.DEBUG, logger="pouch_driver.http.handlers")
    assert await plugin.call("IpamDriver.GetDefaultAddressSpaces")  # 27+: before each pool
    pool = await plugin.call("IpamDriver.RequestPool", E["RequestPool"])
    assert pool == {"PoolID": "PouchLocal/10.200.0.0/26", "Pool": "10.200.0.0/26", "Data": {}}
    gw = await plugin.call("IpamDriver.RequestAddress", E["RequestAddressGateway"])
    assert gw["Address"] == "10.200.0.1/26"
    assert await plugin.call("NetworkDriver.CreateNetwork", E["CreateNetwork"]) == {}

    web = await plugin.call("IpamDriver.RequestAddress", E["RequestAddressEndpoint"])
    assert web["Address"] == "10.200.0.2/26"
    assert "RequestAddress in pool PouchLocal/10.200.0.0/26 for endpoint 'web'" in caplog.text
    assert "Interface" in await plugin.call("NetworkDriver.CreateEndpoint", E["CreateEndpoint"])
    joined = await plugin.call("NetworkDriver.Join", E["Join"])
    assert joined["Gateway"] == "10.200.0.1"
    await plugin.call("NetworkDriver.ProgramExternalConnectivity", E["ProgramExternalConnectivity"])
    (fwd,) = plugin.firewall.plan.forwards
    assert (str(fwd.container_ip), fwd.host_port) == ("10.200.0.2", 8080)
    assert "Value" in await plugin.call("NetworkDriver.EndpointOperInfo", E["EndpointOperInfo"])
    db = await plugin.call("IpamDriver.RequestAddress", E["RequestAddressPinned"])
    assert db["Address"] == "10.200.0.10/26"
    assert "for endpoint 'db'" in caplog.text

    for call in ("RevokeExternalConnectivity", "Leave", "DeleteEndpoint"):
        assert await plugin.call(f"NetworkDriver.{call}", E[call]) == {}
    for release in ("ReleaseAddressEndpoint", "ReleaseAddressPinned", "ReleaseAddressGateway"):
        assert await plugin.call("IpamDriver.ReleaseAddress", E[release]) == {}
    assert await plugin.call("IpamDriver.ReleasePool", E["ReleasePool"]) == {}
    assert await plugin.call("NetworkDriver.DeleteNetwork", E["DeleteNetwork"]) == {}
    assert plugin.service.ipam.pools == {} and plugin.service.state.networks == {}


async def test_size_only_dual_stack_network(plugin: Plugin) -> None:
    """`--ipv6 --subnet 0.0.0.0/24 --subnet ::/96`: one pool of each size, from our ranges."""
    v4 = await plugin.call("IpamDriver.RequestPool", E["RequestPoolDualV4"])
    assert v4["Pool"] == "10.200.0.0/24"
    gw4 = await plugin.call("IpamDriver.RequestAddress", E["RequestAddressDualGatewayV4"])
    v6 = await plugin.call("IpamDriver.RequestPool", E["RequestPoolDualV6"])
    assert v6 == {
        "PoolID": "PouchLocal/fd70:6f75:6368::/96",
        "Pool": "fd70:6f75:6368::/96",
        "Data": {},
    }
    gw6 = await plugin.call("IpamDriver.RequestAddress", E["RequestAddressDualGatewayV6"])
    assert (gw4["Address"], gw6["Address"]) == ("10.200.0.1/24", "fd70:6f75:6368::1/96")
    assert await plugin.call("NetworkDriver.CreateNetwork", E["CreateNetworkDual"]) == {}


async def test_size_only_requests_get_distinct_pools_clear_of_host_routes(
    make_plugin: PluginFactory,
) -> None:
    """Like an automatic request, but of the size asked for: each one a different pool, none
    overlapping a held pool or a route of the host (the engine checks none for these)."""
    plugin = await make_plugin(FakeLinks(routes=[ipaddress.ip_network("10.200.0.0/25")]))
    explicit = {**E["RequestPool"], "Pool": "10.200.0.192/26"}
    await plugin.call("IpamDriver.RequestPool", explicit)
    got = [
        (await plugin.call("IpamDriver.RequestPool", E["RequestPool"]))["Pool"] for _ in range(3)
    ]
    assert got == ["10.200.0.128/26", "10.200.1.0/26", "10.200.1.64/26"]


@pytest.mark.parametrize("v6", [True, False, None])
async def test_size_only_ipv6_pool_whatever_v6_says(plugin: Plugin, v6: bool | None) -> None:
    """The family is the one written in Pool; V6 true (as 29 sends it), false or absent."""
    body = copy.deepcopy(E["RequestPoolDualV6"])
    if v6 is None:
        del body["V6"]
    else:
        body["V6"] = v6
    assert (await plugin.call("IpamDriver.RequestPool", body))["Pool"] == "fd70:6f75:6368::/96"


@pytest.mark.parametrize(
    ("pool", "v6", "message"),
    [
        ("0.0.0.0/8", False, r"Pool 0.0.0.0/8: the IPv4 pool ranges \(10.200.0.0/13\) cannot give"),
        ("0.0.0.0/31", False, "Pool 0.0.0.0/31: a /31 has no room"),
        ("0.0.0.0/0", False, "Pool 0.0.0.0/0: the IPv4 pool ranges"),
        ("::/40", True, r"Pool ::/40: the IPv6 pool ranges \(fd70:6f75:6368::/48\) cannot give"),
        ("::/127", True, "Pool ::/127: a /127 has no room"),
    ],
)
async def test_size_only_pools_our_ranges_cannot_give_are_refused(
    plugin: Plugin, pool: str, v6: bool, message: str
) -> None:
    body = {**E["RequestPool"], "Pool": pool, "V6": v6}
    doc = await plugin.call("IpamDriver.RequestPool", body, status=400)
    assert re.search(message, doc["Err"]), doc["Err"]
    assert plugin.service.ipam.pools == {}


async def test_size_only_pool_with_an_ip_range_is_refused(plugin: Plugin) -> None:
    body = {**E["RequestPool"], "SubPool": "10.200.0.0/28"}
    doc = await plugin.call("IpamDriver.RequestPool", body, status=400)
    assert doc["Err"] == "SubPool (--ip-range) needs an explicit Pool (--subnet)"


async def test_size_only_pools_run_out_with_a_clear_error(make_plugin: PluginFactory) -> None:
    plugin = await make_plugin(pools_v4=parse_pools("10.250.0.0/24:26", v6=False))
    got = [
        (await plugin.call("IpamDriver.RequestPool", {**E["RequestPool"], "Pool": "0.0.0.0/25"}))[
            "Pool"
        ]
        for _ in range(2)
    ]
    assert got == ["10.250.0.0/25", "10.250.0.128/25"]
    doc = await plugin.call("IpamDriver.RequestPool", E["RequestPool"], status=507)
    assert doc["Err"].startswith("no free IPv4 pool of size /26 left in 10.250.0.0/24")


def _second_network(number: int) -> tuple[dict[str, object], str, str]:
    """A second pouch network for the same container, in Engine 29's shapes."""
    nid = f"{number:02d}" * 32
    eid = f"e{number}" * 32
    pool = f"10.201.{number}.0/26"
    create = {
        **E["CreateNetwork"],
        "NetworkID": nid,
        "IPv4Data": [
            {"AddressSpace": "PouchLocal", "Pool": pool, "Gateway": f"10.201.{number}.1/26"}
        ],
    }
    return create, nid, eid


async def test_published_ports_follow_the_gateway_endpoint(plugin: Plugin) -> None:
    """Engine 29 turns every gateway change into Revoke (old gateway endpoint) then Program
    (new one) with the port map captured at Join, and Program may come twice (docs/protocol.md
    §3.9). A container on net1 publishes 8080; `network connect --gw-priority 1 net2` moves
    the gateway to net2; disconnecting net2 moves it back. The port follows, once."""
    await plugin.call("IpamDriver.RequestPool", E["RequestPool"])
    await plugin.call("IpamDriver.RequestAddress", E["RequestAddressGateway"])
    await plugin.call("NetworkDriver.CreateNetwork", E["CreateNetwork"])
    await plugin.call("IpamDriver.RequestAddress", E["RequestAddressEndpoint"])
    await plugin.call("NetworkDriver.CreateEndpoint", E["CreateEndpoint"])
    await plugin.call("NetworkDriver.Join", E["Join"])
    program1 = E["ProgramExternalConnectivity"]
    await plugin.call("NetworkDriver.ProgramExternalConnectivity", program1)

    def forwards() -> list[tuple[str, int, int]]:
        return sorted(
            (str(f.container_ip), f.host_port, f.container_port)
            for f in plugin.firewall.plan.forwards
        )

    assert forwards() == [("10.200.0.2", 8080, 80)]

    create2, nid2, eid2 = _second_network(2)
    await plugin.call("IpamDriver.RequestPool", {**E["RequestPool"], "Pool": "10.201.2.0/26"})
    pool2 = "PouchLocal/10.201.2.0/26"
    await plugin.call("IpamDriver.RequestAddress", {**E["RequestAddressGateway"], "PoolID": pool2})
    await plugin.call("NetworkDriver.CreateNetwork", create2)
    got = await plugin.call(
        "IpamDriver.RequestAddress", {**E["RequestAddressEndpoint"], "PoolID": pool2}
    )
    ep2 = {"NetworkID": nid2, "EndpointID": eid2}
    await plugin.call(
        "NetworkDriver.CreateEndpoint",
        {**E["CreateEndpoint"], **ep2, "Interface": {"Address": got["Address"]}},
    )
    await plugin.call("NetworkDriver.Join", {**E["Join"], **ep2})
    # The gateway moves to net2: the old endpoint is revoked, the new one programmed (twice).
    await plugin.call("NetworkDriver.RevokeExternalConnectivity", E["RevokeExternalConnectivity"])
    assert forwards() == []
    program2 = {**program1, **ep2}
    for _ in range(2):
        await plugin.call("NetworkDriver.ProgramExternalConnectivity", program2)
        assert forwards() == [("10.201.2.2", 8080, 80)]
    # Disconnect net2: Revoke and Leave there, and the gateway is back on net1.
    await plugin.call("NetworkDriver.RevokeExternalConnectivity", ep2)
    await plugin.call("NetworkDriver.Leave", ep2)
    await plugin.call("NetworkDriver.DeleteEndpoint", ep2)
    await plugin.call("NetworkDriver.ProgramExternalConnectivity", program1)
    assert forwards() == [("10.200.0.2", 8080, 80)]
    await plugin.call("NetworkDriver.ProgramExternalConnectivity", program1)
    assert forwards() == [("10.200.0.2", 8080, 80)]


async def test_a_repeated_program_keeps_an_ephemeral_host_port(plugin: Plugin) -> None:
    """`-p 80` (HostPort 0) on two containers: each gets a free host port, the first the
    lower one. Once the first is gone, a second Program of the other (Engine 29 repeats it on
    gateway changes) must not move it to the port that came free: its users know the one it
    has."""
    await plugin.call("IpamDriver.RequestPool", E["RequestPool"])
    await plugin.call("IpamDriver.RequestAddress", E["RequestAddressGateway"])
    await plugin.call("NetworkDriver.CreateNetwork", E["CreateNetwork"])
    program = copy.deepcopy(E["ProgramExternalConnectivity"])
    program["Options"]["com.docker.network.portmap"][0].update(HostPort=0, HostPortEnd=0)
    ids = [EID, "e3" * 32]
    for eid in ids:
        got = await plugin.call("IpamDriver.RequestAddress", E["RequestAddressEndpoint"])
        ep = {"NetworkID": NID, "EndpointID": eid}
        await plugin.call(
            "NetworkDriver.CreateEndpoint",
            {**E["CreateEndpoint"], **ep, "Interface": {"Address": got["Address"]}},
        )
        await plugin.call("NetworkDriver.Join", {**E["Join"], **ep})
        await plugin.call("NetworkDriver.ProgramExternalConnectivity", {**program, **ep})

    def host_ports() -> dict[str, int]:
        state = plugin.service.state.endpoints
        return {eid: b.host_port for eid in ids if eid in state for b in state[eid].port_bindings}

    first, second = (host_ports()[eid] for eid in ids)
    assert first < second
    gone = {"NetworkID": NID, "EndpointID": EID}
    for call in ("RevokeExternalConnectivity", "Leave", "DeleteEndpoint"):
        await plugin.call(f"NetworkDriver.{call}", gone)
    await plugin.call(
        "NetworkDriver.ProgramExternalConnectivity", {**program, "EndpointID": ids[1]}
    )
    assert host_ports() == {ids[1]: second}
    assert [f.host_port for f in plugin.firewall.plan.forwards] == [second]
