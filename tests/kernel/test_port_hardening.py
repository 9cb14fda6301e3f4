"""Published ports as hardened as Engine 28's: nothing reaches a publishing container by
routing to its address, and a port published on 127.0.0.1 is not reachable from the LAN.
Real packets between namespaces (tests/kernel/packets.py), and the raw table's counters."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace

from pouch_driver.kernel import FirewallPlan, PortForward
from pouch_driver.kernel.iptables import IptablesFirewall
from pouch_driver.kernel.rules import address_bucket
from pouch_driver.model import GatewayMode
from pouch_driver.naming import Names

from .conftest import Netns
from .packets import Lab, reaches
from .test_firewall import FWD, NET_A, rules

ip = ipaddress.ip_address
A = NET_A.bridge
LOOPBACK_FWD = replace(FWD, host_ip=ip("127.0.0.1"), host_port=8081)
PLAN = FirewallPlan(networks=(NET_A,), forwards=(FWD, LOOPBACK_FWD))
RAW_A = f"PK-R-{A}"  # the network's own raw chain, jumped to from PK-RAW


def raw_bucket(address: str) -> str:
    """The chain under ``RAW_A`` holding an address's rules."""
    return Names("pk").port_chain("R", A, address_bucket(ip(address)))


# Both of the container's ports: their rules sit in its address's bucket.
RAW_C = raw_bucket("10.61.0.2")
DIRECT_DROP = f"-A {RAW_C} -d 10.61.0.2/32 ! -i {A} -j DROP"
LOOPBACK_DROP = f"-A {RAW_C} -d 127.0.0.1/32 ! -i lo -p tcp -m tcp --dport 8081 -j DROP"


def packets(netns: Netns, rule: str) -> int:
    """How many packets ``rule`` (as iptables-save prints it) has matched."""
    for line in netns.sh("iptables-save", "-c", "-t", "raw").stdout.splitlines():
        m = re.fullmatch(r"\[(\d+):\d+\] (.*)", line)
        if m and m.group(2) == rule:
            return int(m.group(1))
    raise AssertionError(f"no rule {rule!r} in the raw table")


def a_publishing_container(lab: Lab) -> Netns:
    """NET_A's bridge with 10.61.0.2 serving :80, and (returned) a LAN neighbour
    198.51.100.2 whose default route is the host (198.51.100.1)."""
    lab.bridge(A, "10.61.0.1/24")
    lab.serve(lab.container(A, "10.61.0.2/24", "10.61.0.1"), 80)
    return lab.neighbour("198.51.100.1/24", "198.51.100.2/24")


