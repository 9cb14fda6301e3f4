"""The VXLAN verbs between two "hosts" (namespaces) on a veth underlay, with a "container"
namespace behind each host's bridge, checked by packets and by ``ip``/``bridge -json``.

What crosses the overlay is watched with a packet socket on the VXLAN devices (no tcpdump
here): frames the bridge hands to the local VXLAN port are seen there even when the device
then drops them for want of a forwarding entry, and frames that crossed are seen on the far
device after decapsulation. Each "nothing crossed" check has a positive control beside it.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from pouch_driver.kernel import VXLAN_OVERHEAD, BridgeSpec, RemoteEndpoint, VethSpec, VxlanSpec
from pouch_driver.kernel.links import NetlinkLinks

from .conftest import Netns, new_netns
from .packets import Lab, reaches

ip = ipaddress.ip_address
UNDERLAY_MTU = 1500
OVERLAY_MTU = UNDERLAY_MTU - VXLAN_OVERHEAD
BRIDGE, VXLAN, HOST_END, PEER_END = "pkbvx", "pkxvx", "pkhvx", "pkcvx"
GATEWAYS = (ipaddress.ip_interface("10.66.0.1/24"), ipaddress.ip_interface("fd70:66::1/64"))
VNI = 4242

# Targets of the ARP requests and IPv6 neighbour solicitations one device sends ("out") or
# receives ("in"), as JSON.
_SNIFF = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
s.settimeout(0.05)
print("ready", flush=True)
end, seen = time.monotonic() + float(sys.argv[2]), []
while time.monotonic() < end:
    try:
        f, where = s.recvfrom(65535)
    except socket.timeout:
        continue
    if (where[2] == socket.PACKET_OUTGOING) != (sys.argv[3] == "out"):
        continue
    kind = f[12:14]
    if kind == b"\x08\x06" and len(f) >= 42 and f[20:22] == b"\x00\x01":
        seen.append(socket.inet_ntop(socket.AF_INET, f[38:42]))
    elif kind == b"\x86\xdd" and len(f) >= 78 and f[20] == 58 and f[54] == 135:
        seen.append(socket.inet_ntop(socket.AF_INET6, f[62:78]))
print(json.dumps(seen))
"""

# One ICMP echo of N payload bytes with don't-fragment set: "reply", "timeout" or "error N".
_DF_PING = r"""
import os, socket, struct, sys, time
dst, size = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
ident = os.getpid() & 0xFFFF
body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + bytes(size)
padded = body + bytes(len(body) % 2)
total = sum(struct.unpack(f"!{len(padded) // 2}H", padded))
while total >> 16:
    total = (total & 0xFFFF) + (total >> 16)
packet = body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]
try:
    s.sendto(packet, (dst, 0))
except OSError as exc:
    print("error", exc.errno)
    sys.exit()
s.settimeout(0.2)
end = time.monotonic() + 2
while time.monotonic() < end:
    try:
        data = s.recv(65535)
    except socket.timeout:
        continue
    start = (data[0] & 15) * 4
    if data[start] == 0 and struct.unpack("!H", data[start + 4 : start + 6])[0] == ident:
        print("reply")
        sys.exit()
print("timeout")
"""


def _json(ns: Netns, *argv: str) -> Any:
    return json.loads(ns.sh(*argv).stdout or "[]")


