"""Reconciliation: compare the store with the kernel and the firewall, and repair on request.

One mechanism serves start-up (repair before serving: after a crash or a host reboot the
kernel may lack bridges, addresses or rules, or hold veths of endpoints that died unannounced),
the periodic sweep and ``pouch-driver gc`` (repair while serving), and ``pouch-driver check``
(read-only). It is safe while requests run: each repair happens under the guard of the network
or endpoint it touches, after looking again. It only removes objects carrying our prefix, so it
never touches what it did not make.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import DriverError
from ..kernel import LinkInfo
from ..model import Endpoint, Network
from . import leftovers
from .desired import bridge_addresses, bridge_spec, veth_spec
from .driver import Driver
from .state import short

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Report:
    """Differences between store, kernel and firewall, as ``check`` and ``gc`` print them."""

    problems: tuple[str, ...]
    repaired: tuple[str, ...] = ()


@dataclass
class Reconciler:
    driver: Driver
    repair: bool
    #: How long after start-up records from before it may be taken for leftovers (None: the
    #: ``leftover_grace`` setting). The sweep waits out the engine's retry window; an operator
    #: running check/gc --engine asks for it now.
    grace: float | None = None
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    async def run(self) -> Report:
        d = self.driver
        for net in list(d.state.networks.values()):
            await self._bridge(net)
        # One listing for endpoints and orphans, taken after bridge repairs (new indexes).
        links = {link.name: link for link in await d.links.list_links()}
        dead: list[Endpoint] = []
        for ep in list(d.state.endpoints.values()):
            if not await self._endpoint(ep, links):
                dead.append(ep)
        if dead and self.repair:
            await self._forget(dead)
        await self._orphans(links)
        await self._leftovers()
        await self._firewall()
        return Report(problems=tuple(self.problems), repaired=tuple(self.repaired))

    async def _bridge(self, net: Network) -> None:
        d = self.driver
        async with d.guards.network(net.network_id):
            if d.state.networks.get(net.network_id) is not net:
                return  # deleted (or replaced) meanwhile
            link = await d.links.get_link(net.bridge)
            where = f"network {short(net.network_id)}: bridge {net.bridge}"
            broken = link is None
            if link is None:
                self.problems.append(f"{where} is missing")
            else:
                missing = [a for a in bridge_addresses(net) if a not in set(link.addresses)]
                if missing:
                    self.problems.append(f"{where} lacks " + ", ".join(str(a) for a in missing))
                if not link.up:
                    self.problems.append(f"{where} is down")
                broken = bool(missing) or not link.up
            if self.repair and broken:
                await d.links.ensure_bridge(bridge_spec(net))
                self.repaired.append(
                    f"restored bridge {net.bridge} of network {short(net.network_id)}"
                )

    async def _endpoint(self, ep: Endpoint, links: dict[str, LinkInfo]) -> bool:
        """False when the endpoint is dead: its network or its veth is gone."""
        d = self.driver
        net = d.state.networks.get(ep.network_id)
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
                async with d.guards.endpoint(ep.network_id, ep.endpoint_id):
                    if d.state.endpoints.get(ep.endpoint_id) == ep:
                        await d.links.ensure_veth(veth_spec(ep, net))
                        self.repaired.append(f"re-attached {ep.host_ifname} to {net.bridge}")
        return True

    async def _forget(self, candidates: Iterable[Endpoint]) -> None:
        """Look again under each endpoint's guard: mid-create, the record precedes the veth."""
        d = self.driver
        confirmed: list[Endpoint] = []
        linkless: set[str] = set()  # their veth is gone already: nothing to delete
        for ep in candidates:
            async with d.guards.endpoint(ep.network_id, ep.endpoint_id):
                current = d.state.endpoints.get(ep.endpoint_id)
                if current is None:
                    continue
                if await d.links.get_link(current.host_ifname) is None:
                    linkless.add(current.endpoint_id)
                    confirmed.append(current)
                elif current.network_id not in d.state.networks:
                    confirmed.append(current)
        if confirmed:
            self.repaired.extend(await d.endpoints.forget_endpoints(confirmed, linkless))

    async def _orphans(self, links: dict[str, LinkInfo]) -> None:
        # Records are written before links are made and removed before links are deleted, so
        # a link of ours listed earlier and unknown now is an orphan.
        d = self.driver
        known = d.known_links()
        for name in sorted(links):
            if d.names.owned_kind(name) is None or name in known:
                continue
            self.problems.append(f"orphan interface {name} belongs to nothing in the store")
            if self.repair:
                d.deletes.queue(name)
                self.repaired.append(f"removing orphan interface {name}")

    async def _leftovers(self) -> None:
        """Records from before a crash that the engine rolled back on its side (a lost answer,
        retried with an empty body, failed). Looked at only once the engine's retry window is
        over, so nothing it is still completing is taken for a leftover."""
        d = self.driver
        grace = d.settings.leftover_grace if self.grace is None else self.grace
        if time.monotonic() - d.before.started < grace:
            return
        for nid in leftovers.rolled_back_networks(d.state, d.before, d.ipam):
            self.problems.append(f"network {short(nid)}: rolled back by the engine")
            if self.repair:
                await d.networks.delete_network(nid)
                self.repaired.append(f"deleted network {short(nid)} (rolled back)")
        for ep in leftovers.rolled_back_endpoints(d.state, d.before, d.ipam):
            self.problems.append(f"endpoint {short(ep.endpoint_id)}: rolled back by the engine")
            if self.repair:
                async with d.guards.endpoint(ep.network_id, ep.endpoint_id):
                    if d.state.endpoints.get(ep.endpoint_id) == ep:
                        self.repaired.extend(
                            await d.endpoints.forget_endpoints(
                                [ep], reclaim=False, reason="a create the engine rolled back"
                            )
                        )
        for pool in leftovers.leftover_pools(d.state, d.before, d.ipam):
            self.problems.append(f"pool {pool.pool_id} is used by nothing (a lost answer)")
            if self.repair:
                await d.addresses.release_pool(pool.pool_id)
                self.repaired.append(f"released pool {pool.pool_id} (used by nothing)")
        for pool_id, ip in leftovers.leftover_addresses(d.state, d.before, d.ipam):
            self.problems.append(f"address {ip} in {pool_id} is held by nothing (a lost answer)")
            if self.repair:
                await d.addresses.release_address(pool_id, ip)
                self.repaired.append(f"released address {ip} (held by nothing)")

    async def _firewall(self) -> None:
        d = self.driver
        if not d.settings.firewall:
            return
        plan = d.firewall_sync.plan(d.state)
        diffs = await d.firewall.differences(plan)
        self.problems.extend(diffs)
        if self.repair and diffs:
            await d.firewall_sync.sync()
            self.repaired.append("rewrote our firewall chains")


async def start_up(driver: Driver) -> Report:
    """Load the store and make the kernel match it before the first request is served."""
    await driver.start()
    try:
        await driver.firewall_sync.ready()
    except DriverError as exc:
        # Not fatal: the networks that exist keep working as far as they can, and the next
        # CreateNetwork fails with the same message until the host is fixed.
        log.warning("start-up: %s", exc)
    report = await Reconciler(driver, repair=True).run()
    await driver.deletes.drain()
    for line in report.repaired:
        log.warning("start-up repair: %s", line)
    return report


async def sweep_forever(driver: Driver, interval: float) -> None:
    """Self-healing while serving: endpoints that died unannounced, orphans, firewall drift."""
    while True:
        await asyncio.sleep(interval)
        try:
            report = await Reconciler(driver, repair=True).run()
        except DriverError as exc:
            log.warning("sweep failed: %s", exc)
            continue
        for line in report.repaired:
            log.warning("sweep: %s", line)
