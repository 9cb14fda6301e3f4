"""Leftovers of answers a crash lost: which records from before this start nothing will claim.

A request whose answer was lost is retried by the engine with an empty body, which fails, and
the engine then rolls back only its own side (docs/protocol.md §1.5): our record of the pool,
address, network or endpoint stays. Only records from before the start can be such leftovers,
so only they are ever adopted by an identical request or cleaned up. Pure predicates over the
state, the IPAM and ``FromBefore``; the callers act on their verdicts.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field

from ..ipam import ADDRESS, Ipam
from ..model import GLOBAL_ADDRESS_SPACE, LOCAL_ADDRESS_SPACE, Endpoint, IPAddress, IPNetwork, Pool
from ..store import Snapshot
from .state import State


@dataclass
class FromBefore:
    """What the store held when this process started."""

    started: float = 0.0
    networks: set[str] = field(default_factory=set)
    endpoints: set[str] = field(default_factory=set)
    pools: set[str] = field(default_factory=set)
    addresses: set[tuple[str, int]] = field(default_factory=set)

    def load(self, snapshot: Snapshot) -> None:
        """Start now, holding what ``snapshot`` holds."""
        self.started = time.monotonic()
        self.networks = {n.network_id for n in snapshot.networks}
        self.endpoints = {e.endpoint_id for e in snapshot.endpoints}
        self.pools = {r.pool.pool_id for r in snapshot.pools}
        self.addresses = {(r.pool.pool_id, a) for r in snapshot.pools for a, _ in r.allocations}

    def forget_pool(self, pool_id: str) -> None:
        """A pool released in this run: one requested again gets the same ID, but is new."""
        self.pools.discard(pool_id)
        self.addresses -= {k for k in self.addresses if k[0] == pool_id}


def never_joined(ep: Endpoint, before: FromBefore) -> bool:
    """From before our start and never joined: maybe a create whose answer was lost."""
    return ep.endpoint_id in before.endpoints and ep.sandbox_key is None


def endpoint_rolled_back(ep: Endpoint, before: FromBefore, ipam: Ipam) -> bool:
    """Never joined, from before our start, and our IPAM no longer holds its addresses: its
    CreateEndpoint answer was lost and the engine released them."""
    if not never_joined(ep, before):
        return False
    addrs = [a for a in (ep.address, ep.address_v6) if a is not None]
    pools = [ipam.pool_of(a.ip) for a in addrs]
    return bool(addrs) and all(
        p is not None and int(a.ip) not in p.allocated for a, p in zip(addrs, pools, strict=True)
    )


def network_rolled_back(network_id: str, state: State, before: FromBefore, ipam: Ipam) -> bool:
    """A network from before our start, with no endpoints, whose pools came from our IPAM and
    are all released: the engine rolled its create back after a crash lost our answer (it
    releases the pools but never sends DeleteNetwork, docs/protocol.md §5.1)."""
    net = state.networks.get(network_id)
    if net is None or network_id not in before.networks or state.endpoints_of(network_id):
        return False
    ours = [
        d
        for d in (*net.ipv4, *net.ipv6)
        if d.address_space in (LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE)
    ]
    held = {s.pool.network for pid, s in ipam.pools.items() if pid in before.pools}
    return bool(ours) and not any(d.pool in held for d in ours)


def rolled_back_networks(state: State, before: FromBefore, ipam: Ipam) -> list[str]:
    return [nid for nid in state.networks if network_rolled_back(nid, state, before, ipam)]


def rolled_back_endpoints(state: State, before: FromBefore, ipam: Ipam) -> list[Endpoint]:
    return [e for e in state.endpoints.values() if endpoint_rolled_back(e, before, ipam)]


def leftover_pools(state: State, before: FromBefore, ipam: Ipam) -> list[Pool]:
    """Pools reserved before our start, still empty and used by no network of ours: a
    RequestPool whose answer a crash lost (the engine never got the PoolID)."""
    used = {d.pool for n in state.networks.values() for d in (*n.ipv4, *n.ipv6)}
    out = []
    for pool_id in sorted(before.pools):
        pool = ipam.pools.get(pool_id)
        if pool is not None and not pool.allocated and pool.pool.network not in used:
            out.append(pool.pool)
    return out


def leftover_pool(
    state: State,
    before: FromBefore,
    ipam: Ipam,
    *,
    space: str,
    network: IPNetwork,
    sub_pool: IPNetwork | None,
) -> Pool | None:
    """The same pool as a lost reservation: adopted rather than refused as an overlap."""
    return next(
        (
            p
            for p in leftover_pools(state, before, ipam)
            if (p.address_space, p.network, p.sub_pool) == (space, network, sub_pool)
        ),
        None,
    )


def leftover_address(
    state: State, before: FromBefore, ipam: Ipam, pool_id: str, address: IPAddress
) -> bool:
    """Held since before our start, in a pool of one of our networks (so we know every endpoint
    on it), and claimed by no endpoint, gateway or aux address: a RequestAddress whose answer a
    crash lost."""
    pool = ipam.pools.get(pool_id)
    if pool is None or (pool_id, int(address)) not in before.addresses:
        return False
    if pool.allocated.get(int(address)) != ADDRESS:
        return False
    nets = [
        n
        for n in state.networks.values()
        if any(d.pool == pool.pool.network for d in (*n.ipv4, *n.ipv6))
    ]
    if not nets:
        return False  # maybe another driver's network: we cannot see its endpoints
    for n in nets:
        datas = (*n.ipv4, *n.ipv6)
        claimed = {d.gateway.ip for d in datas if d.gateway} | {
            a.ip for d in datas for _, a in d.aux_addresses
        }
        if address in claimed:
            return False
    return not any(
        address in (a.ip for a in (e.address, e.address_v6) if a is not None)
        for e in state.endpoints.values()
    )


def leftover_addresses(state: State, before: FromBefore, ipam: Ipam) -> list[tuple[str, IPAddress]]:
    out: list[tuple[str, IPAddress]] = []
    for pool_id, addr in sorted(before.addresses):
        pool = ipam.pools.get(pool_id)
        if pool is None or addr not in pool.allocated:
            continue
        ip: IPAddress = (
            ipaddress.IPv4Address(addr)
            if pool.pool.network.version == 4
            else ipaddress.IPv6Address(addr)
        )
        if leftover_address(state, before, ipam, pool_id, ip):
            out.append((pool_id, ip))
    return out
