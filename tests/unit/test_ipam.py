"""The allocator's properties: unique addresses, reserved ones never given, no pool-size cost."""

from __future__ import annotations

import ipaddress
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pouch_driver.config import parse_pools
from pouch_driver.errors import Conflict, Exhausted, InvalidRequest, NotFound
from pouch_driver.ipam import ADDRESS, OWED, Ipam
from pouch_driver.model import LOCAL_ADDRESS_SPACE as LOCAL

net = ipaddress.ip_network
addr = ipaddress.ip_address


def make() -> Ipam:
    return Ipam(parse_pools("10.200.0.0/22:24", v6=False), parse_pools("fd70::/62:64", v6=True))


def test_explicit_pool_and_gateway_then_addresses() -> None:
    ipam = make()
    pool = ipam.request_pool(LOCAL, net("10.1.0.0/24"), None, False)
    assert pool.pool_id == "PouchLocal/10.1.0.0/24"
    gw = ipam.request_address(pool.pool_id, None, gateway=True)
    assert str(gw.address) == "10.1.0.1/24"
    first = ipam.request_address(pool.pool_id, None)
    second = ipam.request_address(pool.pool_id, None)
    assert [str(first.address), str(second.address)] == ["10.1.0.2/24", "10.1.0.3/24"]


def test_repeated_empty_requests_get_different_pools() -> None:
    """The engine holds an overlapping pool and asks again with identical arguments."""
    ipam = make()
    pools = [ipam.request_pool(LOCAL, None, None, False).network for _ in range(4)]
    assert len(set(pools)) == 4
    with pytest.raises(Exhausted, match="no free IPv4 pool"):
        ipam.request_pool(LOCAL, None, None, False)


def test_automatic_pool_skips_host_routes_and_held_pools() -> None:
    ipam = make()
    ipam.request_pool(LOCAL, net("10.200.0.0/24"), None, False)
    got = ipam.request_pool(LOCAL, None, None, False, host_routes=[net("10.200.1.0/25")])
    assert got.network == net("10.200.2.0/24")


def test_automatic_ipv6_pool_comes_from_the_ula_range() -> None:
    ipam = make()
    got = ipam.request_pool(LOCAL, None, None, True)
    assert got.network == net("fd70::/64")
    a = ipam.request_address(got.pool_id, None)
    assert str(a.address) == "fd70::1/64"


def test_overlapping_explicit_pool_is_a_conflict_naming_the_holder() -> None:
    ipam = make()
    ipam.request_pool(LOCAL, net("10.1.0.0/16"), None, False)
    with pytest.raises(Conflict, match=r"10\.1\.2\.0/24 overlaps with pool 10\.1\.0\.0/16"):
        ipam.request_pool(LOCAL, net("10.1.2.0/24"), None, False)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=22, max_value=30), min_size=1, max_size=12),
    route=st.integers(min_value=0, max_value=3),
)
def test_property_pools_of_a_given_size(sizes: list[int], route: int) -> None:
    """Engine 29's "any pool of /N" (docs/protocol.md §4.3): of that size, inside our
    ranges, aligned, and clear of every held pool and host route."""
    ipam = make()  # 10.200.0.0/22 for IPv4
    routes = [net(f"10.200.{route}.0/25")]
    held = []
    for size in sizes:
        try:
            got = ipam.request_pool(LOCAL, None, None, False, routes, size=size).network
        except Exhausted:
            blocks = net("10.200.0.0/22").subnets(new_prefix=size)
            assert all(any(b.overlaps(n) for n in (*held, *routes)) for b in blocks)
            continue
        assert got.prefixlen == size and got.subnet_of(net("10.200.0.0/22"))
        assert not any(got.overlaps(n) for n in (*held, *routes))
        held.append(got)


@pytest.mark.parametrize(
    ("pool", "sub", "v6", "message"),
    [
        ("10.1.0.0/24", "10.2.0.0/25", False, "SubPool 10.2.0.0/25 is not inside Pool"),
        ("10.1.0.0/24", None, True, "is IPv4 but V6 is true"),
        (None, "10.1.0.0/25", False, "needs an explicit Pool"),
        ("10.1.0.1/32", None, False, "no room"),
    ],
)
def test_bad_pool_requests_name_the_field(
    pool: str | None, sub: str | None, v6: bool, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        make().request_pool(LOCAL, net(pool) if pool else None, net(sub) if sub else None, v6)


def test_unknown_address_space_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="AddressSpace"):
        make().request_pool("nope", None, None, False)


def test_sub_pool_limits_dynamic_addresses_but_not_explicit_ones() -> None:
    ipam = make()
    pool = ipam.request_pool(LOCAL, net("10.1.0.0/24"), net("10.1.0.128/30"), False)
    gw = ipam.request_address(pool.pool_id, None, gateway=True)
    assert str(gw.address.ip) == "10.1.0.1"
    got = {str(ipam.request_address(pool.pool_id, None).address.ip) for _ in range(4)}
    assert got == {"10.1.0.128", "10.1.0.129", "10.1.0.130", "10.1.0.131"}
    with pytest.raises(Exhausted, match=r"range 10\.1\.0\.128/30"):
        ipam.request_address(pool.pool_id, None)
    outside = ipam.request_address(pool.pool_id, addr("10.1.0.50"))
    assert str(outside.address) == "10.1.0.50/24"


