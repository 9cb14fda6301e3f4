"""The driver, whole: the state and the services that change it, over the adapters it is given.

It builds only domain objects; the adapters (store, netlink, firewall) come from the
composition root (``pouch_driver.daemon``), so tests hand it fakes.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import replace

from ..cluster.kv import KeyValueStore
from ..config import Settings, parse_advertise
from ..ipam import Ipam
from ..kernel import Firewall, Links
from ..naming import Names
from ..store import Store
from .addresses import AddressService
from .blocks import BlockAllocator
from .cluster import Cluster
from .deletions import DeferredDeletes
from .endpoints import EndpointService
from .firewalling import FirewallSync
from .guards import Guards
from .leftovers import FromBefore
from .networks import NetworkService
from .publishing import PortService
from .state import State
from .status import Status, status_of

log = logging.getLogger(__name__)


class Driver:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        links: Links,
        firewall: Firewall,
        kv: KeyValueStore | None = None,
    ) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)
        self.store = store
        self.links = links
        self.firewall = firewall
        self.state = State()
        self.before = FromBefore()
        self.ipam = Ipam(settings.pools_v4, settings.pools_v6)
        self.deletes = DeferredDeletes(links)
        self.guards = Guards()
        self.cluster: Cluster | None = None
        self.blocks: BlockAllocator | None = None
        if kv is not None:
            self.cluster = Cluster(
                kv,
                address=parse_advertise(settings.advertise_address),
                lease_ttl=settings.cluster_lease_ttl,
                names=self.names,
                links=links,
                state=self.state,
                ipam=self.ipam,
                resync_interval=settings.gc_interval or 30.0,
            )
            self.blocks = BlockAllocator(self.cluster, self.ipam, self.state)
        self.firewall_sync = FirewallSync(
            firewall,
            self.state,
            enabled=settings.firewall,
            vxlan=self.cluster.vxlan_filter if self.cluster else lambda: None,
        )
        if self.cluster is not None:
            self.cluster.on_peers = self.firewall_sync.sync
        self.addresses = AddressService(
            store, self.ipam, self.state, self.before, links.host_routes, blocks=self.blocks
        )
        self.networks = NetworkService(
            names=self.names,
            store=store,
            links=links,
            state=self.state,
            before=self.before,
            ipam=self.ipam,
            deletes=self.deletes,
            guards=self.guards,
            firewall=self.firewall_sync,
            cluster=self.cluster,
        )
        self.endpoints = EndpointService(
            names=self.names,
            store=store,
            links=links,
            state=self.state,
            before=self.before,
            addresses=self.addresses,
            deletes=self.deletes,
            guards=self.guards,
            firewall=self.firewall_sync,
            cluster=self.cluster,
        )
        self.ports = PortService(store, self.state, self.guards, self.firewall_sync, links)

    async def start(self) -> None:
        """Load the store; the caller reconciles the kernel before serving."""
        snapshot = await self.store.open()
        self.state.networks.update((n.network_id, n) for n in snapshot.networks)
        self.state.endpoints.update((e.endpoint_id, e) for e in snapshot.endpoints)
        for record in snapshot.pools:
            self.ipam.restore_pool(record.pool, record.allocations, record.cursor)
        self.before.load(snapshot)
        if self.cluster is not None:
            await self.cluster.load()
        log.info(
            "loaded %d networks, %d endpoints, %d pools from %s",
            len(self.state.networks),
            len(self.state.endpoints),
            len(self.ipam.pools),
            self.store.path,
        )

    async def stop(self) -> None:
        if self.cluster is not None:
            await self.cluster.stop()
        await self.deletes.drain()
        await self.firewall_sync.idle()
        await self.firewall.close()
        await self.store.close()
        await self.links.close()

    def status(self) -> Status:
        status = status_of(self.state, self.ipam, len(self.deletes.pending()))
        if self.cluster is None:
            return status
        return replace(status, cluster=self.cluster.view())

    def known_links(self) -> Collection[str]:
        """Interfaces that are ours and expected: recorded, or waiting for their delete."""
        vxlans = self.cluster.vxlan_names() if self.cluster else set()
        return self.state.known_links() | self.deletes.pending() | vxlans
