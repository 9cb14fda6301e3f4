"""Our firewall alone, as the host grows: the cost of one change, and forwarded throughput.

No dockerd: a throwaway namespace holds one bridge with two "containers" (namespaces on
veths), ``br_netfilter`` on, and ``IptablesFirewall`` applies plans of N networks (the
measured bridge sorted last, where a rule per network costs most) and P published ports:

* per change: one published port added, then removed (``apply`` of the plan with it, then
  without it), median of ``reps`` -- the firewall's share of a ``docker run -p``;
* one network added, then removed, likewise;
* forwarded throughput between the two containers (``bench.pump``, one TCP stream).

Run against another copy of the package with ``PYTHONPATH=<copy>`` (the comparison in
bench/README.md is made that way).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

from pouch_driver.kernel import FirewallPlan, NetworkRules, PortForward
from pouch_driver.kernel.iptables import IptablesFirewall
from pouch_driver.naming import Names

from .common import ROOT, log, netns, run

SIZES = ((2, 1), (50, 1), (200, 1), (200, 500), (200, 1000))
QUICK_SIZES = ((2, 1), (20, 1), (20, 100))
OURS = "pbbzzzzzzzzzzzz"  # sorts after every other bridge: the last network of the plan
SUBNET = ipaddress.ip_network("10.150.0.0/16")
PORT = 5201


def _net(bridge: str, subnet: str) -> NetworkRules:
    return NetworkRules(
        bridge=bridge,
        subnets=(ipaddress.ip_network(subnet),),
        icc=True,
        masquerade=True,
        internal=False,
    )


def _forward(i: int) -> PortForward:
    return PortForward(
        bridge=OURS,
        proto="tcp",
        host_ip=None,
        host_port=20000 + i,
        container_ip=SUBNET[256 + i],
        container_port=80,
    )


def plan(networks: int, ports: int) -> FirewallPlan:
    others = tuple(_net(f"pbb{i:012d}", f"10.151.{i}.0/24") for i in range(networks - 1))
    return FirewallPlan(
        networks=(*others, _net(OURS, str(SUBNET))),
        forwards=tuple(_forward(i) for i in range(ports)),
    )


def _sh(ns: str, *argv: str) -> None:
    run("ip", "netns", "exec", ns, *argv)


def _lab(host: str, c1: str, c2: str) -> None:
    _sh(host, "ip", "link", "add", OURS, "type", "bridge")
    _sh(host, "ip", "addr", "add", f"{SUBNET[1]}/16", "dev", OURS)
    _sh(host, "ip", "link", "set", OURS, "up")
    for i, c in enumerate((c1, c2)):
        veth = f"pbh{i}"
        _sh(host, "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", c)
        _sh(host, "ip", "link", "set", veth, "master", OURS, "up")
        _sh(c, "ip", "addr", "add", f"{SUBNET[2 + i]}/16", "dev", "eth0")
        _sh(c, "ip", "link", "set", "eth0", "up")
    _sh(host, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")


def throughput(c1: str, c2: str, seconds: float) -> float:
    """Gbit/s of one TCP stream from c1 to c2 across the bridge."""
    py = [sys.executable, "-m", "bench.pump"]
    srv = subprocess.Popen(
        ["ip", "netns", "exec", c2, *py, "serve", str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert srv.stdout is not None
        srv.stdout.readline()
        out = subprocess.run(
            ["ip", "netns", "exec", c1, *py, "send", str(SUBNET[3]), str(PORT), str(seconds)],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
            cwd=ROOT,
        ).stdout
        srv.wait(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    sent, elapsed = out.split()
    return int(sent) * 8 / float(elapsed) / 1e9


#: The pause between two applies measured "apart": engine operations come tens of
#: milliseconds apart or more, longer than the grace period a removal leaves behind.
GAP = 0.1


async def _timed(
    fw: IptablesFirewall, a: FirewallPlan, b: FirewallPlan, reps: int, gap: float = 0.0
) -> list[float]:
    """Seconds of ``apply(a)`` then ``apply(b)``, each, ``reps`` times (after one warm-up),
    ``gap`` seconds before each apply."""
    out: list[float] = []
    for i in range(reps + 1):
        await asyncio.sleep(gap)
        t0 = time.perf_counter()
        await fw.apply(a)
        t1 = time.perf_counter()
        await asyncio.sleep(gap)
        t2 = time.perf_counter()
        await fw.apply(b)
        t3 = time.perf_counter()
        if i:
            out.extend((t1 - t0, t3 - t2))
    return out


def _stats(xs: list[float], scale: float = 1000) -> dict[str, Any]:
    v = [x * scale for x in xs]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "raw": v}


def _measure_changes(networks: int, ports: int, reps: int) -> dict[str, Any]:
    """In the namespace itself (as the plugin runs: sysctls are file writes, iptables needs
    no nsenter): apply the plan of this size, then time one port and one network more/less."""
    fw = IptablesFirewall(Names("pb"))
    base = plan(networks, ports)
    one_more = replace(base, forwards=(*base.forwards, _forward(ports)))
    extra = _net("pbbyyyyyyyyyyyy", "10.152.0.0/24")
    with_net = replace(base, networks=(extra, *base.networks))

    async def measure() -> dict[str, Any]:
        t0 = time.perf_counter()
        await fw.apply(base)
        first = time.perf_counter() - t0
        ports = await _timed(fw, one_more, base, reps)
        nets = await _timed(fw, with_net, base, reps)
        # Adds and removals apart too, and also spaced in time: after a removal of rules
        # with xt matches, nf_tables makes the next commit wait for an RCU grace period
        # (10-20 ms here) if it comes at once; back to back, an add carries that wait.
        ports_apart = await _timed(fw, one_more, base, reps, GAP)
        nets_apart = await _timed(fw, with_net, base, reps, GAP)
        await fw.close()
        return {
            "first_apply_ms": first * 1000,
            "port_change_ms": _stats(ports),
            "port_add_ms": _stats(ports[0::2]),
            "port_remove_ms": _stats(ports[1::2]),
            "network_change_ms": _stats(nets),
            "network_add_ms": _stats(nets[0::2]),
            "network_remove_ms": _stats(nets[1::2]),
            "port_add_spaced_ms": _stats(ports_apart[0::2]),
            "port_remove_spaced_ms": _stats(ports_apart[1::2]),
            "network_add_spaced_ms": _stats(nets_apart[0::2]),
            "network_remove_spaced_ms": _stats(nets_apart[1::2]),
        }

    return asyncio.run(measure())


def run_all(
    *,
    quick: bool = False,
    reps: int = 10,
    tput_reps: int = 3,
    sizes: tuple[tuple[int, int], ...] | None = None,
) -> dict[str, Any]:
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    seconds = 1.0 if quick else 2.0
    reps, tput_reps = (3, 1) if quick else (reps, tput_reps)
    steps = []
    with netns() as host, netns() as c1, netns() as c2:
        _lab(host, c1, c2)
        for networks, ports in sizes:
            size = (str(networks), str(ports), str(reps))
            out = subprocess.run(
                [*("ip", "netns", "exec", host, sys.executable, "-m", "bench.forward"), *size],
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
                cwd=ROOT,
            ).stdout
            step = {"networks": networks, "ports": ports, **json.loads(out)}
            tput = [throughput(c1, c2, seconds) for _ in range(tput_reps)]
            step["throughput_gbit"] = _stats(tput, 1)
            steps.append(step)
            log(
                f"[firewall] {networks:>3} networks {ports:>4} ports: one port added/removed "
                f"{step['port_change_ms']['median']:.1f} ms "
                f"({step['port_add_ms']['median']:.1f}/{step['port_remove_ms']['median']:.1f}), "
                f"one network {step['network_change_ms']['median']:.1f} ms "
                f"({step['network_add_ms']['median']:.1f}/"
                f"{step['network_remove_ms']['median']:.1f}); {GAP * 1000:.0f} ms apart, port "
                f"{step['port_add_spaced_ms']['median']:.1f}/"
                f"{step['port_remove_spaced_ms']['median']:.1f}, network "
                f"{step['network_add_spaced_ms']['median']:.1f}/"
                f"{step['network_remove_spaced_ms']['median']:.1f} (whole plan at first "
                f"{step['first_apply_ms']:.0f} ms); throughput "
                f"{step['throughput_gbit']['median']:.2f} Gbit/s "
                f"({step['throughput_gbit']['min']:.2f}-{step['throughput_gbit']['max']:.2f})"
            )
    first, last = steps[0], steps[-1]
    growth = {
        k: last[k]["median"] / first[k]["median"]
        for k in (
            "port_change_ms",
            "port_add_ms",
            "port_remove_ms",
            "network_change_ms",
            "network_add_ms",
            "network_remove_ms",
            "port_add_spaced_ms",
            "port_remove_spaced_ms",
            "network_add_spaced_ms",
            "network_remove_spaced_ms",
            "throughput_gbit",
        )
    }
    log(
        "[firewall] growth (largest/smallest host): one port "
        f"{growth['port_change_ms']:.2f} (add {growth['port_add_ms']:.2f}, remove "
        f"{growth['port_remove_ms']:.2f}), one network {growth['network_change_ms']:.2f} "
        f"(add {growth['network_add_ms']:.2f}, remove {growth['network_remove_ms']:.2f}); "
        f"{GAP * 1000:.0f} ms apart: port add {growth['port_add_spaced_ms']:.2f}, remove "
        f"{growth['port_remove_spaced_ms']:.2f}, network add "
        f"{growth['network_add_spaced_ms']:.2f}, remove {growth['network_remove_spaced_ms']:.2f}; "
        f"throughput {growth['throughput_gbit']:.2f}"
    )
    return {"sizes": sizes, "reps": reps, "steps": steps, "growth": growth}


if __name__ == "__main__":
    print(json.dumps(_measure_changes(*(int(a) for a in sys.argv[1:4]))))
