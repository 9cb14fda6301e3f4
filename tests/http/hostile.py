"""Shared by the hostile-input suites: seed payloads per call, state snapshots, answer checks.

A *snapshot* is everything a failed call must leave unchanged: the service's networks,
endpoints and IPAM allocations, the fake kernel's links, the fake firewall's plan, and the
rows of the SQLite store read independently (so memory and disk are both checked).
"""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path
from typing import Any

from pouch_driver.http.handlers import CALLS

from .conftest import Plugin, payloads

D = payloads("dockerd-20.10")
P = payloads("pouchd")
NID = D["CreateNetwork"]["NetworkID"]
EID = D["CreateEndpoint"]["EndpointID"]
POUCH_NID = P["CreateNetwork"]["NetworkID"]
POUCH_EID = P["CreateEndpoint"]["EndpointID"]
BODYLESS = sorted(path for path, call in CALLS.items() if call.request is None)


def _path_for(key: str) -> str | None:
    """The call a payload file entry belongs to: RequestAddressGateway -> RequestAddress."""
    best: str | None = None
    for path in CALLS:
        method = path.rsplit(".", 1)[1]
        if key.startswith(method) and (best is None or len(method) > len(best.rsplit(".")[1])):
            best = path
    return best


def seeds() -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Every real payload, grouped by protocol path, plus our own admin calls."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {path: [] for path in CALLS}
    for engine, doc in (("dockerd", D), ("pouchd", P)):
        for key, body in doc.items():
            path = _path_for(key)
            assert path is not None, f"payload {key} matches no protocol call"
            out[path].append((f"{engine}:{key}", body))
    out["/Pouch.Reconcile"] += [
        ("admin:dry-run", {"DryRun": True, "ForgetNetworks": [], "ForgetEndpoints": []}),
        ("admin:repair", {"DryRun": False, "ForgetNetworks": [POUCH_NID]}),
    ]
    return out


SEEDS = seeds()


async def baseline(plugin: Plugin) -> None:
    """Both engines' `network create` + `run` (no published port): realistic state to attack."""
    await plugin.call("IpamDriver.RequestPool", D["RequestPool"])
    await plugin.call("IpamDriver.RequestAddress", D["RequestAddressGateway"])
    await plugin.call("IpamDriver.RequestAddress", D["RequestAddressAux"])
    await plugin.call("NetworkDriver.CreateNetwork", D["CreateNetwork"])
    await plugin.call("IpamDriver.RequestAddress", D["RequestAddressEndpoint"])
    await plugin.call("NetworkDriver.CreateEndpoint", D["CreateEndpoint"])
    await plugin.call("NetworkDriver.Join", D["Join"])
    await plugin.call("IpamDriver.RequestPool", P["RequestPool"])
    await plugin.call("IpamDriver.RequestAddress", P["RequestAddressGateway"])
    await plugin.call("NetworkDriver.CreateNetwork", P["CreateNetwork"])
    await plugin.call("IpamDriver.RequestAddress", P["RequestAddressEndpoint"])
    await plugin.call("NetworkDriver.CreateEndpoint", P["CreateEndpoint"])
    await plugin.call("NetworkDriver.Join", P["Join"])
    await settle(plugin)


async def settle(plugin: Plugin) -> None:
    """Background work done: deferred veth deletes, and writes queued behind an answer."""
    await plugin.service.deletes.drain()
    await plugin.service.store.flushed()


def store_rows(db_path: Path) -> dict[str, list[tuple[Any, ...]]]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return {
            table: sorted(db.execute(f"SELECT * FROM {table}"))  # noqa: S608 - fixed names
            for table in ("networks", "endpoints", "pools", "addresses")
        }
    finally:
        db.close()


def snapshot(plugin: Plugin) -> dict[str, Any]:
    svc = plugin.service
    return {
        "networks": dict(svc.state.networks),
        "endpoints": dict(svc.state.endpoints),
        "ipam": {k: dict(v.allocated) for k, v in svc.ipam.pools.items()},
        "links": dict(plugin.links.links),
        "firewall": plugin.firewall.plan,
        "store": store_rows(svc.store.path),
    }


def diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [key for key in before if before[key] != after[key]]


def check_answer(path: str, status: int, text: str) -> dict[str, Any]:
    """The contract every answer keeps, whatever was sent."""
    assert text, f"{path}: empty answer body (status {status})"
    doc = json.loads(text)
    assert isinstance(doc, dict), f"{path}: answer is not a JSON object: {text[:200]}"
    if status == 200:
        return doc
    assert 400 <= status < 600, f"{path}: status {status}"
    assert isinstance(doc.get("Err"), str) and doc["Err"].strip(), f"{path}: no Err: {doc}"
    if path in CALLS:
        assert status not in (404, 405), f"{path}: {status} for a known call: {doc}"
    assert not doc["Err"].startswith("internal error"), (
        f"{path}: unhandled exception in the plugin: {doc['Err']}"
    )
    return doc


def mutate_at(body: Any, loc: tuple[Any, ...], fn: Any) -> Any:
    """A deep copy of ``body`` with the value at ``loc`` replaced by ``fn(old)``.

    ``fn`` returning ``DROP`` removes the key (or list item).
    """
    out = copy.deepcopy(body)
    parent: Any = out
    for key in loc[:-1]:
        parent = parent[key]
    new = fn(parent[loc[-1]])
    if new is DROP:
        del parent[loc[-1]]
    else:
        parent[loc[-1]] = new
    return out


DROP = object()


def locations(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path inside a JSON document (dict keys and list indexes), outermost first."""
    out: list[tuple[Any, ...]] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            out.append((*prefix, key))
            out.extend(locations(value, (*prefix, key)))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out.append((*prefix, i))
            out.extend(locations(value, (*prefix, i)))
    return out
