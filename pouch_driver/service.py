"""Orchestration of every protocol call: locking, ordering, and compensation on failure.

The service owns the in-memory state (networks, endpoints, IPAM) that mirrors the store. The
rule for every change: the store first records what must exist, then the kernel is made to
match, and the request is answered only after both. A failure undoes the record and whatever
kernel work was done; a crash between the steps leaves a record (completed by ``reconcile``
at start) or an object carrying our prefix and no record (removed by ``reconcile``).
Imports ``model``, ``ipam``, ``store``, ``kernel`` ports; never ``http``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace

from . import store as st
from .config import Settings
from .errors import Conflict, DriverError, Exhausted, InvalidRequest, NotFound
from .ipam import ADDRESS, RECLAIMED, AddressGrant, Ipam
from .kernel import (
    BRIDGE_MAX_PORTS,
    BridgeSpec,
    Firewall,
    FirewallPlan,
    Links,
    NetworkRules,
    PortForward,
    VethSpec,
)
from .locks import Coalescer, KeyedLocks
from .model import (
    GLOBAL_ADDRESS_SPACE,
    LOCAL_ADDRESS_SPACE,
    Endpoint,
    IPAddress,
    IPAMData,
    IPInterface,
    JoinInfo,
    Network,
    NetworkOptions,
    Pool,
    PortBinding,
)
from .naming import Names, bridge_mac, endpoint_mac
from .ports import resolve_ports

log = logging.getLogger(__name__)


@dataclass
class FromBefore:
    """What the store held when this process started.

    A request whose answer was lost in a crash is retried by the engine with an empty body
    (PROTOCOL.md 1.5), which fails, and the engine rolls back only its own side: our record
    of the pool, address, network or endpoint stays. Only records from before the start can
    be such leftovers, so only they are ever adopted by an identical request or cleaned up.
    """

    started: float = 0.0
    networks: set[str] = field(default_factory=set)
    endpoints: set[str] = field(default_factory=set)
    pools: set[str] = field(default_factory=set)
    addresses: set[tuple[str, int]] = field(default_factory=set)


def short(value: str) -> str:
    return value[:12]


def _net(network_id: str) -> str:
    # Lock keys are namespaced: an EndpointID equal to a NetworkID must not wait on itself.
    return f"net/{network_id}"


def _ep(endpoint_id: str) -> str:
    return f"ep/{endpoint_id}"


class Service:
    def __init__(
        self, settings: Settings, store: st.Store, links: Links, firewall: Firewall
    ) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)
        self.store = store
        self.links = links
        self.firewall = firewall
        self.networks: dict[str, Network] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.ipam = Ipam(settings.pools_v4, settings.pools_v6)
        self._locks = KeyedLocks()
        self._fw = Coalescer(lambda: self.firewall.apply(self.firewall_plan()))
        self._doomed: dict[str, asyncio.Task[None]] = {}
        self._ports_lock = asyncio.Lock()
        self.before = FromBefore()

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the store; the caller reconciles the kernel before serving."""
        snapshot = await self.store.open()
        self.networks = {n.network_id: n for n in snapshot.networks}
        self.endpoints = {e.endpoint_id: e for e in snapshot.endpoints}
        for record in snapshot.pools:
            self.ipam.restore_pool(record.pool, record.allocations, record.cursor)
        self.before = FromBefore(
            started=time.monotonic(),
            networks=set(self.networks),
            endpoints=set(self.endpoints),
            pools={r.pool.pool_id for r in snapshot.pools},
            addresses={(r.pool.pool_id, a) for r in snapshot.pools for a, _ in r.allocations},
        )
        log.info(
            "loaded %d networks, %d endpoints, %d pools from %s",
            len(self.networks), len(self.endpoints), len(self.ipam.pools), self.store.path,
        )

    # --- deferred link deletion ---------------------------------------------------------------
    def delete_link_later(self, ifname: str) -> None:
        """Delete a link in the background; deleting a veth's host end deletes the pair."""
        if ifname in self._doomed:
            return
        task = asyncio.create_task(self._delete_link(ifname), name=f"delete {ifname}")
        self._doomed[ifname] = task
        task.add_done_callback(lambda _t: self._doomed.pop(ifname, None))

    async def _delete_link(self, ifname: str) -> None:
        try:
            await self.links.ensure_link_absent(ifname)
        except DriverError as exc:  # the sweep and start-up remove it as an orphan later
            log.warning("deferred delete of %s failed: %s", ifname, exc)

    def pending_deletes(self) -> frozenset[str]:
        return frozenset(self._doomed)

    async def drain(self) -> None:
        """Wait for every deferred deletion (shutdown, tests, benchmarks)."""
        while self._doomed:
            await asyncio.gather(*list(self._doomed.values()), return_exceptions=True)

    async def _not_doomed(self, ifname: str) -> None:
        task = self._doomed.get(ifname)
        if task is not None:  # a re-created name must not be deleted under our feet
            await asyncio.gather(task, return_exceptions=True)

    async def stop(self) -> None:
        await self.drain()
        await self._fw.idle()
        await self.store.close()
        await self.links.close()

    # --- helpers --------------------------------------------------------------------------------
    def _network(self, network_id: str) -> Network:
        net = self.networks.get(network_id)
        if net is None:
            raise NotFound(f"network {short(network_id)} is unknown to pouch-driver")
        return net

    def endpoints_of(self, network_id: str) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.network_id == network_id]

    async def _durably(
        self,
        ops: Sequence[st.Op],
        *,
        undo: Callable[[], object] | None = None,
        after: Callable[[], object] | None = None,
    ) -> None:
        """Commit ``ops``, then ``after()`` (memory follows the store); on failure ``undo()``.

        The unit runs to its end even when the request is cancelled (its deadline): a commit
        that landed while memory was rolled back would leave the two disagreeing, and a
        restart would then resurrect or release what the engine was told otherwise.
        """

        async def unit() -> None:
            try:
                await self.store.commit(ops)
            except BaseException:
                if undo is not None:
                    undo()
                raise
            if after is not None:
                after()

        task = asyncio.ensure_future(unit())
        # Retrieve the result even if nobody awaits it any more (a cancelled request).
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(task)

    async def _compensate(self, *steps: Callable[[], Awaitable[object]]) -> None:
        """Undo steps after a failure; their own failures are logged, never masking the cause."""
        for step in steps:
            try:
                await asyncio.shield(step())
            except Exception:
                log.exception("compensation step failed; start-up reconcile will finish it")

    def bridge_spec(self, net: Network) -> BridgeSpec:
        return BridgeSpec(
            name=net.bridge,
            mtu=net.options.mtu,
            addresses=net.gateways,
            mac=bridge_mac(net.network_id) if net.bridge_owned else None,
        )

    def veth_spec(self, ep: Endpoint, net: Network) -> VethSpec:
        return VethSpec(
            host=ep.host_ifname, peer=ep.container_ifname, bridge=net.bridge,
            mtu=net.options.mtu, peer_mac=ep.mac,
        )

    # --- firewall: one apply serves every request that asked while it waited ---------------
    def firewall_plan(self) -> FirewallPlan:
        networks = tuple(
            NetworkRules(
                bridge=n.bridge, subnets=n.subnets, icc=n.options.enable_icc,
                masquerade=n.options.enable_masquerade, internal=n.options.internal,
            )
            for n in sorted(self.networks.values(), key=lambda n: n.network_id)
        )
        forwards: list[PortForward] = []
        for ep in sorted(self.endpoints.values(), key=lambda e: e.endpoint_id):
            net = self.networks.get(ep.network_id)
            if net is None:
                continue
            # A binding on all host addresses is published on both families the container
            # has, as Docker's bridge does; one on a host address, in that address's family.
            for b in ep.port_bindings:
                forwards.extend(
                    PortForward(
                        bridge=net.bridge, proto=b.proto.name.lower(), host_ip=b.host_ip,
                        host_port=b.host_port, container_ip=a.ip, container_port=b.port,
                    )
                    for a in (ep.address, ep.address_v6)
                    if a is not None and (b.host_ip is None or b.host_ip.version == a.version)
                )
        return FirewallPlan(networks=networks, forwards=tuple(forwards))

    async def sync_firewall(self) -> None:
        """Make the firewall match the current state; returns once an apply covering it ran."""
        if self.settings.firewall:
            await self._fw.sync()

    # === NetworkDriver ==========================================================================
    async def create_network(
        self,
        network_id: str,
        options: NetworkOptions,
        ipv4: Sequence[IPAMData],
        ipv6: Sequence[IPAMData],
    ) -> None:
        bridge = options.bridge_name or self.names.bridge(network_id)
        datas = (*ipv4, *ipv6)
        while (hit := self._clash(network_id, bridge, datas)) and self.rolled_back(hit[0]):
            log.warning("network %s was rolled back by the engine (its pools are released): "
                        "deleting it", short(hit[0].network_id))
            await self.delete_network(hit[0].network_id)
        async with self._locks.exclusive(_net(network_id)):
            if options.enable_ipv6 is False and ipv6:
                options = replace(options, enable_ipv6=True)
            if hit := self._clash(network_id, bridge, datas):
                raise Conflict(hit[1])
            existing = self.networks.get(network_id)
            if existing is not None:
                if (existing.bridge, existing.options, existing.ipv4, existing.ipv6) != (
                    bridge, options, tuple(ipv4), tuple(ipv6)
                ):
                    raise Conflict(f"network {short(network_id)} exists with another configuration")
                # A retried create: make sure the kernel matches, answer as before.
                await self.links.ensure_bridge(self.bridge_spec(existing))
                await self.sync_firewall()
                return
            link = await self.links.get_link(bridge)
            if link is not None and link.kind != "bridge":
                raise InvalidRequest(
                    f"option com.docker.network.bridge.name: interface {bridge} exists and is "
                    "not a bridge"
                )
            owned = link is None or self.names.owned_kind(bridge) == "bridge"
            net = Network(
                network_id=network_id, bridge=bridge, bridge_owned=owned, options=options,
                ipv4=tuple(ipv4), ipv6=tuple(ipv6),
            )
            self.networks[network_id] = net
            await self._durably([st.PutNetwork(net)],
                                undo=lambda: self.networks.pop(network_id, None))
            try:
                await self.links.ensure_bridge(self.bridge_spec(net))
                await self.sync_firewall()
            except BaseException:
                await self._undo_network(net)
                raise
            log.info(
                "created network %s on bridge %s (%s)", short(network_id), bridge,
                ", ".join(str(s) for s in net.subnets) or "no subnet",
            )

    def _clash(
        self, network_id: str, bridge: str, datas: Sequence[IPAMData]
    ) -> tuple[Network, str] | None:
        """Another network holding this bridge or an overlapping subnet, and why."""
        for other in self.networks.values():
            if other.network_id == network_id:
                continue
            if other.bridge == bridge:
                return other, f"bridge {bridge} is already used by network " \
                              f"{short(other.network_id)}"
            for mine in datas:
                for theirs in other.subnets:
                    if mine.pool.prefixlen and theirs.prefixlen and mine.pool.overlaps(theirs):
                        return other, (f"subnet {mine.pool} overlaps with subnet {theirs} of "
                                       f"network {short(other.network_id)}")
        return None

    def create_rolled_back(self, ep: Endpoint) -> bool:
        """An endpoint from before our start, never joined, whose address our IPAM no longer
        holds: its CreateEndpoint answer was lost and the engine released the address."""
        if ep.endpoint_id not in self.before.endpoints or ep.sandbox_key is not None:
            return False
        addrs = [a for a in (ep.address, ep.address_v6) if a is not None]
        pools = [self.ipam.pool_of(a.ip) for a in addrs]
        return bool(addrs) and all(
            p is not None and int(a.ip) not in p.allocated
            for a, p in zip(addrs, pools, strict=True)
        )

    def rolled_back(self, net: Network) -> bool:
        """A network from before our start, with no endpoints, whose pools came from our IPAM
        and are all released: the engine rolled its create back after a crash lost our
        answer (it releases the pools but never sends DeleteNetwork, PROTOCOL.md 5.1)."""
        if net.network_id not in self.before.networks or self.endpoints_of(net.network_id):
            return False
        ours = [d for d in (*net.ipv4, *net.ipv6)
                if d.address_space in (LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE)]
        held = {s.pool.network for pid, s in self.ipam.pools.items() if pid in self.before.pools}
        return bool(ours) and not any(d.pool in held for d in ours)

    async def _undo_network(self, net: Network) -> None:
        async def forget() -> None:
            await self._durably([st.DeleteNetwork(net.network_id)],
                                after=lambda: self.networks.pop(net.network_id, None))

        async def unbridge() -> None:
            if net.bridge_owned:
                await self.links.ensure_link_absent(net.bridge)
            else:
                await self.links.ensure_addresses_absent(net.bridge, net.gateways)

        await self._compensate(forget, unbridge, self.sync_firewall)

    async def delete_network(self, network_id: str) -> None:
        async with self._locks.exclusive(_net(network_id)):
            net = self.networks.get(network_id)
            if net is None:
                return  # deletes of unknown IDs succeed (PROTOCOL.md 8.5)
            leftovers = self.endpoints_of(network_id)
            ops: list[st.Op] = [st.DeleteEndpoint(e.endpoint_id) for e in leftovers]
            ops.append(st.DeleteNetwork(network_id))

            def forget() -> None:
                self.networks.pop(network_id, None)
                for e in leftovers:
                    self.endpoints.pop(e.endpoint_id, None)

            await self._durably(ops, after=forget)
            # The record is gone first: a crash from here on leaves only prefixed orphans,
            # which start-up removes.
            for e in leftovers:
                self.delete_link_later(e.host_ifname)
            await self.sync_firewall()
            if net.bridge_owned:
                await self.links.ensure_link_absent(net.bridge)
            else:  # the user's bridge stays, without the gateway addresses we put on it
                await self.links.ensure_addresses_absent(net.bridge, net.gateways)
            log.info("deleted network %s", short(network_id))

    async def create_endpoint(
        self,
        network_id: str,
        endpoint_id: str,
        address: ipaddress.IPv4Interface | None,
        address_v6: ipaddress.IPv6Interface | None,
        mac: str | None,
    ) -> str | None:
        """Returns the MAC we chose, or None when the engine set one (never echo it)."""
        async with self._locks.shared(_net(network_id)), self._locks.exclusive(_ep(endpoint_id)):
            net = self._network(network_id)
            self._check_address(net, address, "Interface.Address")
            self._check_address(net, address_v6, "Interface.AddressIPv6")
            chosen = mac or endpoint_mac(endpoint_id, address)
            ep = Endpoint(
                endpoint_id=endpoint_id, network_id=network_id,
                host_ifname=self.names.host_veth(endpoint_id),
                container_ifname=self.names.container_veth(endpoint_id),
                mac=chosen, address=address, address_v6=address_v6,
            )
            existing = self.endpoints.get(endpoint_id)
            if existing is not None:
                if (existing.network_id, existing.address, existing.address_v6, existing.mac) != (
                    network_id, address, address_v6, chosen
                ):
                    raise Conflict(
                        f"endpoint {short(endpoint_id)} exists with another configuration"
                    )
                await self.links.ensure_veth(self.veth_spec(existing, net))
                return None if mac else chosen
            # Veths still waiting for their deferred delete hold bridge ports too.
            if len(self.endpoints_of(network_id)) + len(self._doomed) >= BRIDGE_MAX_PORTS:
                await self.drain()
            on_net = self.endpoints_of(network_id)  # after the await: others may have come
            if len(on_net) >= BRIDGE_MAX_PORTS:
                raise Exhausted(
                    f"network {short(network_id)} has {len(on_net)} endpoints: bridge {net.bridge} "
                    f"reached the kernel's limit of {BRIDGE_MAX_PORTS} ports per bridge"
                )
            for other in on_net:
                for mine, theirs in ((address, other.address), (address_v6, other.address_v6)):
                    if (mine is not None and theirs is not None and mine.ip == theirs.ip
                            and not await self._evict_if_stale(other, mine.ip)):
                        raise Conflict(
                            f"address {mine.ip} is already used by endpoint "
                            f"{short(other.endpoint_id)} on network {short(network_id)}"
                        )
            for other in self.endpoints.values():
                if other.host_ifname == ep.host_ifname:
                    raise Conflict(
                        f"endpoint {short(endpoint_id)} collides with endpoint "
                        f"{short(other.endpoint_id)} on interface name {ep.host_ifname}"
                    )
            self.endpoints[endpoint_id] = ep
            await self._durably([st.PutEndpoint(ep)],
                                undo=lambda: self.endpoints.pop(endpoint_id, None))
            try:
                await self._not_doomed(ep.host_ifname)
                await self.links.ensure_veth(self.veth_spec(ep, net))
            except BaseException:
                await self._undo_endpoint(ep)
                raise
            log.info(
                "created endpoint %s on network %s: %s, %s", short(endpoint_id),
                short(network_id), ep.host_ifname, address or address_v6 or "no address",
            )
            return None if mac else chosen

    async def _evict_if_stale(self, other: Endpoint, ip: IPAddress) -> bool:
        """The engine's IPAM just handed out ``ip``, so it freed it from ``other``: drop
        ``other`` if it is provably dead (its veth is gone: the engine skipped DeleteEndpoint
        after an unclean exit) or a leftover of a CreateEndpoint whose answer a crash lost
        (from before our start and never joined). Its address is not released: it is the new
        endpoint's now."""
        async with self._locks.exclusive(_ep(other.endpoint_id)):
            current = self.endpoints.get(other.endpoint_id)
            if current is None:
                return True
            dead = await self.links.get_link(current.host_ifname) is None
            leftover = current.endpoint_id in self.before.endpoints and current.sandbox_key is None
            if not (dead or leftover):
                return False
            why = "its veth is gone" if dead else "a create the engine rolled back"
            await self.forget_endpoints([current], reclaim=False, reason=why,
                                        linkless={current.endpoint_id} if dead else ())
            log.warning("endpoint %s held %s but was stale (%s): dropped",
                        short(current.endpoint_id), ip, why)
            return True

    @staticmethod
    def _check_address(net: Network, address: IPInterface | None, field: str) -> None:
        if address is None:
            return
        pools = [d.pool for d in (*net.ipv4, *net.ipv6) if d.pool.version == address.version]
        if pools and not any(address.ip in p for p in pools):
            raise InvalidRequest(
                f"{field} {address} is outside the network's subnets "
                + ", ".join(str(p) for p in pools)
            )

    async def _undo_endpoint(self, ep: Endpoint) -> None:
        async def forget() -> None:
            await self._durably([st.DeleteEndpoint(ep.endpoint_id)],
                                after=lambda: self.endpoints.pop(ep.endpoint_id, None))

        await self._compensate(forget, lambda: self.links.ensure_link_absent(ep.host_ifname))

    async def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        async with self._locks.shared(_net(network_id)), self._locks.exclusive(_ep(endpoint_id)):
            ep = self._endpoint_on(network_id, endpoint_id)
            if ep is None:
                return
            await self._durably([st.DeleteEndpoint(endpoint_id)],
                                after=lambda: self.endpoints.pop(endpoint_id, None))
            if ep.port_bindings:
                await self.sync_firewall()
            # The veth is deleted off the request path: the kernel takes ~16 ms (RTNL and RCU
            # waits) that the engine need not wait for. The record is already gone, so a crash
            # before the delete leaves a prefixed orphan that start-up removes.
            self.delete_link_later(ep.host_ifname)
            log.info("deleted endpoint %s", short(endpoint_id))

    def _endpoint_on(self, network_id: str, endpoint_id: str) -> Endpoint | None:
        """The endpoint, None if unknown; an error if the engine names another network."""
        ep = self.endpoints.get(endpoint_id)
        if ep is not None and ep.network_id != network_id:
            raise InvalidRequest(
                f"endpoint {short(endpoint_id)} belongs to network {short(ep.network_id)}, "
                f"not {short(network_id)}"
            )
        return ep

    async def _put_endpoint(self, ep: Endpoint) -> None:
        def remember() -> None:
            self.endpoints[ep.endpoint_id] = ep

        await self._durably([st.PutEndpoint(ep)], after=remember)

    def endpoint_info(self, network_id: str, endpoint_id: str) -> dict[str, str]:
        """Informational only; an error here would fail ``docker run`` on 20.10-27.x."""
        ep = self.endpoints.get(endpoint_id)
        net = self.networks.get(network_id)
        if ep is None or net is None:
            return {}
        return {"bridge": net.bridge, "veth": ep.host_ifname, "mac": ep.mac}

    async def join(self, network_id: str, endpoint_id: str, sandbox_key: str) -> JoinInfo:
        async with self._locks.shared(_net(network_id)), self._locks.exclusive(_ep(endpoint_id)):
            net = self._network(network_id)
            ep = self._endpoint_on(network_id, endpoint_id)
            if ep is None:
                raise NotFound(f"endpoint {short(endpoint_id)} is unknown to pouch-driver")
            if ep.sandbox_key != sandbox_key:
                await self._put_endpoint(replace(ep, sandbox_key=sandbox_key))
            gw4 = next((d.gateway.ip for d in net.ipv4 if d.gateway), None)
            gw6 = next((d.gateway.ip for d in net.ipv6 if d.gateway), None)
            internal = net.options.internal
            return JoinInfo(
                src_name=ep.container_ifname,
                dst_prefix="eth",
                # An internal network has no way out, so no default route through it
                # (Docker's bridge does the same).
                gateway=None if internal or ep.address is None else gw4,  # type: ignore[arg-type]
                gateway_v6=None if internal or ep.address_v6 is None else gw6,  # type: ignore[arg-type]
                disable_gateway_service=internal,
            )

    async def leave(self, network_id: str, endpoint_id: str) -> None:
        async with self._locks.shared(_net(network_id)), self._locks.exclusive(_ep(endpoint_id)):
            ep = self._endpoint_on(network_id, endpoint_id)
            if ep is None or ep.sandbox_key is None:
                return
            await self._put_endpoint(replace(ep, sandbox_key=None))

    async def program_external_connectivity(
        self, network_id: str, endpoint_id: str, bindings: Sequence[PortBinding]
    ) -> None:
        async with self._locks.shared(_net(network_id)), self._locks.exclusive(_ep(endpoint_id)):
            net = self._network(network_id)
            ep = self._endpoint_on(network_id, endpoint_id)
            if ep is None:
                raise NotFound(f"endpoint {short(endpoint_id)} is unknown to pouch-driver")
            if net.options.internal or ep.address is None:
                return
            self._check_host_ips(bindings, ep)
            # One endpoint at a time picks host ports: resolving yields to the loop, and two
            # endpoints must not both take the same free port.
            async with self._ports_lock:
                taken = [
                    b for other in self.endpoints.values() if other.endpoint_id != endpoint_id
                    for b in other.port_bindings
                ]
                resolved = await resolve_ports(bindings, taken, net.options.host_binding_ipv4,
                                               dual_stack=ep.address_v6 is not None)
                if resolved == ep.port_bindings:
                    return  # nothing to publish (the usual case), or a repeated call
                await self._put_endpoint(replace(ep, port_bindings=resolved))
            try:
                await self.sync_firewall()
            except BaseException:
                await self._compensate(lambda: self._put_endpoint(ep), self.sync_firewall)
                raise
            log.info(
                "published %s for endpoint %s", ", ".join(
                    f"{b.host_ip or '*'}:{b.host_port}->{b.port}/{b.proto.name.lower()}"
                    for b in resolved
                ) or "nothing", short(endpoint_id),
            )

    @staticmethod
    def _check_host_ips(bindings: Sequence[PortBinding], ep: Endpoint) -> None:
        for b in bindings:
            if b.host_ip is None or b.host_ip.version == 4:
                continue
            where = f"published port [{b.host_ip}]:{b.host_port}->{b.port}"
            if b.host_ip.is_loopback:
                raise InvalidRequest(
                    f"{where}: the IPv6 loopback cannot be forwarded to a container (Linux "
                    "has no route_localnet for IPv6); use 127.0.0.1 or a host IPv6 address")
            if ep.address_v6 is None:
                raise InvalidRequest(
                    f"{where}: the container has no IPv6 address on this network (create the "
                    "network with --ipv6 and an IPv6 subnet)")

    async def revoke_external_connectivity(self, network_id: str, endpoint_id: str) -> None:
        async with self._locks.shared(_net(network_id)), self._locks.exclusive(_ep(endpoint_id)):
            ep = self._endpoint_on(network_id, endpoint_id)
            if ep is None or not ep.port_bindings:
                return
            await self._put_endpoint(replace(ep, port_bindings=()))
            await self.sync_firewall()

    # === IpamDriver =============================================================================
    async def request_pool(
        self, address_space: str, pool: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
        sub_pool: ipaddress.IPv4Network | ipaddress.IPv6Network | None, v6: bool,
    ) -> Pool:
        space = address_space or LOCAL_ADDRESS_SPACE
        if pool is not None and (left := self._leftover_pool(space, pool, sub_pool)):
            self.before.pools.discard(left.pool_id)
            log.warning("pool %s: adopted the reservation a lost answer left", left.pool_id)
            return left
        routes = await self.links.host_routes() if pool is None else []
        new = self.ipam.request_pool(space, pool, sub_pool, v6, routes)
        await self._durably([st.PutPool(new)], undo=lambda: self.ipam.release_pool(new.pool_id))
        log.info("reserved pool %s (%s)", new.pool_id, new.network)
        return new

    def leftover_pools(self) -> list[Pool]:
        """Pools reserved before our start, still empty and used by no network of ours: a
        RequestPool whose answer a crash lost (the engine never got the PoolID)."""
        used = {d.pool for n in self.networks.values() for d in (*n.ipv4, *n.ipv6)}
        out = []
        for pool_id in sorted(self.before.pools):
            state = self.ipam.pools.get(pool_id)
            if state is not None and not state.allocated and state.pool.network not in used:
                out.append(state.pool)
        return out

    def _leftover_pool(
        self, space: str, pool: ipaddress.IPv4Network | ipaddress.IPv6Network,
        sub_pool: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
    ) -> Pool | None:
        """The same pool as a lost reservation: adopt it rather than refuse an overlap."""
        return next((p for p in self.leftover_pools()
                     if (p.address_space, p.network, p.sub_pool) == (space, pool, sub_pool)),
                    None)

    async def release_pool(self, pool_id: str) -> None:
        state = self.ipam.pools.get(pool_id)
        if state is None:
            return
        def release() -> None:
            self.ipam.release_pool(pool_id)
            # A pool requested again gets the same ID: it is not the one from before.
            self.before.pools.discard(pool_id)
            self.before.addresses -= {k for k in self.before.addresses if k[0] == pool_id}

        await self._durably([st.DeletePool(pool_id)], after=release)
        log.info("released pool %s", pool_id)

    async def request_address(
        self, pool_id: str, address: IPAddress | None, gateway: bool
    ) -> IPInterface:
        if address is not None and not gateway and self.leftover_address(pool_id, address):
            self.before.addresses.discard((pool_id, int(address)))
            state = self.ipam.pools[pool_id]
            log.warning("address %s: adopted the reservation a lost answer left", address)
            return ipaddress.ip_interface((address, state.pool.network.prefixlen))
        grant = self.ipam.request_address(pool_id, address, gateway)
        # Granted in this run (a parked address can be from before): no longer a reservation
        # a lost answer could have left, even for a request racing this one.
        key = (pool_id, int(grant.address.ip))
        was_before = key in self.before.addresses
        self.before.addresses.discard(key)

        def undo() -> None:
            if grant.was_parked:
                self.ipam.reclaim(pool_id, grant.address.ip, grant.kind)
                if was_before:
                    self.before.addresses.add(key)
            else:
                self.ipam.release_address(pool_id, grant.address.ip)

        await self._durably([self._put_address(grant)], undo=undo)
        return grant.address

    def leftover_address(self, pool_id: str, address: IPAddress) -> bool:
        """Held since before our start, in a pool of one of our networks (so we know every
        endpoint on it), and claimed by no endpoint, gateway or aux address: a RequestAddress
        whose answer a crash lost."""
        state = self.ipam.pools.get(pool_id)
        if state is None or (pool_id, int(address)) not in self.before.addresses:
            return False
        if state.allocated.get(int(address)) != ADDRESS:
            return False
        nets = [n for n in self.networks.values()
                if any(d.pool == state.pool.network for d in (*n.ipv4, *n.ipv6))]
        if not nets:
            return False  # maybe another driver's network: we cannot see its endpoints
        for n in nets:
            claimed = {d.gateway.ip for d in (*n.ipv4, *n.ipv6) if d.gateway} | {
                a.ip for d in (*n.ipv4, *n.ipv6) for _, a in d.aux_addresses}
            if address in claimed:
                return False
        return not any(
            address in (a.ip for a in (e.address, e.address_v6) if a is not None)
            for e in self.endpoints.values()
        )

    @staticmethod
    def _put_address(grant: AddressGrant) -> st.PutAddress:
        return st.PutAddress(
            pool_id=grant.pool_id, address=int(grant.address.ip), version=grant.address.version,
            kind=grant.kind, cursor=grant.cursor,
        )

    async def release_address(self, pool_id: str, address: IPAddress) -> None:
        state = self.ipam.pools.get(pool_id)
        if state is None or int(address) not in state.allocated:
            return
        def release() -> None:
            self.ipam.release_address(pool_id, address)
            self.before.addresses.discard((pool_id, int(address)))

        await self._durably(
            [st.DeleteAddress(pool_id=pool_id, address=int(address), version=address.version)],
            after=release,
        )

    @staticmethod
    def address_spaces() -> tuple[str, str]:
        return LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE

    # === cleanup of endpoints that died unannounced =========================================
    async def forget_endpoints(
        self,
        dead: Sequence[Endpoint],
        linkless: Collection[str] = (),
        *,
        reclaim: bool = True,
        reason: str = "veth gone",
    ) -> list[str]:
        """Drop endpoints the engine will never delete, and (``reclaim``) park their addresses
        as ``RECLAIMED``: free for reuse, but last, as the engine may still release them.

        ``linkless``: endpoint IDs whose veth is known gone (no delete to schedule).
        """
        ops: list[st.Op] = []
        parked: list[tuple[str, IPAddress]] = []
        gone = {ep.endpoint_id for ep in dead}
        held = {
            a.ip for e in self.endpoints.values() if e.endpoint_id not in gone
            for a in (e.address, e.address_v6) if a is not None
        }
        for ep in dead:
            ops.append(st.DeleteEndpoint(ep.endpoint_id))
            for addr in (ep.address, ep.address_v6):
                if addr is None or not reclaim or addr.ip in held:
                    continue  # never free an address another endpoint holds now
                state = self.ipam.pool_of(addr.ip)
                if state is not None and state.allocated.get(int(addr.ip)) == ADDRESS:
                    ops.append(st.PutAddress(state.pool.pool_id, int(addr.ip), addr.version,
                                             RECLAIMED, state.cursor))
                    parked.append((state.pool.pool_id, addr.ip))
        def forget() -> None:
            for ep in dead:
                self.endpoints.pop(ep.endpoint_id, None)
            for pool_id, ip in parked:
                self.ipam.reclaim(pool_id, ip)
                self.before.addresses.discard((pool_id, int(ip)))

        await self._durably(ops, after=forget)
        for ep in dead:
            if ep.endpoint_id not in linkless:
                self.delete_link_later(ep.host_ifname)
        if any(ep.port_bindings for ep in dead):
            await self.sync_firewall()
        done = {ip for _, ip in parked}
        lines = []
        for ep in dead:
            mine = [str(a.ip) for a in (ep.address, ep.address_v6) if a and a.ip in done]
            lines.append(f"forgot endpoint {short(ep.endpoint_id)} ({reason})"
                         + (f" and reclaimed {', '.join(mine)}" if mine else ""))
        return lines

    def guard_network(self, network_id: str) -> AbstractAsyncContextManager[None]:
        """Hold off network create/delete while looking at (or repairing) this network."""
        return self._locks.shared(_net(network_id))

    @asynccontextmanager
    async def guard_endpoint(self, network_id: str, endpoint_id: str) -> AsyncIterator[None]:
        """Hold off every call on this endpoint (its record precedes its veth mid-create)."""
        async with self._locks.shared(_net(network_id)), self._locks.exclusive(_ep(endpoint_id)):
            yield

    def known_links(self) -> set[str]:
        return {n.bridge for n in self.networks.values()} | {
            name for e in self.endpoints.values() for name in (e.host_ifname, e.container_ifname)
        }