def test_explicit_address_errors() -> None:
    ipam = make()
    pool = ipam.request_pool(LOCAL, net("10.1.0.0/24"), None, False)
    ipam.request_address(pool.pool_id, addr("10.1.0.9"))
    with pytest.raises(Conflict, match="already in use"):
        ipam.request_address(pool.pool_id, addr("10.1.0.9"))
    with pytest.raises(InvalidRequest, match="not in pool"):
        ipam.request_address(pool.pool_id, addr("10.9.0.9"))
    with pytest.raises(InvalidRequest, match="network address"):
        ipam.request_address(pool.pool_id, addr("10.1.0.0"))
    with pytest.raises(InvalidRequest, match="broadcast address"):
        ipam.request_address(pool.pool_id, addr("10.1.0.255"))
    with pytest.raises(NotFound, match="PoolID"):
        ipam.request_address("PouchLocal/10.9.0.0/24", None)


def test_release_is_tolerant_and_round_robin_delays_reuse() -> None:
    ipam = make()
    pool = ipam.request_pool(LOCAL, net("10.1.0.0/29"), None, False)
    assert ipam.release_address(pool.pool_id, addr("10.1.0.4")) is False
    assert ipam.release_address("unknown", addr("10.1.0.4")) is False
    a = ipam.request_address(pool.pool_id, None).address.ip
    assert ipam.release_address(pool.pool_id, a) is True
    b = ipam.request_address(pool.pool_id, None).address.ip
    assert b != a  # the next address, not the one just freed


def test_exhaustion_then_release_allows_one_more() -> None:
    ipam = make()
    pool = ipam.request_pool(LOCAL, net("10.1.0.0/29"), None, False)
    got = [ipam.request_address(pool.pool_id, None).address.ip for _ in range(6)]
    assert len(set(got)) == 6
    with pytest.raises(Exhausted):
        ipam.request_address(pool.pool_id, None)
    ipam.release_address(pool.pool_id, got[3])
    assert ipam.request_address(pool.pool_id, None).address.ip == got[3]


def test_parked_addresses_are_never_handed_out_until_released() -> None:
    """A parked address still belongs to the engine's dead endpoint, whose ReleaseAddress may
    come at any time: granting it to anyone, even when the pool is otherwise full, would let
    that release free a live address (issue 12 item 7)."""
    ipam = make()
    pool = ipam.request_pool(LOCAL, net("10.1.0.0/29"), None, False)
    got = [ipam.request_address(pool.pool_id, None).address.ip for _ in range(6)]
    assert ipam.reclaim(pool.pool_id, got[4]) and ipam.reclaim(pool.pool_id, got[1])
    assert not ipam.reclaim(pool.pool_id, got[1])  # already parked
    assert not ipam.reclaim(pool.pool_id, addr("10.1.0.7"))  # never handed out
    ipam.release_address(pool.pool_id, got[2])
    assert ipam.request_address(pool.pool_id, None).address.ip == got[2]
    with pytest.raises(Exhausted, match=r"no free address left in pool 10\.1\.0\.0/29.*2 parked"):
        ipam.request_address(pool.pool_id, None)
    assert ipam.release_address(pool.pool_id, got[4])  # the engine's late release
    assert ipam.request_address(pool.pool_id, None).address.ip == got[4]
    with pytest.raises(Exhausted, match="1 parked"):
        ipam.request_address(pool.pool_id, None)


