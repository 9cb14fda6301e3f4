"""Cluster networks across two "hosts": the data plane against a hand-made VXLAN floor, and the
control plane's own costs, in one run.

* **floor**: two host namespaces on a veth underlay (MTU 1500), each with a bridge, a VXLAN
  device (learning off) and one container namespace; static forwarding entries and static ARP
  in the containers, made with ``ip``/``bridge``: the least any VXLAN overlay does per packet.
* **pouch**: the same two hosts built by pouch-driver itself (the whole driver as the daemon
  builds it, kernel adapters bound to each namespace, a real three-member etcd): the bridge,
  the VXLAN port, the entries from the watch, the firewall (VXLAN filter, forward chains).

Measured per setup, alternating: one TCP stream container to container across the hosts
(iperf3, 4 s), and the round trip (60 pings). For pouch also: how long after a Join is
answered on one host the other host's kernel forwards to the new container (polled with
netlink at 1 ms, not through our code), and the latency of address allocation on a cluster
pool (blocks) against a local pool. Docker's Swarm overlay and the engine-driven costs
(``docker network connect`` / ``docker run`` on a cluster network) are ``bench.multihost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from pouch_driver.config import Settings
from pouch_driver.daemon import build_driver
from pouch_driver.model import IPAMData, IPNetwork, NetworkOptions
from pouch_driver.service.driver import Driver
from pouch_driver.service.reconcile import start_up
from tests.etcd_members import member_argv

from .common import Record, log, netns, ratio, run, summary

SUBNET = ipaddress.ip_network("10.71.0.0/16")
UNDERLAY = "198.51.100.%d"
ETCD_PORT = 23830  # clients 23830-2, peers 23840-2: apart from the test suites' ports


def _sh(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("nsenter", f"--net=/run/netns/{ns}", *argv, check=check)


# --- etcd ------------------------------------------------------------------------------------
@contextlib.contextmanager
def etcd_cluster() -> Iterator[str]:
    """Three members on loopback; yields the ``--cluster`` value."""
    root = Path(tempfile.mkdtemp(prefix="pdb-etcd-", dir="/tmp"))
    procs = []
    token = f"pdb-{os.getpid()}-{time.time_ns()}"
    try:
        for i in range(3):
            argv = member_argv(
                f"pdb{i}",
                root / str(i),
                clients=[f"http://127.0.0.1:{ETCD_PORT + i}"],
                peer=f"http://127.0.0.1:{ETCD_PORT + 10 + i}",
                cluster=[(f"pdb{j}", f"http://127.0.0.1:{ETCD_PORT + 10 + j}") for j in range(3)],
                token=token,
                log_level="error",
            )
            with open(root / f"{i}.log", "wb") as out:
                procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
        endpoints = ",".join(f"127.0.0.1:{ETCD_PORT + i}" for i in range(3))
        give_up = time.monotonic() + 30
        while True:
            health = run("etcdctl", f"--endpoints={endpoints}", "endpoint", "health", check=False)
            if health.returncode == 0:
                break
            if time.monotonic() > give_up:
                raise RuntimeError(f"etcd did not start: {health.stderr}")
            time.sleep(0.2)
        yield f"etcd://{endpoints}"
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


# --- the two hosts -----------------------------------------------------------------------------
def underlay(a: str, b: str) -> None:
    _sh(a, "ip", "link", "add", "pbua", "type", "veth", "peer", "name", "pbub", "netns", b)
    for ns, dev, n in ((a, "pbua", 31), (b, "pbub", 32)):
        _sh(ns, "ip", "addr", "add", f"{UNDERLAY % n}/24", "dev", dev)
        _sh(ns, "ip", "link", "set", dev, "up")
        _sh(ns, "ip", "link", "set", "lo", "up")


def floor(stack: ExitStack) -> tuple[str, str, str, tuple[str, str]]:
    """Hand-made VXLAN with static entries; returns (client ns, server ns, server IP, the
    host namespaces)."""
    a, b = stack.enter_context(netns()), stack.enter_context(netns())
    underlay(a, b)
    macs = {a: "02:71:00:00:00:0b", b: "02:71:00:00:00:0c"}
    ips = {a: "10.71.0.11", b: "10.71.0.12"}
    conts = {}
    for ns, n, other in ((a, 31, b), (b, 32, a)):
        c = stack.enter_context(netns())
        conts[ns] = c
        _sh(ns, "ip", "link", "add", "pbbr", "type", "bridge")
        _sh(ns, "ip", "addr", "add", "10.71.0.1/16", "dev", "pbbr")
        _sh(ns, "ip", "link", "set", "pbbr", "up")
        _sh(ns, "ip", "link", "add", "pbvx", "type", "vxlan", "id", "100", "local",
            UNDERLAY % n, "dev", "pbu" + ("a" if ns == a else "b"), "dstport", "4789",
            "nolearning")  # fmt: skip
        _sh(ns, "ip", "link", "set", "pbvx", "master", "pbbr", "up")
        _sh(ns, "ip", "link", "add", "pbh", "mtu", "1450", "type", "veth", "peer", "name",
            "eth0", "mtu", "1450", "netns", c)  # fmt: skip
        _sh(ns, "ip", "link", "set", "pbh", "master", "pbbr", "up")
        _sh(c, "ip", "link", "set", "eth0", "address", macs[ns])
        _sh(c, "ip", "addr", "add", f"{ips[ns]}/16", "dev", "eth0")
        _sh(c, "ip", "link", "set", "eth0", "up")
        _sh(c, "ip", "link", "set", "lo", "up")
        peer = 32 if n == 31 else 31
        _sh(ns, "bridge", "fdb", "add", macs[other], "dev", "pbvx", "dst", UNDERLAY % peer)
        _sh(c, "ip", "neigh", "add", ips[other], "lladdr", macs[other], "dev", "eth0")
    return conts[a], conts[b], ips[b], (a, b)


class Host:
    def __init__(self, ns: str, vtep: str, cluster: str, root: Path) -> None:
        self.ns = ns
        self.vtep = vtep
        self.settings = Settings(
            socket=root / "p.sock",
            state_dir=root / "state",
            prefix="pb",
            gc_interval=0,
            cluster=cluster,
            advertise_address=vtep,
            cluster_lease_ttl=10,
        )
        self.driver: Driver | None = None
        self.network_id = secrets.token_hex(32)
        self.pools: dict[str, str] = {}

    @property
    def d(self) -> Driver:
        assert self.driver is not None
        return self.driver

    async def start(self) -> None:
        self.driver = build_driver(self.settings, netns=self.ns)
        await start_up(self.driver)
        assert self.driver.cluster is not None
        await self.driver.cluster.start()
        assert await self.driver.cluster.wait_connected(10), self.driver.cluster.last_error

    async def network(self, name: str, subnet: IPNetwork, cluster: bool) -> str:
        pool = await self.d.addresses.request_pool("PouchLocal", subnet, None, False)
        gw = await self.d.addresses.request_address(pool.pool_id, None, True)
        nid = secrets.token_hex(32)
        self.pools[nid] = pool.pool_id
        opts = NetworkOptions(cluster=name if cluster else None)
        await self.d.networks.create_network(nid, opts, [IPAMData("PouchLocal", subnet, gw)], [])
        return nid

    async def container(self, nid: str, stack: ExitStack) -> tuple[str, str, str]:
        """(container namespace, IPv4 address, MAC) of a new joined endpoint."""
        addr = await self.d.addresses.request_address(self.pools[nid], None, False)
        eid = secrets.token_hex(32)
        await self.d.endpoints.create_endpoint(nid, eid, addr, None, None)  # type: ignore[arg-type]
        await self.d.endpoints.join(nid, eid, f"/var/run/docker/netns/{eid[:12]}")
        ep = self.d.state.endpoints[eid]
        c = stack.enter_context(netns())
        _sh(self.ns, "ip", "link", "set", ep.container_ifname, "netns", c)
        _sh(c, "ip", "link", "set", ep.container_ifname, "name", "eth0")
        _sh(c, "ip", "addr", "add", str(addr), "dev", "eth0")
        _sh(c, "ip", "link", "set", "eth0", "up")
        _sh(c, "ip", "link", "set", "lo", "up")
        return c, str(addr.ip), ep.mac


# --- measurements ---------------------------------------------------------------------------
def tcp_stream(client: list[str], server: list[str], ip: str, seconds: int) -> float:
    """Gbit/s of one TCP stream (iperf3) between two network namespaces, each given as the
    argv prefix that enters it (``nsenter --net=...``)."""
    srv = subprocess.Popen(
        [*server, "iperf3", "-s", "-1", "-B", ip],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        give_up = time.monotonic() + 30  # the server may be slow to listen on a busy host
        while time.monotonic() < give_up:
            out = run(*client, "iperf3", "-c", ip, "-t", str(seconds), "-J", check=False)
            received = json.loads(out.stdout or "{}").get("end", {}).get("sum_received")
            if out.returncode == 0 and received:
                return float(received["bits_per_second"]) / 1e9
            time.sleep(0.1)
        raise RuntimeError(f"iperf3 failed: {out.stdout[-400:]}")
    finally:
        srv.kill()
        srv.wait()


def ping_rtt_ms(client: list[str], ip: str, count: int = 60) -> float:
    """Mean round trip of ``count`` back-to-back pings from the namespace ``client`` enters."""
    out = run(*client, "busybox", "ping", "-c", str(count), "-A", "-q", ip).stdout
    # round-trip min/avg/max = 0.046/0.063/0.102 ms
    return float(out.strip().splitlines()[-1].split("=")[1].split("/")[1])


def need_iperf3() -> None:
    if shutil.which("iperf3") is None:
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "iperf3"],
            check=True,
            capture_output=True,
            timeout=300,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )


def _enter(ns: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}"]


def throughput(client: str, server: str, ip: str, seconds: int) -> float:
    return tcp_stream(_enter(client), _enter(server), ip, seconds)


def rtt_ms(client: str, ip: str) -> float:
    return ping_rtt_ms(_enter(client), ip)


class FdbWatcher:
    """Polls one namespace's forwarding table on a thread of its own, with one netlink socket
    opened beforehand (opening one in a namespace costs milliseconds)."""

    def __init__(self, ns: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._ipr: Any = self._pool.submit(IPRoute, netns=ns).result()

    def _poll(self, mac: str, since: float, limit: float) -> float | None:
        while time.monotonic() - since < limit:
            for msg in self._ipr.fdb("dump"):
                if msg.get_attr("NDA_LLADDR") == mac and msg.get_attr("NDA_DST"):
                    return time.monotonic() - since
            time.sleep(0.0005)
        return None

    async def seen(self, mac: str, since: float, limit: float) -> float | None:
        """Seconds from ``since`` until ``mac`` has a VXLAN forwarding entry."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._poll, mac, since, limit)

    def close(self) -> None:
        self._pool.submit(self._ipr.close).result()
        self._pool.shutdown()


