"""Reconcile: compare the store with the kernel and the firewall, and repair on request.

Start-up runs it with ``repair=True`` before serving (after a crash or a host reboot the kernel
may lack bridges, addresses or rules, or hold veths of endpoints that died unannounced);
``pouch-driver check`` runs it read-only and ``gc`` with repair. It only ever removes objects
carrying our prefix, so it never touches what it did not make.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .kernel import LinkInfo
from .model import Endpoint, IPInterface, Network
from .service import Service, short


@dataclass(frozen=True)
class Report:
    """Differences between store, kernel and firewall, as ``check`` and ``gc`` print them."""

    problems: tuple[str, ...]
    repaired: tuple[str, ...] = ()


@dataclass
class Reconciler:
    svc: Service
    repair: bool
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    async def run(self) -> Report:
        links = {link.name: link for link in await self.svc.links.list_links()}
        for net in list(self.svc.networks.values()):
            await self._bridge(net, links.get(net.bridge))
        if self.repair:  # bridges may have been recreated with new indexes
            links = {link.name: link for link in await self.svc.links.list_links()}
        dead = [
            ep for ep in list(self.svc.endpoints.values()) if not await self._endpoint(ep, links)
        ]
        if dead and self.repair:
            self.repaired.extend(await self.svc._forget_endpoints(dead))
        await self._orphans(links)
        await self._firewall()
        return Report(problems=tuple(self.problems), repaired=tuple(self.repaired))

    async def _bridge(self, net: Network, link: LinkInfo | None) -> None:
        where = f"network {short(net.network_id)}: bridge {net.bridge}"
        missing: list[IPInterface] = []
        if link is None:
            self.problems.append(f"{where} is missing")
        else:
            info = await self.svc.links.get_link(net.bridge)
            have = set(info.addresses) if info else set()
            missing = [a for a in net.gateways if a not in have]
            if missing:
                self.problems.append(f"{where} lacks " + ", ".join(str(a) for a in missing))
            if not link.up:
                self.problems.append(f"{where} is down")
        if self.repair and (link is None or missing or not link.up):
            await self.svc.links.ensure_bridge(self.svc._bridge_spec(net))
            self.repaired.append(f"restored bridge {net.bridge} of network {short(net.network_id)}")

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
                await self.svc.links.ensure_veth(self.svc._veth_spec(ep, net))
                self.repaired.append(f"re-attached {ep.host_ifname} to {net.bridge}")
        return True

    async def _orphans(self, links: dict[str, LinkInfo]) -> None:
        known = self.svc.known_links() | self.svc.pending_deletes()
        for name in sorted(links):
            if self.svc.names.owned_kind(name) is None or name in known:
                continue
            self.problems.append(f"orphan interface {name} belongs to nothing in the store")
            if self.repair:
                await self.svc.links.ensure_link_absent(name)
                self.repaired.append(f"removed orphan interface {name}")

    async def _firewall(self) -> None:
        if not self.svc.settings.firewall:
            return
        diffs = await self.svc.firewall.differences(self.svc.firewall_plan())
        self.problems.extend(diffs)
        if self.repair:
            await self.svc.sync_firewall()
            if diffs:
                self.repaired.append("rewrote our firewall chains")
