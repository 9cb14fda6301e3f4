"""Netlink verbs against the real kernel: each ensure_* runs twice, state read with ip -json."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pouch_driver.errors import Exhausted, KernelError
from pouch_driver.kernel import BridgeSpec, VethSpec
from pouch_driver.kernel.links import NetlinkLinks

from .conftest import Netns

iface = ipaddress.ip_interface

BRIDGE = BridgeSpec(
    name="pkbtest0000001",
    mtu=1400,
    addresses=(iface("10.77.0.1/24"), iface("fd70:77::1/64")),
    mac="02:51:00:00:00:01",
)
VETH = VethSpec(
    host="pkhtest0000001",
    peer="pkctest0000001",
    bridge=BRIDGE.name,
    mtu=1400,
    peer_mac="02:50:0a:4d:00:02",
)


async def test_ensure_bridge_is_idempotent_and_complete(links: NetlinkLinks, netns: Netns) -> None:
    for _ in range(2):
        await links.ensure_bridge(BRIDGE)
    link = netns.link(BRIDGE.name)
    assert link is not None
    assert link["linkinfo"]["info_kind"] == "bridge"
    assert link["mtu"] == 1400
    assert link["address"] == "02:51:00:00:00:01"
    assert "UP" in link["flags"]
    assert netns.addresses(BRIDGE.name) == {"10.77.0.1/24", "fd70:77::1/64"}


async def test_ensure_bridge_repairs_a_lost_address_and_down_state(
    links: NetlinkLinks, netns: Netns
) -> None:
    await links.ensure_bridge(BRIDGE)
    netns.sh("ip", "addr", "del", "10.77.0.1/24", "dev", BRIDGE.name)
    netns.sh("ip", "link", "set", BRIDGE.name, "down")
    await links.ensure_bridge(BRIDGE)
    assert "10.77.0.1/24" in netns.addresses(BRIDGE.name)
    link = netns.link(BRIDGE.name)
    assert link is not None and "UP" in link["flags"]


async def test_ensure_bridge_refuses_a_non_bridge(links: NetlinkLinks, netns: Netns) -> None:
    netns.sh("ip", "link", "add", BRIDGE.name, "type", "veth", "peer", "name", "pkxother000001")
    with pytest.raises(KernelError, match="not a bridge"):
        await links.ensure_bridge(BRIDGE)


async def test_ensure_veth_makes_the_pair_on_the_bridge(links: NetlinkLinks, netns: Netns) -> None:
    await links.ensure_bridge(BRIDGE)
    for _ in range(2):
        await links.ensure_veth(VETH)
    host, peer, bridge = netns.link(VETH.host), netns.link(VETH.peer), netns.link(BRIDGE.name)
    assert host is not None and peer is not None and bridge is not None
    assert host["linkinfo"]["info_kind"] == "veth"
    assert host["master"] == BRIDGE.name
    assert "UP" in host["flags"]
    assert host["mtu"] == peer["mtu"] == 1400
    assert peer["address"] == "02:50:0a:4d:00:02"
    assert peer.get("master") is None, "the container end is the engine's to move"
    assert host["link"] == VETH.peer  # they are each other's peer


async def test_ensure_veth_reattaches_a_detached_host_end(
    links: NetlinkLinks, netns: Netns
) -> None:
    await links.ensure_bridge(BRIDGE)
    await links.ensure_veth(VETH)
    netns.sh("ip", "link", "set", VETH.host, "nomaster")
    netns.sh("ip", "link", "set", VETH.host, "down")
    await links.ensure_veth(VETH)
    host = netns.link(VETH.host)
    assert host is not None and host["master"] == BRIDGE.name and "UP" in host["flags"]


async def test_ensure_veth_replaces_a_leftover_peer(links: NetlinkLinks, netns: Netns) -> None:
    """A half-deleted pair left the container end's name taken; it is ours by name."""
    await links.ensure_bridge(BRIDGE)
    netns.sh("ip", "link", "add", VETH.peer, "type", "veth", "peer", "name", "pkxleft0000001")
    await links.ensure_veth(VETH)
    peer = netns.link(VETH.peer)
    assert peer is not None and peer["link"] == VETH.host
    assert "pkxleft0000001" not in netns.names()


async def test_ensure_veth_without_bridge_fails_cleanly(links: NetlinkLinks, netns: Netns) -> None:
    with pytest.raises(KernelError, match="does not exist"):
        await links.ensure_veth(VETH)
    assert VETH.host not in netns.names() and VETH.peer not in netns.names()


async def test_ensure_link_absent_deletes_the_pair_and_tolerates_gone(
    links: NetlinkLinks, netns: Netns
) -> None:
    await links.ensure_bridge(BRIDGE)
    await links.ensure_veth(VETH)
    for _ in range(2):
        await links.ensure_link_absent(VETH.host)
    assert not {VETH.host, VETH.peer} & netns.names()
    for _ in range(2):
        await links.ensure_link_absent(BRIDGE.name)
    assert BRIDGE.name not in netns.names()