async def control_plane(a: Host, b: Host, nid_b: str, n: int) -> dict[str, Any]:
    """Join answered on B → A's kernel forwards to the new container, n times."""
    lags: list[float] = []
    watcher = FdbWatcher(a.ns)
    try:
        for _ in range(n):
            addr = await b.d.addresses.request_address(b.pools[nid_b], None, False)
            eid = secrets.token_hex(32)
            mac = await b.d.endpoints.create_endpoint(nid_b, eid, addr, None, None)  # type: ignore[arg-type]
            await b.d.endpoints.join(nid_b, eid, "/x")
            answered = time.monotonic()
            assert mac is not None
            seen = await watcher.seen(mac, answered, 2.0)
            lags.append(seen if seen is not None else 2.0)
    finally:
        watcher.close()
    return summary(lags)


async def allocation(h: Host, nid_cluster: str, nid_local: str, n: int) -> dict[str, Any]:
    out = {}
    for label, nid in (("cluster", nid_cluster), ("local", nid_local)):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await h.d.addresses.request_address(h.pools[nid], None, False)
            times.append(time.perf_counter() - t0)
        out[label] = summary(times) | {"p99": sorted(times)[int(0.99 * (n - 1))] * 1000}
    return out


async def _pouch(
    stack: ExitStack, cluster: str, rounds: int, seconds: int, *, lag_n: int, alloc_n: int
) -> dict[str, Any]:
    a_ns, b_ns = stack.enter_context(netns()), stack.enter_context(netns())
    underlay(a_ns, b_ns)
    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pdb-", dir="/tmp")))
    (root / "a").mkdir()
    (root / "b").mkdir()
    a = Host(a_ns, UNDERLAY % 31, cluster, root / "a")
    b = Host(b_ns, UNDERLAY % 32, cluster, root / "b")
    await a.start()
    await b.start()
    try:
        nid_a = await a.network("benchmesh", SUBNET, True)
        nid_b = await b.network("benchmesh", SUBNET, True)
        ca, _, _ = await a.container(nid_a, stack)
        cb, ip_b, _ = await b.container(nid_b, stack)
        give_up = time.monotonic() + 5
        # On a thread: the hosts' loops must run meanwhile (A learns of B's container from its
        # etcd watch); a ping run on the loop itself would keep them waiting.
        ping = ("busybox", "ping", "-c", "1", "-W", "1", ip_b)
        while (await asyncio.to_thread(_sh, ca, *ping, check=False)).returncode != 0:
            assert time.monotonic() < give_up, "pouch: containers do not reach each other"
        gbits = [await asyncio.to_thread(throughput, ca, cb, ip_b, seconds) for _ in range(rounds)]
        rtts = [await asyncio.to_thread(rtt_ms, ca, ip_b) for _ in range(rounds)]
        lag = await control_plane(a, b, nid_b, lag_n)
        nid_local = await a.network("", ipaddress.ip_network("10.72.0.0/16"), False)
        alloc = await allocation(a, nid_a, nid_local, alloc_n)
        return {"gbits": gbits, "rtt_ms": rtts, "reachable_after_join": lag, "allocation": alloc}
    finally:
        await a.d.stop()
        await b.d.stop()


