"""Opt-in Prometheus metrics: per-call latency and errors, endpoints, networks, pool use.

Text exposition format written by hand (a few lines; no extra dependency). Served only on a
Unix socket or a loopback port: the numbers describe the host's networks.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field

from .service.status import Status

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

    def render(self, status: Status | None) -> str:
        out: list[str] = [
            "# HELP pouch_driver_request_seconds Time to answer a protocol call.",
            "# TYPE pouch_driver_request_seconds histogram",
        ]
        for call, h in sorted(self.latency.items()):
            running = 0
            for bound, count in zip((*BUCKETS, float("inf")), h.counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(
                    f'pouch_driver_request_seconds_bucket{{call="{call}",le="{le}"}} {running}'
                )
            out.append(f'pouch_driver_request_seconds_sum{{call="{call}"}} {h.total:.6f}')
            out.append(f'pouch_driver_request_seconds_count{{call="{call}"}} {h.n}')
        out += [
            "# HELP pouch_driver_requests_total Protocol calls answered, by status.",
            "# TYPE pouch_driver_requests_total counter",
        ]
        for (call, code), n in sorted(self.requests.items()):
            out.append(f'pouch_driver_requests_total{{call="{call}",status="{code}"}} {n}')
        out += [
            "# HELP pouch_driver_errors_total Protocol calls answered with an error.",
            "# TYPE pouch_driver_errors_total counter",
        ]
        errors: dict[str, int] = defaultdict(int)
        for (call, code), n in self.requests.items():
            if code >= 400:
                errors[call] += n
        for call, n in sorted(errors.items()):
            out.append(f'pouch_driver_errors_total{{call="{call}"}} {n}')
        if status is not None:
            out += self._state(status)
        return "\n".join(out) + "\n"

    @staticmethod
    def _state(status: Status) -> list[str]:
        out = [
            "# HELP pouch_driver_networks Networks served.",
            "# TYPE pouch_driver_networks gauge",
            f"pouch_driver_networks {len(status.networks)}",
            "# HELP pouch_driver_endpoints Endpoints, by network.",
            "# TYPE pouch_driver_endpoints gauge",
        ]
        for net in status.networks:
            out.append(f'pouch_driver_endpoints{{network="{net.network_id[:12]}"}} {net.endpoints}')
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
        for pool in status.pools:
            label = f'pool="{pool.network}",space="{pool.address_space}"'
            out.append(f"pouch_driver_pool_addresses_used{{{label}}} {pool.used}")
            reclaimed.append(f"pouch_driver_pool_addresses_reclaimed{{{label}}} {pool.reclaimed}")
            sizes.append(f"pouch_driver_pool_addresses{{{label}}} {pool.size}")
        out += sizes + reclaimed
        if (c := status.cluster) is not None:
            store = "pouch_driver_cluster_store_seconds"
            out += [
                "# HELP pouch_driver_cluster_connected 1 while the etcd session is open.",
                "# TYPE pouch_driver_cluster_connected gauge",
                f"pouch_driver_cluster_connected {int(c.connected)}",
                "# HELP pouch_driver_cluster_hosts Hosts with a live lease in the cluster.",
                "# TYPE pouch_driver_cluster_hosts gauge",
                f"pouch_driver_cluster_hosts {len(c.hosts)}",
                "# HELP pouch_driver_cluster_store_seconds etcd round trips of recent requests.",
                "# TYPE pouch_driver_cluster_store_seconds gauge",
                f'{store}{{quantile="0.5"}} {c.store_p50_ms / 1000:.6f}',
                f'{store}{{quantile="0.99"}} {c.store_p99_ms / 1000:.6f}',
                "# HELP pouch_driver_cluster_watch_lag_seconds Median delay from another host's"
                " endpoint write to its watch event here.",
                "# TYPE pouch_driver_cluster_watch_lag_seconds gauge",
                f"pouch_driver_cluster_watch_lag_seconds {c.watch_lag_ms / 1000:.6f}",
                "# HELP pouch_driver_cluster_remote_endpoints Endpoints of other hosts, by"
                " cluster network.",
                "# TYPE pouch_driver_cluster_remote_endpoints gauge",
            ]
            out += [
                f'pouch_driver_cluster_remote_endpoints{{network="{n.name}"}} {n.remote_endpoints}'
                for n in c.networks
            ]
        out += [
            "# HELP pouch_driver_pending_deletes Veths waiting for their deferred delete.",
            "# TYPE pouch_driver_pending_deletes gauge",
            f"pouch_driver_pending_deletes {status.pending_deletes}",
        ]
        return out
