"""Cluster networks between two "hosts" (network namespaces) over the real etcd and kernel.

Each host is the whole driver as the daemon builds it (``daemon.serving``) with its kernel
adapters bound to its namespace, driven through the service calls the HTTP layer makes, and a
"container" namespace per endpoint. What the kernel holds is read with ``bridge``/``ip -json``
and checked with real packets; what etcd holds, with ``etcdctl``. The engine-driven version of
these scenarios (two dockerd) is tests/multihost.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from pouch_driver.config import Settings
from pouch_driver.daemon import build_driver
from pouch_driver.errors import Conflict, StoreUnavailable
from pouch_driver.metrics import Metrics
from pouch_driver.model import IPAMData, NetworkOptions, PortBinding, Proto
from pouch_driver.naming import Names
from pouch_driver.service.driver import Driver
from pouch_driver.service.reconcile import start_up
from tests.conftest import is_root
from tests.kernel.conftest import Netns, new_netns
from tests.kernel.test_vxlan import _DF_PING as DF_PING

from .conftest import EtcdCluster

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root (namespaces, netlink)")

SUBNET = ipaddress.ip_network("10.61.0.0/16")
SUBNET6 = ipaddress.ip_network("fd61:1::/64")
TTL = 2
UNDERLAY = "198.51.100.%d"


def etcdctl(etcd: EtcdCluster, *args: str) -> str:
    return subprocess.run(
        ["etcdctl", f"--endpoints={','.join(etcd.endpoints)}", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
        env={**os.environ, "ETCDCTL_API": "3"},
    ).stdout


def _json(ns: Netns, *argv: str) -> Any:
    return json.loads(ns.sh(*argv).stdout or "[]")


@dataclass
class Host:
    ns: Netns
    vtep: str
    root: Path
    settings: Settings
    driver: Driver | None = None
    network_id: str = ""
    pools: dict[int, str] = field(default_factory=dict)
    containers: dict[str, Netns] = field(default_factory=dict)
    names: Names = field(default_factory=lambda: Names("pk"))

    async def start(self) -> None:
        """As ``daemon.serving`` starts the driver (no HTTP: the test calls the services)."""
        driver = build_driver(self.settings, netns=self.ns.name)
        await start_up(driver)
        assert driver.cluster is not None
        await driver.cluster.start()
        self.driver = driver
        assert await driver.cluster.wait_connected(10), driver.cluster.last_error

    async def stop(self) -> None:
        if self.driver is not None:
            await self.driver.stop()
            self.driver = None

    @property
    def d(self) -> Driver:
        assert self.driver is not None
        return self.driver

    def vxlan(self) -> str:
        return self.names.vxlan(self.network_id)

    def fdb_macs(self) -> set[str]:
        """MACs the VXLAN device forwards to another host (the oracle: ``bridge -json``)."""
        return {
            e["mac"]
            for e in _json(self.ns, "bridge", "-json", "fdb", "show", "dev", self.vxlan())
            if e.get("dst") and e["mac"] != "00:00:00:00:00:00"
        }


async def _pool(h: Host, subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> IPAMData:
    pool = await h.d.addresses.request_pool("PouchLocal", subnet, None, subnet.version == 6)
    h.pools[subnet.version] = pool.pool_id
    gw = await h.d.addresses.request_address(pool.pool_id, None, True)
    return IPAMData("PouchLocal", subnet, gw)


async def create_network(
    h: Host, *, subnet: ipaddress.IPv4Network = SUBNET, dual: bool = False, name: str = "mesh"
) -> None:
    v4 = await _pool(h, subnet)
    v6 = [await _pool(h, SUBNET6)] if dual else []
    h.network_id = secrets.token_hex(32)
    await h.d.networks.create_network(
        h.network_id, NetworkOptions(cluster=name, enable_ipv6=dual), [v4], v6
    )


async def define(h: Host, **options: Any) -> None:
    """A cluster network ``mesh`` (IPv4) with ``options``; a refused definition releases its
    pool, as the engine rolls back."""
    v4 = await _pool(h, SUBNET)
    h.network_id = secrets.token_hex(32)
    try:
        await h.d.networks.create_network(
            h.network_id, NetworkOptions(cluster="mesh", **options), [v4], []
        )
    except Conflict:
        await h.d.addresses.release_pool(h.pools[4])
        raise


def gateway(h: Host) -> str:
    gw = h.d.state.networks[h.network_id].ipv4[0].gateway
    assert gw is not None
    return str(gw.ip)


_SERVE = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
s.settimeout(10)
conn, peer = s.accept()
print(peer[0], flush=True)
"""
_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("connected")
except OSError as exc:
    print("failed", exc.errno)