def test_a_parked_address_by_name_is_held_again_owing_one_release() -> None:
    """``--ip`` of a parked address (a container restarted after a crash): granted, with the
    old holder's late release owed. The first release only settles that; the second frees it.
    Never as a gateway: a gateway is released once, with its network."""
    ipam = make()
    pool = ipam.request_pool(LOCAL, net("10.1.0.0/24"), None, False)
    a, b = (ipam.request_address(pool.pool_id, None).address.ip for _ in range(2))
    ipam.reclaim(pool.pool_id, a)
    ipam.reclaim(pool.pool_id, b)
    with pytest.raises(Conflict, match=r"Address 10\.1\.0\.1 .*parked.*gateway"):
        ipam.request_address(pool.pool_id, a, gateway=True)
    grant = ipam.request_address(pool.pool_id, a)
    assert (grant.address.ip, grant.kind) == (a, OWED)
    with pytest.raises(Conflict, match="already in use"):
        ipam.request_address(pool.pool_id, a)
    assert ipam.release_address(pool.pool_id, a) is False  # the late one: still held
    assert ipam.pools[pool.pool_id].allocated[int(a)] == ADDRESS
    assert ipam.release_address(pool.pool_id, a) is True
    assert ipam.release_address(pool.pool_id, b) is True
    assert ipam.pools[pool.pool_id].free == 254


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["get", "get_named", "park", "release"]),
            st.integers(min_value=0, max_value=15),
        ),
        max_size=60,
    )
)
def test_property_no_two_live_holders_share_an_address(ops: list[tuple[str, int]]) -> None:
    """Any interleaving of requests (dynamic or by name), endpoints dying without the engine's
    word (the sweep parks their address) and releases, late ones for dead endpoints included,
    in any order: no two live endpoints ever hold one address, a live endpoint's address is
    never free or parked (so no release can free it under it), and our pool holds exactly the
    addresses the engine has yet to release."""
    ipam = make()
    network = net("10.7.0.0/29")
    pool = ipam.request_pool(LOCAL, network, None, False)
    state = ipam.pools[pool.pool_id]
    # The engine's view: every grant it has not released yet, and whether its endpoint lives.
    engine: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, bool]] = []
    for op, k in ops:
        if op in ("get", "get_named"):
            want = network[k % 8] if op == "get_named" else None
            try:
                got = ipam.request_address(pool.pool_id, want).address.ip
            except (Exhausted, Conflict, InvalidRequest):
                continue
            engine.append((got, True))
        elif op == "park" and (alive := [i for i, (_, live) in enumerate(engine) if live]):
            i = alive[k % len(alive)]
            engine[i] = (engine[i][0], False)
            ipam.reclaim(pool.pool_id, engine[i][0])  # the sweep: an OWED one stays held
        elif op == "release" and engine:
            ipam.release_address(pool.pool_id, engine.pop(k % len(engine))[0])
        live = [a for a, alive in engine if alive]
        assert len(live) == len(set(live)), f"an address has two live holders: {engine}"
        assert all(state.allocated.get(int(a)) in (ADDRESS, OWED) for a in live), engine
        assert {addr(a) for a in state.allocated} == {a for a, _ in engine}


@settings(max_examples=60, deadline=None)
@given(
    prefix=st.integers(min_value=24, max_value=30),
    ops=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=300)), max_size=120),
    gateway=st.booleans(),
)
def test_property_no_duplicates_and_no_reserved(
    prefix: int, ops: list[tuple[bool, int]], gateway: bool
) -> None:
    """Any interleaving of allocations and releases keeps addresses unique and usable."""
    ipam = make()
    network = net(f"10.7.0.0/{prefix}")
    pool = ipam.request_pool(LOCAL, network, None, False)
    live: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    if gateway:
        gw = ipam.request_address(pool.pool_id, None, gateway=True).address.ip
        live.add(gw)
    capacity = network.num_addresses - 2
    for allocate, pick in ops:
        if allocate:
            if len(live) >= capacity:
                with pytest.raises(Exhausted):
                    ipam.request_address(pool.pool_id, None)
                continue
            a = ipam.request_address(pool.pool_id, None).address.ip
            assert a not in live
            assert a not in (network.network_address, network.broadcast_address)
            assert a in network
            live.add(a)
        elif live:
            victim = sorted(live)[pick % len(live)]
            assert ipam.release_address(pool.pool_id, victim)
            live.discard(victim)
    state = ipam.pools[pool.pool_id]
    assert {addr(a) for a in state.allocated} == live


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=2**16 - 1), min_size=1, max_size=40, unique=True)
)
def test_property_explicit_ipv6_and_dynamic_never_collide(offsets: list[int]) -> None:
    ipam = make()
    pool = ipam.request_pool(LOCAL, net("fd70:1::/64"), None, True)
    base = int(net("fd70:1::/64").network_address)
    taken = set()
    for off in offsets:
        a = ipaddress.IPv6Address(base + 1 + off)
        ipam.request_address(pool.pool_id, a)
        taken.add(a)
    for _ in range(len(offsets) + 5):
        a = ipam.request_address(pool.pool_id, None).address.ip
        assert a not in taken
        taken.add(a)


def test_a_slash_8_costs_its_allocations_not_its_size() -> None:
    """Correctness at scale; timing numbers live in bench/, this only bounds memory."""
    ipam = make()
    tracemalloc.start()
    try:
        pool = ipam.request_pool(LOCAL, net("10.0.0.0/8"), None, False)
        ipam.request_address(pool.pool_id, None, gateway=True)
        for _ in range(2000):
            ipam.request_address(pool.pool_id, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024  # a materialised /8 would be gigabytes
    assert len(ipam.pools[pool.pool_id].allocated) == 2001
    six = ipam.request_pool(LOCAL, net("fd70:2::/64"), None, True)
    assert str(ipam.request_address(six.pool_id, None).address) == "fd70:2::1/64"


def test_restore_keeps_allocations_and_cursor() -> None:
    ipam = make()
    pool = ipam.request_pool(LOCAL, net("10.1.0.0/24"), None, False)
    grants = [ipam.request_address(pool.pool_id, None) for _ in range(3)]
    state = ipam.pools[pool.pool_id]
    again = make()
    again.restore_pool(pool, state.allocated.items(), state.cursor)
    nxt = again.request_address(pool.pool_id, None).address.ip
    assert nxt not in {g.address.ip for g in grants}
    assert nxt == addr("10.1.0.4")
