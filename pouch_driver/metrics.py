"""Opt-in Prometheus metrics: per-call latency and errors, endpoints, networks, pool use.

Text exposition format written by hand (a few lines; no extra dependency). Served only on a
Unix socket or a loopback port: the numbers describe the host's networks.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field

from .service import Service

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value
        self.n += 1


class Metrics:
    def __init__(self) -> None:
        self.latency: dict[str, _Histogram] = defaultdict(_Histogram)
        self.requests: dict[tuple[str, int], int] = defaultdict(int)

    def observe(self, path: str, seconds: float, status: int) -> None:
        call = path.lstrip("/") or "unknown"
        if len(call) > 64 or not all(c.isalnum() or c == "." for c in call):
            call = "invalid"  # never let request paths grow label cardinality
        self.latency[call].observe(seconds)
        self.requests[(call, status)] += 1

    def render(self, svc: Service | None) -> str:
        out: list[str] = [
            "# HELP pouch_driver_request_seconds Time to answer a protocol call.",
            "# TYPE pouch_driver_request_seconds histogram",
        ]
        for call, h in sorted(self.latency.items()):
            running = 0
            for bound, count in zip((*BUCKETS, float("inf")), h.counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'pouch_driver_request_seconds_bucket{{call="{call}",le="{le}"}} '
                           f"{running}")
            out.append(f'pouch_driver_request_seconds_sum{{call="{call}"}} {h.total:.6f}')
            out.append(f'pouch_driver_request_seconds_count{{call="{call}"}} {h.n}')
        out += [
            "# HELP pouch_driver_requests_total Protocol calls answered, by status.",
            "# TYPE pouch_driver_requests_total counter",
        ]
        for (call, status), n in sorted(self.requests.items()):
            out.append(f'pouch_driver_requests_total{{call="{call}",status="{status}"}} {n}')
        out += [
            "# HELP pouch_driver_errors_total Protocol calls answered with an error.",
            "# TYPE pouch_driver_errors_total counter",
        ]
        errors: dict[str, int] = defaultdict(int)
        for (call, status), n in self.requests.items():
            if status >= 400:
                errors[call] += n
        for call, n in sorted(errors.items()):
            out.append(f'pouch_driver_errors_total{{call="{call}"}} {n}')
        if svc is not None:
            out += self._state(svc)
        return "\n".join(out) + "\n"

    @staticmethod
    def _state(svc: Service) -> list[str]:
        out = [
            "# HELP pouch_driver_networks Networks served.",
            "# TYPE pouch_driver_networks gauge",
            f"pouch_driver_networks {len(svc.networks)}",
            "# HELP pouch_driver_endpoints Endpoints, by network.",
            "# TYPE pouch_driver_endpoints gauge",
        ]
        per_net: dict[str, int] = defaultdict(int)
        for ep in svc.endpoints.values():
            per_net[ep.network_id] += 1
        for nid in sorted(svc.networks):
            out.append(f'pouch_driver_endpoints{{network="{nid[:12]}"}} {per_net[nid]}')
        out += [
            "# HELP pouch_driver_pool_addresses_used Addresses handed out, by pool.",
            "# TYPE pouch_driver_pool_addresses_used gauge",
        ]
        sizes: list[str] = [
            "# HELP pouch_driver_pool_addresses Addresses a pool can hand out.",
            "# TYPE pouch_driver_pool_addresses gauge",
        ]
        reclaimed: list[str] = [
            "# HELP pouch_driver_pool_addresses_reclaimed Addresses of endpoints dropped without"
            " the engine's word, reused only when nothing else is free.",
            "# TYPE pouch_driver_pool_addresses_reclaimed gauge",
        ]
        for _, state in sorted(svc.ipam.pools.items()):
            label = f'pool="{state.pool.network}",space="{state.pool.address_space}"'
            parked = state.reclaimed
            out.append(f"pouch_driver_pool_addresses_used{{{label}}} "
                       f"{len(state.allocated) - parked}")
            reclaimed.append(f"pouch_driver_pool_addresses_reclaimed{{{label}}} {parked}")
            sizes.append(f"pouch_driver_pool_addresses{{{label}}} {state.size}")
        out += sizes + reclaimed
        out += [
            "# HELP pouch_driver_pending_deletes Veths waiting for their deferred delete.",
            "# TYPE pouch_driver_pending_deletes gauge",
            f"pouch_driver_pending_deletes {len(svc.pending_deletes())}",
        ]
        return out
