"""The plugin's own time per call as the host grows, over its socket, without an engine.

One daemon in a throwaway namespace (log level info, firewall on, store fsynced). The
measured operation is what the engine sends for a network created with one container
publishing one port, then both removed: RequestPool, RequestAddress (gateway),
CreateNetwork, RequestAddress, CreateEndpoint, Join, ProgramExternalConnectivity,
RevokeExternalConnectivity, Leave, DeleteEndpoint, ReleaseAddress, DeleteNetwork,
ReleasePool, with pauses of 150 ms around the removals (engine operations come tens of
milliseconds apart). It is timed on a host holding one network, then on the same daemon
grown to ``NETWORKS`` networks and ``PORTS`` published ports spread over endpoints of ten
ports on half of them (many containers publishing a few ports each: every publishing bridge
has port chains of its own). Server-side durations come from the plugin's request log; the
baseline is the same daemon at the smallest host, in the same run.

A third measurement adds, beside ours, rules shaped like Engine 20.10's for as many bridge
networks and published ports (``docker_rules``), one of them changed between calls as a
busy engine does: what a grown Docker host's tables cost the plugin, without dockerd on
the same two cores.

The engine benchmark (``scale.py``) publishes its thousand ports on one network, and
``forward.py`` hands the firewall a ready plan; this one covers what sits between: the
state turned into a plan and rendered across a hundred publishing bridges on every change.
"""

from __future__ import annotations

import hashlib
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

from .common import Daemon, PluginClient, Record, log, netns, ratio, run, workdir
from .plugin import SPACE, create_network

NETWORKS = 200
PORTS = 1000
PORTS_PER_ENDPOINT = 10
REPS = 8
#: what the summary line shows, in call order
SHOWN = (
    "CreateNetwork",
    "ProgramExternalConnectivity",
    "RevokeExternalConnectivity",
    "DeleteNetwork",
)


