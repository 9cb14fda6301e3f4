"""Operator views and repairs: status, check and gc, over a running or offline service.

``check`` and ``gc`` may be told which networks and endpoints the engine no longer knows (the
CLI asks the engine's API, out of band); the daemon itself never calls the engine, which can
deadlock the engine's start-up (PROTOCOL.md 8.2). Imports ``service`` and ``reconcile``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from .ipam import PoolState
from .model import Endpoint, Network
from .reconcile import Reconciler, Report
from .service import Service, short


@dataclass(frozen=True)
class PoolUse:
    pool_id: str
    network: str
    sub_pool: str | None
    used: int
    reclaimed: int  # parked after their endpoint was dropped; reused last
    size: int


@dataclass(frozen=True)
class Status:
    networks: tuple[Network, ...]
    endpoints: tuple[Endpoint, ...]
    pools: tuple[PoolUse, ...]
    pending_deletes: int


def _pool_use(state: PoolState) -> PoolUse:
    return PoolUse(
        pool_id=state.pool.pool_id,
        network=str(state.pool.network),
        sub_pool=str(state.pool.sub_pool) if state.pool.sub_pool else None,
        used=len(state.allocated) - (parked := state.reclaimed),
        reclaimed=parked,
        size=state.size,
    )


def status(svc: Service) -> Status:
    return Status(
        networks=tuple(sorted(svc.networks.values(), key=lambda n: n.network_id)),
        endpoints=tuple(sorted(svc.endpoints.values(), key=lambda e: (e.network_id,
                                                                     e.endpoint_id))),
        pools=tuple(_pool_use(s) for _, s in sorted(svc.ipam.pools.items())),
        pending_deletes=len(svc.pending_deletes()),
    )


async def reconcile(
    svc: Service,
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
    grace = 0.0 if engine else float("inf")
    report = await Reconciler(svc, repair=repair, grace=grace).run()
    problems, repaired = list(report.problems), list(report.repaired)
    for nid in sorted(forget_networks):
        if nid not in svc.networks:
            continue
        problems.append(f"network {short(nid)} is unknown to the engine")
        if repair:
            await svc.delete_network(nid)
            repaired.append(f"deleted network {short(nid)} (unknown to the engine)")
    gone = [svc.endpoints[e] for e in sorted(forget_endpoints) if e in svc.endpoints]
    for ep in gone:
        problems.append(f"endpoint {short(ep.endpoint_id)} is unknown to the engine")
    if repair and gone:
        for ep in gone:
            async with svc.guard_endpoint(ep.network_id, ep.endpoint_id):
                current = svc.endpoints.get(ep.endpoint_id)
                if current is not None:
                    repaired.extend(await svc.forget_endpoints([current]))
    return Report(problems=tuple(problems), repaired=tuple(repaired))
