"""The endpoint calls: a veth pair per endpoint on its network's bridge, joined and left, and
endpoints dropped when they died without the engine's word.

A new endpoint's record and its veth are made together, and the answer waits for both; a
failed step undoes the other (``durable``). The host end's delete is deferred past the answer
(``deletions``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Collection, Sequence
from dataclasses import replace

from .. import store as st
from ..errors import Conflict, Exhausted, InvalidRequest
from ..kernel import BRIDGE_MAX_PORTS, Links
from ..model import Endpoint, IPAddress, IPInterface, JoinInfo, Network
from ..naming import Names, endpoint_mac
from ..store import Store
from . import leftovers
from .addresses import AddressService
from .cluster import Cluster
from .deletions import DeferredDeletes
from .desired import veth_spec
from .durable import compensate, durably, write_behind
from .firewalling import FirewallSync
from .guards import Guards
from .leftovers import FromBefore
from .state import State, short

log = logging.getLogger(__name__)


class EndpointService:
    def __init__(
        self,
        *,
        names: Names,
        store: Store,
        links: Links,
        state: State,
        before: FromBefore,
        addresses: AddressService,
        deletes: DeferredDeletes,
        guards: Guards,
        firewall: FirewallSync,
        cluster: Cluster | None = None,
    ) -> None:
        self._cluster = cluster
        self._names = names
        self._store = store
        self._links = links
        self._state = state
        self._before = before
        self._addresses = addresses
        self._deletes = deletes
        self._guards = guards
        self._firewall = firewall

    async def create_endpoint(
        self,
        network_id: str,
        endpoint_id: str,
        address: ipaddress.IPv4Interface | None,
        address_v6: ipaddress.IPv6Interface | None,
        mac: str | None,
    ) -> str | None:
        """Returns the MAC we chose, or None when the engine set one (never echo it)."""
        state = self._state
        async with self._guards.endpoint(network_id, endpoint_id):
            net = state.network(network_id)
            _check_address(net, address, "Interface.Address")
            _check_address(net, address_v6, "Interface.AddressIPv6")
            chosen = mac or endpoint_mac(endpoint_id, address)
            ep = Endpoint(
                endpoint_id=endpoint_id,
                network_id=network_id,
                host_ifname=self._names.host_veth(endpoint_id),
                container_ifname=self._names.container_veth(endpoint_id),
                mac=chosen,
                address=address,
                address_v6=address_v6,
            )
            existing = state.endpoints.get(endpoint_id)
            if existing is not None:
                if (existing.network_id, existing.address, existing.address_v6, existing.mac) != (
                    network_id,
                    address,
                    address_v6,
                    chosen,
                ):
                    raise Conflict(
                        f"endpoint {short(endpoint_id)} exists with another configuration"
                    )
                await self._links.ensure_veth(veth_spec(existing, net))
                if self._cluster is not None and net.options.cluster:
                    await self._cluster.publish(net, existing)
                return None if mac else chosen
            await self._check_room(net, ep)
            state.endpoints[endpoint_id] = ep

            async def record() -> None:
                await durably(
                    self._store,
                    [st.PutEndpoint(ep)],
                    undo=lambda: state.endpoints.pop(endpoint_id, None),
                )

            async def wire() -> None:
                await self._deletes.settled(ep.host_ifname)
                await self._links.ensure_veth(veth_spec(ep, net))

            try:
                # The record's fsync and the veth overlap; the answer waits for both. A crash
                # between them leaves a veth nothing records (start-up removes it as an orphan)
                # or a record never answered (the engine's rollback; ``leftovers``).
                outcome = await asyncio.gather(record(), wire(), return_exceptions=True)
                failed = next((o for o in outcome if isinstance(o, BaseException)), None)
                if failed is not None:
                    raise failed
                if self._cluster is not None and net.options.cluster:
                    # The other hosts learn the container before the engine hears of it.
                    await self._cluster.publish(net, ep)
            except BaseException:
                await self._undo(ep)
                raise
            log.info(
                "created endpoint %s on network %s: %s, %s",
                short(endpoint_id),
                short(network_id),
                ep.host_ifname,
                address or address_v6 or "no address",
            )
            return None if mac else chosen

    async def _check_room(self, net: Network, ep: Endpoint) -> None:
        """The bridge has a free port, and no live endpoint holds the address or the name."""
        state = self._state
        # Veths still waiting for their deferred delete hold bridge ports too.
        queued = len(self._deletes.pending())
        if len(state.endpoints_of(net.network_id)) + queued >= BRIDGE_MAX_PORTS:
            await self._deletes.drain()
        on_net = state.endpoints_of(net.network_id)  # after the await: others may have come
        if len(on_net) >= BRIDGE_MAX_PORTS:
            raise Exhausted(
                f"network {short(net.network_id)} has {len(on_net)} endpoints: bridge "
                f"{net.bridge} reached the kernel's limit of {BRIDGE_MAX_PORTS} ports per bridge"
            )
        for other in on_net:
            for mine, theirs in ((ep.address, other.address), (ep.address_v6, other.address_v6)):
                if (
                    mine is not None
                    and theirs is not None
                    and mine.ip == theirs.ip
                    and not await self._evict_if_stale(other, mine.ip)
                ):
                    raise Conflict(
                        f"address {mine.ip} is already used by endpoint "
                        f"{short(other.endpoint_id)} on network {short(net.network_id)}"
                    )
        for other in state.endpoints.values():
            if other.host_ifname == ep.host_ifname:
                raise Conflict(
                    f"endpoint {short(ep.endpoint_id)} collides with endpoint "
                    f"{short(other.endpoint_id)} on interface name {ep.host_ifname}"
                )

    async def _evict_if_stale(self, other: Endpoint, ip: IPAddress) -> bool:
        """The engine's IPAM just handed out ``ip``, so it freed it from ``other``: drop
        ``other`` if it is provably dead (its veth is gone: the engine skipped DeleteEndpoint
        after an unclean exit) or a leftover of a CreateEndpoint whose answer a crash lost (from
        before our start and never joined). Its address is not released: it is the new
        endpoint's now."""
        async with self._guards.endpoint_only(other.endpoint_id):
            current = self._state.endpoints.get(other.endpoint_id)
            if current is None:
                return True
            dead = await self._links.get_link(current.host_ifname) is None
            if not (dead or leftovers.never_joined(current, self._before)):
                return False
            why = "its veth is gone" if dead else "a create the engine rolled back"
            await self.forget_endpoints(
                [current],
                reclaim=False,
                reason=why,
                linkless={current.endpoint_id} if dead else (),
            )
            log.warning(
                "endpoint %s held %s but was stale (%s): dropped",
                short(current.endpoint_id),
                ip,
                why,
            )
            return True

    async def _undo(self, ep: Endpoint) -> None:
        async def forget() -> None:
            await durably(
                self._store,
                [st.DeleteEndpoint(ep.endpoint_id)],
                after=lambda: self._state.endpoints.pop(ep.endpoint_id, None),
            )

        await compensate(
            forget,
            lambda: self._links.ensure_link_absent(ep.host_ifname),
            lambda: self._withdraw([ep]),
        )

    async def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        state = self._state
        async with self._guards.endpoint(network_id, endpoint_id):
            ep = state.endpoint_on(network_id, endpoint_id)
            if ep is None:
                return
            await durably(
                self._store,
                [st.DeleteEndpoint(endpoint_id)],
                after=lambda: state.endpoints.pop(endpoint_id, None),
            )
            if ep.port_bindings:
                await self._firewall.sync()
            self._deletes.queue(ep.host_ifname)
            await self._withdraw([ep])
            log.info("deleted endpoint %s", short(endpoint_id))

    async def _withdraw(self, gone: Sequence[Endpoint]) -> None:
        if self._cluster is None:
            return
        for ep in gone:
            net = self._state.networks.get(ep.network_id)
            if net is not None and net.options.cluster:
                await self._cluster.withdraw(net, ep.endpoint_id)

    def endpoint_info(self, network_id: str, endpoint_id: str) -> dict[str, str]:
        """Informational only; an error here would fail ``docker run`` on 20.10-27.x."""
        ep = self._state.endpoints.get(endpoint_id)
        net = self._state.networks.get(network_id)
        if ep is None or net is None:
            return {}
        return {"bridge": net.bridge, "veth": ep.host_ifname, "mac": ep.mac}

    async def join(self, network_id: str, endpoint_id: str, sandbox_key: str) -> JoinInfo:
        async with self._guards.endpoint(network_id, endpoint_id):
            net = self._state.network(network_id)
            ep = self._state.endpoint(network_id, endpoint_id)
            if ep.sandbox_key != sandbox_key:
                self._note_sandbox(replace(ep, sandbox_key=sandbox_key))
            gw4 = next((d.gateway.ip for d in net.ipv4 if d.gateway), None)
            gw6 = next((d.gateway.ip for d in net.ipv6 if d.gateway), None)
            internal = net.options.internal
            return JoinInfo(
                src_name=ep.container_ifname,
                dst_prefix=net.options.container_iface_prefix or "eth",
                # An internal network has no way out, so no default route through it (Docker's
                # bridge does the same).
                gateway=None if internal or ep.address is None else gw4,  # type: ignore[arg-type]
                gateway_v6=None if internal or ep.address_v6 is None else gw6,  # type: ignore[arg-type]
                disable_gateway_service=internal,
            )

    async def leave(self, network_id: str, endpoint_id: str) -> None:
        async with self._guards.endpoint(network_id, endpoint_id):
            ep = self._state.endpoint_on(network_id, endpoint_id)
            if ep is None or ep.sandbox_key is None:
                return
            self._note_sandbox(replace(ep, sandbox_key=None))

    def _note_sandbox(self, ep: Endpoint) -> None:
        """Join and Leave change only the sandbox key, which the engine never asks back: it
        is written behind the answer (one thread hop and fsync less on every connect). A
        kill -9 in the few milliseconds before the next group commit can lose only that key.
        What reads it stays safe without it: ``leftovers.never_joined`` drops an endpoint
        only when the engine has already handed its address out again or released it (so the
        engine is done with it), and ``status`` shows the endpoint as not joined."""
        self._state.endpoints[ep.endpoint_id] = ep
        write_behind(self._store, [st.PutEndpoint(ep)], what=f"sandbox of {short(ep.endpoint_id)}")

    async def forget_endpoints(
        self,
        dead: Sequence[Endpoint],
        linkless: Collection[str] = (),
        *,
        reclaim: bool = True,
        reason: str = "veth gone",
    ) -> list[str]:
        """Drop endpoints the engine will never delete, and (``reclaim``) park their addresses
        as ``RECLAIMED``: the engine may still release them, so only a request naming one gets
        it back (``ipam.OWED``).

        ``linkless``: endpoint IDs whose veth is known gone (no delete to queue). The caller
        holds each endpoint's guard.
        """
        state = self._state
        gone = {ep.endpoint_id for ep in dead}
        held = {
            a.ip
            for e in state.endpoints.values()
            if e.endpoint_id not in gone
            for a in (e.address, e.address_v6)
            if a is not None
        }
        parking = self._addresses.parking(dead if reclaim else (), held)
        ops: list[st.Op] = [st.DeleteEndpoint(ep.endpoint_id) for ep in dead]
        ops.extend(parking.ops)

        def forget() -> None:
            for ep in dead:
                state.endpoints.pop(ep.endpoint_id, None)
            self._addresses.parked(parking)

        await durably(self._store, ops, after=forget)
        for ep in dead:
            if ep.endpoint_id not in linkless:
                self._deletes.queue(ep.host_ifname)
        if any(ep.port_bindings for ep in dead):
            await self._firewall.sync()
        await self._withdraw(dead)
        done = {ip for _, ip in parking.addresses}
        lines = []
        for ep in dead:
            mine = [str(a.ip) for a in (ep.address, ep.address_v6) if a and a.ip in done]
            lines.append(
                f"forgot endpoint {short(ep.endpoint_id)} ({reason})"
                + (f" and reclaimed {', '.join(mine)}" if mine else "")
            )
        return lines


async def put_endpoint(store: Store, state: State, ep: Endpoint) -> None:
    """Record a changed endpoint; memory follows the commit."""

    def remember() -> None:
        state.endpoints[ep.endpoint_id] = ep

    await durably(store, [st.PutEndpoint(ep)], after=remember)


def _check_address(net: Network, address: IPInterface | None, field: str) -> None:
    if address is None:
        return
    pools = [d.pool for d in (*net.ipv4, *net.ipv6) if d.pool.version == address.version]
    if pools and not any(address.ip in p for p in pools):
        raise InvalidRequest(
            f"{field} {address} is outside the network's subnets "
            + ", ".join(str(p) for p in pools)
        )
