"""One handler per protocol call: a typed request in, a typed answer out.

Handlers translate between the protocol's messages and the driver's calls; they hold no state
and touch neither the kernel nor the store. Sections cite docs/protocol.md.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from marshmallow import Schema, ValidationError

from .. import options as opts
from ..errors import InvalidRequest
from ..model import ENDPOINT_NAME, GATEWAY_ADDRESS_TYPE, OPT_PORTMAP, REQUEST_ADDRESS_TYPE
from ..service.audit import audit
from ..service.driver import Driver
from ..service.status import Status
from . import messages as m
from . import schemas as s

log = logging.getLogger(__name__)

EMPTY = m.Empty()


@dataclass(frozen=True)
class Call:
    request: type[Schema] | None  # None: the engine sends an empty body
    handler: Callable[[Driver, Any], Awaitable[Any]]
    response: type[Schema]


# --- handshake (§2) -----------------------------------------------------------------------------
async def activate(driver: Driver, _: None) -> m.ActivateResponse:
    return m.ActivateResponse(("NetworkDriver", "IpamDriver"))


# --- NetworkDriver (§3) -------------------------------------------------------------------------
async def network_capabilities(driver: Driver, _: None) -> m.CapabilitiesResponse:
    """§3.1: local scope; "global" would make a standalone engine roll creates back."""
    return m.CapabilitiesResponse(scope="local", connectivity_scope="local")


async def create_network(driver: Driver, req: m.CreateNetworkRequest) -> m.Empty:
    """§3.2: options from ``-o`` arrive under com.docker.network.generic."""
    options = opts.parse_network_options(
        req.generic, enable_ipv6=req.enable_ipv6, internal=req.internal, enable_ipv4=req.enable_ipv4
    )
    opts.check_address_families(
        options, [d.pool for d in req.ipv4_data], [d.pool for d in req.ipv6_data]
    )
    await driver.networks.create_network(req.network_id, options, req.ipv4_data, req.ipv6_data)
    return EMPTY


async def delete_network(driver: Driver, req: m.NetworkRequest) -> m.Empty:
    await driver.networks.delete_network(req.network_id)
    return EMPTY


async def allocate_network(
    driver: Driver, req: m.AllocateNetworkRequest
) -> m.AllocateNetworkResponse:
    """§3.10: Swarm only, for global scope; we are local, so there is nothing to keep."""
    return m.AllocateNetworkResponse()


async def free_network(driver: Driver, req: m.NetworkRequest) -> m.Empty:
    return EMPTY


async def create_endpoint(driver: Driver, req: m.CreateEndpointRequest) -> m.CreateEndpointResponse:
    """§3.4: never return a field the engine set, not even the same value."""
    opts.check_endpoint_options(req.options)
    iface = req.interface
    mac = await driver.endpoints.create_endpoint(
        req.network_id, req.endpoint_id, iface.address, iface.address_v6, iface.mac
    )
    return m.CreateEndpointResponse(m.InterfaceResponse(mac) if mac else None)


async def endpoint_oper_info(driver: Driver, req: m.EndpointRequest) -> m.EndpointInfoResponse:
    """§3.5: the engine ignores the content, but an error here breaks ``docker run``."""
    return m.EndpointInfoResponse(driver.endpoints.endpoint_info(req.network_id, req.endpoint_id))


async def delete_endpoint(driver: Driver, req: m.EndpointRequest) -> m.Empty:
    await driver.endpoints.delete_endpoint(req.network_id, req.endpoint_id)
    return EMPTY


async def join(driver: Driver, req: m.JoinRequest) -> m.JoinResponse:
    """§3.6: the sandbox may not exist yet; we only name the interface the engine will move."""
    info = await driver.endpoints.join(req.network_id, req.endpoint_id, req.sandbox_key)
    return m.JoinResponse(
        interface_name=m.InterfaceName(info.src_name, info.dst_prefix),
        disable_gateway_service=info.disable_gateway_service,
        gateway=str(info.gateway) if info.gateway is not None else None,
        gateway_v6=str(info.gateway_v6) if info.gateway_v6 is not None else None,
    )


async def leave(driver: Driver, req: m.EndpointRequest) -> m.Empty:
    """§3.7: the interface is still in the sandbox; it is deleted by DeleteEndpoint."""
    await driver.endpoints.leave(req.network_id, req.endpoint_id)
    return EMPTY


async def program_external_connectivity(
    driver: Driver, req: m.ProgramExternalConnectivityRequest
) -> m.Empty:
    """§3.9: publish the sandbox's port map (its Options carry ``-p``)."""
    raw = req.options.get(OPT_PORTMAP) or []
    try:
        bindings = s.PortBindingSchema(many=True).load(raw)
    except ValidationError as exc:
        raise InvalidRequest(
            "; ".join(s.flatten_errors(exc.messages, f"Options.{OPT_PORTMAP}"))
        ) from None
    await driver.ports.program_external_connectivity(req.network_id, req.endpoint_id, bindings)
    return EMPTY


async def revoke_external_connectivity(driver: Driver, req: m.EndpointRequest) -> m.Empty:
    await driver.ports.revoke_external_connectivity(req.network_id, req.endpoint_id)
    return EMPTY


async def discover(driver: Driver, req: m.DiscoveryNotification) -> m.Empty:
    """§3.10: Swarm node discovery; nothing to do with it."""
    return EMPTY


# --- IpamDriver (§4) ----------------------------------------------------------------------------
async def ipam_capabilities(driver: Driver, _: None) -> m.IpamCapabilitiesResponse:
    """§4.1: our state is durable, so replay after an engine restart is not needed.

    A replay would re-request pools and addresses we already hold, which must then be accepted
    as duplicates; without it our store stays the single source of truth.
    """
    return m.IpamCapabilitiesResponse(requires_mac=False, requires_replay=False)