"""


async def source_seen(
    server: Netns, address: str, client: Netns, via: tuple[str, int] | None = None
) -> str | None:
    """The source address a TCP connection from ``client`` arrives with at a server on
    ``address`` (port 4242) in ``server``, or None when it does not arrive. The client
    connects to ``via`` (a published port) if given, else to the server itself. On a thread,
    so the hosts' loops run on."""
    target, port = via or (address, 4242)

    def attempt() -> str | None:
        argv = ["ip", "netns", "exec", server.name, sys.executable, "-c", _SERVE, address, "4242"]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
            try:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
                out = client.sh(sys.executable, "-c", _CONNECT, target, str(port))
                return proc.stdout.readline().strip() if out.stdout.strip() == "connected" else None
            finally:
                proc.kill()

    return await asyncio.to_thread(attempt)


async def run_container(h: Host, stack: ExitStack, address: str | None = None) -> str:
    """An endpoint as the engine makes one (address, create, join), its end in a namespace of
    its own; returns its IPv4 address."""
    d = h.d
    want = ipaddress.ip_address(address) if address else None
    a4 = await d.addresses.request_address(h.pools[4], want, False)
    a6 = await d.addresses.request_address(h.pools[6], None, False) if 6 in h.pools else None
    eid = secrets.token_hex(32)
    await d.endpoints.create_endpoint(h.network_id, eid, a4, a6, None)  # type: ignore[arg-type]
    await d.endpoints.join(h.network_id, eid, f"/var/run/docker/netns/{eid[:12]}")
    ep = d.state.endpoints[eid]
    c = stack.enter_context(new_netns())
    h.ns.sh("ip", "link", "set", ep.container_ifname, "netns", c.name)
    c.sh("ip", "link", "set", ep.container_ifname, "name", "eth0")
    c.sh("ip", "addr", "add", str(a4), "dev", "eth0")
    if a6 is not None:
        c.sh("ip", "addr", "add", str(a6), "dev", "eth0", "nodad")
    c.sh("ip", "link", "set", "eth0", "up")
    h.containers[eid] = c
    return str(a4.ip)


async def ping(c: Netns, target: str, wait: int = 2, size: int = 56) -> bool:
    """One echo answered; on a thread, so the hosts' loops (keepalives, watches) run on."""
    argv = ("busybox", "ping", "-c", "1", "-W", str(wait), "-s", str(size), target)
    out = await asyncio.to_thread(c.sh, *argv, check=False)
    return out.returncode == 0


async def programmed_on(a: Host, b: Host) -> tuple[str, str, float]:
    """B's only container (its endpoint id and MAC) once A's kernel forwards to it, and
    the seconds that took; fails after one."""
    (eid,) = b.containers
    mac = b.d.state.endpoints[eid].mac
    return eid, mac, await eventually(lambda: mac in a.fdb_macs(), 1.0)


async def fits_exactly(c: Netns, target: str, size: int) -> None:
    """An echo of ``size`` bytes with don't-fragment crosses to ``target``; one byte more
    does not (the control)."""
    df = await asyncio.to_thread(c.sh, sys.executable, "-c", DF_PING, target, str(size))
    assert df.stdout.strip() == "reply", df.stdout
    too_big = await asyncio.to_thread(c.sh, sys.executable, "-c", DF_PING, target, str(size + 1))
    assert too_big.stdout.strip() != "reply", "one byte more does not fit"


