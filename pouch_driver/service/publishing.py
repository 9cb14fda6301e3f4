"""Published ports: ProgramExternalConnectivity and RevokeExternalConnectivity.

The engine's port map becomes concrete host ports (``ports``), recorded on the endpoint, then
rendered into the firewall. A repeated Program with the same map changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace

from ..errors import InvalidRequest
from ..kernel import Links
from ..model import Endpoint, PortBinding
from ..ports import resolve_ports
from ..store import Store
from .desired import veth_spec
from .durable import compensate
from .endpoints import put_endpoint
from .firewalling import FirewallSync
from .guards import Guards
from .state import State, short

log = logging.getLogger(__name__)


class PortService:
    def __init__(
        self, store: Store, state: State, guards: Guards, firewall: FirewallSync, links: Links
    ) -> None:
        self._links = links
        self._store = store
        self._state = state
        self._guards = guards
        self._firewall = firewall
        # One endpoint at a time picks host ports: resolving yields to the loop, and two
        # endpoints must not both take the same free port.
        self._picking = asyncio.Lock()

    async def program_external_connectivity(
        self, network_id: str, endpoint_id: str, bindings: Sequence[PortBinding]
    ) -> None:
        async with self._guards.endpoint(network_id, endpoint_id):
            net = self._state.network(network_id)
            ep = self._state.endpoint(network_id, endpoint_id)
            if net.options.internal or (ep.address is None and ep.address_v6 is None):
                return
            _check_host_ips(bindings, ep)
            async with self._picking:
                taken = [
                    b
                    for other in self._state.endpoints.values()
                    if other.endpoint_id != endpoint_id
                    for b in other.port_bindings
                ]
                resolved = await resolve_ports(
                    bindings,
                    taken,
                    net.options.host_binding_ipv4,
                    dual_stack=ep.address_v6 is not None,
                    keep=ep.port_bindings,
                )
                if resolved == ep.port_bindings:
                    return  # nothing to publish (the usual case), or a repeated call
                await put_endpoint(self._store, self._state, replace(ep, port_bindings=resolved))
            try:
                await self._firewall.sync()
                if resolved:  # its bridge port in hairpin mode (``desired.veth_spec``)
                    await self._links.ensure_veth(
                        veth_spec(self._state.endpoint(network_id, endpoint_id), net)
                    )
            except BaseException:
                await compensate(
                    lambda: put_endpoint(self._store, self._state, ep), self._firewall.sync
                )
                raise
            log.info(
                "published %s for endpoint %s",
                ", ".join(
                    f"{b.host_ip or '*'}:{b.host_port}->{b.port}/{b.proto.name.lower()}"
                    for b in resolved
                )
                or "nothing",
                short(endpoint_id),
            )

    async def revoke_external_connectivity(self, network_id: str, endpoint_id: str) -> None:
        async with self._guards.endpoint(network_id, endpoint_id):
            ep = self._state.endpoint_on(network_id, endpoint_id)
            if ep is None or not ep.port_bindings:
                return
            await put_endpoint(self._store, self._state, replace(ep, port_bindings=()))
            await self._firewall.sync()


def _check_host_ips(bindings: Sequence[PortBinding], ep: Endpoint) -> None:
    for b in bindings:
        if b.host_ip is None or b.host_ip.version == 4:
            continue
        where = f"published port [{b.host_ip}]:{b.host_port}->{b.port}"
        if b.host_ip.is_loopback:
            raise InvalidRequest(
                f"{where}: the IPv6 loopback cannot be forwarded to a container (Linux has no "
                "route_localnet for IPv6); use 127.0.0.1 or a host IPv6 address"
            )
        if ep.address_v6 is None:
            raise InvalidRequest(
                f"{where}: the container has no IPv6 address on this network (create the "
                "network with --ipv6 and an IPv6 subnet)"
            )
