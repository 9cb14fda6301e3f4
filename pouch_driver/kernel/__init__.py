"""Kernel side effects, as two ports: ``Links`` (netlink) and ``Firewall`` (iptables).

The service talks only to these protocols. ``links`` and ``iptables`` are the real adapters
(``rules`` renders the firewall as text, ``sysctl`` writes the kernel switches it needs),
``fake`` the typed doubles for unit tests, kept honest by contract tests that run against both.
Never imports ``service`` or ``http``. Every verb is idempotent: ensuring what is already
there, or removing what is gone, succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..model import GatewayMode, IPAddress, IPInterface, IPNetwork

BRIDGE_MAX_PORTS = 1023  # BR_MAX_PORTS (1024) in the kernel, less port 0, which is reserved
# Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14): an overlay's MTU is the
# underlay's less this. (An IPv6 underlay costs 20 more; callers on one say so themselves.)
VXLAN_OVERHEAD = 50
VXLAN_PORT = 4789  # IANA's port, not the kernel's historical default of 8472


@dataclass(frozen=True)
class BridgeSpec:
    name: str
    mtu: int | None
    addresses: tuple[IPInterface, ...]
    mac: str | None = None  # None: keep the MAC of a bridge the user made


@dataclass(frozen=True)
class VethSpec:
    host: str  # stays in the host namespace, enslaved to ``bridge`` and up
    peer: str  # the SrcName the engine moves into the sandbox
    bridge: str
    mtu: int | None
    peer_mac: str
    # Only a container reaching its own published port through the host's address needs
    # the bridge to send a packet back out the port it came in by.
    hairpin: bool = False


@dataclass(frozen=True)
class VxlanSpec:
    """A VXLAN device that carries one cluster network between hosts, as a port of ``bridge``.

    No flood-and-learn: the device learns nothing from received packets and sends nothing for
    which it has no forwarding entry; ``ensure_remote_endpoint`` and ``ensure_flood`` write
    those entries. ``mtu`` None leaves the kernel's choice; callers pass the underlay's MTU
    less ``VXLAN_OVERHEAD``.
    """

    name: str
    vni: int
    local: IPAddress  # this host's VTEP address on the underlay
    bridge: str
    underlay: str | None = None  # the device VXLAN packets leave by; None: the route decides
    port: int = VXLAN_PORT
    mtu: int | None = None


@dataclass(frozen=True)
class RemoteEndpoint:
    """A container on another host, as the forwarding and neighbour entries here know it.

    ``vtep`` is the underlay address of its host; None when only neighbour or bridge entries
    are left (a half-written or half-removed endpoint), so a reconciler sees those too.
    """

    mac: str
    vtep: IPAddress | None
    addresses: tuple[IPAddress, ...] = ()


@dataclass(frozen=True)
class LinkInfo:
    name: str
    index: int
    kind: str | None
    master: int | None
    up: bool
    mtu: int
    mac: str
    addresses: tuple[IPInterface, ...] = ()


class Links(Protocol):
    async def ensure_bridge(self, spec: BridgeSpec) -> None: ...
    async def ensure_veth(self, spec: VethSpec) -> None: ...
    async def ensure_link_absent(self, name: str) -> None: ...
    async def ensure_addresses_absent(
        self, name: str, addresses: tuple[IPInterface, ...]
    ) -> None: ...
    async def ensure_vxlan(self, spec: VxlanSpec) -> None:
        """The device up on its bridge, learning off, ARP/ND for remote endpoints answered
        by the bridge (``neigh_suppress``); a device with another VNI, local address, port or
        underlay is a ``KernelError`` naming the difference."""
        ...

    async def ensure_remote_endpoint(
        self, vxlan: str, bridge: str, mac: str, addresses: tuple[IPAddress, ...], vtep: IPAddress
    ) -> None:
        """``mac`` is reached through ``vtep`` and ``addresses`` resolve to ``mac`` locally;
        replaces entries that said otherwise (an endpoint that moved host)."""
        ...

    async def ensure_remote_endpoint_absent(
        self, vxlan: str, bridge: str, mac: str, addresses: tuple[IPAddress, ...]
    ) -> None:
        """No entry for ``mac``; neighbour entries of ``addresses`` go only while they still
        name ``mac`` (the address may already belong to a newer endpoint)."""
        ...

    async def ensure_flood(self, vxlan: str, vteps: tuple[IPAddress, ...]) -> None:
        """Broadcast and unknown traffic goes to exactly ``vteps`` (none: it stays here)."""
        ...

    async def list_remote_endpoints(self, vxlan: str, bridge: str) -> list[RemoteEndpoint]:
        """What the kernel holds, by MAC, sorted: for a reconciler to diff against etcd."""
        ...

    async def list_flood(self, vxlan: str) -> tuple[IPAddress, ...]:
        """The VTEPs broadcast traffic goes to, sorted."""
        ...

    async def get_link(self, name: str) -> LinkInfo | None: ...
    async def list_links(self) -> list[LinkInfo]: ...
    async def host_routes(self) -> list[IPNetwork]: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class NetworkRules:
    """The filter and NAT policy of one bridge."""

    bridge: str
    subnets: tuple[IPNetwork, ...]
    icc: bool
    masquerade: bool
    internal: bool
    mode_v4: GatewayMode = GatewayMode.NAT
    mode_v6: GatewayMode = GatewayMode.NAT
    # Host interfaces whose traffic reaches published container ports directly.
    trusted: tuple[str, ...] = ()
    snat_v4: IPAddress | None = None  # masquerade with this source (SNAT) instead
    snat_v6: IPAddress | None = None

    def mode(self, version: int) -> GatewayMode:
        return self.mode_v4 if version == 4 else self.mode_v6

    def snat(self, version: int) -> IPAddress | None:
        return self.snat_v4 if version == 4 else self.snat_v6


@dataclass(frozen=True)
class PortForward:
    bridge: str
    proto: str  # tcp, udp, sctp
    host_ip: IPAddress | None
    host_port: int
    container_ip: IPAddress
    container_port: int
    # Rendering looks forwards up by value on every apply (``rules``); an address hashes
    # through its hex text, so the hash is computed once.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "_hash",
            hash(
                (
                    self.bridge,
                    self.proto,
                    self.host_ip,
                    self.host_port,
                    self.container_ip,
                    self.container_port,
                )
            ),
        )

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True)
class VxlanFilter:
    """The VXLAN this host accepts: sent to ``local`` on ``port``, from ``peers`` only (the
    cluster's other hosts); any other VXLAN packet to it is dropped before it is decapsulated."""

    local: IPAddress
    port: int
    peers: tuple[IPAddress, ...]


@dataclass(frozen=True)
class FirewallPlan:
    """Everything our chains must hold. ``apply`` makes the kernel match it exactly."""

    networks: tuple[NetworkRules, ...] = ()
    forwards: tuple[PortForward, ...] = ()
    vxlan: VxlanFilter | None = None

    def needs_ipv6(self) -> bool:
        return any(s.version == 6 for n in self.networks for s in n.subnets)


class Firewall(Protocol):
    async def ensure_bridge_netfilter(self) -> None:
        """Bridged traffic passes iptables, or a ``KernelError`` saying how to get there."""
        ...

    async def apply(self, plan: FirewallPlan) -> None: ...
    async def differences(self, plan: FirewallPlan) -> list[str]: ...
    async def remove_all(self) -> None: ...
    async def close(self) -> None:
        """Release what the adapter keeps between calls (it is not used again)."""
        ...
