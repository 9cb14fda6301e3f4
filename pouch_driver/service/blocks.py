"""Cluster-wide addresses: each host allocates inside address blocks it claimed in etcd.

A block (``cluster.layout.block_prefixlen``: 64 addresses in a large IPv4 subnet) is claimed
once with a put-if-absent, then every address in it is allocated locally, by the ordinary pool
allocator and the local store: no etcd round trip for most containers. Two hosts can never
hand out one address, because no address is allocated outside a block its host holds, except:

* an address asked for by name (``--ip``) outside this host's blocks. It is pinned in etcd with
  one transaction that also requires its block to be unclaimed, and a host that claims a block
  reads the block's pins afterwards, when no new pin can appear in it. An address in another
  host's block is refused, naming that host.
* the gateway, the same on every host, allocated by each host's own pool before the network
  is bound to the cluster and skipped by every block.

Blocks stay with their host while it lives: a dead host's blocks (and pins) come back through
``pouch-driver gc`` once its lease is gone, never while it may still use them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import secrets
from collections import defaultdict

from ..cluster import layout as lay
from ..errors import Conflict, Exhausted
from ..ipam import AddressGrant, Ipam
from ..model import IPAddress, IPNetwork
from .cluster import Cluster
from .state import State

log = logging.getLogger(__name__)
#: Candidate blocks looked at before a pool is called full (a /64 has 2**58 of them).
MAX_CANDIDATES = 1 << 16


class BlockAllocator:
    def __init__(self, cluster: Cluster, ipam: Ipam, state: State) -> None:
        self._cluster = cluster
        self._ipam = ipam
        self._state = state
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def cluster_of(self, pool_id: str) -> str | None:
        """The cluster network a pool belongs to, once a network binds it (CreateNetwork
        comes after the pool and gateway requests, which stay local)."""
        pool = self._ipam.pools.get(pool_id)
        if pool is None:
            return None
        for net in self._state.networks.values():
            if net.options.cluster and any(
                d.pool == pool.pool.network and d.address_space == pool.pool.address_space
                for d in (*net.ipv4, *net.ipv6)
            ):
                return net.options.cluster
        return None

    async def allocate(self, name: str, pool_id: str, address: IPAddress | None) -> AddressGrant:
        self._cluster.ready()
        async with self._locks[name]:
            if address is not None:
                return await self._by_name(name, pool_id, address)
            return await self._dynamic(name, pool_id)

    def _mine(self, name: str) -> list[IPNetwork]:
        blocks = self._cluster.mirror.blocks.get(name, {})
        return sorted(
            (b for b, h in blocks.items() if h == self._cluster.host),
            key=lambda b: int(b.network_address),
        )

    def _foreign_pins(self, name: str) -> frozenset[int]:
        pins = self._cluster.mirror.pins.get(name, {})
        return frozenset(int(a) for a, h in pins.items() if h != self._cluster.host)

    async def _dynamic(self, name: str, pool_id: str) -> AddressGrant:
        cluster = self._cluster
        spans = [lay.span(b) for b in self._mine(name)]
        grant = self._ipam.request_in(pool_id, spans, self._foreign_pins(name))
        if grant is not None:
            return grant
        state = self._ipam.pools[pool_id]
        subnet = state.pool.network
        blocks = cluster.mirror.blocks.setdefault(name, {})
        for block in itertools.islice(lay.blocks_in(subnet, state.lo, state.hi), MAX_CANDIDATES):
            if block in blocks:
                continue
            key = lay.block_key(name, block)
            record = lay.owner_record(cluster.host, secrets.token_hex(6))
            if not await cluster.timed(cluster.kv.create(key, record)):
                current = await cluster.timed(cluster.kv.get(key))
                blocks[block] = lay.owner_of(current.value) if current is not None else "?"
                continue
            blocks[block] = cluster.host
            log.info("cluster network %s: claimed block %s", name, block)
            # Pins in this block are frozen now (a pin needs its block unclaimed): read them.
            kvs, _ = await cluster.timed(cluster.kv.range_prefix(lay.prefix("pins", name)))
            pins = cluster.mirror.pins.setdefault(name, {})
            for kv in kvs:
                parsed = lay.parse_key(kv.key)
                if parsed is not None:
                    pins[ipaddress.ip_address(parsed.item)] = lay.owner_of(kv.value)
            grant = self._ipam.request_in(pool_id, [lay.span(block)], self._foreign_pins(name))
            if grant is not None:
                return grant
        holders = sorted({h for h in blocks.values() if h != cluster.host})
        raise Exhausted(
            f"no free address left in cluster network {name} ({subnet}): every block is held"
            + (f" (by hosts {', '.join(holders)})" if holders else "")
            + "; pouch-driver gc returns the blocks of hosts that are gone"
        )

    async def _by_name(self, name: str, pool_id: str, address: IPAddress) -> AddressGrant:
        cluster = self._cluster
        subnet = self._ipam.pools[pool_id].pool.network
        block = lay.block_of(subnet, address) if address in subnet else None
        holder = cluster.mirror.blocks.get(name, {}).get(block) if block else None
        if block is not None and holder is not None and holder != cluster.host:
            raise _in_block_of(name, address, block, holder)
        foreign = cluster.mirror.pins.get(name, {}).get(address)
        if foreign is not None and foreign != cluster.host:
            raise Conflict(f"address {address} of cluster network {name} is held by host {foreign}")
        grant = self._ipam.request_address(pool_id, address)  # local checks: in use, reserved
        if holder == cluster.host or block is None:
            return grant
        key = lay.pin_key(name, address)
        try:
            won = await cluster.timed(
                cluster.kv.create_all(
                    {key: lay.owner_record(cluster.host, secrets.token_hex(6))},
                    absent=[lay.block_key(name, block)],
                )
            )
        except BaseException:
            self._ipam.release_address(pool_id, address)
            raise
        if not won:
            self._ipam.release_address(pool_id, address)
            current = await cluster.timed(cluster.kv.get(key))
            if current is not None:
                who = lay.owner_of(current.value)
                cluster.mirror.pins.setdefault(name, {})[address] = who
                raise Conflict(f"address {address} of cluster network {name} is held by host {who}")
            # Its block was claimed after our watch last told us: name the claimant.
            claim = await cluster.timed(cluster.kv.get(lay.block_key(name, block)))
            if claim is not None:
                holder = lay.owner_of(claim.value)
                cluster.mirror.blocks.setdefault(name, {})[block] = holder
                raise _in_block_of(name, address, block, holder)
            raise Conflict(
                f"address {address} of cluster network {name}: its block {block} was just "
                "claimed by another host; ask for it there"
            )
        cluster.mirror.pins.setdefault(name, {})[address] = cluster.host
        return grant

    async def released(self, name: str, address: IPAddress) -> None:
        """After the local release: a pin of ours goes too (best effort; a later session
        removes pins this host no longer holds)."""
        cluster = self._cluster
        if cluster.mirror.pins.get(name, {}).get(address) != cluster.host:
            return
        try:
            await cluster.timed(cluster.kv.delete(lay.pin_key(name, address)))
            cluster.mirror.pins[name].pop(address, None)
        except Exception as exc:  # noqa: BLE001 - the release itself has succeeded
            log.warning("address %s: pin left in etcd (%s)", address, exc)


def _in_block_of(name: str, address: IPAddress, block: IPNetwork, holder: str) -> Conflict:
    return Conflict(
        f"address {address} of cluster network {name} is in block {block}, which host "
        f"{holder} allocates from: ask for it on that host, or pick an address in a "
        "block no host holds (pouch-driver status lists them)"
    )
