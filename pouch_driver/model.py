"""Domain types: frozen dataclasses with ``ipaddress`` types, and the engine's option keys.

Pure data: no I/O, no imports from other layers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# --- Keys the engine puts in CreateNetwork.Options (netlabel) -------------------------------
OPT_GENERIC = "com.docker.network.generic"
OPT_ENABLE_IPV6 = "com.docker.network.enable_ipv6"
OPT_ENABLE_IPV4 = "com.docker.network.enable_ipv4"
OPT_INTERNAL = "com.docker.network.internal"

# --- Keys users pass with ``docker network create -o`` (Docker's own bridge keys) -----------
OPT_BRIDGE_NAME = "com.docker.network.bridge.name"
OPT_MTU = "com.docker.network.driver.mtu"
OPT_ENABLE_ICC = "com.docker.network.bridge.enable_icc"
OPT_ENABLE_MASQ = "com.docker.network.bridge.enable_ip_masquerade"
OPT_HOST_BINDING_IPV4 = "com.docker.network.bridge.host_binding_ipv4"
OPT_GATEWAY_MODE_IPV4 = "com.docker.network.bridge.gateway_mode_ipv4"
OPT_GATEWAY_MODE_IPV6 = "com.docker.network.bridge.gateway_mode_ipv6"
OPT_TRUSTED_INTERFACES = "com.docker.network.bridge.trusted_host_interfaces"
OPT_INHIBIT_IPV4 = "com.docker.network.bridge.inhibit_ipv4"
OPT_HOST_IPV4 = "com.docker.network.host_ipv4"
OPT_HOST_IPV6 = "com.docker.network.host_ipv6"
OPT_IFACE_PREFIX = "com.docker.network.container_iface_prefix"

# --- pouch's own network options -------------------------------------------------------------
#: The cluster network this network joins (several hosts, one L2 segment; README "Across hosts")
OPT_CLUSTER = "pouch.cluster"

# --- Endpoint and sandbox option keys ----------------------------------------------------------
OPT_PORTMAP = "com.docker.network.portmap"

# --- IPAM ---------------------------------------------------------------------------------------
REQUEST_ADDRESS_TYPE = "RequestAddressType"
GATEWAY_ADDRESS_TYPE = "com.docker.network.gateway"
#: [29+] on every endpoint's RequestAddress: informational (docs/protocol.md §4.5)
ENDPOINT_NAME = "com.docker.network.endpoint.name"
LOCAL_ADDRESS_SPACE = "PouchLocal"
GLOBAL_ADDRESS_SPACE = "PouchGlobal"


class Proto(IntEnum):
    """IP protocol numbers as the engine sends them in port maps."""

    TCP = 6
    UDP = 17
    SCTP = 132


class GatewayMode(StrEnum):
    """How one address family of a network reaches the world (Docker's gateway modes)."""

    NAT = "nat"  # masquerade out, DNAT in; only published ports take new connections
    NAT_UNPROTECTED = "nat-unprotected"  # NAT, and every container port reachable directly
    ROUTED = "routed"  # no NAT: published container ports (and ICMP) reachable directly
    ISOLATED = "isolated"  # an internal network with no address of ours on the bridge


@dataclass(frozen=True)
class PoolCandidate:
    """A range the IPAM may carve automatic pools of ``size`` prefix length from."""

    base: IPNetwork
    size: int


@dataclass(frozen=True)
class IPAMData:
    """One address pool of a network as the engine hands it to CreateNetwork."""

    address_space: str
    pool: IPNetwork
    gateway: IPInterface | None = None
    aux_addresses: tuple[tuple[str, IPInterface], ...] = ()


@dataclass(frozen=True)
class NetworkOptions:
    """The options of a network, parsed and validated from the engine's request."""

    bridge_name: str | None = None
    mtu: int | None = None
    enable_icc: bool = True
    enable_masquerade: bool = True
    host_binding_ipv4: ipaddress.IPv4Address | None = None
    internal: bool = False
    enable_ipv6: bool = False
    # Added with engines 27-29's bridge options; the defaults are what records from before
    # them mean.
    enable_ipv4: bool = True
    gateway_mode_ipv4: GatewayMode = GatewayMode.NAT
    gateway_mode_ipv6: GatewayMode = GatewayMode.NAT
    trusted_host_interfaces: tuple[str, ...] = ()
    inhibit_ipv4: bool = False  # no IPv4 gateway address on the bridge (still answered in Join)
    host_ipv4: ipaddress.IPv4Address | None = None  # SNAT source instead of MASQUERADE
    host_ipv6: ipaddress.IPv6Address | None = None
    container_iface_prefix: str | None = None  # Join's DstPrefix; None: "eth"
    cluster: str | None = None  # the cluster network's name (OPT_CLUSTER); None: this host only

    def gateway_mode(self, version: int) -> GatewayMode:
        return self.gateway_mode_ipv4 if version == 4 else self.gateway_mode_ipv6


@dataclass(frozen=True)
class Network:
    """A network we serve: one Linux bridge and its addressing."""

    network_id: str
    bridge: str
    bridge_owned: bool  # False when the user made the bridge beforehand: we leave it in place
    options: NetworkOptions
    ipv4: tuple[IPAMData, ...] = ()
    ipv6: tuple[IPAMData, ...] = ()
    vni: int | None = None  # a cluster network's VXLAN network identifier, from etcd

    @property
    def gateways(self) -> tuple[IPInterface, ...]:
        return tuple(d.gateway for d in (*self.ipv4, *self.ipv6) if d.gateway is not None)

    @property
    def subnets(self) -> tuple[IPNetwork, ...]:
        return tuple(d.pool for d in (*self.ipv4, *self.ipv6))


@dataclass(frozen=True)
class PortBinding:
    """One published port: host ``host_ip:host_port`` forwards to the container's ``port``."""

    proto: Proto
    port: int
    host_port: int
    host_port_end: int
    host_ip: IPAddress | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"container port {self.port} is out of range 1-65535")
        if not 0 <= self.host_port < 65536 or not 0 <= self.host_port_end < 65536:
            raise ValueError("host port is out of range 0-65535")
        if self.host_port_end and self.host_port_end < self.host_port:
            raise ValueError(f"host port range {self.host_port}-{self.host_port_end} is reversed")


@dataclass(frozen=True)
class Endpoint:
    """One endpoint: a veth pair whose host end sits on the network's bridge."""

    endpoint_id: str
    network_id: str
    host_ifname: str  # stays in the host namespace, on the bridge
    container_ifname: str  # SrcName: the engine moves it into the sandbox
    mac: str
    address: ipaddress.IPv4Interface | None = None
    address_v6: ipaddress.IPv6Interface | None = None
    sandbox_key: str | None = None  # set by Join, cleared by Leave
    # Bindings programmed through ProgramExternalConnectivity, with host ports resolved.
    port_bindings: tuple[PortBinding, ...] = field(default=())


@dataclass(frozen=True)
class Pool:
    """An IPAM pool: the network, and the sub-range dynamic addresses come from."""

    pool_id: str
    address_space: str
    network: IPNetwork
    sub_pool: IPNetwork | None = None


@dataclass(frozen=True)
class JoinInfo:
    """What Join answers: the interface the engine moves, and the default routes it sets."""

    src_name: str
    dst_prefix: str
    gateway: ipaddress.IPv4Address | None
    gateway_v6: ipaddress.IPv6Address | None
    disable_gateway_service: bool = False
