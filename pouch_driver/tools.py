"""The operator commands: ``status``, ``check`` and ``gc``.

Each asks the running daemon over its socket (so repairs run under the daemon's locks) and,
when no daemon answers, works offline on the store and the kernel directly (the state
directory's lock keeps a daemon from starting meanwhile).
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TextIO

import aiohttp

from . import admin, engine
from .config import Settings
from .http.handlers import status_body
from .http.schemas import ReportResponse, StatusResponse
from .kernel.firewall import IptablesFirewall
from .kernel.links import NetlinkLinks
from .naming import Names
from .service import Service, short
from .store import Store


class DaemonDown(Exception):
    pass


async def _call(settings: Settings, method: str, body: Any = None) -> dict[str, Any]:
    connector = aiohttp.UnixConnector(path=str(settings.socket))
    try:
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=300)
        ) as session, session.post(
            f"http://plugin.moby.localhost/{method}",
            data=b"" if body is None else json.dumps(body).encode(),
        ) as resp:
            doc: dict[str, Any] = json.loads(await resp.read())
            if resp.status != 200:
                raise RuntimeError(doc.get("Err", f"HTTP {resp.status}"))
            return doc
    except (aiohttp.ClientConnectionError, FileNotFoundError) as exc:
        raise DaemonDown(str(exc)) from exc


@asynccontextmanager
async def offline(settings: Settings) -> AsyncIterator[Service]:
    svc = Service(settings, Store(settings.db_path), NetlinkLinks(workers=2),
                  IptablesFirewall(Names(settings.prefix), sysctl_dir=settings.sysctl_dir))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.drain()
        await svc.stop()


async def status(settings: Settings, as_json: bool, out: TextIO = sys.stdout) -> int:
    try:
        doc = await _call(settings, "Pouch.Status")
    except DaemonDown:
        async with offline(settings) as svc:
            doc = StatusResponse().dump(status_body(admin.status(svc)))
    if as_json:
        json.dump(doc, out, indent=2)
        out.write("\n")
        return 0
    _table(out, "NETWORK BRIDGE SUBNETS ENDPOINTS OPTIONS", [
        [short(n["NetworkID"]), n["Bridge"], ",".join(n["Subnets"]) or "-", str(n["Endpoints"]),
         ",".join(k for k, on in (("internal", n["Internal"]), ("no-icc", not n["ICC"]),
                                  ("no-masq", not n["Masquerade"])) if on) or "-"]
        for n in doc["Networks"]
    ])
    out.write("\n")
    _table(out, "ENDPOINT NETWORK VETH ADDRESS JOINED PORTS", [
        [short(e["EndpointID"]), short(e["NetworkID"]), e["Veth"],
         ",".join(a for a in (e["Address"], e["AddressIPv6"]) if a) or "-",
         "yes" if e["SandboxKey"] else "no", ",".join(e["Ports"]) or "-"]
        for e in doc["Endpoints"]
    ])
    out.write("\n")
    _table(out, "POOL USED RECLAIMED SIZE", [
        [p["PoolID"], str(p["Used"]), str(p["Reclaimed"]), str(p["Size"])] for p in doc["Pools"]
    ])
    if doc["PendingDeletes"]:
        out.write(f"\n{doc['PendingDeletes']} veth deletions pending\n")
    return 0


def _table(out: TextIO, header: str, rows: list[list[str]]) -> None:
    cols = header.split()
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    for row in [cols, *rows]:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


async def reconcile(
    settings: Settings, mode: str, engine_url: str | None, out: TextIO = sys.stdout
) -> int:
    """``check`` (exit 1 on any difference), ``gc`` (repair), ``plan`` (gc --dry-run)."""
    repair = mode == "gc"
    try:
        held = await _call(settings, "Pouch.Status")
        online = True
    except DaemonDown:
        online = False
        async with offline(settings) as svc:
            held = StatusResponse().dump(status_body(admin.status(svc)))
    nets: set[str] = set()
    eps: set[str] = set()
    consulted = False
    if engine_url:
        try:
            nets, eps = await engine.forgotten(
                engine_url, [n["NetworkID"] for n in held["Networks"]],
                [e["EndpointID"] for e in held["Endpoints"]],
            )
            consulted = True
        except engine.EngineUnavailable as exc:
            out.write(f"warning: {exc}; comparing store and kernel only\n")
    body = {"DryRun": not repair, "ForgetNetworks": sorted(nets), "ForgetEndpoints": sorted(eps),
            "Engine": consulted}
    if online:
        doc = await _call(settings, "Pouch.Reconcile", body)
    else:
        async with offline(settings) as svc:
            report = await admin.reconcile(svc, repair=repair, forget_networks=nets,
                                           forget_endpoints=eps, engine=consulted)
            doc = ReportResponse().dump({"problems": list(report.problems),
                                         "repaired": list(report.repaired)})
    label = {"check": "problem", "gc": "found", "plan": "would repair"}[mode]
    for line in doc["Problems"]:
        out.write(f"{label}: {line}\n")
    for line in doc["Repaired"]:
        out.write(f"repaired: {line}\n")
    if not doc["Problems"]:
        out.write("clean: store, kernel and firewall agree\n")
    return 1 if doc["Problems"] and mode == "check" else 0

