"""``check`` and ``gc`` over a running or offline driver: reconcile, and drop what the engine
says it no longer knows.

The engine's view is gathered by the CLI, out of band: the daemon itself never calls the
engine, which can deadlock the engine's start-up (docs/protocol.md §5.6).
"""

from __future__ import annotations

from collections.abc import Collection

from .driver import Driver
from .reconcile import Reconciler, Report
from .state import short


async def audit(
    driver: Driver,
    *,
    repair: bool,
    forget_networks: Collection[str] = (),
    forget_endpoints: Collection[str] = (),
    engine: bool = False,
) -> Report:
    """Reconcile store and kernel; also drop what the engine says it no longer knows.

    ``engine``: the caller compared with the engine's view, so records the engine rolled back
    (leftovers of answers lost in a crash) are looked at now, without the sweep's grace period;
    without it, check/gc compare store, kernel and firewall only.
    """
    state = driver.state
    grace = 0.0 if engine else float("inf")
    report = await Reconciler(driver, repair=repair, grace=grace).run()
    problems, repaired = list(report.problems), list(report.repaired)
    if driver.cluster is not None:
        found, fixed = await driver.cluster.audit(repair=repair)
        problems += found
        repaired += fixed
    for nid in sorted(forget_networks):
        if nid not in state.networks:
            continue
        problems.append(f"network {short(nid)} is unknown to the engine")
        if repair:
            await driver.networks.delete_network(nid)
            repaired.append(f"deleted network {short(nid)} (unknown to the engine)")
    gone = [state.endpoints[e] for e in sorted(forget_endpoints) if e in state.endpoints]
    for ep in gone:
        problems.append(f"endpoint {short(ep.endpoint_id)} is unknown to the engine")
    if repair and gone:
        for ep in gone:
            async with driver.guards.endpoint(ep.network_id, ep.endpoint_id):
                current = state.endpoints.get(ep.endpoint_id)
                if current is not None:
                    repaired.extend(await driver.endpoints.forget_endpoints([current]))
    return Report(problems=tuple(problems), repaired=tuple(repaired))
