"""The contract the service relies on, run against the fakes and the real kernel alike.

``kernel/fake.py`` stands in for netlink and iptables in the unit and HTTP suites; each test here
runs twice, once on ``FakeLinks``/``FakeFirewall`` and once on ``NetlinkLinks``/
``IptablesFirewall`` in a throwaway namespace, and reads the result back through the adapter
under test. A behaviour the fake gets wrong fails its ``fake`` variant here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest

from pouch_driver.errors import KernelError
from pouch_driver.kernel import (
    BridgeSpec,
    Firewall,
    FirewallPlan,
    Links,
    NetworkRules,
    PortForward,
    RemoteEndpoint,
    VethSpec,
    VxlanSpec,
)
from pouch_driver.kernel.fake import FakeFirewall, FakeLinks
from pouch_driver.kernel.iptables import IptablesFirewall
from pouch_driver.kernel.links import NetlinkLinks

from .conftest import Netns

iface = ipaddress.ip_interface

BRIDGE = BridgeSpec(
    name="pkbcontract001",
    mtu=1400,
    addresses=(iface("10.78.0.1/24"), iface("fd70:78::1/64")),
    mac="02:51:00:00:00:07",
)
OTHER = BridgeSpec(name="pkbcontract002", mtu=None, addresses=(), mac="02:51:00:00:00:08")
VETH = VethSpec(
    host="pkhcontract001",
    peer="pkccontract001",
    bridge=BRIDGE.name,
    mtu=1400,
    peer_mac="02:50:0a:4e:00:02",
)
RULES = NetworkRules(
    bridge=BRIDGE.name,
    subnets=(ipaddress.ip_network("10.78.0.0/24"),),
    icc=True,
    masquerade=True,
    internal=False,
)
PLAN = FirewallPlan(
    networks=(RULES,),
    forwards=(PortForward(BRIDGE.name, "tcp", None, 8080, ipaddress.ip_address("10.78.0.2"), 80),),
)


@dataclass
class Kernel:
    links: Links
    firewall: Firewall


@pytest.fixture(params=["fake", "real"])
async def kernel(
    request: pytest.FixtureRequest, netns: Netns, firewall: IptablesFirewall
) -> AsyncIterator[Kernel]:
    if request.param == "fake":
        yield Kernel(FakeLinks(), FakeFirewall())
        return
    links = NetlinkLinks(workers=2, netns=netns.name)
    try:
        yield Kernel(links, firewall)
    finally:
        await links.close()


async def ours(links: Links) -> dict[str, object]:
    return {link.name: link for link in await links.list_links() if link.name.startswith("pk")}


async def test_a_bridge_is_made_up_with_its_mtu_mac_and_addresses_idempotently(
    kernel: Kernel,
) -> None:
    for _ in range(2):
        await kernel.links.ensure_bridge(BRIDGE)
    link = await kernel.links.get_link(BRIDGE.name)
    assert link is not None
    assert (link.kind, link.up, link.mtu, link.mac, link.master) == (
        "bridge",
        True,
        1400,
        BRIDGE.mac,
        None,
    )
    assert set(link.addresses) == set(BRIDGE.addresses)
    assert list(await ours(kernel.links)) == [BRIDGE.name]


async def test_ensure_bridge_adds_addresses_and_keeps_the_ones_it_has(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    extra = iface("10.79.0.1/24")
    await kernel.links.ensure_bridge(BridgeSpec(BRIDGE.name, BRIDGE.mtu, (extra,), BRIDGE.mac))
    link = await kernel.links.get_link(BRIDGE.name)
    assert link is not None and set(link.addresses) == {*BRIDGE.addresses, extra}


async def test_a_bridge_without_an_mtu_gets_the_default(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(OTHER)
    link = await kernel.links.get_link(OTHER.name)
    assert link is not None and link.mtu == 1500 and link.addresses == ()


async def test_a_bridge_name_held_by_a_veth_is_refused(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    await kernel.links.ensure_veth(VETH)
    with pytest.raises(KernelError, match="not a bridge"):
        await kernel.links.ensure_bridge(BridgeSpec(VETH.host, None, (), None))


async def test_a_veth_needs_its_bridge(kernel: Kernel) -> None:
    with pytest.raises(KernelError, match="does not exist"):
        await kernel.links.ensure_veth(VETH)
    assert await ours(kernel.links) == {}


async def test_a_veth_pair_is_made_on_its_bridge_idempotently(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    for _ in range(2):
        await kernel.links.ensure_veth(VETH)
    bridge, host, peer = [
        await kernel.links.get_link(n) for n in (BRIDGE.name, VETH.host, VETH.peer)
    ]
    assert bridge is not None and host is not None and peer is not None
    assert (host.kind, host.master, host.up, host.mtu) == ("veth", bridge.index, True, 1400)
    assert (peer.kind, peer.master, peer.up, peer.mtu, peer.mac) == (
        "veth",
        None,
        False,
        1400,
        VETH.peer_mac,
    )
    assert set(await ours(kernel.links)) == {BRIDGE.name, VETH.host, VETH.peer}


async def test_a_veth_name_held_by_a_bridge_is_refused(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    await kernel.links.ensure_bridge(OTHER)
    with pytest.raises(KernelError, match="not a veth"):
        await kernel.links.ensure_veth(
            VethSpec(OTHER.name, VETH.peer, BRIDGE.name, None, VETH.peer_mac)
        )


async def test_removing_either_end_removes_the_pair(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    await kernel.links.ensure_veth(VETH)
    await kernel.links.ensure_link_absent(VETH.peer)
    assert set(await ours(kernel.links)) == {BRIDGE.name}
    await kernel.links.ensure_link_absent(VETH.peer)  # gone already: still fine


async def test_removing_a_bridge_releases_its_ports(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    await kernel.links.ensure_veth(VETH)
    await kernel.links.ensure_link_absent(BRIDGE.name)
    host = await kernel.links.get_link(VETH.host)
    assert host is not None and host.master is None
    assert await kernel.links.get_link(BRIDGE.name) is None


async def test_only_the_named_addresses_are_removed(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    v4, v6 = BRIDGE.addresses
    await kernel.links.ensure_addresses_absent(BRIDGE.name, (v4,))
    await kernel.links.ensure_addresses_absent(BRIDGE.name, (v4,))
    link = await kernel.links.get_link(BRIDGE.name)
    assert link is not None and link.addresses == (v6,)
    await kernel.links.ensure_addresses_absent("pkbnosuchlink1", (v4,))


async def test_the_firewall_matches_the_plan_it_was_given(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    assert await kernel.firewall.differences(PLAN) != []
    for _ in range(2):
        await kernel.firewall.apply(PLAN)
        assert await kernel.firewall.differences(PLAN) == []
    assert await kernel.firewall.differences(FirewallPlan(networks=(RULES,))) != []
    await kernel.firewall.apply(FirewallPlan())
    assert await kernel.firewall.differences(PLAN) != []
    assert await kernel.firewall.differences(FirewallPlan()) == []


async def test_removing_the_firewall_leaves_no_plan_in_force(kernel: Kernel) -> None:
    await kernel.firewall.apply(PLAN)
    await kernel.firewall.remove_all()
    assert await kernel.firewall.differences(PLAN) != []
    assert await kernel.firewall.differences(FirewallPlan()) == []


# --- the VXLAN data plane ----------------------------------------------------------------------
ip = ipaddress.ip_address
VXLAN = VxlanSpec(
    name="pkxcontract001",
    vni=4242,
    local=ip("198.51.100.1"),
    bridge=BRIDGE.name,
    mtu=1400,
)
PEER_MAC = "02:66:00:00:00:12"
PEER_ADDRESSES = (ip("10.78.0.12"), ip("fd70:78::12"))
VTEP_B, VTEP_C = ip("198.51.100.2"), ip("198.51.100.3")


async def test_a_vxlan_device_is_made_on_its_bridge_idempotently(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    for _ in range(2):
        await kernel.links.ensure_vxlan(VXLAN)
    bridge, vxlan = [await kernel.links.get_link(n) for n in (BRIDGE.name, VXLAN.name)]
    assert bridge is not None and vxlan is not None
    assert (vxlan.kind, vxlan.master, vxlan.up, vxlan.mtu) == ("vxlan", bridge.index, True, 1400)
    assert await kernel.links.list_remote_endpoints(VXLAN.name, BRIDGE.name) == []
    assert await kernel.links.list_flood(VXLAN.name) == ()


async def test_a_vxlan_device_needs_its_bridge_and_underlay(kernel: Kernel) -> None:
    with pytest.raises(KernelError, match="does not exist"):
        await kernel.links.ensure_vxlan(VXLAN)
    await kernel.links.ensure_bridge(BRIDGE)
    with pytest.raises(KernelError, match="underlay device pkunosuchlink does not exist"):
        await kernel.links.ensure_vxlan(replace(VXLAN, underlay="pkunosuchlink"))
    assert set(await ours(kernel.links)) == {BRIDGE.name}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"vni": 4243}, "VNI"),
        ({"local": ip("198.51.100.9")}, "local address"),
        ({"port": 8472}, "port"),
    ],
)
async def test_a_vxlan_device_with_another_identity_is_refused_by_name(
    kernel: Kernel, change: dict[str, object], named: str
) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    await kernel.links.ensure_vxlan(VXLAN)
    with pytest.raises(KernelError, match=f"exists with another {named}"):
        await kernel.links.ensure_vxlan(replace(VXLAN, **change))  # type: ignore[arg-type]


async def test_a_vxlan_name_held_by_a_bridge_is_refused(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    await kernel.links.ensure_bridge(OTHER)
    with pytest.raises(KernelError, match="not a vxlan device"):
        await kernel.links.ensure_vxlan(replace(VXLAN, name=OTHER.name))


async def test_a_remote_endpoint_is_written_and_withdrawn_idempotently(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    await kernel.links.ensure_vxlan(VXLAN)
    for _ in range(2):
        await kernel.links.ensure_remote_endpoint(
            VXLAN.name, BRIDGE.name, PEER_MAC.upper(), PEER_ADDRESSES, VTEP_B
        )
    assert await kernel.links.list_remote_endpoints(VXLAN.name, BRIDGE.name) == [
        RemoteEndpoint(PEER_MAC, VTEP_B, PEER_ADDRESSES)
    ]
    for _ in range(2):
        await kernel.links.ensure_remote_endpoint_absent(
            VXLAN.name, BRIDGE.name, PEER_MAC, PEER_ADDRESSES
        )
    assert await kernel.links.list_remote_endpoints(VXLAN.name, BRIDGE.name) == []


async def test_an_endpoint_that_moved_host_keeps_one_entry(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    await kernel.links.ensure_vxlan(VXLAN)
    await kernel.links.ensure_remote_endpoint(
        VXLAN.name, BRIDGE.name, PEER_MAC, PEER_ADDRESSES, VTEP_B
    )
    await kernel.links.ensure_remote_endpoint(
        VXLAN.name, BRIDGE.name, PEER_MAC, PEER_ADDRESSES, VTEP_C
    )
    assert await kernel.links.list_remote_endpoints(VXLAN.name, BRIDGE.name) == [
        RemoteEndpoint(PEER_MAC, VTEP_C, PEER_ADDRESSES)
    ]


async def test_withdrawing_an_endpoint_spares_an_address_now_held_by_another(
    kernel: Kernel,
) -> None:
    """The address went to a newer endpoint before the old one's withdrawal arrived."""
    newer = "02:66:00:00:00:99"
    await kernel.links.ensure_bridge(BRIDGE)
    await kernel.links.ensure_vxlan(VXLAN)
    await kernel.links.ensure_remote_endpoint(
        VXLAN.name, BRIDGE.name, PEER_MAC, PEER_ADDRESSES, VTEP_B
    )
    await kernel.links.ensure_remote_endpoint(
        VXLAN.name, BRIDGE.name, newer, PEER_ADDRESSES[:1], VTEP_C
    )
    await kernel.links.ensure_remote_endpoint_absent(
        VXLAN.name, BRIDGE.name, PEER_MAC, PEER_ADDRESSES
    )
    assert await kernel.links.list_remote_endpoints(VXLAN.name, BRIDGE.name) == [
        RemoteEndpoint(newer, VTEP_C, PEER_ADDRESSES[:1])
    ]