def _id(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


class Host:
    """Networks in 10.152-155.x.0/24 (``grow``) and 10.156.x.0/24 (measured ones)."""

    def __init__(self, c: PluginClient) -> None:
        self.c = c
        self.nets: list[tuple[str, str]] = []
        self.next_port = 20000

    def network(self, subnet: str, tag: str) -> tuple[str, str]:
        nid = _id(f"net-{tag}")
        create_network(self.c, subnet, nid)
        return subnet, nid

    def remove_network(self, subnet: str, nid: str) -> None:
        self.c.call("NetworkDriver.DeleteNetwork", {"NetworkID": nid})
        self.c.call("IpamDriver.ReleasePool", {"PoolID": f"{SPACE}/{subnet}"})

    def endpoint(self, subnet: str, nid: str, tag: str, ports: int) -> tuple[dict[str, str], str]:
        c = self.c
        addr = c.call(
            "IpamDriver.RequestAddress",
            {"PoolID": f"{SPACE}/{subnet}", "Address": "", "Options": None},
        )["Address"]
        ep = {"NetworkID": nid, "EndpointID": _id(f"ep-{tag}")}
        c.call(
            "NetworkDriver.CreateEndpoint",
            {**ep, "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""}},
        )
        c.call("NetworkDriver.Join", {**ep, "SandboxKey": "/var/run/docker/netns/x"})
        portmap = []
        for k in range(ports):
            port, self.next_port = self.next_port, self.next_port + 1
            portmap.append(
                {"Proto": 6, "Port": 80 + k, "HostIP": "", "HostPort": port, "HostPortEnd": port}
            )
        c.call(
            "NetworkDriver.ProgramExternalConnectivity",
            {**ep, "Options": {"com.docker.network.portmap": portmap}},
        )
        return ep, addr

    def remove_endpoint(self, subnet: str, ep: dict[str, str], addr: str) -> None:
        c = self.c
        c.call("NetworkDriver.RevokeExternalConnectivity", ep)
        c.call("NetworkDriver.Leave", ep)
        c.call("NetworkDriver.DeleteEndpoint", ep)
        c.call(
            "IpamDriver.ReleaseAddress",
            {"PoolID": f"{SPACE}/{subnet}", "Address": addr.split("/", maxsplit=1)[0]},
        )

    def grow(self, networks: int, ports: int) -> None:
        while len(self.nets) < networks:
            i = len(self.nets)
            self.nets.append(self.network(f"10.{152 + i // 256}.{i % 256}.0/24", f"grow-{i}"))
        for k in range(ports // PORTS_PER_ENDPOINT):
            subnet, nid = self.nets[k % len(self.nets)]
            self.endpoint(subnet, nid, f"grow-{k}", PORTS_PER_ENDPOINT)


def docker_rules(networks: int, ports: int) -> str:
    """``iptables-restore --noflush`` input shaped like Engine 20.10's rules for ``networks``
    bridge networks (br-*, 10.200-201.x.0/24) with ``ports`` published on the first: its
    MASQUERADE and DNATs in nat, four FORWARD rules per network, the isolation stages, an
    ACCEPT per published port in filter."""
    nat = [
        "*nat",
        ":DOCKER - [0:0]",
        "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
        "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
    ]
    flt = [
        "*filter",
        ":DOCKER - [0:0]",
        ":DOCKER-ISOLATION-STAGE-1 - [0:0]",
        ":DOCKER-ISOLATION-STAGE-2 - [0:0]",
        ":DOCKER-USER - [0:0]",
        "-A FORWARD -j DOCKER-USER",
        "-A FORWARD -j DOCKER-ISOLATION-STAGE-1",
        "-A DOCKER-USER -j RETURN",
    ]
    for i in range(networks):
        br, subnet = f"br-{i:012x}", f"10.{200 + i // 256}.{i % 256}.0/24"
        nat += [
            f"-A POSTROUTING -s {subnet} ! -o {br} -j MASQUERADE",
            f"-A DOCKER -i {br} -j RETURN",
        ]
        flt += [
            f"-A FORWARD -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-A FORWARD -o {br} -j DOCKER",
            f"-A FORWARD -i {br} ! -o {br} -j ACCEPT",
            f"-A FORWARD -i {br} -o {br} -j ACCEPT",
            f"-A DOCKER-ISOLATION-STAGE-1 -i {br} ! -o {br} -j DOCKER-ISOLATION-STAGE-2",
            f"-A DOCKER-ISOLATION-STAGE-2 -o {br} -j DROP",
        ]
    flt += ["-A DOCKER-ISOLATION-STAGE-1 -j RETURN", "-A DOCKER-ISOLATION-STAGE-2 -j RETURN"]
    br = f"br-{0:012x}"
    for p in range(ports):
        port, cip = 30000 + p, f"10.200.0.{2 + p // 500}"
        nat.append(
            f"-A DOCKER ! -i {br} -p tcp -m tcp --dport {port} -j DNAT --to-destination {cip}:80"
        )
        flt.append(f"-A DOCKER -d {cip}/32 ! -i {br} -o {br} -p tcp -m tcp --dport 80 -j ACCEPT")
    return "\n".join([*nat, "COMMIT", *flt, "COMMIT", ""])


def _engine_change(ns: str, r: int) -> None:
    """What a busy engine does between our calls: one rule of its own rewritten."""
    run(
        "ip", "netns", "exec", ns, "iptables", "-R", "DOCKER-ISOLATION-STAGE-2", "1",
        "-o", f"br-{0:012x}", "-m", "comment", "--comment", f"bench-{r}", "-j", "DROP",
    )  # fmt: skip


def _measure(
    d: Daemon, host: Host, label: str, reps: int, between: Callable[[int], None] | None = None
) -> dict[str, list[float]]:
    """ms per call of ``reps`` operations (after one warm-up); ``between(step)`` runs in the
    pauses."""
    out: dict[str, list[float]] = {}
    step = 0

    def pause() -> None:
        nonlocal step
        time.sleep(0.15)
        if between is not None:
            between(step)
            step += 1

    for r in range(reps + 1):
        mark = d.log_path.stat().st_size
        subnet, nid = host.network(f"10.156.{r}.0/24", f"{label}-{r}")
        ep, addr = host.endpoint(subnet, nid, f"{label}-{r}", 1)
        host.remove_endpoint(subnet, ep, addr)
        pause()
        host.remove_network(subnet, nid)
        pause()
        if r == 0:
            continue
        for call, secs in d.server_times(mark).items():
            out.setdefault(call, []).extend(s * 1000 for s in secs)
    return out


def run_all(rec: Record, *, quick: bool = False) -> None:
    networks, ports, reps = (20, 100, 3) if quick else (NETWORKS, PORTS, REPS)
    with netns() as ns, workdir() as base:
        d = Daemon(ns, base)
        d.start()
        c = PluginClient(d.socket)
        try:
            host = Host(c)
            host.grow(1, 0)
            small = _measure(d, host, "small", reps)
            t0 = time.monotonic()
            host.grow(networks, ports)
            log(
                f"[host calls] grown to {networks} networks, {ports} ports in "
                f"{time.monotonic() - t0:.0f} s"
            )
            large = _measure(d, host, "large", reps)
            feed = subprocess.run(
                ["ip", "netns", "exec", ns, "iptables-restore", "--noflush"],
                input=docker_rules(networks, ports),
                capture_output=True,
                text=True,
                check=False,
            )
            if feed.returncode != 0:
                raise RuntimeError(f"loading Docker-like rules: {feed.stderr.strip()}")
            docker = _measure(
                d, host, "docker", reps, between=lambda step: _engine_change(ns, step)
            )
        finally:
            c.close()
            d.stop()
    med = {
        call: (statistics.median(small[call]), statistics.median(large[call]))
        for call in small
        if call in large
    }
    beside = {call: statistics.median(docker[call]) for call in med if call in docker}
    total = (sum(a for a, _ in med.values()), sum(b for _, b in med.values()))
    with_docker = sum(beside.values())
    data: dict[str, Any] = {
        "networks": networks,
        "ports": ports,
        "ports_per_endpoint": PORTS_PER_ENDPOINT,
        "reps": reps,
        "median_ms": {
            call: {"smallest": a, "largest": b, "largest_beside_docker": beside.get(call)}
            for call, (a, b) in med.items()
        },
        "growth": {call: ratio(b, a) for call, (a, b) in med.items()},
        "operation_ms": {
            "smallest": total[0],
            "largest": total[1],
            "largest_beside_docker": with_docker,
        },
        "operation_growth": ratio(total[1], total[0]),
        "operation_growth_beside_docker": ratio(with_docker, total[0]),
        "raw_ms": {"smallest": small, "largest": large, "largest_beside_docker": docker},
    }
    shown = ", ".join(
        f"{call} {med[call][0]:.1f} -> {med[call][1]:.1f}" for call in SHOWN if call in med
    )
    rec.put(
        "host_calls",
        data,
        f"[host calls] 1 -> {networks} networks + {ports} ports, median ms: {shown}; "
        f"the whole operation {total[0]:.0f} -> {total[1]:.0f} ms "
        f"(x{data['operation_growth']:.2f}); beside Docker-like rules for {networks} networks "
        f"and {ports} ports, changing between calls: "
        + ", ".join(f"{call} {beside[call]:.1f}" for call in SHOWN if call in beside)
        + f", the whole {with_docker:.0f} ms (x{data['operation_growth_beside_docker']:.2f})",
    )
