"""Engines 27-29's bridge options through the protocol: what the bridge holds, what Join
answers, what the firewall plan says, and IPv6-only networks (docs/protocol.md §3.2, §3.6)."""

from __future__ import annotations

import copy
from typing import Any

from pouch_driver.model import GatewayMode
from pouch_driver.service.reconcile import Reconciler

from .conftest import Plugin, payloads

D = payloads("dockerd-20.10")
NID = D["CreateNetwork"]["NetworkID"]
EID = D["CreateEndpoint"]["EndpointID"]
V6 = {"AddressSpace": "PouchLocal", "Pool": "fd70:5::/64", "Gateway": "fd70:5::1/64"}


def create_body(generic: dict[str, str], **top: Any) -> dict[str, Any]:
    body = copy.deepcopy(D["CreateNetwork"])
    body["Options"]["com.docker.network.generic"] = generic
    body["Options"].update(top)
    return body


async def _endpoint(plugin: Plugin, address_v6: str = "") -> dict[str, Any]:
    ep = copy.deepcopy(D["CreateEndpoint"])
    if address_v6:
        ep["Interface"]["AddressIPv6"] = address_v6
    await plugin.call("NetworkDriver.CreateEndpoint", ep)
    return await plugin.call("NetworkDriver.Join", D["Join"])


async def test_container_iface_prefix_is_join_dst_prefix(plugin: Plugin) -> None:
    body = create_body({"com.docker.network.container_iface_prefix": "lan"})
    await plugin.call("NetworkDriver.CreateNetwork", body)
    joined = await _endpoint(plugin)
    assert joined["InterfaceName"]["DstPrefix"] == "lan"


async def test_inhibit_ipv4_keeps_the_gateway_off_the_bridge_but_answers_it(
    plugin: Plugin,
) -> None:
    body = create_body({"com.docker.network.bridge.inhibit_ipv4": "true"})
    await plugin.call("NetworkDriver.CreateNetwork", body)
    bridge = plugin.service.state.networks[NID].bridge
    assert plugin.links.links[bridge].addresses == ()
    joined = await _endpoint(plugin)
    assert joined["Gateway"] == "10.1.0.1"
    # check (and the sweep) do not take the missing address for damage to repair.
    report = await Reconciler(plugin.service, repair=False).run()
    assert not any("lacks" in p for p in report.problems), report.problems


async def test_isolated_ipv6_has_no_address_of_that_family_on_the_bridge(plugin: Plugin) -> None:
    body = create_body(
        {"com.docker.network.bridge.gateway_mode_ipv6": "isolated"},
        **{"com.docker.network.internal": True, "com.docker.network.enable_ipv6": True},
    )
    body["IPv6Data"] = [V6]
    await plugin.call("NetworkDriver.CreateNetwork", body)
    bridge = plugin.service.state.networks[NID].bridge
    assert {str(a) for a in plugin.links.links[bridge].addresses} == {"10.1.0.1/24"}
    joined = await _endpoint(plugin, "fd70:5::2/64")
    assert "Gateway" not in joined and "GatewayIPv6" not in joined
    assert joined["DisableGatewayService"] is True


async def test_isolated_without_internal_is_refused_saying_why(plugin: Plugin) -> None:
    body = create_body({"com.docker.network.bridge.gateway_mode_ipv4": "isolated"})
    doc = await plugin.call("NetworkDriver.CreateNetwork", body, status=400)
    assert "only for an internal network" in doc["Err"]
    assert plugin.service.state.networks == {}


async def test_gateway_modes_trusted_and_host_ips_reach_the_firewall_plan(plugin: Plugin) -> None:
    body = create_body(
        {
            "com.docker.network.bridge.gateway_mode_ipv4": "routed",
            "com.docker.network.bridge.gateway_mode_ipv6": "nat-unprotected",
            "com.docker.network.bridge.trusted_host_interfaces": "eth1:eth2",
            "com.docker.network.host_ipv4": "10.9.8.7",
            "com.docker.network.host_ipv6": "fd70:9::7",
        }
    )
    await plugin.call("NetworkDriver.CreateNetwork", body)
    (rules,) = plugin.firewall.plan.networks
    assert (rules.mode_v4, rules.mode_v6) == (GatewayMode.ROUTED, GatewayMode.NAT_UNPROTECTED)
    assert rules.trusted == ("eth1", "eth2")
    assert (str(rules.snat_v4), str(rules.snat_v6)) == ("10.9.8.7", "fd70:9::7")


async def test_ipv6_only_network_from_engine_28(plugin: Plugin) -> None:
    """``-o com.docker.network.enable_ipv4=false`` on Engine 28: no IPv4 pool comes, the
    option stays in the generic map; ports publish on IPv6."""
    body = create_body(
        {"com.docker.network.enable_ipv4": "false"},
        **{"com.docker.network.enable_ipv4": False, "com.docker.network.enable_ipv6": True},
    )
    body["IPv4Data"], body["IPv6Data"] = [], [V6]
    await plugin.call("NetworkDriver.CreateNetwork", body)
    net = plugin.service.state.networks[NID]
    assert not net.options.enable_ipv4 and net.ipv4 == ()
    assert {str(a) for a in plugin.links.links[net.bridge].addresses} == {"fd70:5::1/64"}
    ep = copy.deepcopy(D["CreateEndpoint"])
    ep["Interface"] = {"Address": "", "AddressIPv6": "fd70:5::2/64", "MacAddress": ""}
    await plugin.call("NetworkDriver.CreateEndpoint", ep)
    joined = await plugin.call("NetworkDriver.Join", D["Join"])
    assert joined["GatewayIPv6"] == "fd70:5::1" and "Gateway" not in joined
    await plugin.call(
        "NetworkDriver.ProgramExternalConnectivity",
        {"NetworkID": NID, "EndpointID": EID, "Options": D["Join"]["Options"]},
    )
    (forward,) = plugin.firewall.plan.forwards
    assert (str(forward.container_ip), forward.container_port) == ("fd70:5::2", 80)


async def test_ipv6_only_on_an_engine_that_ignores_it_is_refused(plugin: Plugin) -> None:
    """20.10-27 leave the option to the driver but still allocate (and configure) IPv4."""
    body = create_body({"com.docker.network.enable_ipv4": "false"})
    body["IPv6Data"] = [V6]
    doc = await plugin.call("NetworkDriver.CreateNetwork", body, status=400)
    assert "does not honour it" in doc["Err"] and "Engine 28" in doc["Err"]
    assert plugin.service.state.networks == {}


async def test_a_cluster_network_on_a_plugin_without_a_cluster_is_refused_clearly(
    plugin: Plugin,
) -> None:
    """``pouch.cluster`` needs ``--cluster``: the error says so and nothing is made."""
    body = create_body({"pouch.cluster": "mesh"})
    err = await plugin.call("NetworkDriver.CreateNetwork", body, status=400)
    assert "option pouch.cluster" in err["Err"] and "--cluster" in err["Err"], err
    assert not plugin.service.state.networks
    assert not plugin.links.links
