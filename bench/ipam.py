"""IPAM in-process: a /8 pool and its first address; 100,000 allocations; memory per pool.

The allocator (``pouch_driver.ipam.Ipam``) is pure, so it is timed directly. Memory is
measured with tracemalloc in a separate pass (tracing slows allocation 2-3x, so the timing
pass runs without it).
"""

from __future__ import annotations

import gc
import ipaddress
import time
import tracemalloc

from pouch_driver.config import Settings
from pouch_driver.ipam import Ipam

from .common import Record, summary

SPACE = "PouchLocal"
SLASH8 = ipaddress.ip_network("10.0.0.0/8")
SLASH24 = ipaddress.ip_network("10.0.0.0/24")
MARKS = (1_000, 10_000, 100_000)
WINDOW = 1_000  # allocations averaged just before each mark


def _ipam() -> Ipam:
    s = Settings()
    return Ipam(s.pools_v4, s.pools_v6)


def pool_and_first_address(rec: Record, repeats: int = 2000) -> None:
    pool_t, addr_t = [], []
    for _ in range(repeats):
        ipam = _ipam()
        t0 = time.perf_counter()
        pool = ipam.request_pool(SPACE, SLASH8, None, v6=False)
        t1 = time.perf_counter()
        ipam.request_address(pool.pool_id, None)
        t2 = time.perf_counter()
        pool_t.append(t1 - t0)
        addr_t.append(t2 - t1)
    p, a = summary(pool_t), summary(addr_t)
    rec.put(
        "ipam_inproc_slash8_first",
        {"request_pool": p, "first_request_address": a},
        f"IPAM in-process: RequestPool /8 {p['median'] * 1000:.1f} us, first RequestAddress "
        f"{a['median'] * 1000:.1f} us (median of {repeats})",
    )


def allocations(rec: Record, total: int = MARKS[-1]) -> None:
    """Time per allocation just before 1k/10k/100k, then tracemalloc at the same points."""
    ipam = _ipam()
    pool = ipam.request_pool(SPACE, SLASH8, None, v6=False)
    stamps: dict[int, float] = {}
    gc.collect()
    t_start = time.perf_counter()
    marks = {m - WINDOW for m in MARKS} | set(MARKS)
    for i in range(1, total + 1):
        ipam.request_address(pool.pool_id, None)
        if i in marks:
            stamps[i] = time.perf_counter()
    t_end = time.perf_counter()
    stamps[0] = t_start
    timing = {}
    for m in MARKS:
        if m > total:
            continue
        timing[str(m)] = {
            "us_per_alloc_last_1k": (stamps[m] - stamps[m - WINDOW]) / WINDOW * 1e6,
            "us_per_alloc_cumulative": (stamps[m] - t_start) / m * 1e6,
        }
    total_s = t_end - t_start

    # Memory pass, traced.
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    ipam = _ipam()
    pool = ipam.request_pool(SPACE, SLASH8, None, v6=False)
    memory = {"0": tracemalloc.get_traced_memory()[0] - base}
    for i in range(1, total + 1):
        ipam.request_address(pool.pool_id, None)
        if i in MARKS:
            memory[str(i)] = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del ipam

    rec.put(
        "ipam_inproc_allocations",
        {
            "total": total,
            "seconds": total_s,
            "timing": timing,
            "traced_bytes": memory,
            "bytes_per_allocation_at_100k": (memory.get("100000", 0) - memory["0"]) / total,
        },
        "IPAM in-process: "
        + ", ".join(
            f"{int(m) // 1000}k: {t['us_per_alloc_last_1k']:.1f} us/alloc, "
            f"{memory.get(m, 0) / 1024:.0f} KiB"
            for m, t in timing.items()
        )
        + f" (all {total} in {total_s:.2f} s)",
    )


def empty_pools(rec: Record) -> None:
    """Traced bytes of an Ipam holding one empty /8 vs one empty /24 (and /64, /48 for v6)."""
    out = {}
    for net in (
        SLASH24,
        SLASH8,
        ipaddress.ip_network("fd00:1::/64"),
        ipaddress.ip_network("fd00:2::/48"),
    ):
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        ipam = _ipam()
        before = tracemalloc.get_traced_memory()[0]
        ipam.request_pool(SPACE, net, None, v6=net.version == 6)
        out[str(net)] = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        del ipam, base
    rec.put(
        "ipam_inproc_empty_pool",
        {"traced_bytes": out},
        "IPAM in-process: empty pool costs "
        + ", ".join(f"{k} {v} B" for k, v in out.items())
        + f"; /8 vs /24 ratio {out[str(SLASH8)] / out[str(SLASH24)]:.2f}",
    )


def run_all(rec: Record) -> None:
    pool_and_first_address(rec)
    allocations(rec)
    empty_pools(rec)