async def eventually(check: Any, seconds: float = 5.0) -> float:
    """Seconds until ``check()`` held; fails after ``seconds``."""
    start = time.monotonic()
    while not await asyncio.to_thread(check):
        assert time.monotonic() - start < seconds, f"not within {seconds}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def underlay() -> Iterator[tuple[Netns, Netns]]:
    """Two host namespaces joined by a veth in TEST-NET-2 (never the machine's uplink)."""
    routes = subprocess.run(["ip", "-json", "route"], capture_output=True, text=True, check=True)
    for r in json.loads(routes.stdout):
        dst = r.get("dst", "")
        if dst not in ("default", "") and ipaddress.ip_network(dst, strict=False).overlaps(
            ipaddress.ip_network("198.51.100.0/24")
        ):
            pytest.fail(f"198.51.100.0/24 is routed on this host ({dst}): refusing to use it")
    with ExitStack() as stack:
        a, b = stack.enter_context(new_netns()), stack.enter_context(new_netns())
        a.sh("ip", "link", "add", "pkua", "type", "veth", "peer", "name", "pkub", "netns", b.name)
        for ns, dev, n in ((a, "pkua", 21), (b, "pkub", 22)):
            ns.sh("ip", "addr", "add", f"{UNDERLAY % n}/24", "dev", dev)
            ns.sh("ip", "link", "set", dev, "up")
            ns.sh("ip", "link", "set", "lo", "up")
        yield a, b


def _settings(etcd: EtcdCluster, root: Path, vtep: str, ttl: int | None) -> Settings:
    """``ttl`` None leaves the lease at the default a user gets without the flag."""
    settings = Settings(
        socket=root / "pd.sock",
        state_dir=root / "state",
        prefix="pk",
        gc_interval=0,
        cluster="etcd://" + ",".join(e.removeprefix("http://") for e in etcd.endpoints),
        advertise_address=vtep,
    )
    return settings if ttl is None else replace(settings, cluster_lease_ttl=ttl)


@pytest.fixture
async def hosts(
    etcd: EtcdCluster,
    underlay: tuple[Netns, Netns],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[Host, Host]]:
    """Two hosts with lease TTL ``TTL``, or what ``indirect`` parametrisation asks (None: the
    default)."""
    ttl = getattr(request, "param", TTL)
    etcdctl(etcd, "del", "--prefix", "/pouch/")
    pair = []
    for ns, n in zip(underlay, (21, 22), strict=True):
        root = tmp_path / str(n)
        root.mkdir()
        pair.append(Host(ns, UNDERLAY % n, root, _settings(etcd, root, UNDERLAY % n, ttl)))
    a, b = pair
    try:
        await a.start()
        await b.start()
        yield a, b
    finally:
        await a.stop()
        await b.stop()
    etcdctl(etcd, "del", "--prefix", "/pouch/")


