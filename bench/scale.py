"""Scale: per-operation time and forwarded throughput as the host fills up (issue 14).

On each engine the e2e tests use (dockerd 20.10, the system's; 28.5.2 from
scripts/fetch-engine), in one run and interleaved, pouch beside Docker's bridge driver:

* the host grows in steps: networks per driver (1, 50, 200), then published ports per driver
  (1, 500, 1,000) on top of the 200 networks (``SIZES``); what is added stays;
* at each step, per driver, ``reps`` times each, interleaved (pouch, bridge, pouch, ...):
  ``network create`` (+ remove, untimed), ``docker run -d -p HOST:80`` (create + start; then
  removed, untimed), ``network connect`` and ``network disconnect`` of a running container;
  all through the Engine API. For pouch the plugin's own server-side time of the same calls
  (from its request log) is kept too: the firewall apply is in it, without dockerd's noise;
* forwarded throughput between two containers of one network (through the bridge and the
  FORWARD path of iptables: ours and Docker's): ``bench.pump`` run with ``nsenter`` in the
  containers' namespaces, a single TCP stream for ``seconds``, median of ``tput_reps``.

Growth ratio = median at the largest host / median at the smallest, per operation and
driver; also per axis (networks: 200 vs 1 with one port; ports: 1,000 vs 1 with 200 networks).
First, our firewall alone (``bench/forward.py``, no dockerd): the time of one change and
forwarded throughput as its plan grows, the network under test last in the plan.
Results: ``bench/results/scale.json`` and ``scale.png`` (``scale-quick.*`` with ``--quick``).
dockerd runs with ``--userland-proxy=false`` (both drivers): with the proxy, the bridge
driver would start one docker-proxy process per published port (1,000 of them), which the
engine never does for a remote driver.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.e2e.harness import (
    ENGINES,
    SLEEPER,
    Engine,
    EngineKind,
    check_no_overlap,
    cleanup_leftovers,
)

from .common import ROOT, Record, loadavg, log, server_times, summary
from .docker import DockerAPI

DRIVERS = ("pouch", "bridge")
#: (networks per driver, published ports per driver) at each step, in order
SIZES = ((1, 1), (50, 1), (200, 1), (200, 500), (200, 1000))
QUICK_SIZES = ((1, 1), (10, 1), (10, 100))
OPS = ("network_create", "run_p", "connect", "disconnect")
#: /16 per (driver, use): background networks take a /24 each (index < 256)
SUBNETS = {
    ("pouch", "bg"): "10.120.{}.0/24",
    ("bridge", "bg"): "10.121.{}.0/24",
    ("pouch", "op"): "10.122.{}.0/24",
    ("bridge", "op"): "10.123.{}.0/24",
}
#: host ports: background ranges, and the one each measured ``run -p`` publishes
PORT_BASE = {"pouch": 20000, "bridge": 22000}
OP_PORT = {"pouch": 25000, "bridge": 26000}
PUMP_PORT = 5201


class ScaleEngine(Engine):
    """The e2e harness's engine with the userland proxy off (see the module docstring)."""

    def dockerd_command(self) -> list[str]:
        return [*super().dockerd_command(), "--userland-proxy=false"]


def _run(cmd: list[str], timeout: float = 120) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode:
        raise RuntimeError(f"{cmd}: {r.returncode} {r.stderr.strip()}")
    return r.stdout


