"""Reconcile: compare the store with the kernel and the firewall, and repair on request.

One mechanism serves start-up (repair before serving: after a crash or a host reboot the
kernel may lack bridges, addresses or rules, or hold veths of endpoints that died unannounced),
the periodic sweep and ``pouch-driver gc`` (repair while serving), and ``pouch-driver check``
(read-only). It is safe while requests run: each repair happens under the locks of the network
or endpoint it touches, after looking again. It only removes objects carrying our prefix, so it
never touches what it did not make. Imports ``service``; the service never imports this.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import DriverError
from .kernel import LinkInfo
from .model import Endpoint, Network
from .service import Service, short

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Report:
    """Differences between store, kernel and firewall, as ``check`` and ``gc`` print them."""

    problems: tuple[str, ...]
    repaired: tuple[str, ...] = ()


@dataclass
class Reconciler:
    svc: Service
    repair: bool
    #: How long after start-up records from before it may be taken for leftovers (None: the
    #: ``leftover_grace`` setting). The sweep waits out the engine's retry window; an operator
    #: running check/gc --engine asks for it now.
    grace: float | None = None
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    async def run(self) -> Report:
        for net in list(self.svc.networks.values()):
            await self._bridge(net)
        # One listing for endpoints and orphans, taken after bridge repairs (new indexes).
        links = {link.name: link for link in await self.svc.links.list_links()}
        dead: list[Endpoint] = []
        for ep in list(self.svc.endpoints.values()):
            if not await self._endpoint(ep, links):
                dead.append(ep)
        if dead and self.repair:
            await self._forget(dead)
        await self._orphans(links)
        await self._leftovers()
        await self._firewall()
        return Report(problems=tuple(self.problems), repaired=tuple(self.repaired))

    async def _bridge(self, net: Network) -> None:
        async with self.svc.guard_network(net.network_id):
            if self.svc.networks.get(net.network_id) is not net:
                return  # deleted (or replaced) meanwhile
            link = await self.svc.links.get_link(net.bridge)
            where = f"network {short(net.network_id)}: bridge {net.bridge}"
            broken = link is None
            if link is None:
                self.problems.append(f"{where} is missing")
            else:
                missing = [a for a in net.gateways if a not in set(link.addresses)]
                if missing:
                    self.problems.append(f"{where} lacks " + ", ".join(str(a) for a in missing))
                if not link.up:
                    self.problems.append(f"{where} is down")
                broken = bool(missing) or not link.up
            if self.repair and broken:
                await self.svc.links.ensure_bridge(self.svc.bridge_spec(net))
                self.repaired.append(
                    f"restored bridge {net.bridge} of network {short(net.network_id)}"
                )

    async def _endpoint(self, ep: Endpoint, links: dict[str, LinkInfo]) -> bool:
        """False when the endpoint is dead: its network or its veth is gone."""
        net = self.svc.networks.get(ep.network_id)
        where = f"endpoint {short(ep.endpoint_id)}"
        if net is None:
            self.problems.append(f"{where}: its network {short(ep.network_id)} is unknown")
            return False
        link = links.get(ep.host_ifname)
        if link is None:
            self.problems.append(
                f"{where}: veth {ep.host_ifname} is gone (its sandbox died without DeleteEndpoint)"
            )
            return False
        bridge = links.get(net.bridge)
        if bridge is None or link.master != bridge.index or not link.up:
            self.problems.append(f"{where}: veth {ep.host_ifname} is not up on {net.bridge}")
            if self.repair:
                async with self.svc.guard_endpoint(ep.network_id, ep.endpoint_id):
                    if self.svc.endpoints.get(ep.endpoint_id) == ep:
                        await self.svc.links.ensure_veth(self.svc.veth_spec(ep, net))
                        self.repaired.append(f"re-attached {ep.host_ifname} to {net.bridge}")
        return True

    async def _forget(self, candidates: Iterable[Endpoint]) -> None:
        """Look again under each endpoint's locks: mid-create, the record precedes the veth."""
        confirmed: list[Endpoint] = []
        linkless: set[str] = set()  # their veth is gone already: nothing to delete
        for ep in candidates:
            async with self.svc.guard_endpoint(ep.network_id, ep.endpoint_id):
                current = self.svc.endpoints.get(ep.endpoint_id)
                if current is None:
                    continue
                if await self.svc.links.get_link(current.host_ifname) is None:
                    linkless.add(current.endpoint_id)
                    confirmed.append(current)
                elif current.network_id not in self.svc.networks:
                    confirmed.append(current)
        if confirmed:
            self.repaired.extend(await self.svc.forget_endpoints(confirmed, linkless))

    async def _orphans(self, links: dict[str, LinkInfo]) -> None:
        # Records are written before links are made and removed before links are deleted, so
        # a link of ours listed earlier and unknown now is an orphan.
        known = self.svc.known_links() | self.svc.pending_deletes()
        for name in sorted(links):
            if self.svc.names.owned_kind(name) is None or name in known:
                continue
            self.problems.append(f"orphan interface {name} belongs to nothing in the store")
            if self.repair:
                self.svc.delete_link_later(name)
                self.repaired.append(f"removing orphan interface {name}")

    async def _leftovers(self) -> None:
        """Records from before a crash that the engine rolled back on its side (a lost answer,
        retried with an empty body, failed). Looked at only once the engine's retry window is
        over, so nothing it is still completing is taken for a leftover."""
        svc = self.svc
        grace = svc.settings.leftover_grace if self.grace is None else self.grace
        if time.monotonic() - svc.before.started < grace:
            return
        for net in [n for n in svc.networks.values() if svc.rolled_back(n)]:
            self.problems.append(f"network {short(net.network_id)}: rolled back by the engine")
            if self.repair:
                await svc.delete_network(net.network_id)
                self.repaired.append(f"deleted network {short(net.network_id)} (rolled back)")
        for ep in [e for e in svc.endpoints.values() if svc.create_rolled_back(e)]:
            self.problems.append(f"endpoint {short(ep.endpoint_id)}: rolled back by the engine")
            if self.repair:
                async with svc.guard_endpoint(ep.network_id, ep.endpoint_id):
                    if svc.endpoints.get(ep.endpoint_id) == ep:
                        self.repaired.extend(await svc.forget_endpoints(
                            [ep], reclaim=False, reason="a create the engine rolled back"))
        for pool in svc.leftover_pools():
            self.problems.append(f"pool {pool.pool_id} is used by nothing (a lost answer)")
            if self.repair:
                await svc.release_pool(pool.pool_id)
                self.repaired.append(f"released pool {pool.pool_id} (used by nothing)")
        for pool_id, addr in sorted(svc.before.addresses):
            state = svc.ipam.pools.get(pool_id)
            if state is None or addr not in state.allocated:
                continue
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = (
                ipaddress.IPv4Address(addr) if state.pool.network.version == 4
                else ipaddress.IPv6Address(addr)
            )
            if not svc.leftover_address(pool_id, ip):
                continue
            self.problems.append(f"address {ip} in {pool_id} is held by nothing (a lost answer)")
            if self.repair:
                await svc.release_address(pool_id, ip)
                svc.before.addresses.discard((pool_id, addr))
                self.repaired.append(f"released address {ip} (held by nothing)")

    async def _firewall(self) -> None:
        if not self.svc.settings.firewall:
            return
        diffs = await self.svc.firewall.differences(self.svc.firewall_plan())
        self.problems.extend(diffs)
        if self.repair and diffs:
            await self.svc.sync_firewall()
            self.repaired.append("rewrote our firewall chains")


async def start_up(svc: Service) -> Report:
    """Load the store and make the kernel match it before the first request is served."""
    await svc.start()
    report = await Reconciler(svc, repair=True).run()
    await svc.drain()
    for line in report.repaired:
        log.warning("start-up repair: %s", line)
    return report


async def sweep_forever(svc: Service, interval: float) -> None:
    """Self-healing while serving: endpoints that died unannounced, orphans, firewall drift."""
    while True:
        await asyncio.sleep(interval)
        try:
            report = await Reconciler(svc, repair=True).run()
        except DriverError as exc:
            log.warning("sweep failed: %s", exc)
            continue
        for line in report.repaired:
            log.warning("sweep: %s", line)
