"""The address allocator: pools and addresses, pure and deterministic.

Imports only ``model`` and ``errors``; no asyncio, no I/O. Addresses are plain integers, and a
pool only ever holds the addresses actually handed out, so a /8 or a /64 costs what its
allocations cost, never its size.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import Conflict, Exhausted, InvalidRequest, NotFound
from .model import (
    GLOBAL_ADDRESS_SPACE,
    LOCAL_ADDRESS_SPACE,
    IPAddress,
    IPInterface,
    IPNetwork,
    Pool,
    PoolCandidate,
)

GATEWAY = "gateway"
ADDRESS = "address"
#: The address of an endpoint we dropped without the engine's word (its veth was gone). The
#: engine still counts it as held and may send its ReleaseAddress at any time; that release
#: names only the pool and the address, so it cannot be told apart from one for a new holder.
#: A parked address is therefore never handed out by a dynamic request, even to a full pool:
#: it would go to a holder that does not expect the old holder's release to come.
RECLAIMED = "reclaimed"
#: A parked address asked for by name (``--ip``: a container restarted after a crash wants
#: its address back) is held again, with one release owed: the first ReleaseAddress is taken
#: as the old holder's late one and keeps the address held; the second frees it. Should the
#: old holder's release never come, the address stays held after the new holder is gone: a
#: leaked address, never a shared one.
OWED = "owed"


def _interface(addr: int, network: IPNetwork) -> IPInterface:
    # Never ip_interface(int): a small IPv6 integer would come back as IPv4.
    if network.version == 4:
        return ipaddress.IPv4Interface((addr, network.prefixlen))
    return ipaddress.IPv6Interface((addr, network.prefixlen))


def _network(addr: int, prefixlen: int, version: int) -> IPNetwork:
    if version == 4:
        return ipaddress.IPv4Network((addr, prefixlen))
    return ipaddress.IPv6Network((addr, prefixlen))


def _span(net: IPNetwork) -> tuple[int, int]:
    first = int(net.network_address)
    return first, first + net.num_addresses - 1


@dataclass
class PoolState:
    """One pool's allocations. ``[lo, hi]`` is the range dynamic addresses come from."""

    pool: Pool
    allocated: dict[int, str] = field(default_factory=dict)
    cursor: int = 0
    lo: int = 0
    hi: int = 0
    reserved: frozenset[int] = frozenset()
    in_range: int = 0  # allocations inside [lo, hi], to know exhaustion without scanning

    def __post_init__(self) -> None:
        net = self.pool.network
        first, last = _span(net)
        reserved = set()
        if net.version == 4 and net.prefixlen <= 30:
            reserved = {first, last}  # network and broadcast
        elif net.version == 6 and net.prefixlen <= 126:
            reserved = {first}  # the subnet-router anycast address
        self.reserved = frozenset(reserved)
        self.lo, self.hi = _span(self.pool.sub_pool) if self.pool.sub_pool else (first, last)
        if not self.lo <= self.cursor <= self.hi:
            self.cursor = self.lo
        self.in_range = sum(1 for a in self.allocated if self.lo <= a <= self.hi)

    @property
    def free(self) -> int:
        reserved_in_range = sum(1 for r in self.reserved if self.lo <= r <= self.hi)
        return self.hi - self.lo + 1 - reserved_in_range - self.in_range

    def take(self, addr: int, kind: str) -> None:
        self.allocated[addr] = kind
        if self.lo <= addr <= self.hi:
            self.in_range += 1

    def drop(self, addr: int) -> bool:
        if self.allocated.pop(addr, None) is None:
            return False
        if self.lo <= addr <= self.hi:
            self.in_range -= 1
        return True

    @property
    def reclaimed(self) -> int:
        return sum(1 for kind in self.allocated.values() if kind == RECLAIMED)

    @property
    def size(self) -> int:
        """Addresses this pool can hand out."""
        return self.hi - self.lo + 1 - len(self.reserved)

    def next_free(self) -> int:
        """Round-robin from the cursor, so a released address is not reused at once.

        The loop ends within (allocations + reserved) steps because ``free`` was checked.
        """
        candidate = self.cursor
        while candidate in self.allocated or candidate in self.reserved:
            candidate = self.lo if candidate >= self.hi else candidate + 1
        return candidate


@dataclass(frozen=True)
class AddressGrant:
    """What an address request changed, so the caller can persist exactly that."""

    pool_id: str
    address: IPInterface
    kind: str
    cursor: int