@dataclass
class Host:
    """A Docker host: its namespace, our adapter bound to it, and one container behind it."""

    ns: Netns
    links: NetlinkLinks
    vtep: ipaddress.IPv4Address
    underlay: str
    container: Netns
    address: ipaddress.IPv4Address
    address6: ipaddress.IPv6Address
    mac: str

    @property
    def addresses(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
        return self.address, self.address6

    def vxlan_spec(self, mtu: int | None = OVERLAY_MTU) -> VxlanSpec:
        return VxlanSpec(VXLAN, VNI, self.vtep, BRIDGE, self.underlay, mtu=mtu)

    async def learn(self, other: Host) -> None:
        """What the cluster store's watch would write here for ``other``'s container."""
        await self.links.ensure_remote_endpoint(
            VXLAN, BRIDGE, other.mac, other.addresses, other.vtep
        )

    async def forget(self, other: Host) -> None:
        await self.links.ensure_remote_endpoint_absent(VXLAN, BRIDGE, other.mac, other.addresses)

    def ping(self, target: object, wait: int = 3) -> bool:
        """One echo answered within ``wait`` seconds. A container whose ARP for the target
        already failed retries only on its neighbour timer (1 s), so answers can take that."""
        out = self.container.sh(
            "busybox", "ping", "-c", "1", "-W", str(wait), str(target), check=False
        )
        return out.returncode == 0

    def unreachable(self, target: object) -> bool:
        return not self.ping(target, wait=2)

    def arping(self, target: object) -> str | None:
        """The MAC that answered an ARP request from the container, if any did."""
        out = self.container.sh(
            "busybox", "arping", "-c", "1", "-w", "1", "-I", "eth0", str(target), check=False
        )
        if out.returncode != 0:
            return None
        return out.stdout.split("[", 1)[1].split("]", 1)[0].lower()

    def df_ping(self, target: object, size: int) -> str:
        return self.container.sh(
            sys.executable, "-c", _DF_PING, str(target), str(size)
        ).stdout.strip()

    def state(self) -> tuple[Any, Any, Any]:
        """The host's VXLAN data plane as ``ip``/``bridge`` print it (the oracle)."""
        return (
            _json(self.ns, "ip", "-json", "-details", "link", "show", "dev", VXLAN),
            _json(self.ns, "bridge", "-json", "fdb", "show", "dev", VXLAN),
            _json(self.ns, "ip", "-json", "neigh", "show", "dev", BRIDGE, "nud", "permanent"),
        )


def _timeless(state: Any) -> Any:
    """``state`` without the bridge port's running timers."""
    if isinstance(state, dict):
        return {k: _timeless(v) for k, v in state.items() if not k.endswith("_timer")}
    if isinstance(state, list | tuple):
        return [_timeless(v) for v in state]
    return state


@contextmanager
def sniffing(ns: Netns, device: str, direction: str, seconds: float = 4.0) -> Iterator[list[str]]:
    """Targets of the ARP requests and neighbour solicitations ``device`` sent (``out``: what
    the bridge handed to the VXLAN port) or received (``in``: what crossed) meanwhile."""
    proc = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{ns.name}",
            sys.executable,
            "-c",
            _SNIFF,
            device,
            str(seconds),
            direction,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield seen
        out, _ = proc.communicate(timeout=seconds + 10)
        seen.extend(json.loads(out))
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def _host(stack: ExitStack, ns: Netns, vtep: str, underlay: str, number: int) -> Host:
    links = NetlinkLinks(workers=2, netns=ns.name)
    container = stack.enter_context(new_netns())
    host = Host(
        ns,
        links,
        ipaddress.IPv4Address(vtep),
        underlay,
        container,
        ipaddress.IPv4Address(f"10.66.0.{number}"),
        ipaddress.IPv6Address(f"fd70:66::{number}"),
        f"02:66:00:00:00:{number}",
    )
    await links.ensure_bridge(BridgeSpec(BRIDGE, None, GATEWAYS, None))
    await links.ensure_vxlan(host.vxlan_spec())
    await links.ensure_veth(VethSpec(HOST_END, PEER_END, BRIDGE, OVERLAY_MTU, host.mac))
    ns.sh("ip", "link", "set", PEER_END, "netns", container.name)
    c = container.sh
    c("ip", "link", "set", PEER_END, "name", "eth0")
    c("ip", "addr", "add", f"{host.address}/24", "dev", "eth0")
    c("ip", "addr", "add", f"{host.address6}/64", "dev", "eth0", "nodad")
    c("ip", "link", "set", "eth0", "up")
    c("ip", "route", "add", "default", "via", str(GATEWAYS[0].ip))
    return host


@pytest.fixture
async def hosts() -> AsyncIterator[tuple[Host, Host]]:
    """Hosts A (198.51.100.1, container 10.66.0.11) and B (.2, container .12) on one veth
    underlay, each with a bridge holding the same gateway addresses and a VXLAN port."""
    with ExitStack() as stack:
        a_ns, b_ns = stack.enter_context(new_netns()), stack.enter_context(new_netns())
        a_ns.sh(
            "ip",
            "link",
            "add",
            "pkua",
            "mtu",
            str(UNDERLAY_MTU),
            "type",
            "veth",
            "peer",
            "name",
            "pkub",
            "mtu",
            str(UNDERLAY_MTU),
            "netns",
            b_ns.name,
        )
        for ns, dev, addr in ((a_ns, "pkua", "198.51.100.1/24"), (b_ns, "pkub", "198.51.100.2/24")):
            ns.sh("ip", "addr", "add", addr, "dev", dev)
            ns.sh("ip", "link", "set", dev, "up")
        a = await _host(stack, a_ns, "198.51.100.1", "pkua", 11)
        b = await _host(stack, b_ns, "198.51.100.2", "pkub", 12)
        try:
            yield a, b
        finally:
            await a.links.close()
            await b.links.close()


async def _connect(a: Host, b: Host) -> None:
    await a.learn(b)
    await b.learn(a)


async def test_containers_reach_each_other_across_hosts_both_ways(
    hosts: tuple[Host, Host],
) -> None:
    """Ping (both families) and TCP each way, over entries written by the verbs alone."""
    a, b = hosts
    assert a.unreachable(b.address), "no entries yet: nothing may cross (no flood-and-learn)"
    await _connect(a, b)
    for src, dst in ((a, b), (b, a)):
        assert src.ping(dst.address), f"{src.address} -> {dst.address}"
        assert src.ping(dst.address6), f"{src.address6} -> {dst.address6}"
    with Lab(a.ns) as lab:
        lab.serve(b.container, 8080)
        lab.serve(a.container, 8080)
        assert reaches(a.container, str(b.address), 8080)
        assert reaches(b.container, str(a.address), 8080)


async def test_arp_for_a_remote_container_is_answered_locally(hosts: tuple[Host, Host]) -> None:
    """The container gets B's container MAC, and the request never reaches A's VXLAN port;
    an address nobody announced (the control) does reach it."""
    a, b = hosts
    await _connect(a, b)
    with sniffing(a.ns, VXLAN, "out") as seen:
        assert a.arping(b.address) == b.mac
        assert a.arping("10.66.0.99") is None
    assert str(b.address) not in seen
    assert "10.66.0.99" in seen, "the control: the sniffer sees what the bridge hands over"


async def test_neighbour_solicitation_for_a_remote_container_is_answered_locally(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    await _connect(a, b)
    a.container.sh("ip", "-6", "neigh", "flush", "dev", "eth0")
    with sniffing(a.ns, VXLAN, "out") as seen:
        assert a.ping(b.address6)
        assert a.unreachable("fd70:66::99")
    assert str(b.address6) not in seen
    assert "fd70:66::99" in seen
    (entry,) = _json(a.container, "ip", "-json", "-6", "neigh", "show", str(b.address6))
    assert entry["lladdr"] == b.mac


async def test_arp_for_the_gateway_never_crosses_even_with_flooding_on(
    hosts: tuple[Host, Host],
) -> None:
    """Each host answers for the shared gateway itself. With broadcast flooding to B on (the
    control: an unknown address then does cross), the gateway's ARP still stays on A."""
    a, b = hosts
    await _connect(a, b)
    await a.links.ensure_flood(VXLAN, (b.vtep,))
    bridge_mac = a.ns.link(BRIDGE)
    assert bridge_mac is not None
    with sniffing(a.ns, VXLAN, "out") as sent, sniffing(b.ns, VXLAN, "in") as crossed:
        assert a.arping(GATEWAYS[0].ip) == bridge_mac["address"]
        assert a.arping("10.66.0.99") is None
    assert str(GATEWAYS[0].ip) not in sent + crossed
    assert "10.66.0.99" in crossed, "the control: flooding carries unknown ARP to B"


async def test_without_flooding_broadcasts_stay_on_their_host(hosts: tuple[Host, Host]) -> None:
    """The default: no all-zeros entry, so an ARP request the bridge could not answer is
    handed to the VXLAN port and dropped there; B never sees it."""
    a, b = hosts
    await _connect(a, b)
    assert await a.links.list_flood(VXLAN) == ()
    with sniffing(a.ns, VXLAN, "out") as sent, sniffing(b.ns, VXLAN, "in") as crossed:
        assert a.arping("10.66.0.99") is None
    assert "10.66.0.99" in sent
    assert crossed == []


async def test_withdrawn_entries_stop_the_traffic_and_rewritten_ones_restore_it(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    await _connect(a, b)
    assert a.ping(b.address) and b.ping(a.address)
    for _ in range(2):
        await a.forget(b)
    assert await a.links.list_remote_endpoints(VXLAN, BRIDGE) == []
    assert a.unreachable(b.address), "A has no way to B's container any more"
    assert b.unreachable(a.address), "B's requests arrive, but A's replies have no way back"
    await a.learn(b)
    assert a.ping(b.address) and b.ping(a.address)


async def test_the_overlay_mtu_is_the_underlays_less_the_vxlan_overhead(
    hosts: tuple[Host, Host],
) -> None:
    """ENV.md's check: with the container at underlay - 50, a don't-fragment ping of
    underlay - 50 - 28 bytes crosses and one byte more is refused at the sender; a container
    left at the underlay's MTU loses that larger packet silently on the way."""
    a, b = hosts
    await _connect(a, b)
    largest = UNDERLAY_MTU - VXLAN_OVERHEAD - 28
    assert a.df_ping(b.address, largest) == "reply"
    assert b.df_ping(a.address, largest) == "reply"
    assert a.df_ping(b.address, largest + 1) == "error 90"  # EMSGSIZE
    a.container.sh("ip", "link", "set", "eth0", "mtu", str(UNDERLAY_MTU))
    a.ns.sh("ip", "link", "set", HOST_END, "mtu", str(UNDERLAY_MTU))
    assert a.df_ping(b.address, largest + 1) == "timeout"
    assert a.df_ping(b.address, largest) == "reply"


async def test_the_kernels_own_mtu_on_an_underlay_is_the_same(hosts: tuple[Host, Host]) -> None:
    """VxlanSpec.mtu None leaves the kernel's choice, which on an underlay device is the
    underlay's MTU less the overhead too (callers pass it explicitly all the same)."""
    a, _ = hosts
    await a.links.ensure_link_absent(VXLAN)
    await a.links.ensure_vxlan(a.vxlan_spec(mtu=None))
    link = a.ns.link(VXLAN)
    assert link is not None and link["mtu"] == OVERLAY_MTU


async def test_every_verb_twice_leaves_the_state_ip_and_bridge_print(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    states = []
    for _ in range(2):
        await a.links.ensure_vxlan(a.vxlan_spec())
        await a.learn(b)
        await a.links.ensure_flood(VXLAN, (b.vtep,))
        states.append(a.state())
    assert _timeless(states[0]) == _timeless(states[1])
    (link,), fdb, neigh = states[1]
    info = link["linkinfo"]
    assert link["master"] == BRIDGE and "UP" in link["flags"] and link["mtu"] == OVERLAY_MTU
    assert (info["info_kind"], info["info_data"]["id"], info["info_data"]["local"]) == (
        "vxlan",
        VNI,
        str(a.vtep),
    )
    assert (info["info_data"]["port"], info["info_data"]["link"]) == (4789, "pkua")
    assert info["info_data"]["learning"] is False
    assert info["info_slave_data"]["neigh_suppress"] is True
    assert info["info_slave_data"]["learning"] is False
    entries = {(e["mac"], e.get("dst"), e.get("master"), e["state"]) for e in fdb}
    assert (b.mac, str(b.vtep), None, "permanent") in entries
    assert (b.mac, None, BRIDGE, "static") in entries
    assert ("00:00:00:00:00:00", str(b.vtep), None, "permanent") in entries
    assert sorted((n["dst"], n["lladdr"]) for n in neigh) == sorted(
        (str(x), b.mac) for x in b.addresses
    )
    assert await a.links.list_remote_endpoints(VXLAN, BRIDGE) == [
        RemoteEndpoint(b.mac, b.vtep, b.addresses)
    ]
    for _ in range(2):
        await a.forget(b)
        await a.links.ensure_flood(VXLAN, ())
    _, fdb, neigh = a.state()
    assert [e for e in fdb if e["mac"] == b.mac or e["mac"] == "00:00:00:00:00:00"] == []
    assert neigh == []


async def test_a_lost_port_flag_or_learning_is_repaired(hosts: tuple[Host, Host]) -> None:
    """Someone turned neigh_suppress off and learning on: ensure_vxlan puts them back."""
    a, b = hosts
    a.ns.sh("ip", "link", "set", VXLAN, "type", "vxlan", "learning")
    a.ns.sh(
        "ip",
        "link",
        "set",
        VXLAN,
        "type",
        "bridge_slave",
        "neigh_suppress",
        "off",
        "learning",
        "on",
    )
    await a.links.ensure_vxlan(a.vxlan_spec())
    link = a.ns.link(VXLAN)
    assert link is not None
    assert link["linkinfo"]["info_data"]["learning"] is False
    assert link["linkinfo"]["info_slave_data"]["neigh_suppress"] is True
    assert link["linkinfo"]["info_slave_data"]["learning"] is False
    await _connect(a, b)
    assert a.ping(b.address)
