"""Every protocol call, replaying the engine's real payloads (tests/http/payloads/*.json)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import ipaddress
from typing import Any

import pytest

from pouch_driver.kernel.fake import FakeFirewall, FakeLinks

from .conftest import Plugin, PluginFactory, payloads

D = payloads("dockerd-20.10")
P = payloads("pouchd")
NID = D["CreateNetwork"]["NetworkID"]
EID = D["CreateEndpoint"]["EndpointID"]


async def create_net1(plugin: Plugin) -> None:
    """`docker network create` (docs/protocol.md §5.1): pool, gateway, aux, then CreateNetwork."""
    pool = await plugin.call("IpamDriver.RequestPool", D["RequestPool"])
    assert pool == {"PoolID": "PouchLocal/10.1.0.0/24", "Pool": "10.1.0.0/24", "Data": {}}
    gw = await plugin.call("IpamDriver.RequestAddress", D["RequestAddressGateway"])
    assert gw["Address"] == "10.1.0.1/24"
    aux = await plugin.call("IpamDriver.RequestAddress", D["RequestAddressAux"])
    assert aux["Address"] == "10.1.0.254/24"
    assert await plugin.call("NetworkDriver.CreateNetwork", D["CreateNetwork"]) == {}


async def test_handshake_with_empty_bodies_and_no_content_type(plugin: Plugin) -> None:
    assert await plugin.call("Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert await plugin.call("NetworkDriver.GetCapabilities") == {
        "Scope": "local",
        "ConnectivityScope": "local",
    }
    assert await plugin.call("IpamDriver.GetCapabilities") == {
        "RequiresMACAddress": False,
        "RequiresRequestReplay": False,
    }
    assert await plugin.call("IpamDriver.GetDefaultAddressSpaces") == {
        "LocalDefaultAddressSpace": "PouchLocal",
        "GlobalDefaultAddressSpace": "PouchGlobal",
    }


@pytest.mark.parametrize("host", ["plugin.moby.localhost", "", "%2Frun%2Fdocker%2Fplugins"])
async def test_any_host_header_is_accepted(plugin: Plugin, host: str) -> None:
    """Old engines put (part of) the socket path in Host; nothing validates it (8.14)."""
    doc = await plugin.call("Plugin.Activate", headers={"Host": host})
    assert doc["Implements"] == ["NetworkDriver", "IpamDriver"]


async def test_docker_run_lifecycle(plugin: Plugin) -> None:
    """5.1 + 5.3 + 5.6 + 5.7: create, run with -p, stop, rm; the kernel follows each step."""
    await create_net1(plugin)
    bridge = plugin.service.state.networks[NID].bridge
    assert bridge == "pub" + NID[:12]
    assert plugin.links.links[bridge].mtu == 1450
    assert {str(a) for a in plugin.links.links[bridge].addresses} == {"10.1.0.1/24"}

    addr = await plugin.call("IpamDriver.RequestAddress", D["RequestAddressEndpoint"])
    assert addr["Address"] == "10.1.0.2/24"
    created = await plugin.call("NetworkDriver.CreateEndpoint", D["CreateEndpoint"])
    # MacAddress was empty in the request, so we may (and do) fill it; nothing else.
    assert set(created) == {"Interface"}
    assert set(created["Interface"]) == {"MacAddress"}
    assert created["Interface"]["MacAddress"] == "02:50:0a:01:00:02"
    host, peer = "puh" + EID[:12], "puc" + EID[:12]
    assert plugin.links.links[host].master == plugin.links.links[bridge].index
    assert plugin.links.links[peer].mac == "02:50:0a:01:00:02"
    assert plugin.links.links[peer].mtu == 1450

    joined = await plugin.call("NetworkDriver.Join", D["Join"])
    assert joined["InterfaceName"] == {"SrcName": peer, "DstPrefix": "eth"}
    assert len(joined["InterfaceName"]["SrcName"].encode()) <= 15
    assert joined["Gateway"] == "10.1.0.1"  # a plain IP, not CIDR
    assert "GatewayIPv6" not in joined
    assert (
        await plugin.call(
            "NetworkDriver.ProgramExternalConnectivity", D["ProgramExternalConnectivity"]
        )
        == {}
    )
    (fwd,) = plugin.firewall.plan.forwards
    assert (fwd.proto, fwd.host_port, str(fwd.container_ip), fwd.container_port) == (
        "tcp",
        8080,
        "10.1.0.2",
        80,
    )
    info = await plugin.call("NetworkDriver.EndpointOperInfo", D["EndpointOperInfo"])
    assert isinstance(info["Value"], dict)

    assert (
        await plugin.call(
            "NetworkDriver.RevokeExternalConnectivity", D["RevokeExternalConnectivity"]
        )
        == {}
    )
    assert plugin.firewall.plan.forwards == ()
    assert await plugin.call("NetworkDriver.Leave", D["Leave"]) == {}
    assert peer in plugin.links.links, "Leave must not delete the link: it is still in the sandbox"
    assert await plugin.call("NetworkDriver.DeleteEndpoint", D["DeleteEndpoint"]) == {}
    assert host not in plugin.links.links and peer not in plugin.links.links
    await plugin.call("IpamDriver.ReleaseAddress", D["ReleaseAddressEndpoint"])

    await plugin.call("IpamDriver.ReleaseAddress", D["ReleaseAddressGateway"])
    await plugin.call("IpamDriver.ReleaseAddress", D["ReleaseAddressAux"])
    await plugin.call("IpamDriver.ReleasePool", D["ReleasePool"])
    await plugin.call("NetworkDriver.DeleteNetwork", D["DeleteNetwork"])
    assert bridge not in plugin.links.links
    assert plugin.service.state.networks == {} and plugin.service.state.endpoints == {}
    assert plugin.service.ipam.pools == {}
    assert plugin.firewall.plan.networks == ()


async def test_create_endpoint_never_echoes_engine_set_fields(plugin: Plugin) -> None:
    """3.6: a MAC (or address) the engine set is never returned, not even unchanged."""
    await plugin.call("IpamDriver.RequestPool", {**D["RequestPool"], "Pool": "10.3.0.0/24"})
    await plugin.call(
        "IpamDriver.RequestPool",
        {"Pool": "fd70:6f75:6368:3::/64", "V6": True, "AddressSpace": "PouchLocal"},
    )
    await plugin.call("NetworkDriver.CreateNetwork", D["CreateNetworkInternalDualStack"])
    created = await plugin.call("NetworkDriver.CreateEndpoint", D["CreateEndpointWithMac"])
    assert created == {}
    ep = plugin.service.state.endpoints[D["CreateEndpointWithMac"]["EndpointID"]]
    assert ep.mac == "02:42:0a:03:00:05"
    joined = await plugin.call(
        "NetworkDriver.Join",
        {
            "NetworkID": ep.network_id,
            "EndpointID": ep.endpoint_id,
            "SandboxKey": "/var/run/docker/netns/0123456789ab",
            "Options": {},
        },
    )
    # --internal: no way out, so no default route and no docker_gwbridge (8.13).
    assert "Gateway" not in joined and "GatewayIPv6" not in joined
    assert joined["DisableGatewayService"] is True
    (rules,) = plugin.firewall.plan.networks
    assert rules.internal and {str(s) for s in rules.subnets} == {
        "10.3.0.0/24",
        "fd70:6f75:6368:3::/64",
    }


async def test_unknown_endpoint_driver_opts_are_accepted_and_ignored(
    plugin: Plugin, caplog: pytest.LogCaptureFixture
) -> None:
    """`docker network connect --driver-opt com.example.foo=bar`: Docker's bridge driver
    ignores keys it does not read, so we do too (logged at debug, naming the key)."""
    await create_net1(plugin)
    await plugin.call("IpamDriver.RequestAddress", D["RequestAddressEndpoint"])
    body = copy.deepcopy(D["CreateEndpoint"])
    body["Options"] = {
        **(body.get("Options") or {}),
        "com.example.foo": "bar",
        "my-opt": "1",
        "com.docker.network.endpoint.sysctls": "net.ipv4.conf.IFNAME.log_martians=1",
    }
    with caplog.at_level("DEBUG", logger="pouch_driver.options"):
        created = await plugin.call("NetworkDriver.CreateEndpoint", body)
    assert created["Interface"]["MacAddress"] == "02:50:0a:01:00:02"
    assert EID in plugin.service.state.endpoints
    ignored = [r.getMessage() for r in caplog.records if r.name == "pouch_driver.options"]
    assert any("com.example.foo" in m for m in ignored), ignored
    assert any("my-opt" in m for m in ignored), ignored
    assert not any("sysctls" in m for m in ignored), "the engine's own keys are not ours to log"


async def test_pouchd_flow_with_force_delete_before_create(plugin: Plugin) -> None:
    """9: pouchd deletes a same-named endpoint first (unknown to us) and sends null maps."""
    await plugin.call("IpamDriver.RequestPool", P["RequestPool"])
    await plugin.call("IpamDriver.RequestAddress", P["RequestAddressGateway"])
    await plugin.call("NetworkDriver.CreateNetwork", P["CreateNetwork"])
    await plugin.call("NetworkDriver.DeleteEndpoint", P["DeleteEndpointPreCreate"])
    await plugin.call("IpamDriver.RequestAddress", P["RequestAddressEndpoint"])
    created = await plugin.call("NetworkDriver.CreateEndpoint", P["CreateEndpoint"])
    assert "MacAddress" in created["Interface"]
    joined = await plugin.call("NetworkDriver.Join", P["Join"])
    assert joined["Gateway"] == "10.4.0.1"


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("NetworkDriver.DeleteNetwork", D["DeleteNetwork"]),
        ("NetworkDriver.DeleteEndpoint", D["DeleteEndpoint"]),
        ("NetworkDriver.Leave", D["Leave"]),
        ("NetworkDriver.RevokeExternalConnectivity", D["RevokeExternalConnectivity"]),
        ("NetworkDriver.FreeNetwork", D["FreeNetwork"]),
        ("IpamDriver.ReleasePool", D["ReleasePool"]),
        ("IpamDriver.ReleaseAddress", D["ReleaseAddressGateway"]),
        ("NetworkDriver.EndpointOperInfo", D["EndpointOperInfo"]),
    ],
)
async def test_unknown_ids_in_deletes_and_releases_succeed(
    plugin: Plugin, method: str, body: dict[str, Any]
) -> None:
    assert await plugin.call(method, body) in ({}, {"Value": {}})


async def test_swarm_and_discovery_calls_answer(plugin: Plugin) -> None:
    assert await plugin.call("NetworkDriver.AllocateNetwork", D["AllocateNetwork"]) == {
        "Options": {}
    }
    assert await plugin.call("NetworkDriver.DiscoverNew", D["DiscoverNew"]) == {}
    assert await plugin.call("NetworkDriver.DiscoverDelete", D["DiscoverDelete"]) == {}


async def test_unknown_method_is_404_and_only_that(plugin: Plugin) -> None:
    doc = await plugin.call("NetworkDriver.GwAllocCheck", {"Options": {}}, status=404)
    assert "not implemented" in doc["Err"]
    resp = await plugin.client.get("/Plugin.Activate")
    assert resp.status == 405
    assert (await resp.json())["Err"]


async def test_unknown_network_is_an_error_but_never_404(plugin: Plugin) -> None:
    doc = await plugin.call("NetworkDriver.CreateEndpoint", D["CreateEndpoint"], status=500)
    assert "network 5c3b9f7a1e2d is unknown" in doc["Err"]
    doc = await plugin.call("NetworkDriver.Join", D["Join"], status=500)
    assert "unknown" in doc["Err"]


def _broken(body: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    target: Any = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


BAD_INPUT = [
    ("NetworkDriver.CreateNetwork", _broken(D["CreateNetwork"], ["NetworkID"], 42), "NetworkID"),
    (
        "NetworkDriver.CreateNetwork",
        _broken(D["CreateNetwork"], ["NetworkID"], "../../etc"),
        "NetworkID",
    ),
    (
        "NetworkDriver.CreateNetwork",
        _broken(D["CreateNetwork"], ["IPv4Data", 0, "Pool"], "10.1.0.0/33"),
        "IPv4Data.0.Pool",
    ),
    (
        "NetworkDriver.CreateNetwork",
        _broken(D["CreateNetwork"], ["IPv4Data", 0, "Gateway"], "10.9.0.1/24"),
        "Gateway",
    ),
    (
        "NetworkDriver.CreateNetwork",
        _broken(
            D["CreateNetwork"],
            ["Options", "com.docker.network.generic", "com.docker.network.driver.mtu"],
            "big",
        ),
        "com.docker.network.driver.mtu",
    ),
    (
        "NetworkDriver.CreateNetwork",
        _broken(
            D["CreateNetwork"],
            ["Options", "com.docker.network.generic", "com.docker.network.bridge.name"],
            "x;reboot",
        ),
        "com.docker.network.bridge.name",
    ),
    (
        "NetworkDriver.CreateNetwork",
        _broken(D["CreateNetwork"], ["Options", "com.docker.network.generic", "bogus"], "1"),
        "option bogus",
    ),
    (
        "NetworkDriver.CreateNetwork",
        _broken(
            D["CreateNetwork"],
            ["Options", "com.docker.network.generic", "com.docker.network.bridge.enable_icc"],
            "maybe",
        ),
        "enable_icc",
    ),
    (
        "NetworkDriver.CreateNetwork",
        _broken(D["CreateNetwork"], ["Options", "com.docker.network.enable_ipv6"], "yes"),
        "enable_ipv6",
    ),
    (
        "NetworkDriver.CreateEndpoint",
        _broken(D["CreateEndpoint"], ["Interface", "Address"], "10.1.0.2"),
        "Interface.Address",
    ),
    (
        "NetworkDriver.CreateEndpoint",
        _broken(D["CreateEndpoint"], ["Interface", "MacAddress"], "zz:zz"),
        "Interface.MacAddress",
    ),
    (
        # Endpoint options we do not read are ignored, but do not excuse a field we do read.
        "NetworkDriver.CreateEndpoint",
        _broken(
            _broken(
                D["CreateEndpoint"],
                ["Options"],
                {**D["CreateEndpoint"]["Options"], "com.example.foo": "bar"},
            ),
            ["Interface", "MacAddress"],
            "zz:zz",
        ),
        "Interface.MacAddress",
    ),
    ("NetworkDriver.Join", _broken(D["Join"], ["SandboxKey"], ""), "SandboxKey"),
    (
        "NetworkDriver.ProgramExternalConnectivity",
        _broken(
            D["ProgramExternalConnectivity"],
            ["Options", "com.docker.network.portmap", 0, "Port"],
            "80",
        ),
        "portmap.0.Port",
    ),
    (
        "NetworkDriver.ProgramExternalConnectivity",
        _broken(
            D["ProgramExternalConnectivity"],
            ["Options", "com.docker.network.portmap", 0, "Proto"],
            99,
        ),
        "Proto",
    ),
    ("IpamDriver.RequestPool", _broken(D["RequestPool"], ["Pool"], "10.1.0.0"), "Pool"),
    ("IpamDriver.RequestPool", _broken(D["RequestPool"], ["Options"], {"k": "v"}), "IPAM option k"),
    (
        "IpamDriver.RequestAddress",
        _broken(D["RequestAddressAux"], ["Address"], "10.1.0.2/24"),
        "Address",
    ),
    (
        "IpamDriver.ReleaseAddress",
        _broken(D["ReleaseAddressGateway"], ["Address"], None),
        "Address",
    ),
]


@pytest.mark.parametrize(("method", "body", "names"), BAD_INPUT)
async def test_bad_input_names_the_field_and_changes_nothing(
    plugin: Plugin, method: str, body: dict[str, Any], names: str
) -> None:
    if method != "NetworkDriver.CreateNetwork" and "Ipam" not in method:
        await create_net1(plugin)
        await plugin.call("IpamDriver.RequestAddress", D["RequestAddressEndpoint"])
        if method != "NetworkDriver.CreateEndpoint":
            await plugin.call("NetworkDriver.CreateEndpoint", D["CreateEndpoint"])
    elif "Ipam" in method and method != "IpamDriver.RequestPool":
        await plugin.call("IpamDriver.RequestPool", D["RequestPool"])
    before = _state(plugin)
    calls = list(plugin.links.calls)
    doc = await plugin.call(method, body, status=400)
    assert names in doc["Err"]
    assert _state(plugin) == before
    assert plugin.links.calls == calls, "a refused request must not touch the kernel"


def _state(plugin: Plugin) -> Any:
    svc = plugin.service
    return (
        dict(svc.state.networks),
        dict(svc.state.endpoints),
        {k: dict(v.allocated) for k, v in svc.ipam.pools.items()},
        dict(plugin.links.links),
        plugin.firewall.plan,
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "body is empty"),
        (b"   \n", "body is empty"),
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[" * 100000 + b"]" * 100000, "malformed JSON"),
        (b'{"NetworkID": 1' + b"0" * 5000 + b"}", "malformed JSON"),
    ],
)
async def test_malformed_bodies_get_a_clear_400(plugin: Plugin, raw: bytes, message: str) -> None:
    doc = await plugin.call("NetworkDriver.CreateNetwork", raw=raw, status=400)
    assert message in doc["Err"]


async def test_null_maps_and_unknown_fields_are_tolerated(plugin: Plugin) -> None:
    await plugin.call("IpamDriver.RequestPool", {**D["RequestPool"], "FutureField": {"x": 1}})
    body = {**D["CreateNetwork"], "Options": None, "IPv6Data": None, "NewEngineField": True}
    body["IPv4Data"] = [{**body["IPv4Data"][0], "Extra": 1}]
    assert await plugin.call("NetworkDriver.CreateNetwork", body) == {}


async def test_gateway_request_with_explicit_address_and_aux_conflict(plugin: Plugin) -> None:
    await plugin.call("IpamDriver.RequestPool", D["RequestPool"])
    gw = await plugin.call(
        "IpamDriver.RequestAddress", {**D["RequestAddressGateway"], "Address": "10.1.0.100"}
    )
    assert gw["Address"] == "10.1.0.100/24"
    doc = await plugin.call(
        "IpamDriver.RequestAddress", {**D["RequestAddressAux"], "Address": "10.1.0.100"}, status=409
    )
    assert "already in use" in doc["Err"]


async def test_repeated_empty_pool_requests_return_different_pools(plugin: Plugin) -> None:
    seen = set()
    for _ in range(5):
        doc = await plugin.call("IpamDriver.RequestPool", D["RequestPoolAuto"])
        seen.add(doc["Pool"])
        ipaddress.ip_network(doc["Pool"])
    assert len(seen) == 5
    v6 = await plugin.call("IpamDriver.RequestPool", D["RequestPoolV6Auto"])
    assert ipaddress.ip_network(v6["Pool"]).version == 6


async def test_automatic_pool_avoids_host_routes(make_plugin: PluginFactory) -> None:

    plugin = await make_plugin(links=FakeLinks(routes=[ipaddress.ip_network("10.200.0.0/23")]))
    doc = await plugin.call("IpamDriver.RequestPool", D["RequestPoolAuto"])
    assert doc["Pool"] == "10.200.2.0/24"


async def test_ip_range_gives_addresses_from_the_sub_pool(plugin: Plugin) -> None:
    pool = await plugin.call("IpamDriver.RequestPool", D["RequestPoolSubPool"])
    assert pool["Pool"] == "10.2.0.0/16"
    gw = await plugin.call(
        "IpamDriver.RequestAddress",
        {
            "PoolID": pool["PoolID"],
            "Address": "",
            "Options": {"RequestAddressType": "com.docker.network.gateway"},
        },
    )
    assert gw["Address"] == "10.2.0.1/16"
    addr = await plugin.call(
        "IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": None}
    )
    assert ipaddress.ip_interface(addr["Address"]).ip in ipaddress.ip_network("10.2.5.0/24")


async def test_concurrent_address_requests_never_duplicate(plugin: Plugin) -> None:
    await plugin.call("IpamDriver.RequestPool", D["RequestPool"])
    results = await asyncio.gather(
        *(plugin.call("IpamDriver.RequestAddress", D["RequestAddressEndpoint"]) for _ in range(100))
    )
    got = [r["Address"] for r in results]
    assert len(set(got)) == 100


async def test_concurrent_endpoint_lifecycles(plugin: Plugin) -> None:
    await create_net1(plugin)

    async def lifecycle(i: int) -> str:
        eid = hashlib.sha256(str(i).encode()).hexdigest()
        addr = (await plugin.call("IpamDriver.RequestAddress", D["RequestAddressEndpoint"]))[
            "Address"
        ]
        body = {
            **D["CreateEndpoint"],
            "EndpointID": eid,
            "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""},
        }
        await plugin.call("NetworkDriver.CreateEndpoint", body)
        await plugin.call("NetworkDriver.Join", {**D["Join"], "EndpointID": eid})
        await plugin.call("NetworkDriver.Leave", {**D["Leave"], "EndpointID": eid})
        await plugin.call(
            "NetworkDriver.DeleteEndpoint", {**D["DeleteEndpoint"], "EndpointID": eid}
        )
        await plugin.call(
            "IpamDriver.ReleaseAddress",
            {"PoolID": "PouchLocal/10.1.0.0/24", "Address": addr.split("/")[0]},
        )
        return addr

    addrs = await asyncio.gather(*(lifecycle(i + 1) for i in range(60)))
    assert len(addrs) == 60
    assert plugin.service.state.endpoints == {}
    assert [n for n in plugin.links.links if n.startswith(("puh", "puc"))] == []
    assert set(plugin.service.ipam.pools["PouchLocal/10.1.0.0/24"].allocated) == {
        int(ipaddress.ip_address("10.1.0.1")),
        int(ipaddress.ip_address("10.1.0.254")),
    }


async def test_body_size_limit(make_plugin: PluginFactory) -> None:
    plugin = await make_plugin(max_body=4096)
    doc = await plugin.call(
        "NetworkDriver.CreateNetwork", raw=b"{" + b" " * 10000 + b"}", status=413
    )
    assert doc["Err"]


async def test_without_br_netfilter_create_network_answers_the_fix(
    make_plugin: PluginFactory,
) -> None:
    """A host where br_netfilter cannot be loaded (a managed plugin without the module):
    the engine's CreateNetwork gets an error naming the fix, and nothing is made."""
    firewall = FakeFirewall()
    firewall.bridge_netfilter = False
    plugin = await make_plugin(firewall=firewall)
    await plugin.call("IpamDriver.RequestPool", D["RequestPool"])
    await plugin.call("IpamDriver.RequestAddress", D["RequestAddressGateway"])
    doc = await plugin.call("NetworkDriver.CreateNetwork", D["CreateNetwork"], status=500)
    assert "modprobe br_netfilter" in doc["Err"], doc
    assert plugin.service.state.networks == {} and plugin.links.links == {}
    firewall.bridge_netfilter = True  # the operator loaded it: the engine's retry works
    assert await plugin.call("NetworkDriver.CreateNetwork", D["CreateNetwork"]) == {}
