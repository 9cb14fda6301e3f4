"""Kernel side effects, as two ports: ``Links`` (netlink) and ``Firewall`` (iptables).

The service talks only to these protocols. ``links`` and ``iptables`` are the real adapters
(``rules`` renders the firewall as text, ``sysctl`` writes the kernel switches it needs),
``fake`` the typed doubles for unit tests, kept honest by contract tests that run against both.
Never imports ``service`` or ``http``. Every verb is idempotent: ensuring what is already
there, or removing what is gone, succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..model import GatewayMode, IPAddress, IPInterface, IPNetwork

BRIDGE_MAX_PORTS = 1023  # BR_MAX_PORTS (1024) in the kernel, less port 0, which is reserved


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


@dataclass(frozen=True)
class FirewallPlan:
    """Everything our chains must hold. ``apply`` makes the kernel match it exactly."""

    networks: tuple[NetworkRules, ...] = ()
    forwards: tuple[PortForward, ...] = ()

    def needs_ipv6(self) -> bool:
        return any(s.version == 6 for n in self.networks for s in n.subnets)


class Firewall(Protocol):
    async def ensure_bridge_netfilter(self) -> None:
        """Bridged traffic passes iptables, or a ``KernelError`` saying how to get there."""
        ...

    async def apply(self, plan: FirewallPlan) -> None: ...
    async def differences(self, plan: FirewallPlan) -> list[str]: ...
    async def remove_all(self) -> None: ...
