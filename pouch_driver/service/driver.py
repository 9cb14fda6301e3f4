"""The driver, whole: the state and the services that change it, over the adapters it is given.

It builds only domain objects; the adapters (store, netlink, firewall) come from the
composition root (``pouch_driver.daemon``), so tests hand it fakes.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from ..config import Settings
from ..ipam import Ipam
from ..kernel import Firewall, Links
from ..naming import Names
from ..store import Store
from .addresses import AddressService
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
    def __init__(self, settings: Settings, store: Store, links: Links, firewall: Firewall) -> None:
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
        self.firewall_sync = FirewallSync(firewall, self.state, enabled=settings.firewall)
        self.addresses = AddressService(
            store, self.ipam, self.state, self.before, links.host_routes
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
        )
        self.ports = PortService(store, self.state, self.guards, self.firewall_sync)

    async def start(self) -> None:
        """Load the store; the caller reconciles the kernel before serving."""
        snapshot = await self.store.open()
        self.state.networks.update((n.network_id, n) for n in snapshot.networks)
        self.state.endpoints.update((e.endpoint_id, e) for e in snapshot.endpoints)
        for record in snapshot.pools:
            self.ipam.restore_pool(record.pool, record.allocations, record.cursor)
        self.before.load(snapshot)
        log.info(
            "loaded %d networks, %d endpoints, %d pools from %s",
            len(self.state.networks),
            len(self.state.endpoints),
            len(self.ipam.pools),
            self.store.path,
        )

    async def stop(self) -> None:
        await self.deletes.drain()
        await self.firewall_sync.idle()
        await self.store.close()
        await self.links.close()

    def status(self) -> Status:
        return status_of(self.state, self.ipam, len(self.deletes.pending()))

    def known_links(self) -> Collection[str]:
        """Interfaces that are ours and expected: recorded, or waiting for their delete."""
        return self.state.known_links() | self.deletes.pending()
