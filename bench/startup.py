"""Start-up with 2,000 endpoints in the store, and the daemon's idle resident memory.

The store is written through ``pouch_driver.store.Store`` (4 networks x 500 joined endpoints,
their addresses allocated), and the kernel side is built to match with pyroute2 in a
throwaway namespace: 4 bridges with their gateway addresses, 2,000 veth pairs on them, up.
Start-up reconciles the kernel against the store, so three cases are measured:

* ``empty``: no state at all (the baseline: interpreter, imports, an empty store);
* ``2000``: store and kernel agree (a plugin restart on a busy host): 2,000 host-side veths
  on 4 bridges in the plugin's namespace, their peers in a second "sandbox" namespace;
* ``2000_veths_missing``: the same store in a fresh namespace with nothing in it (a host
  reboot): start-up rebuilds the 4 bridges and forgets the 2,000 endpoints, whose veths
  are gone, releasing their addresses.

Each time is from process start (``Popen``) to the first answered request, median of
``restarts`` restarts after one untimed first start (which writes the firewall chains).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from pouch_driver import store as st
from pouch_driver.model import (
    LOCAL_ADDRESS_SPACE,
    Endpoint,
    IPAMData,
    Network,
    NetworkOptions,
    Pool,
)
from pouch_driver.naming import Names, endpoint_mac
from tests.e2e.harness import check_no_overlap

from .common import (
    PLUGIN_PREFIX,
    ROOT,
    Daemon,
    PluginClient,
    Record,
    log,
    netns,
    schedstat,
    workdir,
)

NETWORKS = 4
IDLE_SECONDS = 3.0


def _subnet(k: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.{91 + k}.0.0/16")


def build_state(n_endpoints: int) -> tuple[list[Network], list[Endpoint], list[st.Op]]:
    names = Names(PLUGIN_PREFIX)
    nets: list[Network] = []
    eps: list[Endpoint] = []
    ops: list[st.Op] = []
    per = n_endpoints // NETWORKS
    for k in range(NETWORKS):
        nid = hashlib.sha256(f"startup-net-{k}".encode()).hexdigest()
        subnet = _subnet(k)
        gw = ipaddress.IPv4Interface((int(subnet.network_address) + 1, subnet.prefixlen))
        net = Network(
            network_id=nid,
            bridge=names.bridge(nid),
            bridge_owned=True,
            options=NetworkOptions(),
            ipv4=(IPAMData(address_space=LOCAL_ADDRESS_SPACE, pool=subnet, gateway=gw),),
        )
        pool = Pool(
            pool_id=f"{LOCAL_ADDRESS_SPACE}/{subnet}",
            address_space=LOCAL_ADDRESS_SPACE,
            network=subnet,
        )
        nets.append(net)
        ops += [
            st.PutNetwork(net),
            st.PutPool(pool),
            st.PutAddress(pool.pool_id, int(gw.ip), 4, "gateway", int(gw.ip) + 1),
        ]
        for i in range(per):
            eid = hashlib.sha256(f"startup-ep-{k}-{i}".encode()).hexdigest()
            addr = ipaddress.IPv4Interface((int(subnet.network_address) + 2 + i, subnet.prefixlen))
            ep = Endpoint(
                endpoint_id=eid,
                network_id=nid,
                host_ifname=names.host_veth(eid),
                container_ifname=names.container_veth(eid),
                mac=endpoint_mac(eid, addr),
                address=addr,
                sandbox_key=f"/var/run/docker/netns/{eid[:12]}",
            )
            eps.append(ep)
            ops += [
                st.PutAddress(pool.pool_id, int(addr.ip), 4, "address", int(addr.ip) + 1),
                st.PutEndpoint(ep),
            ]
    return nets, eps, ops


async def write_store(path: Path, ops: list[st.Op]) -> None:
    store = st.Store(path)
    await store.open()
    await store.commit(ops)
    await store.close()


def build_kernel(ns: str, sandbox: str, nets: list[Network], eps: list[Endpoint]) -> float:
    """Bridges and veths in ``ns``; each veth's peer in ``sandbox``, where the engine would
    have moved it at Join (so the host namespace holds what it holds on a real host)."""
    t0 = time.perf_counter()
    ipr = IPRoute(netns=ns)
    try:
        index = {}
        for net in nets:
            ipr.link("add", ifname=net.bridge, kind="bridge")
            (idx,) = ipr.link_lookup(ifname=net.bridge)
            gw = net.gateways[0]
            ipr.addr("add", index=idx, address=str(gw.ip), prefixlen=gw.network.prefixlen)
            ipr.link("set", index=idx, state="up")
            index[net.network_id] = idx
        for ep in eps:
            ipr.link(
                "add",
                ifname=ep.host_ifname,
                kind="veth",
                master=index[ep.network_id],
                state="up",
                peer={"ifname": ep.container_ifname, "address": ep.mac, "net_ns_fd": sandbox},
            )
    finally:
        ipr.close()
    return time.perf_counter() - t0


def _starts(d: Daemon, restarts: int) -> dict[str, Any]:
    """One untimed-for-the-median first start, then ``restarts`` timed restarts."""
    first = d.start()
    d.stop()
    times, phases = [], []
    for _ in range(restarts):
        times.append(d.start())
        phases.append(d.phases())
        d.stop()
    t = d.start()  # the last one stays up for memory and the status check
    times.append(t)
    phases.append(d.phases())
    idle0 = schedstat(d.pid)[0]
    time.sleep(IDLE_SECONDS)
    idle_cpu = schedstat(d.pid)[0] - idle0
    rss = d.rss_kib()
    c = PluginClient(d.socket)
    status = c.call("Pouch.Status")
    sweep = _sweep_cost(d, c)
    c.close()
    d.stop()
    return {
        "idle_cpu_ms_per_s": idle_cpu / 1e6 / IDLE_SECONDS,
        "sweep": sweep,
        "first_start_ms": first * 1000,
        "start_ms": [x * 1000 for x in times],
        "median_ms": statistics.median(times) * 1000,
        "phases_s": phases,
        "idle_rss_kib": rss,
        "endpoints_after_start": len(status.get("Endpoints") or []),
    }


def _sweep_cost(d: Daemon, c: PluginClient, repeats: int = 3) -> dict[str, float]:
    """A read-only reconcile (``Pouch.Reconcile`` dry run): the work of the periodic sweep."""
    wall, cpu = [], []
    for _ in range(repeats):
        before = schedstat(d.pid)[0]
        t, _ = c.timed("Pouch.Reconcile", {"DryRun": True})
        cpu.append((schedstat(d.pid)[0] - before) / 1e6)
        wall.append(t * 1000)
    return {"wall_ms": statistics.median(wall), "cpu_ms": statistics.median(cpu)}


def import_floor(repeats: int = 5) -> dict[str, float]:
    """Interpreter start alone, and with the plugin's imports: what any start costs.

    From process start to the moment the child has imported (it prints its clock), so the
    interpreter's teardown is not counted, as it is not in a start-up time. The minimum of
    ``repeats``: a floor, not a typical value.
    """
    out = {}
    for label, code in (
        ("python -c pass", ""),
        ("import pouch_driver.server", "import pouch_driver.server, pouch_driver.http.app"),
    ):
        ts = []
        for _ in range(repeats):
            t0 = time.time()
            done = subprocess.run(
                [sys.executable, "-c", f"{code}\nimport time\nprint(time.time())"],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            ).stdout
            ts.append(float(done) - t0)
        out[label] = min(ts) * 1000
    return out


def run_all(
    rec: Record, *, src: Path | None = None, n_endpoints: int = 2000, restarts: int = 3
) -> None:
    check_no_overlap(*(str(_subnet(k)) for k in range(NETWORKS)))
    nets, eps, ops = build_state(n_endpoints)
    results: dict[str, Any] = {"import_floor_ms": import_floor()}

    with netns() as ns, workdir() as base:
        d = Daemon(ns, base, src=src)
        results["empty"] = _starts(d, restarts)
    log(f"start-up empty: {results['empty']['median_ms']:.0f} ms")

    with workdir() as saved:
        asyncio.run(write_store(saved / "state.db", ops))
        with netns() as ns, netns() as sandbox, workdir() as base:
            shutil.copytree(saved, base / "state")
            built = build_kernel(ns, sandbox, nets, eps)
            log(f"built {len(nets)} bridges + {len(eps)} veth pairs in {built:.1f} s")
            results["kernel_build_s"] = built
            d = Daemon(ns, base, src=src)
            results["2000"] = _starts(d, restarts)
        log(f"start-up with {len(eps)} endpoints: {results['2000']['median_ms']:.0f} ms")

        with netns() as ns, workdir() as base:
            shutil.copytree(saved, base / "state")
            d = Daemon(ns, base, src=src)
            t = d.start()
            phases = d.phases()
            time.sleep(IDLE_SECONDS)
            c = PluginClient(d.socket)
            status = c.call("Pouch.Status")
            c.close()
            rss = d.rss_kib()
            d.stop()
            results["2000_veths_missing"] = {
                "start_ms": t * 1000,
                "phases_s": phases,
                "idle_rss_kib": rss,
                "endpoints_after_start": len(status.get("Endpoints") or []),
            }

    e, f, m = results["empty"], results["2000"], results["2000_veths_missing"]
    results["n_endpoints"] = n_endpoints
    results["ratio_2000_vs_empty"] = f["median_ms"] / e["median_ms"]
    results["rss_kib_per_endpoint"] = (f["idle_rss_kib"] - e["idle_rss_kib"]) / n_endpoints
    rec.put(
        "startup",
        results,
        f"start-up to first answer: empty store {e['median_ms']:.0f} ms, {n_endpoints} "
        f"endpoints {f['median_ms']:.0f} ms (ratio {results['ratio_2000_vs_empty']:.2f}; "
        f"kept {f['endpoints_after_start']}), {n_endpoints} with veths missing "
        f"{m['start_ms']:.0f} ms (kept {m['endpoints_after_start']}); python+imports alone "
        f"{results['import_floor_ms']['import pouch_driver.server']:.0f} ms",
    )
    rec.put(
        "sweep",
        {
            "empty": e["sweep"],
            "with_endpoints": f["sweep"],
            "gc_interval_s": 30.0,
            "core_percent_at_default_interval": f["sweep"]["cpu_ms"] / 30_000 * 100,
        },
        f"periodic sweep (a dry-run reconcile, every 30 s by default): empty "
        f"{e['sweep']['wall_ms']:.0f} ms, with {n_endpoints} endpoints "
        f"{f['sweep']['wall_ms']:.0f} ms wall / {f['sweep']['cpu_ms']:.0f} ms CPU "
        f"(= {f['sweep']['cpu_ms'] / 30_000 * 100:.1f}% of a core at the default interval)",
    )
    rec.put(
        "idle_rss",
        {
            "empty_kib": e["idle_rss_kib"],
            "with_2000_kib": f["idle_rss_kib"],
            "with_2000_veths_missing_kib": m["idle_rss_kib"],
            "kib_per_endpoint": results["rss_kib_per_endpoint"],
        },
        f"idle RSS: empty {e['idle_rss_kib'] / 1024:.1f} MiB, with {n_endpoints} endpoints "
        f"{f['idle_rss_kib'] / 1024:.1f} MiB (+{results['rss_kib_per_endpoint']:.1f} "
        f"KiB/endpoint)",
    )
