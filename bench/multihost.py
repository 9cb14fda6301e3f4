"""Across hosts through real engines: pouch's cluster network beside Docker's Swarm overlay.

Two Docker hosts (tests/multihost/harness.py: each a netns and a mount namespace with its own
dockerd 20.10 and plugin, an underlay in 198.51.100.0/24, a three-member etcd), measured twice
in one run: once with pouch-driver in the cluster, once as a Swarm (manager a, worker b) with an
attachable overlay network, built here. For each:

* ``connect``: ``docker network connect`` + ``disconnect`` of a running container on host b, to
  the cross-host network and, interleaved, to a local network of the same host (pouch: a local
  pouch network; Swarm: a bridge network), through the Engine API;
* ``run``: ``docker run -d`` (create + start) on each of the two networks, on host b;
* ``reachable``: once ``docker run -d`` on host b returns, how long until a container on host
  a gets an echo reply from the new container (a prober pings its fixed ``--ip`` every 2 ms;
  also counted from the ``docker run`` call, as the overlay's figure in the issue was);
* ``throughput`` and ``rtt``: one TCP stream (iperf3) and pings between containers on the two
  hosts, run from the host's binaries inside the containers' network namespaces.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

from tests.multihost.harness import DRIVER, Host, bring_up

from .cluster import need_iperf3, ping_rtt_ms, tcp_stream
from .common import Record, log, ratio, summary
from .docker import DockerAPI

#: Once told to go (a line on stdin), pings ``sys.argv[1]`` every 2 ms; prints the
#: CLOCK_MONOTONIC time of the first reply.
_PROBER = r"""
import os, socket, struct, sys, time
dst, limit = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.setblocking(False)
ident = os.getpid() & 0xFFFF
def packet(seq):
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    total = sum(struct.unpack("!4H", body))
    total = (total & 0xFFFF) + (total >> 16)
    return body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]
print("ready", flush=True)
sys.stdin.readline()  # go: the container exists now
end, seq = time.monotonic() + limit, 0
while time.monotonic() < end:
    seq = (seq + 1) & 0xFFFF
    try:
        s.sendto(packet(seq), (dst, 0))
    except OSError:
        pass
    stop = time.monotonic() + 0.002
    while time.monotonic() < stop:
        try:
            data = s.recv(2048)
        except BlockingIOError:
            time.sleep(0.0002)
            continue
        start = (data[0] & 15) * 4
        if data[start] == 0 and struct.unpack("!H", data[start + 4 : start + 6])[0] == ident:
            print(time.monotonic(), flush=True)
            sys.exit()
