"""The protocol's messages as typed values, named after the engine's own types.

Requests load into these (``schemas``); handlers answer with these. No wire names here: the
schemas own the mapping to the engine's CamelCase keys.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..model import IPAddress, IPAMData, IPNetwork

Options = Mapping[str, Any]


# --- NetworkDriver requests -------------------------------------------------------------------
@dataclass(frozen=True)
class CreateNetworkRequest:
    network_id: str
    generic: Mapping[str, str]  # the -o options (com.docker.network.generic)
    enable_ipv6: bool
    internal: bool
    ipv4_data: tuple[IPAMData, ...] = ()
    ipv6_data: tuple[IPAMData, ...] = ()
    enable_ipv4: bool = True  # [28+] False with --ipv4=false


@dataclass(frozen=True)
class NetworkRequest:
    """DeleteNetwork and FreeNetwork."""

    network_id: str


@dataclass(frozen=True)
class AllocateNetworkRequest:
    network_id: str
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EndpointInterface:
    address: ipaddress.IPv4Interface | None = None
    address_v6: ipaddress.IPv6Interface | None = None
    mac: str | None = None


@dataclass(frozen=True)
class CreateEndpointRequest:
    network_id: str
    endpoint_id: str
    interface: EndpointInterface = EndpointInterface()
    options: Options = field(default_factory=dict)


@dataclass(frozen=True)
class EndpointRequest:
    """DeleteEndpoint, EndpointOperInfo, Leave and RevokeExternalConnectivity."""

    network_id: str
    endpoint_id: str


@dataclass(frozen=True)
class JoinRequest:
    network_id: str
    endpoint_id: str
    sandbox_key: str
    options: Options = field(default_factory=dict)


@dataclass(frozen=True)
class ProgramExternalConnectivityRequest:
    network_id: str
    endpoint_id: str
    options: Options = field(default_factory=dict)


@dataclass(frozen=True)
class DiscoveryNotification:
    discovery_type: int
    discovery_data: Any = None


# --- IpamDriver requests ----------------------------------------------------------------------
@dataclass(frozen=True)
class RequestPoolRequest:
    address_space: str
    pool: IPNetwork | None  # None: any free pool
    sub_pool: IPNetwork | None
    options: Mapping[str, str]
    v6: bool
    size: int | None = None  # with pool None: the prefix length asked for ("0.0.0.0/N")


@dataclass(frozen=True)
class ReleasePoolRequest:
    pool_id: str


@dataclass(frozen=True)
class RequestAddressRequest:
    pool_id: str
    address: IPAddress | None
    options: Mapping[str, str]


@dataclass(frozen=True)
class ReleaseAddressRequest:
    pool_id: str
    address: IPAddress


# --- our own calls (pouch-driver check/gc) ----------------------------------------------------
@dataclass(frozen=True)
class ReconcileRequest:
    dry_run: bool = True
    forget_networks: tuple[str, ...] = ()
    forget_endpoints: tuple[str, ...] = ()
    engine: bool = False


# --- responses --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Empty:
    pass


@dataclass(frozen=True)
class ActivateResponse:
    implements: tuple[str, ...]


@dataclass(frozen=True)
class CapabilitiesResponse:
    scope: str
    connectivity_scope: str


@dataclass(frozen=True)
class AllocateNetworkResponse:
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InterfaceResponse:
    mac: str


@dataclass(frozen=True)
class CreateEndpointResponse:
    interface: InterfaceResponse | None = None  # only what the engine left empty


@dataclass(frozen=True)
class EndpointInfoResponse:
    value: Mapping[str, str]


@dataclass(frozen=True)
class InterfaceName:
    src_name: str
    dst_prefix: str


@dataclass(frozen=True)
class JoinResponse:
    interface_name: InterfaceName
    disable_gateway_service: bool
    gateway: str | None = None
    gateway_v6: str | None = None


@dataclass(frozen=True)
class IpamCapabilitiesResponse:
    requires_mac: bool
    requires_replay: bool


@dataclass(frozen=True)
class AddressSpacesResponse:
    local: str
    global_: str


@dataclass(frozen=True)
class RequestPoolResponse:
    pool_id: str
    pool: str
    data: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestAddressResponse:
    address: str
    data: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportResponse:
    problems: tuple[str, ...]
    repaired: tuple[str, ...]
