"""marshmallow schemas for every request and response of both protocols.

Wire keys keep the engine's CamelCase through ``data_key``; Python names stay snake_case.
Requests tolerate unknown keys (engines add fields over versions). Types are checked strictly:
a string where a number belongs is an error naming the field, never a silent coercion.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    post_dump,
    post_load,
    validates_schema,
)

from ..errors import DriverError
from ..model import (
    OPT_ENABLE_IPV4,
    OPT_ENABLE_IPV6,
    OPT_GENERIC,
    OPT_INTERNAL,
    IPAMData,
    IPNetwork,
    PortBinding,
    Proto,
)
from ..naming import normalize_mac, validate_id
from ..service.status import (
    ClusterNetworkView,
    ClusterView,
    EndpointView,
    NetworkView,
    PoolUse,
    Status,
)
from . import messages as m


class _Field(fields.Field):  # type: ignore[type-arg]
    """A string field that becomes a typed value, or a ValidationError naming the problem."""

    allow_empty = False

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, str):
            raise ValidationError("must be a string")
        if value == "" and self.allow_empty:
            return None
        if "%" in value:
            # Python accepts IPv6 scope IDs (fe80::1%anything) and keeps them in str(): they
            # would carry arbitrary text into iptables rules. The engine never sends them.
            raise ValidationError(f"{value!r}: IPv6 scope IDs (%...) are not accepted")
        try:
            return self.parse(value)
        except (ValueError, DriverError) as exc:
            raise ValidationError(str(exc)) from None

    def parse(self, value: str) -> Any:
        raise NotImplementedError

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return "" if value is None else str(value)


class ID(_Field):
    def parse(self, value: str) -> str:
        return validate_id(value, "ID")


class CIDR(_Field):
    """A network such as 10.1.0.0/24 (host bits are cleared, as the engine's parser does)."""

    def parse(self, value: str) -> Any:
        if "/" not in value:
            raise ValueError(f"{value!r} is not in CIDR form (address/length)")
        return ipaddress.ip_network(value, strict=False)


class OptionalCIDR(CIDR):
    allow_empty = True


class Interface(_Field):
    """An address with its prefix length, such as 10.1.0.3/24."""

    def parse(self, value: str) -> Any:
        if "/" not in value:
            raise ValueError(f"{value!r} is not in CIDR form (address/length)")
        return ipaddress.ip_interface(value)


class OptionalInterface(Interface):
    allow_empty = True


class IP(_Field):
    def parse(self, value: str) -> Any:
        return ipaddress.ip_address(value)


class OptionalIP(IP):
    allow_empty = True


class MAC(_Field):
    allow_empty = True

    def parse(self, value: str) -> str:
        return normalize_mac(value, "MAC")


def _nullable_map(data_key: str) -> fields.Dict:
    # Go serialises a nil map as null: accept it as empty.
    return fields.Dict(
        keys=fields.String(),
        values=fields.Raw(allow_none=True),
        data_key=data_key,
        allow_none=True,
        load_default=dict,
    )


class Request(Schema):
    class Meta:
        unknown = EXCLUDE


# --- NetworkDriver ----------------------------------------------------------------------------
class IPAMDataSchema(Request):
    address_space = fields.String(data_key="AddressSpace", load_default="")
    pool = CIDR(data_key="Pool", required=True)
    gateway = OptionalInterface(data_key="Gateway", load_default=None, allow_none=True)
    aux_addresses = fields.Dict(
        keys=fields.String(),
        values=Interface(),
        data_key="AuxAddresses",
        load_default=dict,
        allow_none=True,
    )

    @validates_schema
    def _gateway_in_pool(self, data: dict[str, Any], **kwargs: Any) -> None:
        gw = data.get("gateway")
        if gw is not None and gw.ip not in data["pool"]:
            raise ValidationError(f"gateway {gw} is outside pool {data['pool']}", "Gateway")

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> IPAMData:
        return IPAMData(
            address_space=data["address_space"],
            pool=data["pool"],
            gateway=data.get("gateway"),
            aux_addresses=tuple(sorted((data.get("aux_addresses") or {}).items())),
        )


class CreateNetworkRequest(Request):
    network_id = ID(data_key="NetworkID", required=True)
    options = _nullable_map("Options")
    ipv4_data = fields.List(
        fields.Nested(IPAMDataSchema), data_key="IPv4Data", load_default=list, allow_none=True
    )
    ipv6_data = fields.List(
        fields.Nested(IPAMDataSchema), data_key="IPv6Data", load_default=list, allow_none=True
    )

    @post_load
    def _engine_options(self, data: dict[str, Any], **kwargs: Any) -> m.CreateNetworkRequest:
        options: Mapping[str, Any] = data.get("options") or {}
        generic = options.get(OPT_GENERIC) or {}
        if not isinstance(generic, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in generic.items()
        ):
            raise ValidationError(
                "must be an object of string options (-o key=value)", f"Options.{OPT_GENERIC}"
            )
        for key, default in (
            (OPT_ENABLE_IPV6, False),
            (OPT_INTERNAL, False),
            (OPT_ENABLE_IPV4, True),
        ):
            value = options.get(key, default)
            if not isinstance(value, bool):
                raise ValidationError("must be a boolean", f"Options.{key}")
        ipv4 = tuple(data.get("ipv4_data") or ())
        ipv6 = tuple(data.get("ipv6_data") or ())
        for i, d in enumerate(ipv4):
            if d.pool.version != 4:
                raise ValidationError(f"pool {d.pool} is not IPv4", f"IPv4Data.{i}.Pool")
        for i, d in enumerate(ipv6):
            if d.pool.version != 6:
                raise ValidationError(f"pool {d.pool} is not IPv6", f"IPv6Data.{i}.Pool")
        return m.CreateNetworkRequest(
            network_id=data["network_id"],
            generic=generic,
            enable_ipv6=options.get(OPT_ENABLE_IPV6, False),
            internal=options.get(OPT_INTERNAL, False),
            ipv4_data=ipv4,
            ipv6_data=ipv6,
            enable_ipv4=options.get(OPT_ENABLE_IPV4, True),
        )


class NetworkIDRequest(Request):
    network_id = ID(data_key="NetworkID", required=True)

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.NetworkRequest:
        return m.NetworkRequest(data["network_id"])


class AllocateNetworkRequest(Request):
    network_id = ID(data_key="NetworkID", required=True)
    options = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        data_key="Options",
        load_default=dict,
        allow_none=True,
    )
    # IPv4Data/IPv6Data come too; a local driver allocates nothing, so they are not read.

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.AllocateNetworkRequest:
        return m.AllocateNetworkRequest(data["network_id"], data.get("options") or {})