print("none", flush=True)
"""


def _pid(h: Host, container: str) -> int:
    return int(h.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip())


def _in(h: Host, container: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net=/proc/{_pid(h, container)}/ns/net", *argv]


def _daemon(h: Host, net: str, name: str, ip: str | None = None) -> None:
    args = ["run", "-d", "--name", name, "--network", net]
    if ip:
        args += ["--ip", ip]
    h.docker(*args, h.image, "sleep", "86400", timeout=120)


def throughput(a: Host, ca: str, b: Host, cb: str, ip_b: str, *, seconds: int) -> float:
    return tcp_stream(_in(a, ca), _in(b, cb), ip_b, seconds)


def rtt_ms(a: Host, ca: str, ip_b: str) -> float:
    return ping_rtt_ms(_in(a, ca), ip_b)


def connect_pairs(api: DockerAPI, home: str, nets: dict[str, str], pairs: int) -> dict[str, Any]:
    times: dict[str, dict[str, list[float]]] = {k: {"connect": [], "disconnect": []} for k in nets}
    for i in range(2 + pairs):
        for kind, net in nets.items():
            t0 = time.perf_counter()
            api.ok("POST", f"/networks/{net}/connect", {"Container": home})
            t1 = time.perf_counter()
            api.ok("POST", f"/networks/{net}/disconnect", {"Container": home, "Force": False})
            t2 = time.perf_counter()
            if i >= 2:
                times[kind]["connect"].append(t1 - t0)
                times[kind]["disconnect"].append(t2 - t1)
    return {k: {op: summary(v) for op, v in ops.items()} for k, ops in times.items()}


def run_pairs(api: DockerAPI, image: str, nets: dict[str, str], pairs: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {k: [] for k in nets}
    made = []
    for i in range(1 + pairs):
        for kind, net in nets.items():
            t0 = time.perf_counter()
            doc = api.ok(
                "POST",
                "/containers/create",
                {"Image": image, "Cmd": ["sleep", "600"], "HostConfig": {"NetworkMode": net}},
            )
            api.ok("POST", f"/containers/{doc['Id']}/start")
            if i:
                times[kind].append(time.perf_counter() - t0)
            made.append(doc["Id"])
    for cid in made:
        api.request("DELETE", f"/containers/{cid}?force=true")
    return {k: summary(v) for k, v in times.items()}


def reachable(a: Host, ca: str, b: Host, net: str, ips: list[str]) -> dict[str, Any]:
    """``docker run -d`` on b returns; how long until a container on a gets an echo reply from
    the new container. The prober is started beforehand but sends only then: an ARP request
    sent before the container exists would fail and be retried a second later, which measures
    the neighbour timer, not the control plane."""
    lags, from_call = [], []
    for n, ip in enumerate(ips):
        prober = subprocess.Popen(
            _in(a, ca, sys.executable, "-c", _PROBER, ip, "5"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert prober.stdout is not None
        assert prober.stdin is not None
        assert prober.stdout.readline().strip() == "ready"
        t_call = time.monotonic()
        _daemon(b, net, f"reach{n}", ip)
        t_run = time.monotonic()
        prober.stdin.write("go\n")
        prober.stdin.flush()
        answer = prober.stdout.readline().strip()
        prober.wait()
        prober.stdin.close()
        prober.stdout.close()
        first = float(answer) if answer != "none" else t_run + 5.0
        lags.append(max(0.0, first - t_run))
        from_call.append(first - t_call)
        b.docker("rm", "-f", f"reach{n}")
    return summary(lags) | {"from_run_call": summary(from_call)}


def _measure(
    a: Host, b: Host, cross: str, local: str, *, ips: list[str], ip_srv: str, pairs: int
) -> dict[str, Any]:
    api = DockerAPI(str(b.sock))
    _daemon(a, cross, "cli")
    _daemon(b, cross, "srv", ip_srv)
    _daemon(b, "bhome", "home")  # on a third network: connected to and from the two
    out: dict[str, Any] = {
        "connect": connect_pairs(api, "home", {"cross": cross, "local": local}, pairs),
        "run": run_pairs(api, a.image, {"cross": cross, "local": local}, max(5, pairs // 2)),
        "reachable": reachable(a, "cli", b, cross, ips),
    }
    out["gbits"] = [throughput(a, "cli", b, "srv", ip_srv, seconds=4) for _ in range(3)]
    out["rtt_ms"] = [rtt_ms(a, "cli", ip_srv) for _ in range(3)]
    return out


def _pouch(pairs: int, probes: int) -> dict[str, Any]:
    with bring_up(2, cluster=True, lease_ttl=10, log=log) as mh:
        a, b = mh.hosts
        for h in (a, b):
            h.docker("network", "create", "-d", DRIVER, "--ipam-driver", DRIVER,
                     "--subnet", "10.73.0.0/16", "-o", "pouch.cluster=bmesh", "bmesh")  # fmt: skip
        for net, subnet in (("blocal", "10.74.0.0/24"), ("bhome", "10.74.1.0/24")):
            b.docker("network", "create", "-d", DRIVER, "--ipam-driver", DRIVER,
                     "--subnet", subnet, net)  # fmt: skip
        ips = [f"10.73.200.{10 + i}" for i in range(probes)]
        return _measure(a, b, "bmesh", "blocal", ips=ips, ip_srv="10.73.201.1", pairs=pairs)


def _swarm(pairs: int, probes: int) -> dict[str, Any]:
    with bring_up(2, cluster=False, log=log) as mh:
        a, b = mh.hosts
        for i, h in enumerate((a, b)):
            # Swarm's per-host bridge, made beforehand in a test range (it would otherwise
            # take one of Docker's default pools).
            h.docker("network", "create", "--subnet", f"10.57.{i}.0/24",
                     "-o", "com.docker.network.bridge.name=docker_gwbridge",
                     "-o", "com.docker.network.bridge.enable_icc=false",
                     "-o", "com.docker.network.bridge.enable_ip_masquerade=true",
                     "docker_gwbridge")  # fmt: skip
        a.docker("swarm", "init", "--advertise-addr", a.address,
                 "--default-addr-pool", "10.56.0.0/16", timeout=120)  # fmt: skip
        token = a.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        b.docker("swarm", "join", "--token", token, "--advertise-addr", b.address,
                 f"{a.address}:2377", timeout=120)  # fmt: skip
        a.docker("network", "create", "-d", "overlay", "--attachable",
                 "--subnet", "10.75.0.0/16", "bov")  # fmt: skip
        b.docker("network", "create", "--subnet", "10.76.0.0/24", "blocal")
        b.docker("network", "create", "--subnet", "10.76.1.0/24", "bhome")
        ips = [f"10.75.200.{10 + i}" for i in range(probes)]
        try:
            return _measure(a, b, "bov", "blocal", ips=ips, ip_srv="10.75.201.1", pairs=pairs)
        finally:
            for h in (b, a):
                h.docker("rm", "-f", "cli", "srv", "home", check=False)
                h.docker("swarm", "leave", "--force", check=False, timeout=60)


def run_multihost(rec: Record, *, quick: bool) -> None:
    pairs, probes = (4, 3) if quick else (20, 15)
    need_iperf3()
    log(f"multihost: pouch cluster network, then Swarm overlay; {pairs} pairs, {probes} probes")
    pouch = _pouch(pairs, probes)
    swarm = _swarm(pairs, probes)

    def med(d: dict[str, Any], *path: str) -> float:
        for p in path:
            d = d[p]
        return float(d["median"])

    data: dict[str, Any] = {"pouch": pouch, "swarm": swarm}
    lines = []
    for name, r in (("pouch", pouch), ("swarm", swarm)):
        c = ratio(med(r, "connect", "cross", "connect"), med(r, "connect", "local", "connect"))
        u = ratio(med(r, "run", "cross"), med(r, "run", "local"))
        data[f"{name}_connect_ratio"], data[f"{name}_run_ratio"] = c, u
        lines.append(
            f"{name}: connect {med(r, 'connect', 'cross', 'connect'):.0f} ms ({c:.2f}x its local "
            f"network), run -d {med(r, 'run', 'cross'):.0f} ms ({u:.2f}x), first echo from the "
            f"other host {med(r, 'reachable'):.1f} ms after docker run returned (p90 "
            f"{r['reachable']['p90']:.1f}; {med(r, 'reachable', 'from_run_call'):.0f} ms from "
            f"its call), {statistics.median(r['gbits']):.2f} Gbit/s, RTT "
            f"{statistics.median(r['rtt_ms']):.3f} ms"
        )
    data["throughput_vs_swarm"] = ratio(
        statistics.median(pouch["gbits"]), statistics.median(swarm["gbits"])
    )
    lines.append(f"pouch/swarm throughput {data['throughput_vs_swarm']:.2f}x")
    rec.put("multihost", data, "multihost: " + "; ".join(lines))
