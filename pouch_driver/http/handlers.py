"""One handler per protocol call: validated request in, response dict out.

Handlers translate between wire shapes and the service's typed calls; they hold no state and
touch neither the kernel nor the store. Section numbers cite ``PROTOCOL.md``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from marshmallow import Schema, ValidationError

from .. import admin
from .. import options as opts
from ..errors import InvalidRequest
from ..model import GATEWAY_ADDRESS_TYPE, OPT_PORTMAP, REQUEST_ADDRESS_TYPE
from ..service import Service
from . import schemas as s

Body = dict[str, Any]
Handler = Callable[[Service, Body], Awaitable[Body]]


@dataclass(frozen=True)
class Call:
    request: type[Schema] | None  # None: the engine sends an empty body
    handler: Handler
    response: type[Schema]


# --- handshake (2) ------------------------------------------------------------------------------
async def activate(svc: Service, body: Body) -> Body:
    return {"implements": ["NetworkDriver", "IpamDriver"]}


# --- NetworkDriver (3) --------------------------------------------------------------------------
async def network_capabilities(svc: Service, body: Body) -> Body:
    """3.1: local scope; "global" would make a standalone engine roll creates back (8.17)."""
    return {"scope": "local", "connectivity_scope": "local"}


async def create_network(svc: Service, body: Body) -> Body:
    """3.3: options from ``-o`` arrive under com.docker.network.generic."""
    options = opts.parse_network_options(
        body["generic"], enable_ipv6=body["enable_ipv6"], internal=body["internal"]
    )
    await svc.create_network(body["network_id"], options, body["ipv4_data"], body["ipv6_data"])
    return {}


async def delete_network(svc: Service, body: Body) -> Body:
    await svc.delete_network(body["network_id"])
    return {}


async def allocate_network(svc: Service, body: Body) -> Body:
    """3.5: swarm-only and only for global scope; we are local, so there is nothing to keep."""
    return {"options": {}}


async def free_network(svc: Service, body: Body) -> Body:
    return {}


async def create_endpoint(svc: Service, body: Body) -> Body:
    """3.6: never return a field the engine set, not even the same value."""
    options = body.get("options") or {}
    opts.check_endpoint_options(options)
    iface = body.get("interface") or {}
    mac = await svc.create_endpoint(
        body["network_id"], body["endpoint_id"], iface.get("address"), iface.get("address_v6"),
        iface.get("mac"),
    )
    return {"interface": {"mac": mac}} if mac else {}


async def endpoint_oper_info(svc: Service, body: Body) -> Body:
    """3.7: the engine ignores the content, but a 404 or error here breaks ``docker run``."""
    return {"value": svc.endpoint_info(body["network_id"], body["endpoint_id"])}


async def delete_endpoint(svc: Service, body: Body) -> Body:
    await svc.delete_endpoint(body["network_id"], body["endpoint_id"])
    return {}


async def join(svc: Service, body: Body) -> Body:
    """3.9: the sandbox may not exist yet; we only name the interface the engine will move."""
    info = await svc.join(body["network_id"], body["endpoint_id"], body["sandbox_key"])
    out: Body = {
        "interface_name": {"src_name": info.src_name, "dst_prefix": info.dst_prefix},
        "disable_gateway_service": info.disable_gateway_service,
    }
    if info.gateway is not None:
        out["gateway"] = str(info.gateway)
    if info.gateway_v6 is not None:
        out["gateway_v6"] = str(info.gateway_v6)
    if info.static_routes:
        out["static_routes"] = [
            {"destination": str(r.destination), "route_type": r.route_type,
             **({"next_hop": str(r.next_hop)} if r.next_hop else {})}
            for r in info.static_routes
        ]
    return out


async def leave(svc: Service, body: Body) -> Body:
    """3.10: the interface is still in the sandbox; it is deleted by DeleteEndpoint."""
    await svc.leave(body["network_id"], body["endpoint_id"])
    return {}


async def program_external_connectivity(svc: Service, body: Body) -> Body:
    """3.11: publish the sandbox's port map (its Options carry ``-p``)."""
    raw = (body.get("options") or {}).get(OPT_PORTMAP) or []
    try:
        bindings = s.PortBindingSchema(many=True).load(raw)
    except ValidationError as exc:
        raise InvalidRequest("; ".join(
            s.flatten_errors(exc.messages, f"Options.{OPT_PORTMAP}")
        )) from None
    await svc.program_external_connectivity(body["network_id"], body["endpoint_id"], bindings)
    return {}


async def revoke_external_connectivity(svc: Service, body: Body) -> Body:
    await svc.revoke_external_connectivity(body["network_id"], body["endpoint_id"])
    return {}


async def discover(svc: Service, body: Body) -> Body:
    """3.12: swarm node discovery; a single-host driver has nothing to do with it."""
    return {}


# --- IpamDriver (4) -----------------------------------------------------------------------------
async def ipam_capabilities(svc: Service, body: Body) -> Body:
    """4.1: our state is durable, so replay after an engine restart is not needed.

    A replay would re-request pools and addresses we already hold, which must then be
    accepted as duplicates; without it our store stays the single source of truth.
    """
    return {"requires_mac": False, "requires_replay": False}


async def address_spaces(svc: Service, body: Body) -> Body:
    local, global_ = svc.address_spaces()
    return {"local": local, "global_": global_}


async def request_pool(svc: Service, body: Body) -> Body:
    """4.3: an empty Pool asked again must get a different pool, or the engine spins."""
    opts.parse_ipam_options(body.get("options") or {})
    pool = await svc.request_pool(
        body["address_space"], body.get("pool"), body.get("sub_pool"), bool(body["v6"])
    )
    return {"pool_id": pool.pool_id, "pool": str(pool.network), "data": {}}


