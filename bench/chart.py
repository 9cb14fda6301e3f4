"""One PNG of a run's results (matplotlib, Agg backend): six panels, medians with ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

POUCH, BRIDGE, FLOOR, OTHER = "#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f"


def _bar_labels(ax: Any, bars: Any, fmt: str = "{:.0f}") -> None:
    for b in bars:
        h = b.get_height()
        ax.annotate(
            fmt.format(h), (b.get_x() + b.get_width() / 2, h), ha="center", va="bottom", fontsize=7
        )


def _missing(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.text(
        0.5,
        0.5,
        "not measured in this run",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color=OTHER,
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _docker_ops(ax: Any, r: dict[str, Any]) -> None:
    cd, rr = r.get("docker_connect_disconnect"), r.get("docker_run_rm")
    if not cd or not rr:
        _missing(ax, "docker operations (Engine API)")
        return
    labels = ["connect", "disconnect", "run --rm"]
    pouch = [
        cd["connect"]["pouch_ms"]["median"],
        cd["disconnect"]["pouch_ms"]["median"],
        rr["api"]["pouch_ms"]["median"],
    ]
    bridge = [
        cd["connect"]["bridge_ms"]["median"],
        cd["disconnect"]["bridge_ms"]["median"],
        rr["api"]["bridge_ms"]["median"],
    ]
    x = range(len(labels))
    if "floor_ms" in cd["connect"]:  # the floor plugin: connect/disconnect only
        w = 0.27
        floor = [cd[op]["floor_ms"]["median"] for op in ("connect", "disconnect")]
        _bar_labels(ax, ax.bar([i + w for i in x][:2], floor, w, label="floor plugin", color=FLOOR))
    else:
        w = 0.4
    _bar_labels(
        ax,
        ax.bar(
            [i - w for i in x] if w < 0.4 else [i - 0.2 for i in x],
            pouch,
            w,
            label="pouch",
            color=POUCH,
        ),
    )
    _bar_labels(
        ax,
        ax.bar(
            list(x) if w < 0.4 else [i + 0.2 for i in x], bridge, w, label="bridge", color=BRIDGE
        ),
    )
    ax.set_xticks(
        list(x), [f"{lab}\nx{p / b:.2f}" for lab, p, b in zip(labels, pouch, bridge, strict=True)]
    )
    ax.set_ylabel("median ms")
    ax.set_title(
        f"docker ops via Engine API ({cd['pairs']} / {rr['pairs']} interleaved pairs)", fontsize=9
    )
    ax.legend(fontsize=7)


def _parallel(ax: Any, r: dict[str, Any]) -> None:
    par = r.get("docker_parallel")
    if not par:
        _missing(ax, "containers started in parallel")
        return
    drivers = [d for d in ("pouch", "bridge", "floor") if f"{d}_wall_s" in par]
    bars = ax.bar(
        [d if d != "floor" else "floor plugin" for d in drivers],
        [par[f"{d}_wall_s"] for d in drivers],
        color=[POUCH, BRIDGE, FLOOR][: len(drivers)],
    )
    _bar_labels(ax, bars, "{:.1f} s")
    ok = "/".join("ok" if par[f"{d}_all_ok"] else "FAIL" for d in drivers)
    ax.set_title(
        f"{par['n']} containers started at once: mean wall s (x{par['ratio']:.2f}; {ok})",
        fontsize=9,
    )
    ax.set_ylabel("seconds")


def _endpoint(ax: Any, r: dict[str, Any]) -> None:
    seq = r.get("endpoint_sequential")
    if not seq:
        _missing(ax, "plugin per endpoint vs kernel floor")
        return
    calls = list(seq["per_call_ms"])
    bottom = 0.0
    colors = plt.get_cmap("Blues")
    for i, name in enumerate(calls):
        v = seq["per_call_ms"][name]["median"]
        ax.bar(0, v, 0.6, bottom=bottom, color=colors(0.3 + 0.7 * i / len(calls)), label=name)
        bottom += v
    bars = ax.bar(
        [1, 2, 3, 4],
        [
            seq["plugin_ms_per_lifecycle_until_drained"],
            seq["floor_inline_ms_per_lifecycle"],
            seq["floor_deferred_ms_per_lifecycle_answered"],
            seq["floor_deferred_ms_per_lifecycle_until_drained"],
        ],
        0.6,
        color=[POUCH, FLOOR, FLOOR, FLOOR],
    )
    _bar_labels(ax, bars, "{:.1f}")
    ax.annotate(f"{bottom:.1f}", (0, bottom), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(
        [0, 1, 2, 3, 4],
        [
            "plugin\nanswered\n(per call)",
            "plugin\nuntil veths\ngone",
            "floor\ninline del",
            "floor\ndeferred\nanswered",
            "floor\ndeferred\ndrained",
        ],
        fontsize=7,
    )
    ax.set_ylabel("ms per lifecycle")
    ax.set_title(f"per endpoint, sequential ({seq['lifecycles']} lifecycles)", fontsize=9)
    ax.legend(fontsize=6, loc="upper right")


def _ipam(ax: Any, r: dict[str, Any]) -> None:
    al = r.get("ipam_inproc_allocations")
    if not al:
        _missing(ax, "IPAM allocations in a /8")
        return
    marks = list(al["timing"])
    us = [al["timing"][m]["us_per_alloc_last_1k"] for m in marks]
    kib = [al["traced_bytes"].get(m, 0) / 1024 for m in marks]
    bars = ax.bar([f"{int(m) // 1000}k" for m in marks], us, color=POUCH)
    _bar_labels(ax, bars, "{:.1f} us")
    ax.set_ylabel("us per allocation (last 1k)")
    ax2 = ax.twinx()
    ax2.plot([f"{int(m) // 1000}k" for m in marks], kib, "o-", color=BRIDGE)
    for m, k in zip(marks, kib, strict=True):
        ax2.annotate(
            f"{k:.0f} KiB",
            (f"{int(m) // 1000}k", k),
            fontsize=7,
            color=BRIDGE,
            ha="right",
            textcoords="offset points",
            xytext=(-6, -12),
        )
    ax2.set_ylabel("traced memory KiB", color=BRIDGE)
    empty = r.get("ipam_inproc_empty_pool", {}).get("traced_bytes", {})
    extra = f"; empty /8 {empty.get('10.0.0.0/8', '?')} B vs /24 {empty.get('10.0.0.0/24', '?')} B"
    ax.set_title("IPAM in a /8: time and memory" + extra, fontsize=9)


def _startup(ax: Any, r: dict[str, Any]) -> None:
    su = r.get("startup")
    if not su:
        _missing(ax, "start-up to first answer")
        return
    n = su["n_endpoints"]
    vals = [su["empty"]["median_ms"], su["2000"]["median_ms"], su["2000_veths_missing"]["start_ms"]]
    bars = ax.bar(
        ["empty", f"{n} endpoints", f"{n}, veths\nmissing"], vals, color=[OTHER, POUCH, POUCH]
    )
    _bar_labels(ax, bars, "{:.0f} ms")
    imp = su["import_floor_ms"]["import pouch_driver.server"]
    ax.axhline(
        imp,
        color=FLOOR,
        linestyle="--",
        linewidth=1,
        label=f"python + imports alone ({imp:.0f} ms)",
    )
    ax.legend(fontsize=7, loc="upper left")
    ax.set_ylabel("ms from process start")
    ax.set_title("start-up to first answered request", fontsize=9)


def _rss(ax: Any, r: dict[str, Any]) -> None:
    rs = r.get("idle_rss")
    if not rs:
        _missing(ax, "idle RSS")
        return
    n = r["startup"]["n_endpoints"]
    vals = [
        rs["empty_kib"] / 1024,
        rs["with_2000_kib"] / 1024,
        rs["with_2000_veths_missing_kib"] / 1024,
    ]
    bars = ax.bar(
        ["empty", f"{n} endpoints", f"{n}, veths\nmissing"], vals, color=[OTHER, POUCH, POUCH]
    )
    _bar_labels(ax, bars, "{:.1f} MiB")
    ax.set_ylabel("VmRSS MiB")
    ax.set_title(f"daemon idle RSS ({rs['kib_per_endpoint']:.1f} KiB per endpoint)", fontsize=9)


def render(doc: dict[str, Any], path: Path) -> None:
    r, meta = doc["results"], doc["meta"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    _docker_ops(axes[0][0], r)
    _parallel(axes[0][1], r)
    _endpoint(axes[0][2], r)
    _ipam(axes[1][0], r)
    _startup(axes[1][1], r)
    _rss(axes[1][2], r)
    load = (
        meta.get("load_at_start", meta.get("load_before", ["?"]))[0],
        meta.get("load_after", ["?"])[0],
    )
    fig.suptitle(
        f"pouch-driver benchmarks {meta.get('started', '')} "
        f"(commit {str(meta.get('commit', '?'))[:10]}; {meta.get('cpus', '?')} CPUs; "
        f"1-min load {load[0]} at the start, {load[1]} at the end)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scale_chart(data: dict[str, Any], path: Path) -> None:
    """``bench.scale``: one row per engine; per operation the median (p10-p90 band) against
    the host's size, pouch beside the bridge driver, and the forwarded throughput."""
    engines = list(data["engines"].items())
    fw = data.get("firewall")
    ops = ("network_create", "run_p", "connect", "disconnect")
    titles = {
        "network_create": "network create",
        "run_p": "run -d -p HOST:80",
        "connect": "network connect",
        "disconnect": "network disconnect",
    }
    rows = len(engines) + (1 if fw else 0)
    fig, axes = plt.subplots(
        max(1, rows), len(ops) + 1, figsize=(20, 3.8 * max(1, rows)), squeeze=False
    )
    if fw:
        _firewall_row(axes[len(engines)], fw)
    for row, (name, res) in enumerate(engines):
        steps = res["steps"]
        labels = [f"{s['networks']}n\n{s['ports']}p" for s in steps]
        x = list(range(len(steps)))
        for col, op in enumerate(ops):
            ax = axes[row][col]
            for driver, color in (("pouch", POUCH), ("bridge", BRIDGE)):
                med = [s[driver][op]["median"] for s in steps]
                lo = [s[driver][op]["p10"] for s in steps]
                hi = [s[driver][op]["p90"] for s in steps]
                g = res["growth"][driver][op]["total"]
                ax.plot(x, med, marker="o", color=color, label=f"{driver} (x{g:.2f})")
                ax.fill_between(x, lo, hi, color=color, alpha=0.15)
            ax.set_title(f"{name}: {titles[op]} (ms)", fontsize=9)
            ax.set_xticks(x, labels, fontsize=7)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
        ax = axes[row][len(ops)]
        for driver, color in (("pouch", POUCH), ("bridge", BRIDGE)):
            med = [s[driver]["throughput_gbit"]["median"] for s in steps]
            lo = [s[driver]["throughput_gbit"]["min"] for s in steps]
            hi = [s[driver]["throughput_gbit"]["max"] for s in steps]
            g = res["growth"][driver]["throughput"]["total"]
            ax.plot(x, med, marker="o", color=color, label=f"{driver} (x{g:.2f})")
            ax.fill_between(x, lo, hi, color=color, alpha=0.15)
        ax.set_title(f"{name}: forwarded throughput, 1 TCP stream (Gbit/s)", fontsize=9)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    meta = data.get("meta", {})
    fig.suptitle(
        f"pouch-driver vs bridge as the host grows (networks n, published ports p per driver); "
        f"commit {str(meta.get('commit', ''))[:10]}, {meta.get('started', '')}; "
        "legend: growth largest/smallest",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _firewall_row(axes: Any, fw: dict[str, Any]) -> None:
    steps = fw["steps"]
    labels = [f"{s['networks']}n\n{s['ports']}p" for s in steps]
    x = list(range(len(steps)))
    for ax, key, title in (
        (axes[0], "port_change_ms", "firewall alone: one published port added or removed (ms)"),
        (axes[1], "network_change_ms", "firewall alone: one network added or removed (ms)"),
        (axes[2], "throughput_gbit", "firewall alone: forwarded, 1 TCP stream (Gbit/s)"),
    ):
        med = [s[key]["median"] for s in steps]
        ax.plot(x, med, marker="o", color=POUCH, label=f"pouch (x{fw['growth'][key]:.2f})")
        ax.fill_between(
            x,
            [s[key]["min"] for s in steps],
            [s[key]["max"] for s in steps],
            color=POUCH,
            alpha=0.15,
        )
        ax.set_title(title, fontsize=9)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    for ax in axes[3:]:
        ax.axis("off")