async def test_a_published_container_is_not_reached_by_routing_to_its_address(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    """From the LAN the published host port works; routing straight to the container's
    address is dropped in the raw table, before conntrack sees the packet."""
    with Lab(netns) as lab:
        lan = a_publishing_container(lab)
        await firewall.apply(PLAN)
        assert reaches(lan, "198.51.100.1", 8080)
        assert packets(netns, DIRECT_DROP) == 0
        assert not reaches(lan, "10.61.0.2", 80)
        assert packets(netns, DIRECT_DROP) > 0
        # Containers of the network itself still reach it by its address.
        peer = lab.container(A, "10.61.0.3/24", "10.61.0.1")
        assert reaches(peer, "10.61.0.2", 80)
        assert reaches(peer, "198.51.100.1", 8080)  # and through the host


async def test_a_port_published_on_loopback_is_not_reachable_from_the_lan(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    """A neighbour that routes 127.0.0.1 to the host gets its packet DNAT'd to the
    container unless the raw table drops it (conntrack then sees a DNAT'd connection, which
    our FORWARD rules let through). The host itself keeps reaching 127.0.0.1:8081."""
    with Lab(netns) as lab:
        lan = a_publishing_container(lab)
        # The neighbour sends 127.0.0.1 out of its LAN link, and takes replies from it.
        lan.sh("ip", "addr", "del", "127.0.0.1/8", "dev", "lo")
        lan.sh("ip", "route", "add", "127.0.0.1/32", "via", "198.51.100.1", "dev", "lan0")
        lan.sh("sysctl", "-qw", "net.ipv4.conf.lan0.route_localnet=1")
        await firewall.apply(PLAN)
        assert reaches(netns, "127.0.0.1", 8081)
        assert not reaches(lan, "127.0.0.1", 8081)
        assert packets(netns, LOOPBACK_DROP) > 0
        assert reaches(lan, "198.51.100.1", 8080)


async def test_raw_rules_are_part_of_the_plan(firewall: IptablesFirewall, netns: Netns) -> None:
    """Exact and idempotent like every chain of ours, both families, reported by
    ``differences`` when changed, and gone with the last network."""
    v6 = PortForward(
        bridge=A,
        proto="udp",
        host_ip=None,
        host_port=5353,
        container_ip=ip("fd70:61::2"),
        container_port=53,
    )
    plan = replace(PLAN, forwards=(*PLAN.forwards, v6))
    await firewall.apply(plan)
    await firewall.apply(plan)
    raw = rules(netns.iptables_save(), "raw")
    jump = "-A PREROUTING -m comment --comment pk-driver -j PK-RAW"
    # Into the network's chain only what is addressed to what it names (every packet of the
    # host passes raw PREROUTING).
    dispatch = [
        f"-A PK-RAW -d 10.61.0.0/24 ! -i {A} -j {RAW_A}",
        f"-A PK-RAW -d 127.0.0.1/32 -j {RAW_A}",
    ]
    assert sorted(raw) == sorted(
        [
            jump,
            *dispatch,
            f"-A {RAW_A} -j {RAW_C}",
            DIRECT_DROP,  # once, though the container publishes two ports
            LOOPBACK_DROP,
        ]
    )
    assert [r for r in raw if r.startswith(f"-A {RAW_C} ")] == [DIRECT_DROP, LOOPBACK_DROP]
    assert [r for r in raw if r.startswith("-A PK-RAW ")] == dispatch
    assert sorted(rules(netns.iptables_save(v6=True), "raw")) == sorted(
        [
            jump,
            f"-A PK-RAW -d fd70:61::/64 ! -i {A} -j {RAW_A}",
            f"-A {RAW_A} -j {raw_bucket('fd70:61::2')}",
            f"-A {raw_bucket('fd70:61::2')} -d fd70:61::2/128 ! -i {A} -j DROP",
        ]
    )
    assert await firewall.differences(plan) == []
    netns.sh("iptables", "-t", "raw", "-F", RAW_C)
    diffs = await firewall.differences(plan)
    assert f"IPv4 missing rule: {DIRECT_DROP}" in diffs, diffs
    await firewall.apply(plan)
    assert await firewall.differences(plan) == []
    # A trusted host interface reaches the container address: its RETURN comes first.
    trusting = replace(plan, networks=(replace(NET_A, trusted=("pktrust0",)),))
    await firewall.apply(trusting)
    own = [r for r in rules(netns.iptables_save(), "raw") if r.startswith(f"-A {RAW_C} ")]
    assert own[:2] == [
        DIRECT_DROP.replace(f"! -i {A} -j DROP", "-i pktrust0 -j RETURN"),
        DIRECT_DROP,
    ]
    assert await firewall.differences(trusting) == []
    # A network that leaves its containers reachable (nat-unprotected) keeps only the
    # loopback drop, which protects the host's loopback, not the container.
    unprotected_mode = GatewayMode.NAT_UNPROTECTED
    unprotected = replace(
        plan, networks=(replace(NET_A, mode_v4=unprotected_mode, mode_v6=unprotected_mode),)
    )
    await firewall.apply(unprotected)
    assert [r for r in rules(netns.iptables_save(), "raw") if "-j PK-" not in r] == [LOOPBACK_DROP]
    assert rules(netns.iptables_save(v6=True), "raw") == [jump]
    assert await firewall.differences(unprotected) == []
    await firewall.apply(FirewallPlan())
    for family in (False, True):
        save = netns.iptables_save(v6=family)
        assert "PK-R" not in save and "pk-driver" not in save