async def release_pool(svc: Service, body: Body) -> Body:
    await svc.release_pool(body["pool_id"])
    return {}


async def request_address(svc: Service, body: Body) -> Body:
    """4.5: answers in CIDR form; the gateway request is marked by RequestAddressType."""
    options = body.get("options") or {}
    kind = options.get(REQUEST_ADDRESS_TYPE)
    if kind not in (None, "", GATEWAY_ADDRESS_TYPE):
        raise InvalidRequest(f"Options.{REQUEST_ADDRESS_TYPE}: {kind!r} is not supported")
    address = await svc.request_address(
        body["pool_id"], body.get("address"), gateway=kind == GATEWAY_ADDRESS_TYPE
    )
    return {"address": str(address), "data": {}}


async def release_address(svc: Service, body: Body) -> Body:
    """4.6: tolerant, the engine releases gateways it never requested."""
    await svc.release_address(body["pool_id"], body["address"])
    return {}


# --- our admin calls -------------------------------------------------------------------------
def status_body(st: admin.Status) -> Body:
    """The status as the admin schema names it (shared with the offline CLI)."""
    counts: dict[str, int] = {}
    for e in st.endpoints:
        counts[e.network_id] = counts.get(e.network_id, 0) + 1
    return {
        "networks": [{
            "network_id": n.network_id, "bridge": n.bridge, "bridge_owned": n.bridge_owned,
            "subnets": [str(s) for s in n.subnets], "gateways": [str(g) for g in n.gateways],
            "mtu": n.options.mtu, "icc": n.options.enable_icc,
            "masquerade": n.options.enable_masquerade, "internal": n.options.internal,
            "endpoints": counts.get(n.network_id, 0),
        } for n in st.networks],
        "endpoints": [{
            "endpoint_id": e.endpoint_id, "network_id": e.network_id, "veth": e.host_ifname,
            "src_name": e.container_ifname, "mac": e.mac,
            "address": str(e.address) if e.address else None,
            "address_v6": str(e.address_v6) if e.address_v6 else None,
            "sandbox_key": e.sandbox_key,
            "ports": [f"{b.host_ip or '*'}:{b.host_port}->{b.port}/{b.proto.name.lower()}"
                      for b in e.port_bindings],
        } for e in st.endpoints],
        "pools": [p.__dict__ for p in st.pools],
        "pending_deletes": st.pending_deletes,
    }


async def pouch_status(svc: Service, body: Body) -> Body:
    return status_body(admin.status(svc))


async def pouch_reconcile(svc: Service, body: Body) -> Body:
    report = await admin.reconcile(
        svc, repair=not body["dry_run"], forget_networks=body["forget_networks"],
        forget_endpoints=body["forget_endpoints"], engine=body["engine"],
    )
    return {"problems": list(report.problems), "repaired": list(report.repaired)}


CALLS: dict[str, Call] = {
    "/Plugin.Activate": Call(None, activate, s.ActivateResponse),
    "/NetworkDriver.GetCapabilities": Call(None, network_capabilities,
                                           s.NetworkCapabilitiesResponse),
    "/NetworkDriver.CreateNetwork": Call(s.CreateNetworkRequest, create_network, s.EmptyResponse),
    "/NetworkDriver.DeleteNetwork": Call(s.NetworkIDRequest, delete_network, s.EmptyResponse),
    "/NetworkDriver.AllocateNetwork": Call(s.AllocateNetworkRequest, allocate_network,
                                           s.AllocateNetworkResponse),
    "/NetworkDriver.FreeNetwork": Call(s.NetworkIDRequest, free_network, s.EmptyResponse),
    "/NetworkDriver.CreateEndpoint": Call(s.CreateEndpointRequest, create_endpoint,
                                          s.CreateEndpointResponse),
    "/NetworkDriver.EndpointOperInfo": Call(s.EndpointRequest, endpoint_oper_info,
                                            s.EndpointInfoResponse),
    "/NetworkDriver.DeleteEndpoint": Call(s.EndpointRequest, delete_endpoint, s.EmptyResponse),
    "/NetworkDriver.Join": Call(s.JoinRequest, join, s.JoinResponse),
    "/NetworkDriver.Leave": Call(s.EndpointRequest, leave, s.EmptyResponse),
    "/NetworkDriver.ProgramExternalConnectivity": Call(
        s.ProgramExternalConnectivityRequest, program_external_connectivity, s.EmptyResponse),
    "/NetworkDriver.RevokeExternalConnectivity": Call(
        s.EndpointRequest, revoke_external_connectivity, s.EmptyResponse),
    "/NetworkDriver.DiscoverNew": Call(s.DiscoveryRequest, discover, s.EmptyResponse),
    "/NetworkDriver.DiscoverDelete": Call(s.DiscoveryRequest, discover, s.EmptyResponse),
    "/IpamDriver.GetCapabilities": Call(None, ipam_capabilities, s.IpamCapabilitiesResponse),
    "/IpamDriver.GetDefaultAddressSpaces": Call(None, address_spaces, s.AddressSpacesResponse),
    "/IpamDriver.RequestPool": Call(s.RequestPoolRequest, request_pool, s.RequestPoolResponse),
    "/IpamDriver.ReleasePool": Call(s.ReleasePoolRequest, release_pool, s.EmptyResponse),
    "/IpamDriver.RequestAddress": Call(s.RequestAddressRequest, request_address,
                                       s.RequestAddressResponse),
    "/IpamDriver.ReleaseAddress": Call(s.ReleaseAddressRequest, release_address, s.EmptyResponse),
    "/Pouch.Status": Call(None, pouch_status, s.StatusResponse),
    "/Pouch.Reconcile": Call(s.ReconcileRequest, pouch_reconcile, s.ReportResponse),
}
