"""The plugin's own work per endpoint over its socket, against the kernel floor (pyroute2).

One daemon runs in a throwaway namespace (log level info, firewall on, store fsynced as in
production). A lifecycle is what the engine sends for one container on one network:
RequestAddress, CreateEndpoint, Join, Leave, DeleteEndpoint, ReleaseAddress. The floor is
pyroute2 doing the same kernel work directly in the same namespace: one RTM_NEWLINK making
the veth pair on a bridge, up, with the peer's MAC (what the plugin sends), then its delete.

The plugin answers DeleteEndpoint before the veth is deleted (deferred off the request path),
so two numbers are reported: the latency the engine sees, and the total time of N lifecycles
until every veth is really gone. Rounds of plugin and floor alternate, in the same run.
Also here: IPAM over the socket (a /8 pool and its first address; 1,000 addresses).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from tests.e2e.harness import check_no_overlap

from .common import (
    PLUGIN_PREFIX,
    Daemon,
    PluginClient,
    Record,
    log,
    netns,
    ratio,
    schedstat,
    summary,
    workdir,
)

CALLS = ("RequestAddress", "CreateEndpoint", "Join", "Leave", "DeleteEndpoint", "ReleaseAddress")
SUBNET = "10.77.0.0/16"
SPACE = "PouchLocal"
POOL_ID = f"{SPACE}/{SUBNET}"
NID = hashlib.sha256(b"pouch-bench-net").hexdigest()
FLOOR_BRIDGE = "flbr0"


def eid(tag: str, i: int) -> str:
    return hashlib.sha256(f"{tag}-{i}".encode()).hexdigest()


def create_network(c: PluginClient, subnet: str, nid: str) -> None:
    """What the engine sends for ``docker network create -d pouch --ipam-driver pouch``
    with one IPv4 subnet: its pool, its gateway, the network."""
    c.call(
        "IpamDriver.RequestPool",
        {"AddressSpace": SPACE, "Pool": subnet, "SubPool": "", "Options": {}, "V6": False},
    )
    gw = c.call(
        "IpamDriver.RequestAddress",
        {
            "PoolID": f"{SPACE}/{subnet}",
            "Address": "",
            "Options": {"RequestAddressType": "com.docker.network.gateway"},
        },
    )
    c.call(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": nid,
            "Options": {"com.docker.network.generic": {}},
            "IPv4Data": [{"AddressSpace": SPACE, "Pool": subnet, "Gateway": gw["Address"]}],
            "IPv6Data": [],
        },
    )


def setup_network(c: PluginClient) -> None:
    create_network(c, SUBNET, NID)


def lifecycle(c: PluginClient, endpoint_id: str, times: dict[str, list[float]]) -> None:
    """The six calls of one container's endpoint, timed one by one."""
    t, doc = c.timed(
        "IpamDriver.RequestAddress", {"PoolID": POOL_ID, "Address": "", "Options": None}
    )
    times["RequestAddress"].append(t)
    addr = doc["Address"]
    ep = {"NetworkID": NID, "EndpointID": endpoint_id}
    t, _ = c.timed(
        "NetworkDriver.CreateEndpoint",
        {**ep, "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""}, "Options": {}},
    )
    times["CreateEndpoint"].append(t)
    t, _ = c.timed(
        "NetworkDriver.Join",
        {**ep, "SandboxKey": f"/var/run/docker/netns/{endpoint_id[:12]}", "Options": {}},
    )
    times["Join"].append(t)
    t, _ = c.timed("NetworkDriver.Leave", ep)
    times["Leave"].append(t)
    t, _ = c.timed("NetworkDriver.DeleteEndpoint", ep)
    times["DeleteEndpoint"].append(t)
    t, _ = c.timed("IpamDriver.ReleaseAddress", {"PoolID": POOL_ID, "Address": addr.split("/")[0]})
    times["ReleaseAddress"].append(t)


def _ours(ipr: Any, prefixes: tuple[str, ...]) -> int:
    return sum(1 for m in ipr.link("dump") if m.get_attr("IFLA_IFNAME").startswith(prefixes))


def wait_gone(ipr: Any, prefixes: tuple[str, ...], timeout: float = 60.0) -> float:
    """Poll (every 5 ms) until no interface with these prefixes is left; return the time."""
    deadline = time.perf_counter() + timeout
    while _ours(ipr, prefixes):
        if time.perf_counter() > deadline:
            raise RuntimeError(f"interfaces {prefixes} still present after {timeout}s")
        time.sleep(0.005)
    return time.perf_counter()


def plugin_round(
    c: PluginClient, ipr: Any, tag: str, n: int, *, times: dict[str, list[float]], threads: int = 1
) -> dict[str, float]:
    """n lifecycles (split over ``threads`` clients); time answered and time drained."""
    prefixes = (f"{PLUGIN_PREFIX}h", f"{PLUGIN_PREFIX}c")
    t0 = time.perf_counter()
    if threads == 1:
        for i in range(n):
            lifecycle(c, eid(tag, i), times)
    else:
        sock = c.conn._path
        per = n // threads

        def worker(k: int) -> None:
            own = PluginClient(sock)
            local: dict[str, list[float]] = {name: [] for name in CALLS}
            for i in range(per):
                lifecycle(own, eid(f"{tag}-{k}", i), local)
            own.close()
            with lock:
                for name, v in local.items():
                    times[name].extend(v)

        lock = threading.Lock()
        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        n = per * threads
    t_answered = time.perf_counter()
    t_drained = wait_gone(ipr, prefixes)
    return {"n": n, "answered_s": t_answered - t0, "drained_s": t_drained - t0}


class Deleter:
    """Deferred deletes for the floor: worker threads with one IPRoute each, as the plugin."""

    def __init__(self, netns_name: str, workers: int = 4) -> None:
        self.netns = netns_name
        self.jobs: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        ipr = IPRoute(netns=self.netns)
        try:
            while (name := self.jobs.get()) is not None:
                ipr.link("del", ifname=name)
        finally:
            ipr.close()

    def finish(self) -> float:
        """Wait for every queued delete; return the time they were all done."""
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()
        return time.perf_counter()


def floor_round(
    netns_name: str,
    tag: str,
    n: int,
    *,
    create: list[float],
    delete: list[float],
    threads: int = 1,
    deferred: bool = False,
) -> dict[str, float]:
    """The same kernel work straight through pyroute2: veth on the bridge, up; delete.

    ``deferred``: deletes go to 4 worker threads (the plugin's strategy) instead of inline;
    then ``answered_s`` is when the last create returned and ``drained_s`` when the last
    delete did.
    """
    deleter = Deleter(netns_name) if deferred else None

    def worker(k: int, count: int, out_c: list[float], out_d: list[float]) -> None:
        ipr = IPRoute(netns=netns_name)
        try:
            master = ipr.link_lookup(ifname=FLOOR_BRIDGE)[0]
            for i in range(count):
                host, peer = f"flh{tag}{k}x{i}", f"flc{tag}{k}x{i}"
                t_a = time.perf_counter()
                ipr.link(
                    "add",
                    ifname=host,
                    kind="veth",
                    master=master,
                    state="up",
                    peer={"ifname": peer, "address": f"02:50:0a:4d:{k:02x}:{i % 256:02x}"},
                )
                t_b = time.perf_counter()
                out_c.append(t_b - t_a)
                if deleter is not None:
                    deleter.jobs.put(host)
                    continue
                ipr.link("del", ifname=host)
                out_d.append(time.perf_counter() - t_b)
        finally:
            ipr.close()

    t0 = time.perf_counter()
    if threads == 1:
        worker(0, n, create, delete)
    else:
        per = n // threads
        outs: list[tuple[list[float], list[float]]] = [([], []) for _ in range(threads)]
        ts = [threading.Thread(target=worker, args=(k, per, *outs[k])) for k in range(threads)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        for oc, od in outs:
            create.extend(oc)
            delete.extend(od)
        n = per * threads
    t_answered = time.perf_counter()
    t_drained = deleter.finish() if deleter is not None else t_answered
    return {"n": n, "answered_s": t_answered - t0, "drained_s": t_drained - t0}


def _per(rounds: list[dict[str, float]], key: str) -> float:
    """Seconds per lifecycle over all rounds."""
    return sum(r[key] for r in rounds) / sum(r["n"] for r in rounds)


def _ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


def endpoint_lifecycles(rec: Record, ns: str, d: Daemon, rounds: int, per_round: int) -> None:
    c = PluginClient(d.socket)
    setup_network(c)
    ipr = IPRoute(netns=ns)
    try:
        ipr.link("add", ifname=FLOOR_BRIDGE, kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname=FLOOR_BRIDGE)[0], state="up")
        warm: dict[str, list[float]] = {name: [] for name in CALLS}
        plugin_round(c, ipr, "warm", 20, times=warm)
        floor_round(ns, "w", 20, create=[], delete=[])
        floor_round(ns, "v", 20, create=[], delete=[], deferred=True)
        for threads in (1, 4):
            _lifecycles(rec, ns, d, c, ipr, rounds=rounds, per_round=per_round, threads=threads)
        ipr.link("del", ifname=FLOOR_BRIDGE)
    finally:
        ipr.close()
        c.close()


def _lifecycles(
    rec: Record,
    ns: str,
    d: Daemon,
    c: PluginClient,
    ipr: Any,
    *,
    rounds: int,
    per_round: int,
    threads: int,
) -> None:
    """Rounds of plugin, floor (inline delete), floor (deferred delete), interleaved."""
    kind = "sequential" if threads == 1 else f"{threads} concurrent clients"
    times: dict[str, list[float]] = {name: [] for name in CALLS}
    sc: list[float] = []
    sd: list[float] = []
    dc: list[float] = []
    p_r, s_r, d_r = [], [], []
    log_mark = d.log_path.stat().st_size
    tag = "s" if threads == 1 else "c"
    cpu = [0, 0, 0, 0]  # the daemon's on-CPU and run-queue ns (all threads; main thread)
    client_cpu = floor_cpu = 0.0  # this process (all threads, ended ones included)
    for r in range(rounds):
        before, mine = schedstat(d.pid), time.process_time()
        p_r.append(plugin_round(c, ipr, f"{tag}p{r}", per_round, times=times, threads=threads))
        after, mine2 = schedstat(d.pid), time.process_time()
        cpu = [x + b - a for x, a, b in zip(cpu, before, after, strict=True)]
        client_cpu += mine2 - mine
        s_r.append(floor_round(ns, f"{tag}{r}i", per_round, create=sc, delete=sd, threads=threads))
        d_r.append(
            floor_round(
                ns, f"{tag}{r}d", per_round, create=dc, delete=[], threads=threads, deferred=True
            )
        )
        floor_cpu += time.process_time() - mine2
    per_call = {name: summary(v) for name, v in times.items()}
    server = d.server_times(log_mark)
    server_side = {name: summary(server.get(name, [])) for name in CALLS}
    n = sum(x["n"] for x in p_r)
    p_ans, p_dr = _per(p_r, "answered_s"), _per(p_r, "drained_s")
    f_inline = _per(s_r, "drained_s")
    f_ans, f_dr = _per(d_r, "answered_s"), _per(d_r, "drained_s")
    data = {
        "clients": threads,
        "lifecycles": n,
        "rounds": rounds,
        "per_call_ms": per_call,
        "server_side_ms": server_side,
        "transport_and_client_ms": {
            name: per_call[name]["median"] - server_side[name].get("median", float("nan"))
            for name in CALLS
        },
        "lifecycle_sum_of_medians_ms": sum(per_call[name]["median"] for name in CALLS),
        "plugin_ms_per_lifecycle_answered": p_ans * 1000,
        "plugin_ms_per_lifecycle_until_drained": p_dr * 1000,
        "floor_inline_ms_per_lifecycle": f_inline * 1000,
        "floor_inline_create_ms": summary(sc),
        "floor_inline_delete_ms": summary(sd),
        "floor_deferred_ms_per_lifecycle_answered": f_ans * 1000,
        "floor_deferred_ms_per_lifecycle_until_drained": f_dr * 1000,
        "floor_deferred_create_ms": summary(dc),
        "ratio_answered_vs_floor_deferred_answered": ratio(p_ans, f_ans),
        "ratio_drained_vs_floor_deferred_drained": ratio(p_dr, f_dr),
        "ratio_drained_vs_floor_inline": ratio(p_dr, f_inline),
        "plugin_cpu_ms_per_lifecycle": {
            "daemon_all_threads": cpu[0] / n / 1e6,
            "daemon_event_loop_thread": cpu[2] / n / 1e6,
            "daemon_runqueue_wait": cpu[1] / n / 1e6,
            "daemon_event_loop_runqueue_wait": cpu[3] / n / 1e6,
            "client_incl_drain_polling": client_cpu / n * 1000,
        },
        # Both floor variants ran 2n lifecycles in this process (pyroute2 + syscalls).
        "floor_cpu_ms_per_lifecycle": floor_cpu / (2 * n) * 1000,
        "plugin_lifecycles_per_s_until_drained": 1 / p_dr,
        "floor_deferred_lifecycles_per_s": 1 / f_dr,
        "rounds_detail": {"plugin": p_r, "floor_inline": s_r, "floor_deferred": d_r},
    }
    key = "endpoint_sequential" if threads == 1 else "endpoint_concurrent"
    rec.put(
        key,
        data,
        f"per endpoint ({kind}, {n} lifecycles): plugin {_ms(p_ans)}/lifecycle answered ("
        + ", ".join(f"{name} {per_call[name]['median']:.2f}" for name in CALLS)
        + f" ms medians), {_ms(p_dr)} until veths gone | kernel floor: inline delete "
        f"{_ms(f_inline)}, deferred delete {_ms(f_ans)} answered / {_ms(f_dr)} drained | "
        f"plugin/floor: answered {ratio(p_ans, f_ans):.2f}x, drained {ratio(p_dr, f_dr):.2f}x"
        f" (vs inline floor {ratio(p_dr, f_inline):.2f}x) | CPU/lifecycle: daemon "
        f"{cpu[0] / n / 1e6:.2f} ms (event loop {cpu[2] / n / 1e6:.2f}), floor "
        f"{floor_cpu / (2 * n) * 1000:.2f} ms; daemon run-queue wait "
        f"{cpu[1] / n / 1e6:.2f} ms",
    )


def ipam_over_socket(rec: Record, d: Daemon, repeats: int = 20, allocs: int = 1000) -> None:
    """RequestPool of a /8 + first RequestAddress over the socket; then 1,000 addresses."""
    c = PluginClient(d.socket)
    try:
        out: dict[str, Any] = {}
        for pool in ("10.0.0.0/8", "10.0.0.0/24"):
            tp, ta = [], []
            for _ in range(repeats):
                t, doc = c.timed(
                    "IpamDriver.RequestPool",
                    {
                        "AddressSpace": "PouchGlobal",
                        "Pool": pool,
                        "SubPool": "",
                        "Options": {},
                        "V6": False,
                    },
                )
                tp.append(t)
                t, got = c.timed(
                    "IpamDriver.RequestAddress",
                    {"PoolID": doc["PoolID"], "Address": "", "Options": None},
                )
                ta.append(t)
                c.call(
                    "IpamDriver.ReleaseAddress",
                    {"PoolID": doc["PoolID"], "Address": got["Address"].split("/")[0]},
                )
                c.call("IpamDriver.ReleasePool", {"PoolID": doc["PoolID"]})
            out[pool] = {"request_pool_ms": summary(tp), "first_request_address_ms": summary(ta)}
        doc = c.call(
            "IpamDriver.RequestPool",
            {
                "AddressSpace": "PouchGlobal",
                "Pool": "10.0.0.0/8",
                "SubPool": "",
                "Options": {},
                "V6": False,
            },
        )
        rss0 = d.rss_kib()
        ts = []
        for _ in range(allocs):
            t, _ = c.timed(
                "IpamDriver.RequestAddress",
                {"PoolID": doc["PoolID"], "Address": "", "Options": None},
            )
            ts.append(t)
        rss1 = d.rss_kib()
        c.call("IpamDriver.ReleasePool", {"PoolID": doc["PoolID"]})
        out["allocations"] = {
            "n": allocs,
            "request_address_ms": summary(ts),
            "last_100_ms": summary(ts[-100:]),
            "rss_kib_before": rss0,
            "rss_kib_after": rss1,
        }
        s8 = out["10.0.0.0/8"]
        s24 = out["10.0.0.0/24"]
        rec.put(
            "ipam_socket",
            out,
            f"IPAM over the socket: RequestPool /8 {s8['request_pool_ms']['median']:.2f} ms "
            f"+ first RequestAddress {s8['first_request_address_ms']['median']:.2f} ms "
            f"(/24: {s24['request_pool_ms']['median']:.2f} + "
            f"{s24['first_request_address_ms']['median']:.2f} ms, ratio /8:/24 "
            f"{ratio(s8['request_pool_ms']['median'], s24['request_pool_ms']['median']):.2f})"
            f"; {allocs} addresses in the /8: median "
            f"{out['allocations']['request_address_ms']['median']:.2f} ms, last 100 "
            f"{out['allocations']['last_100_ms']['median']:.2f} ms, RSS +{rss1 - rss0} KiB",
        )
    finally:
        c.close()


def run_all(rec: Record, *, src: Path | None = None, rounds: int = 4, per_round: int = 50) -> None:
    check_no_overlap(SUBNET, "10.0.0.0/8")
    with netns() as ns, workdir() as base:
        d = Daemon(ns, base, src=src)
        t = d.start()
        log(f"plugin up in {ns} after {t * 1000:.0f} ms (pid {d.pid})")
        try:
            rss_start = d.rss_kib()
            ipam_over_socket(rec, d)
            endpoint_lifecycles(rec, ns, d, rounds, per_round)
            rec.results.setdefault("plugin_rss_kib", {})["after_endpoint_benchmarks"] = d.rss_kib()
            rec.results["plugin_rss_kib"]["at_start_of_endpoint_benchmarks"] = rss_start
        finally:
            d.stop()
