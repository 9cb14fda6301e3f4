"""The operator commands ``status``, ``check`` and ``gc``, as the CLI runs them.

Each asks the running daemon over its socket (so repairs run under the daemon's guards) and,
when no daemon answers, works offline on the store and the kernel directly (the state
directory's lock keeps a daemon from starting meanwhile). Either way the answer is the same
status model and report, rendered here.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import aiohttp

from . import engine
from .config import Settings
from .daemon import offline
from .http.schemas import ReportResponse, StatusResponse
from .service.audit import audit
from .service.reconcile import Report
from .service.state import short
from .service.status import Status


class DaemonDown(Exception):
    pass


async def _call(settings: Settings, method: str, body: Any = None) -> dict[str, Any]:
    connector = aiohttp.UnixConnector(path=str(settings.socket))
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=300)
            ) as session,
            session.post(
                f"http://plugin.moby.localhost/{method}",
                data=b"" if body is None else json.dumps(body).encode(),
            ) as resp,
        ):
            doc: dict[str, Any] = json.loads(await resp.read())
            if resp.status != 200:
                raise RuntimeError(doc.get("Err", f"HTTP {resp.status}"))
            return doc
    except (aiohttp.ClientConnectionError, FileNotFoundError) as exc:
        raise DaemonDown(str(exc)) from exc


async def _status(settings: Settings) -> Status:
    try:
        doc = await _call(settings, "Pouch.Status")
    except DaemonDown:
        async with offline(settings) as driver:
            return driver.status()
    loaded: Status = StatusResponse().load(doc)
    return loaded


async def status(settings: Settings, as_json: bool, out: TextIO = sys.stdout) -> int:
    st = await _status(settings)
    if as_json:
        json.dump(StatusResponse().dump(st), out, indent=2)
        out.write("\n")
        return 0
    _table(
        out,
        "NETWORK BRIDGE SUBNETS ENDPOINTS OPTIONS",
        [
            [
                short(n.network_id),
                n.bridge,
                ",".join(n.subnets) or "-",
                str(n.endpoints),
                ",".join(
                    k
                    for k, on in (
                        ("internal", n.internal),
                        ("no-icc", not n.icc),
                        ("no-masq", not n.masquerade),
                    )
                    if on
                )
                or "-",
            ]
            for n in st.networks
        ],
    )
    out.write("\n")
    _table(
        out,
        "ENDPOINT NETWORK VETH ADDRESS JOINED PORTS",
        [
            [
                short(e.endpoint_id),
                short(e.network_id),
                e.veth,
                ",".join(a for a in (e.address, e.address_v6) if a) or "-",
                "yes" if e.sandbox_key else "no",
                ",".join(e.ports) or "-",
            ]
            for e in st.endpoints
        ],
    )
    out.write("\n")
    _table(
        out,
        "POOL USED RECLAIMED SIZE",
        [[p.pool_id, str(p.used), str(p.reclaimed), str(p.size)] for p in st.pools],
    )
    if st.pending_deletes:
        out.write(f"\n{st.pending_deletes} veth deletions pending\n")
    if (c := st.cluster) is not None:
        state = "connected" if c.connected else f"NOT connected ({c.last_error})"
        out.write(
            f"\ncluster: host {c.host}, etcd {','.join(c.store)} {state}; "
            f"{len(c.hosts)} host(s): {', '.join(c.hosts) or '-'}\n"
            f"etcd round trip p50 {c.store_p50_ms:.1f} ms, p99 {c.store_p99_ms:.1f} ms; "
            f"watch lag p50 {c.watch_lag_ms:.1f} ms\n\n"
        )
        _table(
            out,
            "CLUSTER NETWORK VNI MEMBERS REMOTE BLOCKS PINS",
            [
                [
                    n.name,
                    short(n.network_id),
                    str(n.vni),
                    ",".join(n.members) or "-",
                    str(n.remote_endpoints),
                    ",".join(n.blocks) or "-",
                    ",".join(n.pins) or "-",
                ]
                for n in c.networks
            ],
        )
    return 0


def _table(out: TextIO, header: str, rows: list[list[str]]) -> None:
    cols = header.split()
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)
    ]
    for row in [cols, *rows]:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


async def check(
    settings: Settings, mode: str, engine_url: str | None, out: TextIO = sys.stdout
) -> int:
    """``check`` (exit 1 on any difference), ``gc`` (repair), ``plan`` (gc --dry-run)."""
    repair = mode == "gc"
    try:
        held: Status = StatusResponse().load(await _call(settings, "Pouch.Status"))
        online = True
    except DaemonDown:
        online = False
        async with offline(settings) as driver:
            held = driver.status()
    nets: set[str] = set()
    eps: set[str] = set()
    consulted = False
    if engine_url:
        try:
            nets, eps = await engine.forgotten(
                engine_url,
                [n.network_id for n in held.networks],
                [e.endpoint_id for e in held.endpoints],
            )
            consulted = True
        except engine.EngineUnavailable as exc:
            out.write(f"warning: {exc}; comparing store and kernel only\n")
    if online:
        body = {
            "DryRun": not repair,
            "ForgetNetworks": sorted(nets),
            "ForgetEndpoints": sorted(eps),
            "Engine": consulted,
        }
        answer = ReportResponse().load(await _call(settings, "Pouch.Reconcile", body))
        report = Report(answer.problems, answer.repaired)
    else:
        async with offline(settings) as driver:
            report = await audit(
                driver, repair=repair, forget_networks=nets, forget_endpoints=eps, engine=consulted
            )
    label = {"check": "problem", "gc": "found", "plan": "would repair"}[mode]
    for line in report.problems:
        out.write(f"{label}: {line}\n")
    for line in report.repaired:
        out.write(f"repaired: {line}\n")
    if not report.problems:
        out.write("clean: store, kernel and firewall agree\n")
    return 1 if report.problems and mode == "check" else 0