class Ipam:
    """All pools of one plugin instance."""

    def __init__(
        self,
        candidates_v4: Sequence[PoolCandidate],
        candidates_v6: Sequence[PoolCandidate],
    ) -> None:
        self._candidates = {4: tuple(candidates_v4), 6: tuple(candidates_v6)}
        self.pools: dict[str, PoolState] = {}

    # --- restore --------------------------------------------------------------------------
    def restore_pool(self, pool: Pool, allocations: Iterable[tuple[int, str]], cursor: int) -> None:
        self.pools[pool.pool_id] = PoolState(pool=pool, allocated=dict(allocations), cursor=cursor)

    # --- pools ----------------------------------------------------------------------------
    def request_pool(
        self,
        address_space: str,
        pool: IPNetwork | None,
        sub_pool: IPNetwork | None,
        v6: bool,
        host_routes: Sequence[IPNetwork] = (),
        *,
        size: int | None = None,
    ) -> Pool:
        """``pool`` None picks a free pool of the configured size, or of ``size`` (a prefix
        length) when given: the engine's "any pool this big" (docs/protocol.md §4.3)."""
        if address_space not in (LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE):
            raise InvalidRequest(
                f"AddressSpace {address_space!r} is unknown; use {LOCAL_ADDRESS_SPACE} "
                f"or {GLOBAL_ADDRESS_SPACE}"
            )
        if pool is None:
            if sub_pool is not None:
                raise InvalidRequest("SubPool (--ip-range) needs an explicit Pool (--subnet)")
            pool = self._pick_pool(6 if v6 else 4, host_routes, size)
        else:
            if (pool.version == 6) != v6:
                raise InvalidRequest(
                    f"Pool {pool} is IPv{pool.version} but V6 is {str(v6).lower()}"
                )
            if pool.prefixlen == pool.max_prefixlen:
                raise InvalidRequest(f"Pool {pool} has no room for a gateway and an address")
            if sub_pool is not None and (
                sub_pool.version != pool.version or not sub_pool.subnet_of(pool)  # type: ignore[arg-type]
            ):
                raise InvalidRequest(f"SubPool {sub_pool} is not inside Pool {pool}")
            for other in self.pools.values():
                if other.pool.address_space == address_space and other.pool.network.overlaps(pool):
                    raise Conflict(
                        f"Pool {pool} overlaps with pool {other.pool.network} "
                        f"(PoolID {other.pool.pool_id}) already in use"
                    )
        pool_id = f"{address_space}/{pool}" + (f"/{sub_pool}" if sub_pool else "")
        new = Pool(pool_id=pool_id, address_space=address_space, network=pool, sub_pool=sub_pool)
        self.pools[pool_id] = PoolState(pool=new)
        return new

    def _pick_pool(
        self, version: int, host_routes: Sequence[IPNetwork], size: int | None = None
    ) -> IPNetwork:
        """The first candidate overlapping neither a pool we hold nor a host route.

        Held pools count, so each repeated empty request gets a *different* pool: the
        engine holds a pool it finds overlapping and asks again (docs/protocol.md §4.3).
        ``size`` overrides the candidates' own size; ranges smaller than it are skipped.
        """
        candidates = self._candidates[version]
        if size is not None:
            candidates = self._candidates_for(version, size)
        blocked = sorted(
            _span(n)
            for n in (*(s.pool.network for s in self.pools.values()), *host_routes)
            if n.version == version and n.prefixlen > 0
        )
        merged: list[tuple[int, int]] = []
        for lo, hi in blocked:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        starts = [lo for lo, _ in merged]
        bits = 32 if version == 4 else 128
        for cand in candidates:
            prefixlen = cand.size if size is None else size
            step = 1 << (bits - prefixlen)
            c, end = _span(cand.base)
            while c + step - 1 <= end:
                i = bisect.bisect_right(starts, c + step - 1) - 1
                if i >= 0 and merged[i][1] >= c:
                    # Skip past the blocker, staying aligned to the pool size.
                    c = (merged[i][1] // step + 1) * step
                    continue
                return _network(c, prefixlen, version)
        raise Exhausted(
            f"no free IPv{version} pool"
            + ("" if size is None else f" of size /{size}")
            + " left in "
            + ", ".join(f"{c.base} (/{c.size if size is None else size})" for c in candidates)
            + "; remove unused networks or configure more pools"
        )

    def _candidates_for(self, version: int, size: int) -> tuple[PoolCandidate, ...]:
        """The configured ranges that can hold a pool of prefix length ``size``."""
        anywhere = ipaddress.IPv4Address(0) if version == 4 else ipaddress.IPv6Address(0)
        field = f"Pool {anywhere}/{size}"
        bits = 32 if version == 4 else 128
        if size > bits - 2:
            raise InvalidRequest(f"{field}: a /{size} has no room for a gateway and an address")
        fit = tuple(c for c in self._candidates[version] if c.base.prefixlen <= size)
        if not fit:
            ranges = ", ".join(str(c.base) for c in self._candidates[version])
            widest = min(c.base.prefixlen for c in self._candidates[version])
            raise InvalidRequest(
                f"{field}: the IPv{version} pool ranges ({ranges}) cannot give a /{size}; "
                f"ask for /{widest} to /{bits - 2}, or configure a larger range"
            )
        return fit

    def release_pool(self, pool_id: str) -> bool:
        return self.pools.pop(pool_id, None) is not None

    # --- addresses ------------------------------------------------------------------------
    def _state(self, pool_id: str) -> PoolState:
        state = self.pools.get(pool_id)
        if state is None:
            raise NotFound(f"PoolID {pool_id!r} is unknown")
        return state

    def request_address(
        self, pool_id: str, address: IPAddress | None, gateway: bool = False
    ) -> AddressGrant:
        state = self._state(pool_id)
        net = state.pool.network
        kind = GATEWAY if gateway else ADDRESS
        if address is not None:
            if address.version != net.version or address not in net:
                raise InvalidRequest(f"Address {address} is not in pool {net}")
            addr = int(address)
            if addr in state.reserved:
                what = "network" if addr == int(net.network_address) else "broadcast"
                raise InvalidRequest(f"Address {address} is the {what} address of pool {net}")
            if state.allocated.get(addr) == RECLAIMED and not gateway:
                state.allocated[addr] = OWED
                return AddressGrant(pool_id, _interface(addr, net), OWED, state.cursor)
            if state.allocated.get(addr) == RECLAIMED:
                raise Conflict(
                    f"Address {address} in pool {net} is parked: its endpoint is gone but the "
                    "engine has not released it yet, so it cannot be the gateway "
                    "(docker network disconnect -f clears a stale endpoint)"
                )
            if addr in state.allocated:
                raise Conflict(f"Address {address} is already in use in pool {net}")
        elif gateway and (first := self._first_host(state)) is not None:
            addr = first
        elif state.free > 0:
            addr = state.next_free()
            state.cursor = state.lo if addr >= state.hi else addr + 1
        else:
            raise Exhausted(self._no_free_address(state))
        state.take(addr, kind)
        return AddressGrant(pool_id, _interface(addr, net), kind, state.cursor)

    def request_in(
        self, pool_id: str, ranges: Sequence[tuple[int, int]], exclude: frozenset[int]
    ) -> AddressGrant | None:
        """The first free address inside ``ranges`` (and the pool's own range), skipping
        ``exclude``; None when there is none. For the cluster, whose hosts allocate only inside
        the address blocks they hold (``cluster.layout``)."""
        state = self._state(pool_id)
        for first, last in ranges:
            for addr in range(max(first, state.lo), min(last, state.hi) + 1):
                if addr in state.allocated or addr in state.reserved or addr in exclude:
                    continue
                state.take(addr, ADDRESS)
                return AddressGrant(
                    pool_id, _interface(addr, state.pool.network), ADDRESS, state.cursor
                )
        return None

    @staticmethod
    def _no_free_address(state: PoolState) -> str:
        net = state.pool.network
        where = (
            f"range {state.pool.sub_pool} of pool {net}" if state.pool.sub_pool else f"pool {net}"
        )
        text = f"no free address left in {where}"
        parked = sum(
            1
            for a, kind in state.allocated.items()
            if kind == RECLAIMED and state.lo <= a <= state.hi
        )
        if parked:
            text += (
                f"; {parked} parked address(es) of endpoints that are gone wait for the "
                "engine to release them"
            )
        return text

    @staticmethod
    def _first_host(state: PoolState) -> int | None:
        """The gateway defaults to the first host of the subnet (10.1.0.1), as users expect."""
        first, last = _span(state.pool.network)
        for addr in range(first, min(last, first + 2) + 1):
            if addr not in state.reserved and addr not in state.allocated:
                return addr
        return None

    def release_address(self, pool_id: str, address: IPAddress) -> bool:
        """Tolerant: the engine releases gateways it never requested (docs/protocol.md §4.6).

        True when the address is free afterwards; an ``OWED`` one is only settled."""
        state = self.pools.get(pool_id)
        if state is None:
            return False
        if state.allocated.get(int(address)) == OWED:
            state.allocated[int(address)] = ADDRESS
            return False
        return state.drop(int(address))

    def reclaim(self, pool_id: str, address: IPAddress, kind: str = ADDRESS) -> bool:
        """Park an address of this kind that its endpoint no longer uses (see ``RECLAIMED``)."""
        state = self.pools.get(pool_id)
        if state is None or state.allocated.get(int(address)) != kind:
            return False
        state.allocated[int(address)] = RECLAIMED
        return True

    def pool_of(self, address: IPAddress) -> PoolState | None:
        for state in self.pools.values():
            if address in state.pool.network:
                return state
        return None