class EndpointInterfaceSchema(Request):
    address = OptionalInterface(data_key="Address", load_default=None, allow_none=True)
    address_v6 = OptionalInterface(data_key="AddressIPv6", load_default=None, allow_none=True)
    mac = MAC(data_key="MacAddress", load_default=None, allow_none=True)

    @validates_schema(skip_on_field_errors=False)
    def _families(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("address") is not None and data["address"].version != 4:
            raise ValidationError("must be an IPv4 address", "Address")
        if data.get("address_v6") is not None and data["address_v6"].version != 6:
            raise ValidationError("must be an IPv6 address", "AddressIPv6")

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.EndpointInterface:
        return m.EndpointInterface(data.get("address"), data.get("address_v6"), data.get("mac"))


class _EndpointIDs(Request):
    network_id = ID(data_key="NetworkID", required=True)
    endpoint_id = ID(data_key="EndpointID", required=True)


class EndpointRequest(_EndpointIDs):
    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.EndpointRequest:
        return m.EndpointRequest(data["network_id"], data["endpoint_id"])


class CreateEndpointRequest(_EndpointIDs):
    interface = fields.Nested(
        EndpointInterfaceSchema, data_key="Interface", allow_none=True, load_default=None
    )
    options = _nullable_map("Options")

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.CreateEndpointRequest:
        return m.CreateEndpointRequest(
            data["network_id"],
            data["endpoint_id"],
            data.get("interface") or m.EndpointInterface(),
            data.get("options") or {},
        )


class JoinRequest(_EndpointIDs):
    sandbox_key = fields.String(data_key="SandboxKey", required=True)
    options = _nullable_map("Options")

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.JoinRequest:
        return m.JoinRequest(
            data["network_id"], data["endpoint_id"], data["sandbox_key"], data.get("options") or {}
        )

    @validates_schema
    def _key(self, data: dict[str, Any], **kwargs: Any) -> None:
        key = data.get("sandbox_key", "")
        if not key or len(key) > 4096 or "\x00" in key:
            raise ValidationError("must be a non-empty path", "SandboxKey")


class PortBindingSchema(Request):
    proto = fields.Integer(data_key="Proto", required=True, strict=True)
    ip = fields.String(data_key="IP", load_default="", allow_none=True)
    port = fields.Integer(data_key="Port", required=True, strict=True)
    host_ip = fields.String(data_key="HostIP", load_default="", allow_none=True)
    host_port = fields.Integer(data_key="HostPort", load_default=0, strict=True)
    host_port_end = fields.Integer(data_key="HostPortEnd", load_default=0, strict=True)

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> PortBinding:
        try:
            proto = Proto(data["proto"])
        except ValueError:
            raise ValidationError("must be 6 (tcp), 17 (udp) or 132 (sctp)", "Proto") from None
        host_ip = None
        if data.get("host_ip"):
            if "%" in data["host_ip"]:
                raise ValidationError("IPv6 scope IDs (%...) are not accepted", "HostIP")
            try:
                host_ip = ipaddress.ip_address(data["host_ip"])
            except ValueError:
                raise ValidationError("is not an IP address", "HostIP") from None
        try:
            return PortBinding(
                proto=proto,
                port=data["port"],
                host_port=data["host_port"],
                host_port_end=data["host_port_end"],
                host_ip=host_ip,
            )
        except ValueError as exc:
            raise ValidationError(str(exc), "Port") from None


class ProgramExternalConnectivityRequest(_EndpointIDs):
    options = _nullable_map("Options")

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.ProgramExternalConnectivityRequest:
        return m.ProgramExternalConnectivityRequest(
            data["network_id"], data["endpoint_id"], data.get("options") or {}
        )


class DiscoveryRequest(Request):
    discovery_type = fields.Integer(data_key="DiscoveryType", required=True, strict=True)
    discovery_data = fields.Raw(data_key="DiscoveryData", load_default=None, allow_none=True)

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.DiscoveryNotification:
        return m.DiscoveryNotification(data["discovery_type"], data.get("discovery_data"))


# --- IpamDriver -------------------------------------------------------------------------------
class RequestPoolRequest(Request):
    address_space = fields.String(data_key="AddressSpace", load_default="")
    pool = OptionalCIDR(data_key="Pool", load_default=None, allow_none=True)
    sub_pool = OptionalCIDR(data_key="SubPool", load_default=None, allow_none=True)
    options = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        data_key="Options",
        load_default=dict,
        allow_none=True,
    )
    v6 = fields.Boolean(data_key="V6", load_default=False, truthy={True}, falsy={False})

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.RequestPoolRequest:
        pool: IPNetwork | None = data.get("pool")
        v6, size = bool(data["v6"]), None
        if pool is not None and pool.network_address.is_unspecified:
            # "0.0.0.0/N" or "::/N" is a size, not a subnet (docs/protocol.md §4.3); the
            # family is the one written, whatever V6 says.
            v6, size = pool.version == 6, pool.prefixlen
            pool = None
        return m.RequestPoolRequest(
            data["address_space"], pool, data.get("sub_pool"), data.get("options") or {}, v6, size
        )


