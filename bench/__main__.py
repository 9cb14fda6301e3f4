"""``python -m bench``: run the benchmark suite, write JSON results and a PNG chart.

    sudo scripts/bench                      # everything (root: namespaces, dockerd)
    sudo scripts/bench --only plugin,ipam   # a subset: ipam, plugin, startup, docker, profile
    sudo scripts/bench --plugin-src /tmp/x  # run a scratch copy of the package (A/B)

Results: ``bench/results/<UTC timestamp>.json`` and ``.png``; a full run (all default
benchmarks, installed package, not ``--quick``) also writes ``latest.json`` and ``latest.png``.
``profile`` (py-spy on the daemon) is not part of the default set: sampling perturbs the
timings, so it runs on its own (``--only profile``). Nor is ``scale`` (``--only scale``, ~15 min:
the host grown to 200 networks and 1,000 published ports on two engines; ``bench/scale.py``),
which writes ``scale.json`` and ``scale.png``; nor ``hostcalls`` (``--only hostcalls``, ~1
min: the plugin's time per call over its socket, 1 network against 200 + 1,000 ports;
``bench/host_calls.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from .common import ROOT, Record, bench_lock, cleanup_leftovers, loadavg, log

DEFAULT = ("ipam", "plugin", "startup", "docker")
ALL = (*DEFAULT, "profile", "cluster", "multihost", "hostcalls", "scale")


def _git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
    return r.stdout.strip()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--only",
        default=",".join(DEFAULT),
        help=f"comma-separated subset of {', '.join(ALL)} (default: all but profile)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--plugin-src",
        type=Path,
        default=None,
        help="directory holding a pouch_driver package to benchmark instead "
        "(kernel benchmarks and profile only)",
    )
    p.add_argument("--pairs", type=int, default=30, help="connect/disconnect pairs (>= 15)")
    p.add_argument("--run-pairs", type=int, default=15, help="docker run --rm pairs")
    p.add_argument(
        "--parallel-rounds",
        type=int,
        default=2,
        help="rounds of the parallel start (pouch, bridge, pouch, bridge)",
    )
    p.add_argument("--parallel", type=int, default=50, help="containers started at once")
    p.add_argument("--endpoints", type=int, default=2000, help="endpoints for start-up")
    p.add_argument("--rounds", type=int, default=4, help="rounds of per-endpoint lifecycles")
    p.add_argument("--per-round", type=int, default=50, help="lifecycles per round")
    p.add_argument(
        "--lock-wait",
        type=float,
        default=3600,
        help="seconds to wait for another e2e/dockerd session to finish",
    )
    p.add_argument(
        "--engines",
        default="20.10,28.5.2",
        help="scale: the engines to run it on (tests/e2e/harness.py ENGINES)",
    )
    p.add_argument(
        "--engine",
        default="20.10",
        help="docker: the engine to run it on (tests/e2e/harness.py ENGINES)",
    )
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke test")
    p.add_argument("--no-chart", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench: needs root (network namespaces, dockerd)", file=sys.stderr)
        return 2
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(only) - set(ALL)
    if unknown:
        print(f"python -m bench: unknown benchmark(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    if args.quick:
        args.pairs, args.run_pairs, args.parallel, args.parallel_rounds = 3, 2, 10, 1
        args.endpoints, args.rounds, args.per_round = 200, 2, 20
    src = args.plugin_src.resolve() if args.plugin_src else None
    if src is not None and not (src / "pouch_driver" / "__init__.py").exists():
        print(f"python -m bench: {src} holds no pouch_driver package", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)

    rec = Record()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    rec.meta.update(
        started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        commit=_git("rev-parse", "HEAD"),
        dirty=bool(_git("status", "--porcelain", "pouch_driver")),
        plugin_src=str(src) if src else "installed (editable) pouch_driver",
        host=platform.node(),
        kernel=platform.release(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        benchmarks=only,
        quick=args.quick,
        load_before=loadavg(),
    )
    lock = bench_lock()
    lock.acquire(timeout=args.lock_wait)
    t_start = time.monotonic()
    failed: list[str] = []
    e2e = None
    try:
        if {"docker", "scale"} & set(only):
            # Held for the whole run, not just the docker step: no other engineer's dockerd
            # session (the heaviest neighbour on this machine) runs during any measurement.
            from .docker import e2e_lock  # noqa: PLC0415

            e2e = e2e_lock(rec, args.lock_wait)
        rec.meta["load_at_start"] = loadavg()  # after any wait for the locks
        cleanup_leftovers()
        failed = _steps(rec, only, args, src)
    finally:
        cleanup_leftovers()
        if e2e is not None:
            e2e.release()
        lock.release()
    rec.meta["duration_s"] = round(time.monotonic() - t_start, 1)
    rec.meta["duration_excluding_lock_wait_s"] = round(
        rec.meta["duration_s"] - rec.meta.get("docker_lock_wait_s", 0), 1
    )
    rec.meta["load_after"] = loadavg()
    rec.meta["failed"] = failed

    full = set(DEFAULT) <= set(only) and not args.quick and src is None
    charted = not args.no_chart and bool(set(only) - {"scale"})  # scale draws its own
    _write(rec, args.out, stamp, chart=charted, latest=full)
    log(
        f"done in {rec.meta['duration_s']:.0f} s (lock wait "
        f"{rec.meta.get('docker_lock_wait_s', 0):.0f} s); load {rec.meta['load_at_start']} -> "
        f"{rec.meta['load_after']}" + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def _steps(rec: Record, only: list[str], args: argparse.Namespace, src: Path | None) -> list[str]:
    """Run the selected benchmarks in order; return the names of those that failed."""
    steps: dict[str, Callable[[], None]] = {
        "ipam": lambda: _ipam(rec),
        "plugin": lambda: _plugin(rec, src, args.rounds, args.per_round),
        "startup": lambda: _startup(rec, src, args.endpoints),
        "docker": lambda: _docker(rec, args),
        "profile": lambda: _profile(rec, src, args.out, args.endpoints),
        "cluster": lambda: _cluster(rec, args),
        "multihost": lambda: _multihost(rec, args),
        "hostcalls": lambda: _host_calls(rec, args),
        "scale": lambda: _scale(rec, args),
    }
    failed = []
    for name in ALL:
        if name not in only:
            continue
        log(f"--- {name} (load {loadavg()}) ---")
        t0 = time.monotonic()
        before = loadavg()
        try:
            steps[name]()
        except Exception as exc:  # noqa: BLE001 - one failed benchmark must not hide others
            traceback.print_exc()
            failed.append(name)
            rec.results[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
        rec.meta.setdefault("steps", {})[name] = {
            "seconds": round(time.monotonic() - t0, 1),
            "load_before": before,
            "load_after": loadavg(),
        }
    return failed


def _write(rec: Record, out: Path, stamp: str, *, chart: bool, latest: bool) -> None:
    """``<stamp>.json``/``.png``; ``latest.*`` only for a full run of the installed package
    (a subset, ``--quick`` or ``--plugin-src`` run must not replace the published figures)."""
    text = rec.to_json()
    (out / f"{stamp}.json").write_text(text)
    if latest:
        (out / "latest.json").write_text(text)
    log(f"results: {out / f'{stamp}.json'}" + (" (and latest.json)" if latest else ""))
    if chart:
        from . import chart as charts  # noqa: PLC0415 - matplotlib only when a chart is wanted

        charts.render({"meta": rec.meta, "results": rec.results}, out / f"{stamp}.png")
        if latest:
            shutil.copyfile(out / f"{stamp}.png", out / "latest.png")
        log(f"chart: {out / f'{stamp}.png'}" + (" (and latest.png)" if latest else ""))


def _cluster(rec: Record, args: argparse.Namespace) -> None:
    from . import cluster  # noqa: PLC0415

    cluster.run_cluster(rec, quick=args.quick)


def _multihost(rec: Record, args: argparse.Namespace) -> None:
    from . import multihost  # noqa: PLC0415 - needs tests/multihost (its harness)

    multihost.run_multihost(rec, quick=args.quick)


def _ipam(rec: Record) -> None:
    from . import ipam  # noqa: PLC0415

    ipam.run_all(rec)


def _host_calls(rec: Record, args: argparse.Namespace) -> None:
    from . import host_calls  # noqa: PLC0415

    host_calls.run_all(rec, quick=args.quick)


def _plugin(rec: Record, src: Path | None, rounds: int, per_round: int) -> None:
    from . import plugin  # noqa: PLC0415

    plugin.run_all(rec, src=src, rounds=rounds, per_round=per_round)


def _startup(rec: Record, src: Path | None, endpoints: int) -> None:
    from . import startup  # noqa: PLC0415

    startup.run_all(rec, src=src, n_endpoints=endpoints)


def _docker(rec: Record, args: argparse.Namespace) -> None:
    from . import docker  # noqa: PLC0415

    if args.plugin_src:
        rec.note("the docker benchmarks run the installed plugin, not --plugin-src")
    docker.run_all(
        rec,
        pairs=args.pairs,
        run_pairs=args.run_pairs,
        parallel=args.parallel,
        parallel_rounds=args.parallel_rounds,
        lock_wait=args.lock_wait,
        locked=True,
        engine=args.engine,
    )


def _profile(rec: Record, src: Path | None, out: Path, endpoints: int) -> None:
    from . import profile  # noqa: PLC0415

    profile.run_all(rec, out, src=src, n_endpoints=endpoints)


def _scale(rec: Record, args: argparse.Namespace) -> None:
    from . import scale  # noqa: PLC0415

    if args.plugin_src:
        rec.note("the scale benchmark runs the installed plugin, not --plugin-src")
    scale.run_all(
        rec,
        args.out,
        quick=args.quick,
        engines=tuple(e.strip() for e in args.engines.split(",") if e.strip()),
        chart=not args.no_chart,
    )


if __name__ == "__main__":
    sys.exit(main())
