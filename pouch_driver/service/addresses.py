"""The IpamDriver calls: pools and addresses, made durable.

No locks: every call is one synchronous step of the pure allocator followed by one commit, and
the allocator's own state is what keeps two requests from getting one address. Only the
records' leftovers from before a crash need the network state (``leftovers``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

from .. import store as st
from ..ipam import ADDRESS, OWED, RECLAIMED, AddressGrant, Ipam
from ..model import (
    GLOBAL_ADDRESS_SPACE,
    LOCAL_ADDRESS_SPACE,
    Endpoint,
    IPAddress,
    IPInterface,
    IPNetwork,
    Pool,
)
from ..store import Store
from . import leftovers
from .blocks import BlockAllocator
from .durable import durably
from .leftovers import FromBefore
from .state import State

log = logging.getLogger(__name__)

HostRoutes = Callable[[], Awaitable[list[IPNetwork]]]


@dataclass(frozen=True)
class Parking:
    """Addresses to park as ``RECLAIMED``: the ops to commit with the caller's own, and what to
    do once they are committed."""

    ops: tuple[st.Op, ...]
    addresses: tuple[tuple[str, IPAddress], ...]


class AddressService:
    def __init__(
        self,
        store: Store,
        ipam: Ipam,
        state: State,
        before: FromBefore,
        host_routes: HostRoutes,
        *,
        blocks: BlockAllocator | None = None,
    ) -> None:
        self._blocks = blocks
        self._store = store
        self.ipam = ipam
        self._state = state
        self._before = before
        self._host_routes = host_routes

    @staticmethod
    def address_spaces() -> tuple[str, str]:
        return LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE

    async def request_pool(
        self,
        address_space: str,
        pool: IPNetwork | None,
        sub_pool: IPNetwork | None,
        v6: bool,
        *,
        size: int | None = None,
    ) -> Pool:
        """``pool`` None: any free pool, of ``size`` (a prefix length) if given. Picked
        pools avoid our host's routes, as the engine checks none for a size-only request."""
        space = address_space or LOCAL_ADDRESS_SPACE
        if pool is not None and (
            left := leftovers.leftover_pool(
                self._state, self._before, self.ipam, space=space, network=pool, sub_pool=sub_pool
            )
        ):
            self._before.pools.discard(left.pool_id)
            log.warning("pool %s: adopted the reservation a lost answer left", left.pool_id)
            return left
        routes = await self._host_routes() if pool is None else []
        new = self.ipam.request_pool(space, pool, sub_pool, v6, routes, size=size)
        await durably(
            self._store, [st.PutPool(new)], undo=lambda: self.ipam.release_pool(new.pool_id)
        )
        log.info("reserved pool %s (%s)", new.pool_id, new.network)
        return new

    async def release_pool(self, pool_id: str) -> None:
        if pool_id not in self.ipam.pools:
            return

        def release() -> None:
            self.ipam.release_pool(pool_id)
            self._before.forget_pool(pool_id)

        await durably(self._store, [st.DeletePool(pool_id)], after=release)
        log.info("released pool %s", pool_id)

    async def request_address(
        self, pool_id: str, address: IPAddress | None, gateway: bool
    ) -> IPInterface:
        if (
            address is not None
            and not gateway
            and leftovers.leftover_address(self._state, self._before, self.ipam, pool_id, address)
        ):
            self._before.addresses.discard((pool_id, int(address)))
            log.warning("address %s: adopted the reservation a lost answer left", address)
            prefix = self.ipam.pools[pool_id].pool.network.prefixlen
            return ipaddress.ip_interface((address, prefix))
        cluster = self._blocks.cluster_of(pool_id) if self._blocks and not gateway else None
        if self._blocks is not None and cluster is not None:
            # Unique across hosts: inside this host's blocks, or pinned in etcd (blocks.py).
            grant = await self._blocks.allocate(cluster, pool_id, address)
        else:
            # A free address, or a parked one asked for by name (ipam.OWED): never one of the
            # records from before this start.
            grant = self.ipam.request_address(pool_id, address, gateway)

        def undo() -> None:
            if grant.kind == OWED:  # parked again, as before the request
                self.ipam.reclaim(pool_id, grant.address.ip, kind=OWED)
            else:
                self.ipam.release_address(pool_id, grant.address.ip)

        try:
            await durably(self._store, [_put_address(grant)], undo=undo)
        except BaseException:
            if self._blocks is not None and cluster is not None:
                await self._blocks.released(cluster, grant.address.ip)
            raise
        if grant.kind == OWED:
            log.info("address %s: parked, given back by name; one late release owed", address)
        return grant.address

    async def release_address(self, pool_id: str, address: IPAddress) -> None:
        pool = self.ipam.pools.get(pool_id)
        if pool is None or int(address) not in pool.allocated:
            return

        def release() -> None:
            self.ipam.release_address(pool_id, address)
            self._before.addresses.discard((pool_id, int(address)))

        op: st.Op
        if pool.allocated[int(address)] == OWED:  # the owed release: still held (ipam.OWED)
            op = st.PutAddress(pool_id, int(address), address.version, ADDRESS, pool.cursor)
        else:
            op = st.DeleteAddress(pool_id=pool_id, address=int(address), version=address.version)
        await durably(self._store, [op], after=release)
        free = int(address) not in pool.allocated  # an OWED address is only settled
        if free and self._blocks is not None and (cluster := self._blocks.cluster_of(pool_id)):
            await self._blocks.released(cluster, address)

    # --- endpoints dropped without the engine's word -----------------------------------------
    def parking(self, dead: Sequence[Endpoint], held: Collection[IPAddress]) -> Parking:
        """What parking the addresses of ``dead`` takes, except those in ``held`` (another
        endpoint holds them now: never free those)."""
        ops: list[st.Op] = []
        parked: list[tuple[str, IPAddress]] = []
        for ep in dead:
            for addr in (ep.address, ep.address_v6):
                if addr is None or addr.ip in held:
                    continue
                pool = self.ipam.pool_of(addr.ip)
                # An OWED address stays held: parking it would owe two releases, and a grant
                # by name could then be freed under its holder. Held by nobody, it is a leak.
                if pool is not None and pool.allocated.get(int(addr.ip)) == ADDRESS:
                    ops.append(
                        st.PutAddress(
                            pool.pool.pool_id, int(addr.ip), addr.version, RECLAIMED, pool.cursor
                        )
                    )
                    parked.append((pool.pool.pool_id, addr.ip))
        return Parking(tuple(ops), tuple(parked))

    def parked(self, parking: Parking) -> None:
        """Memory follows a committed ``parking``."""
        for pool_id, ip in parking.addresses:
            self.ipam.reclaim(pool_id, ip)
            self._before.addresses.discard((pool_id, int(ip)))


def _put_address(grant: AddressGrant) -> st.PutAddress:
    return st.PutAddress(
        pool_id=grant.pool_id,
        address=int(grant.address.ip),
        version=grant.address.version,
        kind=grant.kind,
        cursor=grant.cursor,
    )
