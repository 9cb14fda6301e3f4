"""Typed in-memory doubles of ``Links`` and ``Firewall`` for fast unit and HTTP tests.

They follow the real adapters' contracts (idempotent verbs, errors as ``KernelError``) and
can inject failures and delays, so tests reach the compensation paths the kernel rarely
takes. ``tests/kernel/test_contract.py`` runs one set of behaviour tests against these and
against the real kernel, which keeps them honest.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from ..errors import KernelError
from ..model import IPAddress, IPInterface, IPNetwork
from . import (
    VXLAN_OVERHEAD,
    BridgeSpec,
    FirewallPlan,
    LinkInfo,
    RemoteEndpoint,
    VethSpec,
    VxlanSpec,
)
from .sysctl import BR_NETFILTER_FIX


@dataclass
class Faults:
    """Make the named verbs (``ensure_bridge``, ``ensure_veth``, ...) fail or slow down."""

    fail: set[str] = field(default_factory=set)
    delay: dict[str, float] = field(default_factory=dict)

    async def check(self, verb: str) -> None:
        if verb in self.delay:
            await asyncio.sleep(self.delay[verb])
        if verb in self.fail:
            raise KernelError(f"{verb}: injected failure")


class FakeLinks:
    def __init__(self, routes: list[IPNetwork] | None = None) -> None:
        self.links: dict[str, LinkInfo] = {}
        self.peers: dict[str, str] = {}
        self.hairpin: set[str] = set()  # bridge ports in hairpin mode
        self.routes = list(routes or [])
        self.faults = Faults()
        self.calls: list[str] = []
        self._next = 10
        # The VXLAN data plane: device specs; per device MAC -> VTEP, the flood VTEPs and the
        # MACs its bridge forwards to it; per bridge its permanent neighbour entries.
        self.vxlans: dict[str, VxlanSpec] = {}
        self.fdb: dict[str, dict[str, IPAddress]] = {}
        self.flood: dict[str, set[IPAddress]] = {}
        self.bridged: dict[str, set[str]] = {}
        self.neighbours: dict[str, dict[IPAddress, str]] = {}

    def _index(self) -> int:
        self._next += 1
        return self._next

    async def ensure_bridge(self, spec: BridgeSpec) -> None:
        self.calls.append(f"ensure_bridge {spec.name}")
        await self.faults.check("ensure_bridge")
        link = self.links.get(spec.name)
        if link is None:
            link = LinkInfo(
                spec.name,
                self._index(),
                "bridge",
                None,
                False,
                spec.mtu or 1500,
                spec.mac or "02:00:00:00:00:01",
            )
        elif link.kind != "bridge":
            raise KernelError(f"interface {spec.name} exists and is not a bridge")
        addresses = tuple(dict.fromkeys((*link.addresses, *spec.addresses)))
        self.links[spec.name] = replace(
            link, up=True, mtu=spec.mtu or link.mtu, addresses=addresses
        )

    async def ensure_veth(self, spec: VethSpec) -> None:
        self.calls.append(f"ensure_veth {spec.host}")
        await self.faults.check("ensure_veth")
        bridge = self.links.get(spec.bridge)
        if bridge is None:
            raise KernelError(f"bridge {spec.bridge} does not exist")
        held = self.links.get(spec.host)
        if held is not None and held.kind != "veth":
            raise KernelError(f"interface {spec.host} exists and is not a veth")
        mtu = spec.mtu or 1500
        self.links[spec.host] = LinkInfo(
            spec.host,
            self.links[spec.host].index if spec.host in self.links else self._index(),
            "veth",
            bridge.index,
            True,
            mtu,
            "02:00:00:00:00:02",
        )
        if spec.peer not in self.links:
            self.links[spec.peer] = LinkInfo(
                spec.peer, self._index(), "veth", None, False, mtu, spec.peer_mac
            )
        self.peers[spec.host] = spec.peer
        self.peers[spec.peer] = spec.host
        if spec.hairpin:
            self.hairpin.add(spec.host)

    async def ensure_link_absent(self, name: str) -> None:
        self.calls.append(f"ensure_link_absent {name}")
        await self.faults.check("ensure_link_absent")
        link = self.links.pop(name, None)
        if link is None:
            return
        self.vxlans.pop(name, None)  # a device takes its forwarding entries with it
        self.fdb.pop(name, None)
        self.flood.pop(name, None)
        self.bridged.pop(name, None)
        self.neighbours.pop(name, None)
        peer = self.peers.pop(name, None)
        if peer is not None:  # deleting one end of a veth deletes the pair
            self.links.pop(peer, None)
            self.peers.pop(peer, None)
        if link.kind == "bridge":  # ports are released, not deleted; its FDB goes with it
            for port in self.links.values():
                if port.master == link.index and port.name in self.bridged:
                    self.bridged[port.name] = set()
            self.links.update(
                {
                    n: replace(port, master=None)
                    for n, port in self.links.items()
                    if port.master == link.index
                }
            )

    async def ensure_addresses_absent(self, name: str, addresses: tuple[IPInterface, ...]) -> None:
        self.calls.append(f"ensure_addresses_absent {name}")
        await self.faults.check("ensure_addresses_absent")
        link = self.links.get(name)
        if link is not None:
            kept = tuple(a for a in link.addresses if a not in addresses)
            self.links[name] = replace(link, addresses=kept)

    async def ensure_vxlan(self, spec: VxlanSpec) -> None:
        self.calls.append(f"ensure_vxlan {spec.name}")
        await self.faults.check("ensure_vxlan")
        bridge = self.links.get(spec.bridge)
        if bridge is None or bridge.kind != "bridge":
            raise KernelError(f"bridge {spec.bridge} does not exist")
        lower = self.links.get(spec.underlay) if spec.underlay is not None else None
        if spec.underlay is not None and lower is None:
            raise KernelError(f"underlay device {spec.underlay} does not exist")
        link = self.links.get(spec.name)
        if link is not None and link.kind != "vxlan":
            raise KernelError(f"interface {spec.name} exists and is not a vxlan device")
        held = self.vxlans.get(spec.name)
        if held is not None:
            differences = [
                f"{what} ({have}, not {want})"
                for what, have, want in (
                    ("VNI", held.vni, spec.vni),
                    ("local address", held.local, spec.local),
                    ("port", held.port, spec.port),
                )
                if have != want
            ]
            if spec.underlay is not None and held.underlay != spec.underlay:
                differences.append(f"underlay ({held.underlay}, not {spec.underlay})")
            if differences:
                raise KernelError(
                    f"vxlan device {spec.name} exists with another " + ", ".join(differences)
                )
        default_mtu = lower.mtu - VXLAN_OVERHEAD if lower is not None else 1500
        mtu = spec.mtu or (link.mtu if link is not None else default_mtu)
        index = link.index if link is not None else self._index()
        self.links[spec.name] = LinkInfo(
            spec.name, index, "vxlan", bridge.index, True, mtu, "02:00:00:00:00:03"
        )
        self.vxlans[spec.name] = held or spec
        self.fdb.setdefault(spec.name, {})
        self.bridged.setdefault(spec.name, set())
        self.flood.setdefault(spec.name, set())

    def _need(self, name: str, kind: str) -> None:
        link = self.links.get(name)
        if link is None or link.kind != kind:
            raise KernelError(f"{kind} device {name} does not exist")

    async def ensure_remote_endpoint(
        self, vxlan: str, bridge: str, mac: str, addresses: tuple[IPAddress, ...], vtep: IPAddress
    ) -> None:
        self.calls.append(f"ensure_remote_endpoint {vxlan} {mac}")
        await self.faults.check("ensure_remote_endpoint")
        self._need(vxlan, "vxlan")
        self._need(bridge, "bridge")
        mac = mac.lower()
        self.fdb[vxlan][mac] = vtep
        self.bridged[vxlan].add(mac)
        neighbours = self.neighbours.setdefault(bridge, {})
        neighbours.update(dict.fromkeys(addresses, mac))

    async def ensure_remote_endpoint_absent(
        self, vxlan: str, bridge: str, mac: str, addresses: tuple[IPAddress, ...]
    ) -> None:
        self.calls.append(f"ensure_remote_endpoint_absent {vxlan} {mac}")
        await self.faults.check("ensure_remote_endpoint_absent")
        mac = mac.lower()
        self.fdb.get(vxlan, {}).pop(mac, None)
        self.bridged.get(vxlan, set()).discard(mac)
        neighbours = self.neighbours.get(bridge, {})
        for address in addresses:
            if neighbours.get(address) == mac:
                del neighbours[address]

    async def ensure_flood(self, vxlan: str, vteps: tuple[IPAddress, ...]) -> None:
        self.calls.append(f"ensure_flood {vxlan}")
        await self.faults.check("ensure_flood")
        self._need(vxlan, "vxlan")
        self.flood[vxlan] = set(vteps)

    async def list_flood(self, vxlan: str) -> tuple[IPAddress, ...]:
        await self.faults.check("list_flood")
        return tuple(sorted(self.flood.get(vxlan, ()), key=lambda a: (a.version, int(a))))

    async def list_remote_endpoints(self, vxlan: str, bridge: str) -> list[RemoteEndpoint]:
        await self.faults.check("list_remote_endpoints")
        vteps: dict[str, IPAddress | None] = dict.fromkeys(self.bridged.get(vxlan, ()))
        vteps.update(self.fdb.get(vxlan, {}))
        by_mac: dict[str, list[IPAddress]] = {}
        for address, mac in self.neighbours.get(bridge, {}).items():
            by_mac.setdefault(mac, []).append(address)
        return [
            RemoteEndpoint(
                mac,
                vteps.get(mac),
                tuple(sorted(by_mac.get(mac, ()), key=lambda a: (a.version, int(a)))),
            )
            for mac in sorted({*vteps, *by_mac})
        ]

    async def get_link(self, name: str) -> LinkInfo | None:
        await self.faults.check("get_link")
        return self.links.get(name)

    async def list_links(self) -> list[LinkInfo]:
        await self.faults.check("list_links")
        return list(self.links.values())

    async def host_routes(self) -> list[IPNetwork]:
        await self.faults.check("host_routes")
        return list(self.routes)

    async def close(self) -> None:
        return None


class FakeFirewall:
    def __init__(self) -> None:
        self.plan = FirewallPlan()
        self.faults = Faults()
        #: False: a host without br_netfilter that the driver cannot load it on.
        self.bridge_netfilter = True

    async def ensure_bridge_netfilter(self) -> None:
        if not self.bridge_netfilter:
            raise KernelError(f"bridged traffic cannot pass iptables (fake); {BR_NETFILTER_FIX}")

    async def apply(self, plan: FirewallPlan) -> None:
        await self.faults.check("firewall_apply")
        self.plan = plan

    async def differences(self, plan: FirewallPlan) -> list[str]:
        return [] if plan == self.plan else ["firewall rules differ from the plan"]

    async def remove_all(self) -> None:
        self.plan = FirewallPlan()

    async def close(self) -> None:
        pass