async def test_ensure_addresses_absent_leaves_the_bridge(links: NetlinkLinks, netns: Netns) -> None:
    await links.ensure_bridge(BRIDGE)
    netns.sh("ip", "addr", "add", "10.88.0.1/24", "dev", BRIDGE.name)
    for _ in range(2):
        await links.ensure_addresses_absent(BRIDGE.name, BRIDGE.addresses)
    assert netns.addresses(BRIDGE.name) == {"10.88.0.1/24"}
    await links.ensure_addresses_absent("pkbnothere0000", BRIDGE.addresses)


async def test_reads_match_ip_json(links: NetlinkLinks, netns: Netns) -> None:
    await links.ensure_bridge(BRIDGE)
    await links.ensure_veth(VETH)
    ours = {link.name: link for link in await links.list_links()}
    theirs = {link["ifname"]: link for link in netns.ip_json("link", "show")}
    assert set(ours) == set(theirs)
    assert ours[VETH.host].master == ours[BRIDGE.name].index
    info = await links.get_link(BRIDGE.name)
    assert info is not None and {str(a) for a in info.addresses} == netns.addresses(BRIDGE.name)
    assert await links.get_link("pknothere00000") is None
    routes = {str(r) for r in await links.host_routes()}
    assert {"10.77.0.0/24", "fd70:77::/64"} <= routes


async def test_many_concurrent_veths(links: NetlinkLinks, netns: Netns) -> None:
    await links.ensure_bridge(BRIDGE)
    specs = [
        VethSpec(
            host=f"pkh{i:012d}",
            peer=f"pkc{i:012d}",
            bridge=BRIDGE.name,
            mtu=None,
            peer_mac=f"02:50:00:00:00:{i:02x}",
        )
        for i in range(40)
    ]
    await asyncio.gather(*(links.ensure_veth(s) for s in specs))
    ports = [link for link in netns.ip_json("link", "show") if link.get("master") == BRIDGE.name]
    assert len(ports) == 40
    await asyncio.gather(*(links.ensure_link_absent(s.host) for s in specs))
    assert not any(n.startswith(("pkh", "pkc")) for n in netns.names())


async def test_raw_link_dump_matches_ip_json(links: NetlinkLinks, netns: Netns) -> None:
    """The daemon lists links with its own small netlink decoder (pyroute2 decodes every
    attribute of every link, which dominated start-up); check it against iproute2."""
    await links.ensure_bridge(BRIDGE)
    await links.ensure_veth(VETH)
    code = (
        "import json; from pouch_driver.kernel.links import _dump_links; "
        "print(json.dumps([l.__dict__ for l in _dump_links()], default=str))"
    )
    out = netns.sh(sys.executable, "-c", code).stdout
    ours = {d["name"]: d for d in json.loads(out)}
    theirs = {link["ifname"]: link for link in netns.ip_json("-details", "link", "show")}
    assert set(ours) == set(theirs)
    for name, link in theirs.items():
        mine = ours[name]
        assert mine["index"] == link["ifindex"]
        assert mine["mtu"] == link["mtu"]
        assert mine["up"] == ("UP" in link["flags"])
        assert mine["mac"] == link.get("address", "")
        assert mine["kind"] == link.get("linkinfo", {}).get("info_kind")
        master = link.get("master")
        assert mine["master"] == (theirs[master]["ifindex"] if master else None)


async def test_ports_of_endpoints_with_published_ports_are_in_hairpin_mode(
    links: NetlinkLinks, netns: Netns
) -> None:
    """Set just after the answer (off the request path): poll for it. Only a spec that asks
    for it (an endpoint with published ports) gets it: no netlink call on a plain connect."""

    def hairpin() -> bool:
        link = netns.link(VETH.host)
        return bool(link is not None and link["linkinfo"]["info_slave_data"]["hairpin"])

    async def eventually() -> bool:
        for _ in range(100):
            if hairpin():
                return True
            await asyncio.sleep(0.02)
        return False

    await links.ensure_bridge(BRIDGE)
    await links.ensure_veth(VETH)
    await asyncio.sleep(0.2)  # what a background call would have needed
    assert not hairpin()
    published = replace(VETH, hairpin=True)
    await links.ensure_veth(published)
    assert await eventually()
    netns.sh("ip", "link", "set", VETH.host, "type", "bridge_slave", "hairpin", "off")
    await links.ensure_veth(published)
    assert await eventually()


async def test_a_full_bridge_is_a_clear_error(
    links: NetlinkLinks,
    netns: Netns,
    tmp_path: Path,
) -> None:
    """A bridge takes 1,023 ports (port 0 is reserved) and the kernel says "Exchange full"
    past that. The service counts its own endpoints, but a user's bridge may hold ports of
    others: the kernel's refusal must still read as what it is, and leave no veth behind."""
    await links.ensure_bridge(BRIDGE)
    batch = tmp_path / "ports.batch"
    batch.write_text(
        "".join(
            f"link add pkd{i} type veth peer name pke{i}\nlink set pkd{i} master {BRIDGE.name}\n"
            for i in range(1023)
        )
    )
    netns.sh("ip", "-batch", str(batch))  # the ports of others (veths: no dummy module here)
    assert len([n for n in netns.names() if n.startswith("pkd")]) == 1023
    with pytest.raises(Exhausted, match=rf"bridge {BRIDGE.name} is full: Linux allows 1023"):
        await links.ensure_veth(VETH)
    assert VETH.host not in netns.names() and VETH.peer not in netns.names()