def run_cluster(rec: Record, *, quick: bool) -> None:
    rounds, seconds, lag_n, alloc_n = (1, 2, 10, 100) if quick else (3, 4, 40, 400)
    need_iperf3()
    log(f"cluster: floor VXLAN vs pouch across two hosts, {rounds} rounds of {seconds}s")
    floor_gbits, floor_rtt, tracked_gbits = [], [], []
    with etcd_cluster() as cluster, ExitStack() as stack:
        client, server, ip, hosts = floor(stack)
        for _ in range(rounds):
            floor_gbits.append(throughput(client, server, ip, seconds))
            floor_rtt.append(rtt_ms(client, ip))
        # The same floor on a Docker host: Docker's FORWARD rules track connections, so the
        # bridged packets are tracked there whatever the overlay.
        for ns in hosts:
            _sh(ns, "iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate",
                "RELATED,ESTABLISHED", "-j", "ACCEPT")  # fmt: skip
        for _ in range(rounds):
            tracked_gbits.append(throughput(client, server, ip, seconds))
        with ExitStack() as pstack:
            pouch = asyncio.run(
                _pouch(pstack, cluster, rounds, seconds, lag_n=lag_n, alloc_n=alloc_n)
            )
    fg, pg = statistics.median(floor_gbits), statistics.median(pouch["gbits"])
    tg = statistics.median(tracked_gbits)
    fr, pr = statistics.median(floor_rtt), statistics.median(pouch["rtt_ms"])
    lag = pouch["reachable_after_join"]
    alloc = pouch["allocation"]
    data = {
        "floor": {"gbits": floor_gbits, "rtt_ms": floor_rtt},
        "floor_tracked": {"gbits": tracked_gbits},
        "pouch": pouch,
        "throughput_ratio": ratio(pg, fg),
        "throughput_ratio_tracked_floor": ratio(pg, tg),
        "rtt_ratio": ratio(pr, fr),
    }
    rec.put(
        "cluster",
        data,
        f"cluster: one TCP stream across hosts {pg:.2f} Gbit/s vs hand-made VXLAN {fg:.2f} "
        f"({ratio(pg, fg):.2f}x; {ratio(pg, tg):.2f}x the floor on a conntracking host, "
        f"{tg:.2f}); RTT {pr:.3f} vs {fr:.3f} ms; reachable from the other host "
        f"{lag['median']:.1f} ms after Join (p90 {lag['p90']:.1f}, max {lag['max']:.1f}); "
        f"allocation p50/p99 cluster {alloc['cluster']['median']:.2f}/"
        f"{alloc['cluster']['p99']:.2f} ms, local {alloc['local']['median']:.2f}/"
        f"{alloc['local']['p99']:.2f} ms",
    )