async def address_spaces(driver: Driver, _: None) -> m.AddressSpacesResponse:
    local, global_ = driver.addresses.address_spaces()
    return m.AddressSpacesResponse(local=local, global_=global_)


async def request_pool(driver: Driver, req: m.RequestPoolRequest) -> m.RequestPoolResponse:
    """§4.3: an empty Pool asked again must get a different pool, or the engine spins; a
    Pool of "0.0.0.0/N" or "::/N" asks for any free pool of that size."""
    opts.parse_ipam_options(req.options)
    pool = await driver.addresses.request_pool(
        req.address_space, req.pool, req.sub_pool, req.v6, size=req.size
    )
    return m.RequestPoolResponse(pool_id=pool.pool_id, pool=str(pool.network))


async def release_pool(driver: Driver, req: m.ReleasePoolRequest) -> m.Empty:
    await driver.addresses.release_pool(req.pool_id)
    return EMPTY


async def request_address(driver: Driver, req: m.RequestAddressRequest) -> m.RequestAddressResponse:
    """§4.5: answers in CIDR form; the gateway request is marked by RequestAddressType, and
    an endpoint's name (engine 29) is only logged. Other keys are ignored."""
    if name := req.options.get(ENDPOINT_NAME):
        log.debug("RequestAddress in pool %s for endpoint %r", req.pool_id, name)
    kind = req.options.get(REQUEST_ADDRESS_TYPE)
    if kind not in (None, "", GATEWAY_ADDRESS_TYPE):
        raise InvalidRequest(f"Options.{REQUEST_ADDRESS_TYPE}: {kind!r} is not supported")
    address = await driver.addresses.request_address(
        req.pool_id, req.address, gateway=kind == GATEWAY_ADDRESS_TYPE
    )
    return m.RequestAddressResponse(address=str(address))


async def release_address(driver: Driver, req: m.ReleaseAddressRequest) -> m.Empty:
    """§4.6: tolerant, the engine releases gateways it never requested."""
    await driver.addresses.release_address(req.pool_id, req.address)
    return EMPTY


# --- our own calls ------------------------------------------------------------------------------
async def pouch_status(driver: Driver, _: None) -> Status:
    return driver.status()


async def pouch_reconcile(driver: Driver, req: m.ReconcileRequest) -> m.ReportResponse:
    report = await audit(
        driver,
        repair=not req.dry_run,
        forget_networks=req.forget_networks,
        forget_endpoints=req.forget_endpoints,
        engine=req.engine,
    )
    return m.ReportResponse(report.problems, report.repaired)


CALLS: dict[str, Call] = {
    "/Plugin.Activate": Call(None, activate, s.ActivateResponse),
    "/NetworkDriver.GetCapabilities": Call(
        None, network_capabilities, s.NetworkCapabilitiesResponse
    ),
    "/NetworkDriver.CreateNetwork": Call(s.CreateNetworkRequest, create_network, s.EmptyResponse),
    "/NetworkDriver.DeleteNetwork": Call(s.NetworkIDRequest, delete_network, s.EmptyResponse),
    "/NetworkDriver.AllocateNetwork": Call(
        s.AllocateNetworkRequest, allocate_network, s.AllocateNetworkResponse
    ),
    "/NetworkDriver.FreeNetwork": Call(s.NetworkIDRequest, free_network, s.EmptyResponse),
    "/NetworkDriver.CreateEndpoint": Call(
        s.CreateEndpointRequest, create_endpoint, s.CreateEndpointResponse
    ),
    "/NetworkDriver.EndpointOperInfo": Call(
        s.EndpointRequest, endpoint_oper_info, s.EndpointInfoResponse
    ),
    "/NetworkDriver.DeleteEndpoint": Call(s.EndpointRequest, delete_endpoint, s.EmptyResponse),
    "/NetworkDriver.Join": Call(s.JoinRequest, join, s.JoinResponse),
    "/NetworkDriver.Leave": Call(s.EndpointRequest, leave, s.EmptyResponse),
    "/NetworkDriver.ProgramExternalConnectivity": Call(
        s.ProgramExternalConnectivityRequest, program_external_connectivity, s.EmptyResponse
    ),
    "/NetworkDriver.RevokeExternalConnectivity": Call(
        s.EndpointRequest, revoke_external_connectivity, s.EmptyResponse
    ),
    "/NetworkDriver.DiscoverNew": Call(s.DiscoveryRequest, discover, s.EmptyResponse),
    "/NetworkDriver.DiscoverDelete": Call(s.DiscoveryRequest, discover, s.EmptyResponse),
    "/IpamDriver.GetCapabilities": Call(None, ipam_capabilities, s.IpamCapabilitiesResponse),
    "/IpamDriver.GetDefaultAddressSpaces": Call(None, address_spaces, s.AddressSpacesResponse),
    "/IpamDriver.RequestPool": Call(s.RequestPoolRequest, request_pool, s.RequestPoolResponse),
    "/IpamDriver.ReleasePool": Call(s.ReleasePoolRequest, release_pool, s.EmptyResponse),
    "/IpamDriver.RequestAddress": Call(
        s.RequestAddressRequest, request_address, s.RequestAddressResponse
    ),
    "/IpamDriver.ReleaseAddress": Call(s.ReleaseAddressRequest, release_address, s.EmptyResponse),
    "/Pouch.Status": Call(None, pouch_status, s.StatusResponse),
    "/Pouch.Reconcile": Call(s.ReconcileRequest, pouch_reconcile, s.ReportResponse),
}