class Host:
    """One engine's host, grown step by step, with the objects the operations use."""

    def __init__(self, eng: Engine, api: DockerAPI) -> None:
        self.eng, self.api = eng, api
        self.plugin = eng.plugin.name
        self.nets: dict[str, list[str]] = {d: [] for d in DRIVERS}
        self.ports: dict[str, int] = dict.fromkeys(DRIVERS, 0)
        self.port_containers: dict[str, list[str]] = {d: [] for d in DRIVERS}
        self.op_seq = 0
        self.tput: dict[str, tuple[str, str]] = {}  # driver -> (server ctr, client ctr)

    def create_network(self, driver: str, name: str, subnet: str) -> None:
        ipam = self.plugin if driver == "pouch" else "default"
        self.api.ok(
            "POST",
            "/networks/create",
            {
                "Name": name,
                "Driver": self.plugin if driver == "pouch" else "bridge",
                "CheckDuplicate": True,
                "IPAM": {"Driver": ipam, "Config": [{"Subnet": subnet}]},
            },
        )

    def run(self, name: str, net: str, ports: range | None = None) -> str:
        body: dict[str, Any] = {"Image": self.eng.image, "Cmd": list(SLEEPER)}
        host: dict[str, Any] = {"NetworkMode": net}
        if ports is not None:
            body["ExposedPorts"] = {f"{p}/tcp": {} for p in ports}
            host["PortBindings"] = {f"{p}/tcp": [{"HostPort": str(p)}] for p in ports}
        body["HostConfig"] = host
        cid: str = self.api.ok("POST", f"/containers/create?name={name}", body)["Id"]
        self.api.ok("POST", f"/containers/{cid}/start")
        return cid

    def grow(self, networks: int, ports: int) -> None:
        for d in DRIVERS:
            while len(self.nets[d]) < networks:
                i = len(self.nets[d])
                name = f"pds-{d[0]}{i}"
                self.create_network(d, name, SUBNETS[(d, "bg")].format(i))
                self.nets[d].append(name)
                if i == 0:
                    self._first_network(d, name)
            if ports > self.ports[d]:
                # One container per step publishes the difference, a range of host ports on
                # the first network (as `-p A-B:A-B`).
                start = PORT_BASE[d] + self.ports[d]
                rng = range(start, PORT_BASE[d] + ports)
                name = f"pds-{d[0]}ports{len(self.port_containers[d])}"
                cid = self.run(name, self.nets[d][0], rng)
                self.port_containers[d].append(cid)
                self.ports[d] = ports

    def _first_network(self, driver: str, net: str) -> None:
        """The throughput pair and the published port of size 1 live on the first network."""
        server = self.run(f"pds-{driver[0]}srv", net)
        client = self.run(f"pds-{driver[0]}cli", net)
        self.tput[driver] = (server, client)
        self.run(f"pds-{driver[0]}ports0", net, range(PORT_BASE[driver], PORT_BASE[driver] + 1))
        self.ports[driver] = 1
        self.port_containers[driver].append(f"pds-{driver[0]}ports0")

    # ---- the measured operations ----------------------------------------------------------

    def op_network_create(self, driver: str) -> float:
        self.op_seq += 1
        name = f"pds-op{driver[0]}{self.op_seq}"
        subnet = SUBNETS[(driver, "op")].format(self.op_seq % 256)
        t0 = time.perf_counter()
        self.create_network(driver, name, subnet)
        t = time.perf_counter() - t0
        self.api.ok("DELETE", f"/networks/{name}")
        return t

    def op_run_p(self, driver: str) -> float:
        self.op_seq += 1
        port = OP_PORT[driver]
        body = {
            "Image": self.eng.image,
            "Cmd": list(SLEEPER),
            "ExposedPorts": {"80/tcp": {}},
            "HostConfig": {
                "NetworkMode": self.nets[driver][0],
                "PortBindings": {"80/tcp": [{"HostPort": str(port)}]},
            },
        }
        t0 = time.perf_counter()
        cid = self.api.ok("POST", f"/containers/create?name=pds-run{self.op_seq}", body)["Id"]
        self.api.ok("POST", f"/containers/{cid}/start")
        t = time.perf_counter() - t0
        self.api.ok("DELETE", f"/containers/{cid}?force=true")
        return t

    def op_connect(self, driver: str) -> float:
        t0 = time.perf_counter()
        self.api.ok("POST", f"/networks/{self.nets[driver][0]}/connect", {"Container": "pds-home"})
        return time.perf_counter() - t0

    def op_disconnect(self, driver: str) -> float:
        t0 = time.perf_counter()
        self.api.ok(
            "POST",
            f"/networks/{self.nets[driver][0]}/disconnect",
            {"Container": "pds-home", "Force": False},
        )
        return time.perf_counter() - t0

    def throughput(self, driver: str, seconds: float) -> float:
        """Gbit/s of one TCP stream from the client container to the server container."""
        server, client = self.tput[driver]
        net = self.nets[driver][0]
        sinfo = self.api.ok("GET", f"/containers/{server}/json")
        cinfo = self.api.ok("GET", f"/containers/{client}/json")
        ip = sinfo["NetworkSettings"]["Networks"][net]["IPAddress"]
        py = [sys.executable, "-m", "bench.pump"]
        srv = subprocess.Popen(
            ["nsenter", "-t", str(sinfo["State"]["Pid"]), "-n", *py, "serve", str(PUMP_PORT)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            assert srv.stdout is not None
            srv.stdout.readline()  # "listening"
            out = _run(
                [
                    "nsenter",
                    "-t",
                    str(cinfo["State"]["Pid"]),
                    "-n",
                    *py,
                    "send",
                    ip,
                    str(PUMP_PORT),
                    str(seconds),
                ],
                timeout=seconds + 60,
            )
            srv.wait(timeout=30)
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
        sent, elapsed = out.split()
        return int(sent) * 8 / float(elapsed) / 1e9


def _measure_step(
    host: Host, size: tuple[int, int], reps: int, tput_reps: int, seconds: float
) -> dict[str, Any]:
    times: dict[str, dict[str, list[float]]] = {d: {op: [] for op in OPS} for d in DRIVERS}
    server_ms: dict[str, list[float]] = {op: [] for op in OPS}
    log_path = host.eng.plugin.log_path
    for i in range(reps + 1):  # the first round warms up
        for op in OPS:
            order = DRIVERS if i % 2 == 0 else tuple(reversed(DRIVERS))
            for d in order:
                mark = host.eng.plugin.log_offset()
                t = getattr(host, f"op_{op}")(d)
                if i == 0:
                    continue
                times[d][op].append(t)
                if d == "pouch":
                    calls = server_times(log_path, mark)
                    server_ms[op].append(sum(sum(v) for v in calls.values()) * 1000)
    tput: dict[str, list[float]] = {d: [] for d in DRIVERS}
    for i in range(tput_reps):
        for d in DRIVERS if i % 2 == 0 else tuple(reversed(DRIVERS)):
            tput[d].append(host.throughput(d, seconds))
    out: dict[str, Any] = {"networks": size[0], "ports": size[1], "load": loadavg()}
    for d in DRIVERS:
        out[d] = {op: summary(times[d][op]) for op in OPS}
        out[d]["raw_ms"] = {op: [x * 1000 for x in times[d][op]] for op in OPS}
        out[d]["throughput_gbit"] = {
            "median": statistics.median(tput[d]),
            "min": min(tput[d]),
            "max": max(tput[d]),
            "raw": tput[d],
        }
    out["pouch"]["server_ms"] = {
        op: {"median": statistics.median(v), "min": min(v), "max": max(v), "raw": v}
        for op, v in server_ms.items()
        if v
    }
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def growth(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Largest / smallest host per operation and driver; also along each axis."""
    first, last = steps[0], steps[-1]
    by_size = {(s["networks"], s["ports"]): s for s in steps}
    max_nets = max(s["networks"] for s in steps)
    nets_only = by_size.get((max_nets, first["ports"]))
    out: dict[str, Any] = {}
    for d in DRIVERS:
        g: dict[str, Any] = {}
        for op in OPS:
            g[op] = {"total": _ratio(last[d][op]["median"], first[d][op]["median"])}
            if nets_only is not None:
                g[op]["networks_axis"] = _ratio(nets_only[d][op]["median"], first[d][op]["median"])
                g[op]["ports_axis"] = _ratio(last[d][op]["median"], nets_only[d][op]["median"])
        tp = "throughput_gbit"
        g["throughput"] = {"total": _ratio(last[d][tp]["median"], first[d][tp]["median"])}
        if d == "pouch":
            for op in OPS:
                if op in last[d]["server_ms"] and op in first[d]["server_ms"]:
                    g[op]["server_total"] = _ratio(
                        last[d]["server_ms"][op]["median"], first[d]["server_ms"][op]["median"]
                    )
        out[d] = g
    return out


def run_engine(
    kind: EngineKind,
    sizes: tuple[tuple[int, int], ...],
    *,
    reps: int,
    tput_reps: int,
    seconds: float,
) -> dict[str, Any]:
    cleanup_leftovers(log=lambda m: log(f"[pde2e] {m}"))
    eng = ScaleEngine(kind=kind)
    eng.plugin.extra_args = ("--log-level", "info")
    t0 = time.monotonic()
    try:
        eng.start()
        api = DockerAPI(str(eng.sock))
        api.version = "/v" + api.ok("GET", "/version")["ApiVersion"]
        res: dict[str, Any] = {
            "engine": kind.name,
            "dockerd_version": eng.server_version,
            "engine_start_s": time.monotonic() - t0,
            "steps": [],
        }
        host = Host(eng, api)
        host.run("pds-home", "bridge")  # on the default bridge, like a user's container
        for size in sizes:
            tg = time.monotonic()
            host.grow(*size)
            grow_s = time.monotonic() - tg
            log(f"[{kind.name}] host at {size[0]} networks, {size[1]} ports ({grow_s:.0f} s)")
            step = _measure_step(host, size, reps, tput_reps, seconds)
            step["grow_s"] = grow_s
            res["steps"].append(step)
            p, b = step["pouch"], step["bridge"]
            log(
                f"[{kind.name}] {size[0]:>3} nets {size[1]:>4} ports: "
                + "; ".join(
                    f"{op} {p[op]['median']:.0f}/{b[op]['median']:.0f} ms"
                    f" (server {p['server_ms'].get(op, {}).get('median', float('nan')):.1f})"
                    for op in OPS
                )
                + f"; throughput {p['throughput_gbit']['median']:.2f}/"
                f"{b['throughput_gbit']['median']:.2f} Gbit/s (pouch/bridge)"
            )
        res["growth"] = growth(res["steps"])
        return res
    finally:
        _teardown(eng)


def _teardown(eng: Engine) -> None:
    """Containers publishing hundreds of ports take dockerd (bridge: one iptables call per
    rule) longer than the harness's 60 s to remove at once: remove them one by one first. A
    failed teardown is logged, never allowed to lose the measurements."""
    try:
        ids = eng.docker("ps", "-aq", check=False).stdout.split()
        for cid in ids:
            eng.docker("rm", "-f", cid, check=False, timeout=600)
    except Exception as exc:  # noqa: BLE001 - the close below cleans up what it can
        log(f"scale: removing containers: {exc}")
    try:
        eng.close()
    except Exception as exc:  # noqa: BLE001 - the numbers are taken; leftovers go next start
        log(f"scale: engine teardown: {exc}")


def run_all(
    rec: Record,
    out_dir: Path,
    *,
    quick: bool = False,
    engines: tuple[str, ...] = ("20.10", "28.5.2"),
    chart: bool = True,
) -> None:
    """``rec``: the run's record (the caller holds the e2e lock)."""
    sizes = QUICK_SIZES if quick else SIZES
    reps, tput_reps, seconds = (2, 1, 1.0) if quick else (5, 3, 2.0)
    check_no_overlap(*(s.format(0).replace(".0.0/24", ".0.0/16") for s in SUBNETS.values()))
    data: dict[str, Any] = {
        "sizes": sizes,
        "reps": reps,
        "throughput_reps": tput_reps,
        "throughput_seconds": seconds,
        "engines": {},
        "meta": rec.meta,
    }
    from . import forward  # noqa: PLC0415 - imports the firewall of the package under test

    log("--- our firewall alone, no dockerd (bench/forward.py) ---")
    data["firewall"] = forward.run_all(quick=quick)
    for name in engines:
        if name == "none":
            continue
        kind = ENGINES[name]
        if kind.bin_dir is not None and not (kind.bin_dir / "dockerd").exists():
            rec.note(f"scale: engine {name} not fetched (scripts/fetch-engine); skipped")
            continue
        data["engines"][name] = run_engine(
            kind, sizes, reps=reps, tput_reps=tput_reps, seconds=seconds
        )
    g = data["firewall"]["growth"]
    lines = [
        f"firewall alone: growth one port {g['port_change_ms']:.2f}, one network "
        f"{g['network_change_ms']:.2f}, throughput {g['throughput_gbit']:.2f}"
    ]
    for name, res in data["engines"].items():
        for d in DRIVERS:
            g = res["growth"][d]
            lines.append(
                f"{name} {d}: growth (largest/smallest host) "
                + ", ".join(f"{op} {g[op]['total']:.2f}" for op in OPS)
                + f", throughput {g['throughput']['total']:.2f}"
                + (
                    "; plugin server time "
                    + ", ".join(
                        f"{op} {g[op]['server_total']:.2f}" for op in OPS if "server_total" in g[op]
                    )
                    if d == "pouch"
                    else ""
                )
            )
    rec.put("scale", {k: v for k, v in data.items() if k != "meta"}, " | ".join(lines))
    for line in lines:
        log(line)
    stem = "scale-quick" if quick else "scale"
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    log(f"results: {out_dir / f'{stem}.json'}")
    if chart:
        from .chart import scale_chart  # noqa: PLC0415 - matplotlib only when a chart is wanted

        scale_chart(data, out_dir / f"{stem}.png")
        log(f"chart: {out_dir / f'{stem}.png'}")