class ReleasePoolRequest(Request):
    pool_id = fields.String(data_key="PoolID", required=True)

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.ReleasePoolRequest:
        return m.ReleasePoolRequest(data["pool_id"])


class RequestAddressRequest(Request):
    pool_id = fields.String(data_key="PoolID", required=True)
    address = OptionalIP(data_key="Address", load_default=None, allow_none=True)
    options = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        data_key="Options",
        load_default=dict,
        allow_none=True,
    )

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.RequestAddressRequest:
        return m.RequestAddressRequest(
            data["pool_id"], data.get("address"), data.get("options") or {}
        )


class ReleaseAddressRequest(Request):
    pool_id = fields.String(data_key="PoolID", required=True)
    address = IP(data_key="Address", required=True)

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.ReleaseAddressRequest:
        return m.ReleaseAddressRequest(data["pool_id"], data["address"])


# --- responses --------------------------------------------------------------------------------
class Response(Schema):
    pass


class OmitNone(Response):
    """Optional answer fields are left out rather than sent as null, as the engine's own
    drivers do."""

    @post_dump
    def _omit_none(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {k: v for k, v in data.items() if v is not None}


class ActivateResponse(Response):
    implements = fields.List(fields.String(), data_key="Implements")


class NetworkCapabilitiesResponse(Response):
    scope = fields.String(data_key="Scope")
    connectivity_scope = fields.String(data_key="ConnectivityScope")


class EmptyResponse(Response):
    pass


class AllocateNetworkResponse(Response):
    options = fields.Dict(keys=fields.String(), values=fields.String(), data_key="Options")


class EndpointInterfaceResponse(Response):
    mac = fields.String(data_key="MacAddress")


class CreateEndpointResponse(OmitNone):
    interface = fields.Nested(EndpointInterfaceResponse, data_key="Interface")


class EndpointInfoResponse(Response):
    value = fields.Dict(keys=fields.String(), values=fields.String(), data_key="Value")


class InterfaceNameResponse(Response):
    src_name = fields.String(data_key="SrcName")
    dst_prefix = fields.String(data_key="DstPrefix")


class JoinResponse(OmitNone):
    interface_name = fields.Nested(InterfaceNameResponse, data_key="InterfaceName")
    gateway = fields.String(data_key="Gateway")
    gateway_v6 = fields.String(data_key="GatewayIPv6")
    disable_gateway_service = fields.Boolean(data_key="DisableGatewayService")


class IpamCapabilitiesResponse(Response):
    requires_mac = fields.Boolean(data_key="RequiresMACAddress")
    requires_replay = fields.Boolean(data_key="RequiresRequestReplay")


class AddressSpacesResponse(Response):
    local = fields.String(data_key="LocalDefaultAddressSpace")
    global_ = fields.String(data_key="GlobalDefaultAddressSpace")


class RequestPoolResponse(Response):
    pool_id = fields.String(data_key="PoolID")
    pool = fields.String(data_key="Pool")
    data = fields.Dict(keys=fields.String(), values=fields.String(), data_key="Data")


class RequestAddressResponse(Response):
    address = fields.String(data_key="Address")
    data = fields.Dict(keys=fields.String(), values=fields.String(), data_key="Data")


def flatten_errors(messages: Any, prefix: str = "") -> list[str]:
    """marshmallow's nested error dict as ``Field.Sub: message`` lines."""
    if isinstance(messages, dict):
        out: list[str] = []
        for key, value in messages.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if key == "_schema":
                name = prefix or "request"
            out.extend(flatten_errors(value, name))
        return out
    if isinstance(messages, list):
        if all(isinstance(m, str) for m in messages):
            return [f"{prefix}: {m}" for m in messages]
        out = []
        for m in messages:
            out.extend(flatten_errors(m, prefix))
        return out
    return [f"{prefix}: {messages}"]


# --- our own calls (pouch-driver status/check/gc); the engine never sends these --------------
# The status schemas both dump (the daemon) and load (the CLI) the status model.
class ReconcileRequest(Request):
    dry_run = fields.Boolean(data_key="DryRun", load_default=True, truthy={True}, falsy={False})
    forget_networks = fields.List(ID(), data_key="ForgetNetworks", load_default=list)
    forget_endpoints = fields.List(ID(), data_key="ForgetEndpoints", load_default=list)
    engine = fields.Boolean(data_key="Engine", load_default=False, truthy={True}, falsy={False})

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.ReconcileRequest:
        return m.ReconcileRequest(
            data["dry_run"],
            tuple(data["forget_networks"]),
            tuple(data["forget_endpoints"]),
            data["engine"],
        )


class ReportResponse(Response):
    problems = fields.List(fields.String(), data_key="Problems")
    repaired = fields.List(fields.String(), data_key="Repaired")

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> m.ReportResponse:
        return m.ReportResponse(tuple(data["problems"]), tuple(data["repaired"]))


class NetworkStatus(Request):
    network_id = fields.String(data_key="NetworkID")
    bridge = fields.String(data_key="Bridge")
    bridge_owned = fields.Boolean(data_key="BridgeOwned")
    subnets = fields.List(fields.String(), data_key="Subnets")
    gateways = fields.List(fields.String(), data_key="Gateways")
    mtu = fields.Integer(data_key="MTU", allow_none=True)
    icc = fields.Boolean(data_key="ICC")
    masquerade = fields.Boolean(data_key="Masquerade")
    internal = fields.Boolean(data_key="Internal")
    endpoints = fields.Integer(data_key="Endpoints")

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> NetworkView:
        return NetworkView(
            **{**data, "subnets": tuple(data["subnets"]), "gateways": tuple(data["gateways"])}
        )


class EndpointStatus(Request):
    endpoint_id = fields.String(data_key="EndpointID")
    network_id = fields.String(data_key="NetworkID")
    veth = fields.String(data_key="Veth")
    src_name = fields.String(data_key="SrcName")
    mac = fields.String(data_key="MacAddress")
    address = fields.String(data_key="Address", allow_none=True)
    address_v6 = fields.String(data_key="AddressIPv6", allow_none=True)
    sandbox_key = fields.String(data_key="SandboxKey", allow_none=True)
    ports = fields.List(fields.String(), data_key="Ports")

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> EndpointView:
        return EndpointView(**{**data, "ports": tuple(data["ports"])})


class PoolStatus(Request):
    pool_id = fields.String(data_key="PoolID")
    network = fields.String(data_key="Pool")
    sub_pool = fields.String(data_key="SubPool", allow_none=True)
    address_space = fields.String(data_key="AddressSpace")
    used = fields.Integer(data_key="Used")
    reclaimed = fields.Integer(data_key="Reclaimed")
    size = fields.Integer(data_key="Size")

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> PoolUse:
        return PoolUse(**data)


class ClusterNetworkStatus(Request):
    name = fields.String(data_key="Name")
    network_id = fields.String(data_key="NetworkID")
    vni = fields.Integer(data_key="VNI", allow_none=True)
    members = fields.List(fields.String(), data_key="Members")
    blocks = fields.List(fields.String(), data_key="Blocks")
    pins = fields.List(fields.String(), data_key="Pins")
    remote_endpoints = fields.Integer(data_key="RemoteEndpoints")

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> ClusterNetworkView:
        lists = {k: tuple(data[k]) for k in ("members", "blocks", "pins")}
        return ClusterNetworkView(**{**data, **lists})


class ClusterStatus(Request):
    host = fields.String(data_key="Host")
    store = fields.List(fields.String(), data_key="Store")
    connected = fields.Boolean(data_key="Connected")
    last_error = fields.String(data_key="LastError")
    hosts = fields.List(fields.String(), data_key="Hosts")
    networks = fields.List(fields.Nested(ClusterNetworkStatus), data_key="Networks")
    store_p50_ms = fields.Float(data_key="StoreP50Ms")
    store_p99_ms = fields.Float(data_key="StoreP99Ms")
    watch_lag_ms = fields.Float(data_key="WatchLagMs")

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> ClusterView:
        lists = {k: tuple(data[k]) for k in ("store", "hosts", "networks")}
        return ClusterView(**{**data, **lists})


class StatusResponse(Request):
    networks = fields.List(fields.Nested(NetworkStatus), data_key="Networks")
    endpoints = fields.List(fields.Nested(EndpointStatus), data_key="Endpoints")
    pools = fields.List(fields.Nested(PoolStatus), data_key="Pools")
    pending_deletes = fields.Integer(data_key="PendingDeletes")
    cluster = fields.Nested(ClusterStatus, data_key="Cluster", allow_none=True, load_default=None)

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> Status:
        return Status(
            tuple(data["networks"]),
            tuple(data["endpoints"]),
            tuple(data["pools"]),
            data["pending_deletes"],
            data["cluster"],
        )
