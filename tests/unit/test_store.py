"""The SQLite store: round trips, group commit, isolation of a bad op, damage and locking."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from pouch_driver import store as st
from pouch_driver.errors import StoreError
from pouch_driver.model import (
    Endpoint,
    GatewayMode,
    IPAMData,
    Network,
    NetworkOptions,
    Pool,
    PortBinding,
    Proto,
)

NET = Network(
    network_id="a" * 64,
    bridge="pdbaaaaaaaaaaaa",
    bridge_owned=True,
    options=NetworkOptions(
        mtu=1450,
        enable_icc=False,
        host_binding_ipv4=ipaddress.IPv4Address("127.0.0.1"),
        enable_ipv6=True,
    ),
    ipv4=(
        IPAMData(
            "PouchLocal",
            ipaddress.ip_network("10.1.0.0/24"),
            ipaddress.ip_interface("10.1.0.1/24"),
            (("router", ipaddress.ip_interface("10.1.0.254/24")),),
        ),
    ),
    ipv6=(
        IPAMData(
            "PouchLocal", ipaddress.ip_network("fd70::/64"), ipaddress.ip_interface("fd70::1/64")
        ),
    ),
)
EP = Endpoint(
    endpoint_id="b" * 64,
    network_id="a" * 64,
    host_ifname="pdhbbbbbbbbbbbb",
    container_ifname="pdcbbbbbbbbbbbb",
    mac="02:50:0a:01:00:02",
    address=ipaddress.IPv4Interface("10.1.0.2/24"),
    address_v6=ipaddress.IPv6Interface("fd70::2/64"),
    sandbox_key="/var/run/docker/netns/x",
    port_bindings=(PortBinding(Proto.TCP, 80, 8080, 8080, ipaddress.ip_address("10.0.0.1")),),
)
POOL = Pool("PouchLocal/fd70::/64", "PouchLocal", ipaddress.ip_network("fd70::/64"))


async def test_round_trip_of_every_record(tmp_path: Path) -> None:
    s = st.Store(tmp_path / "state.db")
    assert await s.open() == st.Snapshot()
    await s.commit([st.PutNetwork(NET), st.PutEndpoint(EP), st.PutPool(POOL)])
    big = int(ipaddress.IPv6Address("fd70::ffff:ffff:ffff:fffe"))
    await s.commit([st.PutAddress(POOL.pool_id, big, 6, "address", big + 1)])
    await s.close()
    again = st.Store(tmp_path / "state.db")
    snap = await again.open()
    await again.close()
    assert snap.networks == (NET,)
    assert snap.endpoints == (EP,)
    assert snap.pools == (st.PoolRecord(POOL, big + 1, ((big, "address"),)),)


async def test_deletes(tmp_path: Path) -> None:
    s = st.Store(tmp_path / "state.db")
    await s.open()
    await s.commit(
        [
            st.PutNetwork(NET),
            st.PutEndpoint(EP),
            st.PutPool(POOL),
            st.PutAddress(POOL.pool_id, 5, 6, "address", 6),
        ]
    )
    await s.commit(
        [
            st.DeleteEndpoint(EP.endpoint_id),
            st.DeleteNetwork(NET.network_id),
            st.DeleteAddress(POOL.pool_id, 5, 6),
        ]
    )
    await s.commit([st.DeletePool(POOL.pool_id)])
    await s.close()
    again = st.Store(tmp_path / "state.db")
    assert await again.open() == st.Snapshot()
    await again.close()


async def test_concurrent_commits_share_transactions(tmp_path: Path) -> None:
    s = st.Store(tmp_path / "state.db")
    await s.open()
    await s.commit([st.PutPool(POOL)])
    before = s.commits
    await asyncio.gather(
        *(s.commit([st.PutAddress(POOL.pool_id, i, 6, "address", i + 1)]) for i in range(1, 201))
    )
    groups = s.commits - before
    await s.close()
    assert groups < 200, "commits arriving together must be grouped"
    again = st.Store(tmp_path / "state.db")
    (record,) = (await again.open()).pools
    await again.close()
    assert len(record.allocations) == 200


async def test_a_failing_op_fails_only_its_request(tmp_path: Path) -> None:
    s = st.Store(tmp_path / "state.db")
    await s.open()
    assert s._db is not None
    # A trigger stands in for any SQLite failure of one op (disk errors are not injectable).
    await asyncio.get_running_loop().run_in_executor(
        s._executor,
        lambda: s._db.execute(  # type: ignore[union-attr]
            "CREATE TRIGGER boom BEFORE INSERT ON networks WHEN NEW.network_id LIKE 'f%' "
            "BEGIN SELECT RAISE(ABORT, 'boom'); END"
        ),
    )
    bad = Network(**{**NET.__dict__, "network_id": "f" * 64})
    results = await asyncio.gather(
        s.commit([st.PutEndpoint(EP)]),
        s.commit([st.PutNetwork(bad), st.PutPool(POOL)]),
        s.commit([st.PutNetwork(NET)]),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], StoreError) and "boom" in str(results[1])
    await s.close()
    again = st.Store(tmp_path / "state.db")
    snap = await again.open()
    await again.close()
    assert snap.networks == (NET,) and snap.endpoints == (EP,)
    assert snap.pools == (), "the failed request's other ops were rolled back with it"


async def test_second_instance_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    s = st.Store(tmp_path / "state.db")
    await s.open()
    other = st.Store(tmp_path / "state.db")
    with pytest.raises(StoreError, match="in use by another pouch-driver"):
        await other.open()
    await s.close()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad-json", "future-schema"])
async def test_damaged_store_is_a_clear_error_and_is_left_untouched(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "state.db"
    s = st.Store(path)
    await s.open()
    await s.commit([st.PutNetwork(NET), st.PutEndpoint(EP)])
    await s.close()
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
        (tmp_path / "state.db-wal").unlink(missing_ok=True)
    elif damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    else:
        db = sqlite3.connect(path)
        if damage == "bad-json":
            db.execute("UPDATE networks SET doc = '{broken'")
        else:
            db.execute("PRAGMA user_version = 99")
        db.commit()
        db.close()
    before = path.read_bytes()
    again = st.Store(path)
    with pytest.raises(StoreError, match="left untouched"):
        await again.open()
    assert path.read_bytes() == before, "a damaged store is never reset or rewritten"


def test_network_options_of_engines_27_to_29_round_trip_and_old_records_load() -> None:
    """New option fields are stored; a record written before they existed loads with the
    defaults, which mean what such a network always did."""
    new = NetworkOptions(
        enable_ipv6=True,
        enable_ipv4=False,
        gateway_mode_ipv4=GatewayMode.ROUTED,
        gateway_mode_ipv6=GatewayMode.NAT_UNPROTECTED,
        trusted_host_interfaces=("eth1", "vxlan.1"),
        inhibit_ipv4=True,
        host_ipv4=ipaddress.IPv4Address("10.9.8.7"),
        host_ipv6=ipaddress.IPv6Address("fd70:9::7"),
        container_iface_prefix="lan",
    )
    net = replace(NET, options=new)
    assert st.decode_network(net.network_id, st.encode_network(net)) == net
    doc = json.loads(st.encode_network(NET))
    for key in (
        "ipv4",
        "gateway_mode_ipv4",
        "gateway_mode_ipv6",
        "trusted_host_interfaces",
        "inhibit_ipv4",
        "host_ipv4",
        "host_ipv6",
        "container_iface_prefix",
    ):
        del doc["options"][key]
    old = st.decode_network(NET.network_id, json.dumps(doc))
    assert old == NET
    assert old.options.gateway_mode_ipv4 is GatewayMode.NAT and old.options.enable_ipv4
