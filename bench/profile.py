"""Where the plugin's time goes: py-spy on the real daemon under two workloads.

* ``endpoint``: sequential lifecycles (the per-endpoint benchmark's workload);
* ``startup``: a start with 2,000 endpoints in the store and their veths present.

py-spy samples every thread (``--idle --threads``, non-blocking, so the daemon is not paused)
and writes collapsed stacks (``bench/results/profile-<workload>.txt``, flamegraph.pl input).
The summary attributes each event-loop sample to a layer: walking from the innermost frame
outwards, asyncio/threading/stdlib helper frames are transparent, and the first frame of a
known layer wins (HTTP = aiohttp, marshmallow = schemas, store, netlink, firewall, logging,
service, ipam, JSON). Inclusive shares of key functions are listed too. Needs py-spy
(``pip install py-spy``).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from . import plugin, startup
from .common import Daemon, PluginClient, Record, log, netns, task_cpu, workdir

#: Frames that never decide a sample's layer (the caller does).
TRANSPARENT = (
    "asyncio/",
    "threading.py",
    "concurrent/futures",
    "contextlib.py",
    "functools.py",
    "typing.py",
    "abc.py",
    "ipaddress.py",
    "dataclasses.py",
    "enum.py",
    "re/",
    "hashlib",
    "secrets.py",
    "<frozen",
    "copy.py",
    "weakref.py",
    "collections/",
)
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("idle (epoll wait)", ("EpollSelector.select (selectors.py)",)),
    ("marshmallow schemas", ("marshmallow/", "pouch_driver/http/schemas.py")),
    ("logging", ("logging/", "pouch_driver/logs.py")),
    ("store (loop side)", ("pouch_driver/store.py", "sqlite3")),
    ("netlink (loop side)", ("pouch_driver/kernel/links.py", "pyroute2/")),
    (
        "firewall",
        (
            "pouch_driver/kernel/iptables.py",
            "pouch_driver/kernel/rules.py",
            "pouch_driver/kernel/rule_changes.py",
            "pouch_driver/kernel/saved.py",
            "subprocess.py",
        ),
    ),
    ("ipam", ("pouch_driver/ipam.py",)),
    ("reconcile", ("pouch_driver/service/reconcile.py",)),
    (
        "service",
        (
            "pouch_driver/service/",
            "pouch_driver/locks.py",
            "pouch_driver/naming.py",
            "pouch_driver/options.py",
            "pouch_driver/model.py",
        ),
    ),
    ("JSON", ("json/",)),
    ("our HTTP layer (dispatch, middleware, handlers)", ("pouch_driver/http/",)),
    ("aiohttp (HTTP parse/write, transport)", ("aiohttp/", "multidict", "yarl", "propcache")),
)
INCLUSIVE: tuple[tuple[str, str], ...] = (
    ("aiohttp request handling", "RequestHandler._handle_request (aiohttp/web_protocol.py)"),
    ("middleware", "(pouch_driver/http/middleware.py)"),
    ("dispatch", "dispatch (pouch_driver/http/app.py)"),
    ("marshmallow Schema() construction", "Schema.__init__ (marshmallow/schema.py)"),
    ("marshmallow load", "Schema.load (marshmallow/schema.py)"),
    ("marshmallow dump", "Schema.dump (marshmallow/schema.py)"),
    ("web.json_response", "json_response (aiohttp/web_response.py)"),
    ("service methods", "(pouch_driver/service/"),
    ("Store.commit (loop side)", "Store.commit (pouch_driver/store.py)"),
    ("NetlinkLinks._run (loop side)", "NetlinkLinks._run (pouch_driver/kernel/links.py)"),
    ("logging", "(logging/__init__.py)"),
    ("reconcile", "(pouch_driver/service/reconcile.py)"),
    ("list_links parse (netlink threads)", "NetlinkLinks.list_links"),
)


def _layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        for label, keys in LAYERS:
            if any(k in frame for k in keys):
                return label
        if any(t in frame for t in TRANSPARENT):
            continue
    return "asyncio loop / other"


def _thread_group(name: str) -> str:
    if name == "MainThread":
        return "event loop"
    if name.startswith("store"):
        return "store thread"
    if name.startswith("netlink"):
        return "netlink threads"
    return "other threads"


def _idle_leaf(group: str, frames: list[str]) -> bool:
    leaf = frames[-1] if frames else ""
    if group == "event loop":
        return "EpollSelector.select" in leaf
    # Worker threads waiting for a job: the innermost Python frame is the loop itself.
    return (
        leaf.startswith(("_worker (concurrent", "NetlinkLinks._work "))
        or "Condition.wait" in leaf
        or "Event.wait" in leaf
    )


def summarize(raw: Path, cpu_ns: dict[int, int] | None = None, n: int = 0) -> dict[str, Any]:
    """Shares of samples by thread group and layer; with ``cpu_ns`` (per thread id, from
    schedstat over the same window), CPU ms per thread group and per event-loop layer,
    divided by ``n`` (lifecycles; 1 for a whole start-up)."""
    per_group: Counter[str] = Counter()
    busy_group: Counter[str] = Counter()
    threads_in_group: dict[str, set[str]] = {}
    layers: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    tids: dict[str, set[int]] = {}
    loop_busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack.startswith("thread (") or not count_s.isdigit():
            continue
        count = int(count_s)
        head, _, rest = stack.partition("): ")
        frames = rest.split(";")
        name = frames.pop(0)
        group = _thread_group(name)
        tid = head.removeprefix("thread (").strip()
        if tid.isdigit():
            tids.setdefault(group, set()).add(int(tid, 10))
        threads_in_group.setdefault(group, set()).add(head)
        per_group[group] += count
        if _idle_leaf(group, frames):
            continue
        busy_group[group] += count
        if group != "event loop":
            continue
        loop_busy += count
        layers[_layer(frames)] += count
        joined = ";".join(frames)
        for label, key in INCLUSIVE:
            if key in joined:
                inclusive[label] += count
        leaves[frames[-1] if frames else "(no frame)"] += count

    def share(c: Counter[str], total: int) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in c.most_common()} if total else {}

    threads = {}
    for group, total in per_group.items():
        k = len(threads_in_group[group])
        threads[group] = {
            "threads": k,
            "busy_percent_of_one_thread": round(100 * busy_group[group] / (total / k), 1),
        }
    cpu: dict[str, float] = {}
    if cpu_ns and n:
        for group, ids in tids.items():
            cpu[group] = round(sum(cpu_ns.get(t, 0) for t in ids) / n / 1e6, 3)
        if "event loop" in cpu and loop_busy:
            # Samples say where the loop's CPU goes; schedstat says how much there is.
            est = {
                k: round(cpu["event loop"] * v / loop_busy, 3)
                for k, v in layers.items()
                if not k.startswith("idle")
            }
            cpu = {**cpu, **{f"event loop: {k}": v for k, v in est.items()}}
    return {
        "cpu_ms": cpu,
        "samples_event_loop_busy": loop_busy,
        "threads": threads,
        "event_loop_busy_by_layer_percent": share(layers, loop_busy),
        "event_loop_inclusive_percent": share(inclusive, loop_busy),
        "top_leaf_frames_percent": dict(list(share(leaves, loop_busy).items())[:15]),
    }


def _spy(pid: int, out: Path, rate: int, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [
            spy,
            "record",
            "-p",
            str(pid),
            "-r",
            str(rate),
            "-f",
            "raw",
            "-o",
            str(out),
            "--threads",
            "--idle",
            "--nolineno",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_spy(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)
    spy.wait(30)


def endpoint_profile(
    out_dir: Path, src: Path | None, lifecycles: int, rate: int
) -> tuple[Path, dict[int, int]]:
    raw = out_dir / "profile-endpoint.txt"
    with netns() as ns, workdir() as base:
        d = Daemon(ns, base, src=src)
        d.start()
        try:
            c = PluginClient(d.socket)
            plugin.setup_network(c)
            times: dict[str, list[float]] = {name: [] for name in plugin.CALLS}
            for i in range(20):
                plugin.lifecycle(c, plugin.eid("pwarm", i), times)
            spy = _spy(d.pid, raw, rate, ("--nonblocking",))
            time.sleep(1.0)  # py-spy attaches
            before = task_cpu(d.pid)
            t0 = time.perf_counter()
            for i in range(lifecycles):
                plugin.lifecycle(c, plugin.eid("prof", i), times)
            elapsed = time.perf_counter() - t0
            after = task_cpu(d.pid)
            _stop_spy(spy)
            c.close()
        finally:
            d.stop()
    log(
        f"profiled {lifecycles} lifecycles in {elapsed:.1f} s "
        f"({elapsed / lifecycles * 1000:.2f} ms each under py-spy)"
    )
    return raw, {t: after[t] - before.get(t, 0) for t in after}


def startup_profile(
    out_dir: Path, src: Path | None, rate: int, n_endpoints: int
) -> tuple[Path, dict[int, int]]:
    raw = out_dir / "profile-startup.txt"
    nets, eps, ops = startup.build_state(n_endpoints)
    with netns() as ns, netns() as sandbox, workdir() as base:
        asyncio.run(startup.write_store(base / "state" / "state.db", ops))
        startup.build_kernel(ns, sandbox, nets, eps)
        d = Daemon(ns, base, src=src)
        d.start()  # first start writes the firewall chains
        d.stop()
        # Attach as early as possible: the interpreter and imports take ~0.4 s.
        t0 = d.spawn()
        time.sleep(0.05)
        spy = _spy(d.pid, raw, rate, ("--nonblocking",))
        try:
            d.wait_ready(t0)
            cpu = task_cpu(d.pid)  # every thread was born during this start
            _stop_spy(spy)
        finally:
            d.stop()
    return raw, cpu


def run_all(
    rec: Record,
    out_dir: Path,
    *,
    src: Path | None = None,
    lifecycles: int = 1000,
    rate: int = 250,
    n_endpoints: int = 2000,
) -> None:
    ep_raw, cpu = endpoint_profile(out_dir, src, lifecycles, rate)
    ep = summarize(ep_raw, cpu, lifecycles)
    rec.put(
        "profile_endpoint",
        ep,
        "profile (sequential lifecycles), CPU ms per lifecycle: "
        + ", ".join(f"{k} {v:.2f}" for k, v in ep["cpu_ms"].items() if v),
    )
    su_raw, su_cpu = startup_profile(out_dir, src, rate, n_endpoints)
    su = summarize(su_raw, su_cpu, 1)
    rec.put(
        "profile_startup",
        su,
        f"profile (start-up with {n_endpoints} endpoints), CPU ms "
        "until the first answer: "
        + ", ".join(f"{k} {v:.0f}" for k, v in su["cpu_ms"].items() if v),
    )