async def test_containers_on_two_hosts_reach_each_other_in_both_families(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    with ExitStack() as stack:
        for h in (a, b):
            await create_network(h, dual=True)
        ip_a = await run_container(a, stack)
        ip_b = await run_container(b, stack)
        (ca,), (cb,) = a.containers.values(), b.containers.values()
        assert a.d.state.networks[a.network_id].vni == b.d.state.networks[b.network_id].vni
        assert await ping(ca, ip_b) and await ping(cb, ip_a)
        # Each host routes and masquerades its own containers' way out.
        bridge = a.d.state.networks[a.network_id].bridge
        # (in whichever of our chains the firewall layout keeps it)
        assert f"-s 10.61.0.0/16 ! -o {bridge} -j MASQUERADE" in a.ns.iptables_save()
        # ... and by packets: a connection out to the other host's underlay address arrives
        # from this host's own address (B routes 10.61/16 into the overlay, so an unmasqueraded
        # reply would still come back: the source seen is what tells).
        ca.sh("ip", "route", "add", "default", "via", gateway(a))
        assert await source_seen(b.ns, b.vtep, ca) == a.vtep
        six_a, six_b = (
            str(h.d.state.endpoints[next(iter(h.containers))].address_v6.ip)  # type: ignore[union-attr]
            for h in (a, b)
        )
        assert await ping(ca, six_b) and await ping(cb, six_a)
        # The overlay's MTU is the underlay's less 50: a full-size DF packet crosses.
        link = a.ns.link(a.vxlan())
        assert link is not None and link["mtu"] == 1450
        await fits_exactly(ca, ip_b, 1422)


async def test_a_conflicting_definition_is_refused_naming_the_difference(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    await create_network(a)
    before = {link["ifname"] for link in b.ns.ip_json("link", "show")}
    with pytest.raises(Conflict, match=r"subnets: 10\.61\.0\.0/16 in the cluster, 10\.62"):
        await create_network(b, subnet=ipaddress.ip_network("10.62.0.0/16"))
    assert not b.d.state.networks
    assert {link["ifname"] for link in b.ns.ip_json("link", "show")} == before


async def test_a_new_endpoint_is_programmed_and_withdrawn_on_the_other_host(
    hosts: tuple[Host, Host], etcd: EtcdCluster
) -> None:
    a, b = hosts
    with ExitStack() as stack:
        for h in (a, b):
            await create_network(h)
        await run_container(b, stack)
        eid, mac, took = await programmed_on(a, b)
        print(f"\nprogrammed on the other host {took * 1000:.0f} ms after CreateEndpoint")
        await b.d.endpoints.leave(b.network_id, eid)
        await b.d.endpoints.delete_endpoint(b.network_id, eid)
        await eventually(lambda: mac not in a.fdb_macs(), 1.0)
        assert f"/pouch/v1/endpoints/mesh/{eid}" not in etcdctl(
            etcd, "get", "--prefix", "--keys-only", "/pouch/v1/endpoints/"
        )


async def test_addresses_are_unique_across_hosts_under_concurrency(
    hosts: tuple[Host, Host], etcd: EtcdCluster
) -> None:
    a, b = hosts
    for h in (a, b):
        await create_network(h)

    async def many(h: Host) -> list[str]:
        grants = await asyncio.gather(
            *(h.d.addresses.request_address(h.pools[4], None, False) for _ in range(40))
        )
        return [str(g.ip) for g in grants]

    got_a, got_b = await asyncio.gather(many(a), many(b))
    assert len(set(got_a) | set(got_b)) == 80
    blocks = etcdctl(etcd, "get", "--prefix", "/pouch/v1/blocks/mesh/")
    owners = [json.loads(line)["host"] for line in blocks.splitlines() if line.startswith("{")]
    assert set(owners) == {a.vtep, b.vtep}, blocks
    # Released addresses stay unique too: one host frees its own, the other cannot take them.
    for ip in got_a[:10]:
        await a.d.addresses.release_address(a.pools[4], ipaddress.ip_address(ip))
    more_b = await many(b)
    assert not set(more_b) & set(got_a[:10])


async def test_the_same_address_asked_on_both_hosts_at_once_goes_to_exactly_one(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    for h in (a, b):
        await create_network(h)
    want = ipaddress.ip_address("10.61.200.7")
    results = await asyncio.gather(
        *(h.d.addresses.request_address(h.pools[4], want, False) for h in (a, b)),
        return_exceptions=True,
    )
    wins = [r for r in results if not isinstance(r, BaseException)]
    losses = [r for r in results if isinstance(r, BaseException)]
    assert len(wins) == 1 and len(losses) == 1, results
    assert isinstance(losses[0], Conflict) and "10.61.200.7" in str(losses[0])
    # The winner's pin keeps the other host's dynamic allocations off it, and a block claim
    # over it reads the pin: fill the block on the loser and check.
    loser = b if isinstance(results[1], BaseException) else a
    block_addresses = set()
    for _ in range(70):
        g = await loser.d.addresses.request_address(loser.pools[4], None, False)
        block_addresses.add(g.ip)
    assert want not in block_addresses


async def test_an_address_in_another_hosts_block_is_refused_naming_the_host(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    for h in (a, b):
        await create_network(h)
    got = await a.d.addresses.request_address(a.pools[4], None, False)
    neighbour = ipaddress.ip_address(int(got.ip) + 1)
    with pytest.raises(Conflict, match=f"host {a.vtep}"):
        await b.d.addresses.request_address(b.pools[4], neighbour, False)


@pytest.mark.parametrize("hosts", [TTL, None], ids=["ttl2", "default-ttl"], indirect=True)
async def test_a_dead_hosts_entries_are_withdrawn_after_its_lease(
    hosts: tuple[Host, Host], etcd: EtcdCluster, request: pytest.FixtureRequest
) -> None:
    """B's plugin stops without a word (its session task is cancelled, nothing deleted, as
    with kill -9): once B's lease expires, A forgets B's containers and B as a VXLAN peer;
    not before, since B renews every third of the TTL and may be alive behind a slow network.
    Also run with the lease a user gets without ``--cluster-lease-ttl``."""
    a, b = hosts
    asked = request.node.callspec.params["hosts"]
    ttl = Settings().cluster_lease_ttl if asked is None else asked
    cluster = b.d.cluster
    assert cluster is not None and cluster.lease is not None
    granted = json.loads(etcdctl(etcd, "lease", "timetolive", f"{cluster.lease:x}", "-w", "json"))
    assert granted["granted-ttl"] == ttl, granted
    with ExitStack() as stack:
        for h in (a, b):
            await create_network(h)
        await run_container(b, stack)
        _, mac, _ = await programmed_on(a, b)
        assert f"-s {b.vtep}/32 -d {a.vtep}/32 -p udp -m udp --dport 4789 -j RETURN" in (
            a.ns.iptables_save()
        )
        assert cluster._task is not None
        cluster._task.cancel()
        took = await eventually(lambda: mac not in a.fdb_macs(), ttl + 4)
        print(f"\nwithdrawn {took:.1f}s after the host went silent (TTL {ttl}s)")
        # The last renewal was at most ttl/3 before the silence; the lease lives ttl after it.
        assert took >= ttl * 2 / 3 - 0.5, f"withdrawn {took:.1f}s into a {ttl}s lease"
        await eventually(lambda: f"-s {b.vtep}/32" not in a.ns.iptables_save(), 2)
        assert f"-d {a.vtep}/32 -p udp -m udp --dport 4789 -j DROP" in a.ns.iptables_save()


async def test_a_restarted_plugin_rebuilds_its_entries_from_etcd(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    with ExitStack() as stack:
        for h in (a, b):
            await create_network(h)
        ip_b = await run_container(b, stack)
        await run_container(a, stack)
        _, mac, _ = await programmed_on(a, b)
        (ca,) = a.containers.values()
        # A stops; its entries are wiped behind its back; a new A must bring them back.
        await a.stop()
        a.ns.sh("bridge", "fdb", "del", mac, "dev", a.vxlan(), check=False)
        assert mac not in a.fdb_macs()
        await a.start()
        await eventually(lambda: mac in a.fdb_macs(), 2.0)
        assert await ping(ca, ip_b)


async def test_with_etcd_away_traffic_flows_and_new_endpoints_fail_clearly(
    hosts: tuple[Host, Host], etcd: EtcdCluster
) -> None:
    a, b = hosts
    with ExitStack() as stack:
        for h in (a, b):
            await create_network(h)
        ip_b = await run_container(b, stack)
        await run_container(a, stack)
        (ca,) = a.containers.values()
        assert await ping(ca, ip_b)
        for i in range(len(etcd.members)):
            etcd.stop(i)
        try:
            assert await ping(ca, ip_b), "the kernel needs no etcd"
            with pytest.raises(StoreUnavailable, match="cluster store etcd"):
                await run_container(a, stack)
            # Local networks are not affected at all.
            pool = await a.d.addresses.request_pool(
                "PouchLocal", ipaddress.ip_network("10.63.0.0/24"), None, False
            )
            gw = await a.d.addresses.request_address(pool.pool_id, None, True)
            await a.d.networks.create_network(
                "l" * 64, NetworkOptions(), [IPAMData("PouchLocal", pool.network, gw)], []
            )
        finally:
            etcd.heal()
        assert a.d.cluster is not None
        assert await a.d.cluster.wait_connected(15), a.d.cluster.last_error
        ip_a2 = await run_container(a, stack)
        eid = list(a.containers)[-1]
        mac = a.d.state.endpoints[eid].mac
        await eventually(lambda: mac in b.fdb_macs(), 3.0)
        assert ip_a2 != ip_b


async def test_status_check_and_gc_cover_cluster_networks(
    hosts: tuple[Host, Host], etcd: EtcdCluster
) -> None:
    """status shows what this host holds and what etcd says; check finds the kernel out of
    step with etcd and gc repairs it; a dead host's blocks come back only through gc."""
    a, b = hosts
    with ExitStack() as stack:
        for h in (a, b):
            await create_network(h)
        await run_container(a, stack)
        await run_container(b, stack)
        (eid_b,) = b.containers
        mac_b = b.d.state.endpoints[eid_b].mac
        await eventually(lambda: mac_b in a.fdb_macs(), 1.0)
        view = a.d.status().cluster
        assert view is not None and view.connected
        (net,) = view.networks
        assert (net.name, set(net.members), net.remote_endpoints) == (
            "mesh",
            {a.vtep, b.vtep},
            1,
        )
        assert len(net.blocks) == 1 and net.vni is not None
        # The metrics' figures are measured, not placeholders: etcd round trips were made,
        # and B's endpoint reached A through its watch.
        assert 0 < view.store_p50_ms <= view.store_p99_ms < 5000, view
        assert 0 < view.watch_lag_ms < 5000, view
        text = Metrics().render(a.d.status())
        assert 'pouch_driver_cluster_remote_endpoints{network="mesh"} 1' in text
        assert "pouch_driver_cluster_watch_lag_seconds 0.000000" not in text
        assert a.d.cluster is not None
        assert await a.d.cluster.audit(repair=False) == ([], [])
        a.ns.sh("bridge", "fdb", "del", mac_b, "dev", a.vxlan())
        problems, _ = await a.d.cluster.audit(repair=False)
        assert problems == [f"cluster network mesh: endpoint {mac_b} is out of date"]
        _, repaired = await a.d.cluster.audit(repair=True)
        assert repaired and mac_b in a.fdb_macs()
        # B goes silent for good: its lease lapses, its endpoint is withdrawn, but its block
        # stays until gc returns it.
        assert b.d.cluster is not None and b.d.cluster._task is not None
        b.d.cluster._task.cancel()
        await eventually(lambda: mac_b not in a.fdb_macs(), TTL + 4)
        blocks = etcdctl(etcd, "get", "--prefix", "--keys-only", "/pouch/v1/blocks/mesh/")
        assert len(blocks.split()) == 2, "a lapsed lease returns no addresses by itself"
        problems, repaired = await a.d.cluster.audit(repair=True)
        assert any(f"of host {b.vtep}, whose lease is gone" in p for p in problems), problems
        blocks = etcdctl(etcd, "get", "--prefix", "--keys-only", "/pouch/v1/blocks/mesh/")
        assert len(blocks.split()) == 1, blocks


async def test_losing_one_etcd_member_of_three_changes_nothing(
    hosts: tuple[Host, Host], etcd: EtcdCluster
) -> None:
    a, b = hosts
    with ExitStack() as stack:
        for h in (a, b):
            await create_network(h)
        etcd.kill(0)
        ip_a = await run_container(a, stack)
        ip_b = await run_container(b, stack)
        for h, other in ((a, b), (b, a)):
            (eid,) = other.containers
            mac = other.d.state.endpoints[eid].mac
            await eventually(lambda h=h, mac=mac: mac in h.fdb_macs(), 3.0)  # type: ignore[misc]
        (ca,), (cb,) = a.containers.values(), b.containers.values()
        assert await ping(ca, ip_b) and await ping(cb, ip_a)
        assert a.d.cluster is not None and a.d.cluster.connected


async def test_two_cluster_networks_get_distinct_vnis_and_a_race_agrees_on_one(
    hosts: tuple[Host, Host],
) -> None:
    """Both hosts define ``mesh`` at the same instant: one definition, one VNI; a second
    cluster network gets another VNI."""
    a, b = hosts
    await asyncio.gather(create_network(a), create_network(b))
    vni = a.d.state.networks[a.network_id].vni
    assert vni is not None and vni == b.d.state.networks[b.network_id].vni
    first = a.network_id
    await create_network(a, subnet=ipaddress.ip_network("10.62.0.0/16"), name="other")
    assert a.d.state.networks[a.network_id].vni not in (None, vni)
    assert a.d.state.networks[first].vni == vni


async def test_an_internal_cluster_network_has_no_way_out_on_any_host(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    await define(a, internal=True)
    # A host defining it as not internal is refused, naming the difference.
    with pytest.raises(Conflict, match="internal: true in the cluster, false here"):
        await define(b, internal=False)
    await define(b, internal=True)
    with ExitStack() as stack:
        ip_a = await run_container(a, stack)
        ip_b = await run_container(b, stack)
        (ca,), (cb,) = a.containers.values(), b.containers.values()
        assert await ping(ca, ip_b) and await ping(cb, ip_a)
        for h, c, other in ((a, ca, b), (b, cb, a)):
            (eid,) = h.containers
            joined = await h.d.endpoints.join(h.network_id, eid, "/again")
            assert joined.gateway is None and joined.disable_gateway_service
            assert "MASQUERADE" not in h.ns.iptables_save()
            # A container that makes its own way out (a default route through its host's
            # end of the bridge) is still not forwarded anywhere: the other host's underlay
            # address is out of reach. (Its own host is reachable, as from Docker's internal
            # bridge networks: the ``isolated`` gateway mode is what takes that away.)
            c.sh("ip", "route", "add", "default", "via", gateway(h))
            # Forwarding on, as on any Docker host: the firewall must keep it in, not the sysctl.
            h.ns.sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
            assert await ping(c, h.vtep, wait=1), "the control: the route is in place"
            assert not await ping(c, other.vtep, wait=1), f"{other.vtep} reached from {h.vtep}"
            assert await source_seen(other.ns, other.vtep, c) is None


async def test_the_mtu_option_overrides_the_underlays_on_every_host(
    hosts: tuple[Host, Host],
) -> None:
    """``com.docker.network.driver.mtu`` is part of the cluster's definition: every host
    applies it to the VXLAN device and the containers' interfaces, and a host that leaves it
    out is refused."""
    a, b = hosts
    await define(a, mtu=1400)
    with pytest.raises(Conflict, match="mtu: 1400 in the cluster, default here"):
        await define(b)
    await define(b, mtu=1400)
    with ExitStack() as stack:
        await run_container(a, stack)
        ip_b = await run_container(b, stack)
        (ca,) = a.containers.values()
        for h in (a, b):
            link = h.ns.link(h.vxlan())
            assert link is not None and link["mtu"] == 1400
            (c,) = h.containers.values()
            eth0 = c.link("eth0")
            assert eth0 is not None and eth0["mtu"] == 1400
        await fits_exactly(ca, ip_b, 1372)


async def test_names_that_start_alike_get_distinct_vnis_at_once_and_in_turn(
    hosts: tuple[Host, Host], etcd: EtcdCluster
) -> None:
    """The first VNI a network tries comes from the first eight bytes of its name, so these
    names all start on the same one: etcd's put-if-absent on the VNI's key moves all but one
    on, whether two hosts define theirs at the same instant or one after another."""
    a, b = hosts
    await asyncio.gather(
        create_network(a, name="meshmesh-a"),
        create_network(b, subnet=ipaddress.ip_network("10.62.0.0/16"), name="meshmesh-b"),
    )
    first_a, first_b = a.network_id, b.network_id
    await create_network(a, subnet=ipaddress.ip_network("10.63.0.0/16"), name="meshmesh-c")
    vnis = {
        name: h.d.state.networks[nid].vni
        for h, nid, name in (
            (a, first_a, "meshmesh-a"),
            (b, first_b, "meshmesh-b"),
            (a, a.network_id, "meshmesh-c"),
        )
    }
    assert None not in vnis.values() and len(set(vnis.values())) == 3, vnis
    held = etcdctl(etcd, "get", "--prefix", "/pouch/v1/vnis/").splitlines()
    pairs = zip(held[::2], held[1::2], strict=True)
    registry = {int(key.rsplit("/", 1)[1]): value.split()[0] for key, value in pairs}
    assert registry == {vni: name for name, vni in vnis.items()}, registry
    # The other host joining one of them gets that one's VNI.
    await create_network(b, name="meshmesh-a")
    assert b.d.state.networks[b.network_id].vni == vnis["meshmesh-a"]


async def test_an_endpoint_removed_while_etcd_is_away_is_withdrawn_when_it_returns(
    hosts: tuple[Host, Host], etcd: EtcdCluster
) -> None:
    """The engine removes a container while no etcd member answers: the removal succeeds
    locally, and once etcd is back the endpoint's record goes and the other host forgets it;
    its address goes to exactly one new container."""
    a, b = hosts
    with ExitStack() as stack:
        for h in (a, b):
            await create_network(h)
        ip_b = await run_container(b, stack)
        eid, mac, _ = await programmed_on(a, b)
        for i in range(len(etcd.members)):
            etcd.stop(i)
        try:
            await b.d.endpoints.leave(b.network_id, eid)
            await b.d.endpoints.delete_endpoint(b.network_id, eid)
            await b.d.addresses.release_address(b.pools[4], ipaddress.ip_address(ip_b))
            assert mac in a.fdb_macs(), "A cannot have heard of it yet"
        finally:
            etcd.heal()
        took = await eventually(lambda: mac not in a.fdb_macs(), 15.0)
        print(f"\nwithdrawn {took:.1f}s after etcd was healed")
        keys = etcdctl(etcd, "get", "--prefix", "--keys-only", "/pouch/v1/endpoints/")
        assert f"/pouch/v1/endpoints/mesh/{eid}" not in keys
        for h in (a, b):
            assert h.d.cluster is not None
            assert await h.d.cluster.wait_connected(15), h.d.cluster.last_error
        assert await run_container(b, stack, ip_b) == ip_b
        with pytest.raises(Conflict, match=ip_b.replace(".", r"\.")):
            await run_container(a, stack, ip_b)


class _Killed(BaseException):
    """The process ends here: nothing after it runs, no clean-up either."""


async def test_a_plugin_killed_between_its_etcd_pin_and_its_own_record_leaks_nothing(
    hosts: tuple[Host, Host], etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A asks for an address by name outside every block: the pin is written to etcd, then
    the plugin dies before its own store records the address (so the engine never got an
    answer). The pin keeps everyone else off the address while A may still hold it; the
    restarted A, which holds no such address, removes the pin, and the address is free for
    exactly one host again."""
    a, b = hosts
    for h in (a, b):
        await create_network(h)
    want = ipaddress.ip_address("10.61.200.9")
    pin = f"/pouch/v1/pins/mesh/{want}"

    async def dies(*_args: Any, **_kwargs: Any) -> None:
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr("pouch_driver.service.addresses.durably", dies)
        m.setattr("pouch_driver.service.blocks.BlockAllocator.released", dies)
        with pytest.raises(_Killed):
            await a.d.addresses.request_address(a.pools[4], want, False)
    assert pin in etcdctl(etcd, "get", "--prefix", "--keys-only", "/pouch/v1/pins/")
    with pytest.raises(Conflict, match=f"held by host {a.vtep}"):
        await b.d.addresses.request_address(b.pools[4], want, False)
    await a.stop()  # what is on disk is what a process started after kill -9 finds
    await a.start()
    await eventually(
        lambda: pin not in etcdctl(etcd, "get", "--prefix", "--keys-only", "/pouch/v1/pins/"),
        5.0,
    )
    results = await asyncio.gather(
        *(h.d.addresses.request_address(h.pools[4], want, False) for h in (a, b)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1, results


async def test_a_published_port_is_reached_at_its_own_hosts_address(
    hosts: tuple[Host, Host],
) -> None:
    """Published ports are per host: a container on A publishing a port is reached at A's
    address from B's side of the underlay (with B's address as the source: DNAT, no
    masquerade), and B's address does not publish it."""
    a, b = hosts
    with ExitStack() as stack:
        for h in (a, b):
            await create_network(h)
        ip_a = await run_container(a, stack)
        (eid,) = a.containers
        await a.d.ports.program_external_connectivity(
            a.network_id, eid, [PortBinding(Proto.TCP, 4242, 0, 0, None)]
        )
        (bound,) = a.d.state.endpoints[eid].port_bindings
        (ca,) = a.containers.values()
        ca.sh("ip", "route", "add", "default", "via", gateway(a))  # as Join's gateway makes it
        published = (a.vtep, bound.host_port)
        assert await source_seen(ca, ip_a, b.ns, via=published) == b.vtep
        assert await source_seen(ca, ip_a, b.ns, via=(b.vtep, bound.host_port)) is None
