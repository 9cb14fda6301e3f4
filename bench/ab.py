"""A/B: two builds of the plugin under the same per-endpoint workload, rounds alternating.

    sudo .venv/bin/python -m bench.ab /tmp/scratch            # installed package vs scratch
    sudo .venv/bin/python -m bench.ab /tmp/a /tmp/b --rounds 10

Each side is a daemon in its own namespace; rounds of sequential lifecycles alternate
between them (A, B, A, B, ...) so machine load hits both alike. Reported per side: wall ms
per lifecycle (answered; until the veths are gone) and the daemon's CPU ms per lifecycle
(all threads, and the event-loop thread), medians over rounds. CPU is the steadier number
on a busy machine. Start-up (empty store, and with ``--endpoints`` endpoints) is compared
with ``--startup``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from . import plugin, startup
from .common import Daemon, PluginClient, bench_lock, loadavg, log, netns, schedstat, workdir


def _side(stack: contextlib.ExitStack, src: Path | None) -> tuple[Daemon, PluginClient, Any]:
    ns = stack.enter_context(netns())
    base = stack.enter_context(workdir())
    d = Daemon(ns, base, src=src)
    d.start()
    stack.callback(d.stop)
    c = PluginClient(d.socket)
    stack.callback(c.close)
    plugin.setup_network(c)
    ipr = IPRoute(netns=ns)
    stack.callback(ipr.close)
    return d, c, ipr


def lifecycles(
    srcs: list[Path | None], rounds: int, per_round: int, clients: int = 1
) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        sides = [_side(stack, s) for s in srcs]
        for i, (_, c, ipr) in enumerate(sides):
            plugin.plugin_round(c, ipr, f"w{i}", 20, times={k: [] for k in plugin.CALLS})
        stats: list[dict[str, list[float]]] = [
            {"answered": [], "drained": [], "cpu": [], "loop_cpu": [], "runq": []} for _ in sides
        ]
        for r in range(rounds):
            order = range(len(sides)) if r % 2 == 0 else reversed(range(len(sides)))
            for i in order:
                d, c, ipr = sides[i]
                before = schedstat(d.pid)
                res = plugin.plugin_round(
                    c,
                    ipr,
                    f"r{r}s{i}",
                    per_round,
                    times={k: [] for k in plugin.CALLS},
                    threads=clients,
                )
                after = schedstat(d.pid)
                n = res["n"]
                stats[i]["answered"].append(res["answered_s"] / n * 1000)
                stats[i]["drained"].append(res["drained_s"] / n * 1000)
                stats[i]["cpu"].append((after[0] - before[0]) / n / 1e6)
                stats[i]["loop_cpu"].append((after[2] - before[2]) / n / 1e6)
                stats[i]["runq"].append((after[1] - before[1]) / n / 1e6)
    return {
        _label(s): {k: statistics.median(v) for k, v in st.items()}
        for s, st in zip(srcs, stats, strict=True)
    }


def startups(srcs: list[Path | None], endpoints: int, repeats: int) -> dict[str, Any]:
    nets, eps, ops = startup.build_state(endpoints)
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        saved = stack.enter_context(workdir())
        asyncio.run(startup.write_store(saved / "state.db", ops))
        ns = stack.enter_context(netns())
        sandbox = stack.enter_context(netns())
        startup.build_kernel(ns, sandbox, nets, eps)
        daemons = []
        for s in srcs:
            base = stack.enter_context(workdir())
            shutil.copytree(saved, base / "state")
            daemons.append(Daemon(ns, base, src=s))
        for d in daemons:  # first starts write the firewall chains
            d.start()
            d.stop()
        times: list[list[float]] = [[] for _ in daemons]
        rss: list[int] = [0 for _ in daemons]
        for _ in range(repeats):
            for i, d in enumerate(daemons):
                times[i].append(d.start() * 1000)
                time.sleep(1.0)
                rss[i] = d.rss_kib()
                d.stop()
        for s, t, r in zip(srcs, times, rss, strict=True):
            out[_label(s)] = {"start_ms_median": statistics.median(t), "idle_rss_kib": r}
    return out


def _label(src: Path | None) -> str:
    return str(src) if src else "installed"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.ab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src",
        nargs="+",
        type=Path,
        help="directories holding a pouch_driver package; one = compare with the installed package",
    )
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--per-round", type=int, default=40)
    p.add_argument("--clients", type=int, default=1, help="concurrent clients per side")
    p.add_argument("--startup", action="store_true", help="also compare start-up")
    p.add_argument("--endpoints", type=int, default=2000)
    p.add_argument("--no-lifecycles", action="store_true")
    args = p.parse_args(argv)
    srcs: list[Path | None] = [s.resolve() for s in args.src]
    if len(srcs) == 1:
        srcs.insert(0, None)
    lock = bench_lock()
    lock.acquire(timeout=3600)
    try:
        log(f"load {loadavg()}")
        if not args.no_lifecycles:
            res = lifecycles(srcs, args.rounds, args.per_round, args.clients)
            for label, st in res.items():
                log(
                    f"A/B lifecycles ({args.clients} client(s)) {label}: "
                    f"{st['answered']:.2f} ms answered, "
                    f"{st['drained']:.2f} ms drained, CPU {st['cpu']:.2f} ms (event loop "
                    f"{st['loop_cpu']:.2f}), run-queue wait {st['runq']:.2f} ms per lifecycle"
                )
        if args.startup:
            for label, st in startups(srcs, args.endpoints, 3).items():
                log(
                    f"A/B start-up with {args.endpoints} endpoints {label}: "
                    f"{st['start_ms_median']:.0f} ms, idle RSS {st['idle_rss_kib'] / 1024:.1f} MiB"
                )
        log(f"load {loadavg()}")
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
