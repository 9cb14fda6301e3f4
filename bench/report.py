"""``python -m bench.report [results.json]``: the key figures of a run as a Markdown table.

Defaults to ``bench/results/latest.json``; the README's figures are this script's output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .common import ROOT


def _row(what: str, pouch: str, ref: str, ratio: str, note: str = "") -> str:
    return f"| {what} | {pouch} | {ref} | {ratio} | {note} |"


def rows(doc: dict[str, Any]) -> list[str]:  # noqa: PLR0912 - one row per figure, in order
    r = doc["results"]
    out = ["| measurement | pouch-driver | reference | ratio | note |", "|---|---|---|---|---|"]
    if cd := r.get("docker_connect_disconnect"):
        for op in ("connect", "disconnect"):
            p, b = cd[op]["pouch_ms"], cd[op]["bridge_ms"]
            out.append(
                _row(
                    f"`docker network {op}` (API), median of {cd['pairs']} pairs",
                    f"{p['median']:.1f} ms (p90 {p['p90']:.1f})",
                    f"bridge {b['median']:.1f} ms (p90 {b['p90']:.1f})",
                    f"{cd[op]['ratio']:.2f}",
                )
            )
            if "floor_ms" in cd[op]:
                f = cd[op]["floor_ms"]
                out.append(
                    _row(
                        f"`docker network {op}`, floor plugin (a remote driver "
                        "answering from memory)",
                        f"{f['median']:.1f} ms (p90 {f['p90']:.1f})",
                        f"bridge {b['median']:.1f} ms",
                        f"{cd[op]['floor_ratio']:.2f}",
                        f"pouch / floor {cd[op]['pouch_over_floor']:.2f}",
                    )
                )
        if "plugin_server_ms_per_connect_disconnect" in cd:
            out.append(
                _row(
                    "plugin's own server time per connect+disconnect",
                    f"{cd['plugin_server_ms_per_connect_disconnect']:.1f} ms",
                    "",
                    "",
                    ", ".join(
                        f"{k} x{v['calls']:.0f}"
                        for k, v in cd["plugin_calls_per_connect_disconnect"].items()
                    ),
                )
            )
    if rr := r.get("docker_run_rm"):
        a = rr["api"]
        out.append(
            _row(
                f"`docker run --rm ... true` (API), median of {rr['pairs']} pairs",
                f"{a['pouch_ms']['median']:.0f} ms",
                f"bridge {a['bridge_ms']['median']:.0f} ms",
                f"{a['ratio']:.2f}",
            )
        )
        if c := rr.get("cli"):
            out.append(
                _row(
                    f"`docker run --rm` (CLI), median of {rr['cli_pairs']} pairs",
                    f"{c['pouch_ms']['median']:.0f} ms",
                    f"bridge {c['bridge_ms']['median']:.0f} ms",
                    f"{c['ratio']:.2f}",
                )
            )
    if par := r.get("docker_parallel"):
        ok = (
            "all running with an address"
            if par["pouch_all_ok"] and par["bridge_all_ok"]
            else "FAILURES"
        )
        out.append(
            _row(
                f"{par['n']} containers started at once, mean wall",
                f"{par['pouch_wall_s']:.1f} s "
                f"({', '.join(f'{x:.1f}' for x in par.get('pouch_wall_s_rounds', []))})",
                f"bridge {par['bridge_wall_s']:.1f} s "
                f"({', '.join(f'{x:.1f}' for x in par.get('bridge_wall_s_rounds', []))})",
                f"{par['ratio']:.2f}",
                ok,
            )
        )
        if "floor_wall_s" in par:
            out.append(
                _row(
                    f"{par['n']} at once, floor plugin (answering from memory)",
                    f"{par['floor_wall_s']:.1f} s ("
                    + ", ".join(f"{x:.1f}" for x in par["floor_wall_s_rounds"])
                    + ")",
                    f"bridge {par['bridge_wall_s']:.1f} s",
                    f"{par['floor_ratio']:.2f}",
                    "all running with an address" if par["floor_all_ok"] else "FAILURES",
                )
            )
        pr, br = par["rounds"]["pouch"], par["rounds"]["bridge"]
        if pr and "plugin_cpu_s" in pr[0]:

            def mean(rounds: list[dict[str, Any]], key: str) -> float:
                return float(sum(x[key] for x in rounds)) / len(rounds)

            out.append(
                _row(
                    "CPU used during one round of 50",
                    f"plugin {mean(pr, 'plugin_cpu_s'):.2f} s, "
                    f"dockerd {mean(pr, 'dockerd_cpu_s'):.1f} s",
                    f"dockerd {mean(br, 'dockerd_cpu_s'):.1f} s",
                    "",
                    "the plugin's share of the work",
                )
            )
    for key, label in (
        ("endpoint_sequential", "sequential"),
        ("endpoint_concurrent", "4 concurrent clients"),
    ):
        if e := r.get(key):
            out.append(
                _row(
                    f"per endpoint, {label}: answered (engine-seen)",
                    f"{e['plugin_ms_per_lifecycle_answered']:.2f} ms",
                    f"floor {e['floor_deferred_ms_per_lifecycle_answered']:.2f} ms",
                    f"{e['ratio_answered_vs_floor_deferred_answered']:.2f}",
                    "floor = veth create only (its delete deferred)",
                )
            )
            out.append(
                _row(
                    f"per endpoint, {label}: until every veth is gone",
                    f"{e['plugin_ms_per_lifecycle_until_drained']:.2f} ms",
                    f"floor {e['floor_deferred_ms_per_lifecycle_until_drained']:.2f} ms"
                    f" (inline delete {e['floor_inline_ms_per_lifecycle']:.2f})",
                    f"{e['ratio_drained_vs_floor_deferred_drained']:.2f}",
                    "per lifecycle, N lifecycles back to back",
                )
            )
            cpu = e["plugin_cpu_ms_per_lifecycle"]
            out.append(
                _row(
                    f"per endpoint, {label}: CPU per lifecycle",
                    f"{cpu['daemon_all_threads']:.2f} ms (event loop "
                    f"{cpu['daemon_event_loop_thread']:.2f})",
                    f"floor {e['floor_cpu_ms_per_lifecycle']:.2f} ms",
                    f"{cpu['daemon_all_threads'] / e['floor_cpu_ms_per_lifecycle']:.1f}",
                    f"daemon run-queue wait {cpu['daemon_runqueue_wait']:.2f} ms",
                )
            )
    if s := r.get("ipam_socket"):
        s8, s24 = s["10.0.0.0/8"], s["10.0.0.0/24"]
        out.append(
            _row(
                "RequestPool /8 + first RequestAddress, over the socket",
                f"{s8['request_pool_ms']['median']:.2f} + "
                f"{s8['first_request_address_ms']['median']:.2f} ms",
                f"/24: {s24['request_pool_ms']['median']:.2f} + "
                f"{s24['first_request_address_ms']['median']:.2f} ms",
                "",
                "",
            )
        )
    if i := r.get("ipam_inproc_slash8_first"):
        out.append(
            _row(
                "RequestPool /8 + first RequestAddress, in-process",
                f"{i['request_pool']['median'] * 1000:.1f} + "
                f"{i['first_request_address']['median'] * 1000:.1f} us",
                "",
                "",
                "",
            )
        )
    if a := r.get("ipam_inproc_allocations"):
        for m, t in a["timing"].items():
            out.append(
                _row(
                    f"IPAM allocation #{int(m):,} in a /8 (in-process)",
                    f"{t['us_per_alloc_last_1k']:.1f} us/alloc (last 1k)",
                    f"{a['traced_bytes'][m] / 1024:.0f} KiB traced",
                    "",
                    f"{a['bytes_per_allocation_at_100k']:.0f} B per allocation"
                    if m == "100000"
                    else "",
                )
            )
    if ep := r.get("ipam_inproc_empty_pool"):
        t = ep["traced_bytes"]
        out.append(
            _row(
                "empty pool, traced bytes",
                f"/8: {t['10.0.0.0/8']} B",
                f"/24: {t['10.0.0.0/24']} B",
                f"{t['10.0.0.0/8'] / t['10.0.0.0/24']:.2f}",
                "size-independent",
            )
        )
    if su := r.get("startup"):
        n = su["n_endpoints"]
        out.append(
            _row(
                f"start-up to first answer, {n} endpoints (veths present)",
                f"{su['2000']['median_ms']:.0f} ms",
                f"empty store {su['empty']['median_ms']:.0f} ms",
                f"{su['ratio_2000_vs_empty']:.2f}",
                f"python + imports alone "
                f"{su['import_floor_ms']['import pouch_driver.server']:.0f} ms",
            )
        )
        out.append(
            _row(
                f"start-up, {n} endpoints whose veths are gone (reboot)",
                f"{su['2000_veths_missing']['start_ms']:.0f} ms",
                "",
                "",
                f"endpoints kept: {su['2000_veths_missing']['endpoints_after_start']}",
            )
        )
    if sw := r.get("sweep"):
        out.append(
            _row(
                "periodic sweep (dry-run reconcile), 2000 endpoints",
                f"{sw['with_endpoints']['wall_ms']:.0f} ms wall, "
                f"{sw['with_endpoints']['cpu_ms']:.0f} ms CPU",
                f"empty {sw['empty']['wall_ms']:.0f} ms",
                "",
                f"{sw['core_percent_at_default_interval']:.1f}% of a core every 30 s",
            )
        )
    if rss := r.get("idle_rss"):
        out.append(
            _row(
                "idle RSS",
                f"{rss['with_2000_kib'] / 1024:.1f} MiB with 2000 endpoints",
                f"empty {rss['empty_kib'] / 1024:.1f} MiB",
                f"{rss['with_2000_kib'] / rss['empty_kib']:.2f}",
                f"{rss['kib_per_endpoint']:.1f} KiB per endpoint",
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else ROOT / "bench" / "results" / "latest.json"
    doc = json.loads(path.read_text())
    m = doc["meta"]
    start = m.get("load_at_start", m["load_before"])
    print(
        f"Run {m['started']}, commit {m['commit'][:10]}, {m['cpus']} CPUs, kernel "
        f"{m['kernel']}; 1/5/15-min load {start} at the start, "
        f"{m['load_after']} at the end; "
        f"{m['duration_excluding_lock_wait_s']:.0f} s of benchmarks "
        f"(+{m.get('docker_lock_wait_s', 0):.0f} s waiting for dockerd's lock).\n"
    )
    print("\n".join(rows(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