async def test_withdrawing_from_a_device_that_is_gone_succeeds(kernel: Kernel) -> None:
    await kernel.links.ensure_remote_endpoint_absent(
        VXLAN.name, BRIDGE.name, PEER_MAC, PEER_ADDRESSES
    )
    assert await kernel.links.list_remote_endpoints(VXLAN.name, BRIDGE.name) == []
    assert await kernel.links.list_flood(VXLAN.name) == ()


async def test_remote_entries_need_the_vxlan_device(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    with pytest.raises(KernelError, match="does not exist"):
        await kernel.links.ensure_remote_endpoint(
            VXLAN.name, BRIDGE.name, PEER_MAC, PEER_ADDRESSES, VTEP_B
        )
    with pytest.raises(KernelError, match="does not exist"):
        await kernel.links.ensure_flood(VXLAN.name, (VTEP_B,))


async def test_the_flood_list_is_exactly_what_was_asked_idempotently(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    await kernel.links.ensure_vxlan(VXLAN)
    for _ in range(2):
        await kernel.links.ensure_flood(VXLAN.name, (VTEP_C, VTEP_B))
    assert await kernel.links.list_flood(VXLAN.name) == (VTEP_B, VTEP_C)
    await kernel.links.ensure_flood(VXLAN.name, (VTEP_C,))
    assert await kernel.links.list_flood(VXLAN.name) == (VTEP_C,)
    for _ in range(2):
        await kernel.links.ensure_flood(VXLAN.name, ())
    assert await kernel.links.list_flood(VXLAN.name) == ()
    assert await kernel.links.list_remote_endpoints(VXLAN.name, BRIDGE.name) == []


async def test_removing_the_vxlan_device_takes_its_entries(kernel: Kernel) -> None:
    await kernel.links.ensure_bridge(BRIDGE)
    await kernel.links.ensure_vxlan(VXLAN)
    await kernel.links.ensure_remote_endpoint(
        VXLAN.name, BRIDGE.name, PEER_MAC, PEER_ADDRESSES, VTEP_B
    )
    await kernel.links.ensure_flood(VXLAN.name, (VTEP_B,))
    await kernel.links.ensure_link_absent(VXLAN.name)
    await kernel.links.ensure_vxlan(VXLAN)
    assert await kernel.links.list_flood(VXLAN.name) == ()
    # The bridge's neighbour entries stay: the reconciler sees them, without a VTEP.
    assert await kernel.links.list_remote_endpoints(VXLAN.name, BRIDGE.name) == [
        RemoteEndpoint(PEER_MAC, None, PEER_ADDRESSES)
    ]
