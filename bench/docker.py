"""Through a real dockerd (the e2e harness's): pouch vs the built-in bridge driver.

Every timed operation goes through the Engine HTTP API over its Unix socket (``http.client``,
no CLI process per operation); ``docker run --rm`` is also timed through the CLI for reference.

* ``connect``/``disconnect``: a running container (on the default bridge) joins and leaves
  a pouch network, a bridge network and a network of the *floor plugin* (``floor_plugin.py``:
  the least a remote driver can do, answering from memory), interleaved (pouch, bridge,
  floor, pouch, ...). The floor shows what the engine itself spends on any remote driver.
* ``run --rm``: create (AutoRemove) + wait(condition=removed) + start of ``true`` until the
  container is gone, on each network, interleaved.
* 50 containers started at once (create + start, 50 threads) on one network; all must run
  with an address on it; then removed at once. Rounds go pouch, bridge, bridge, pouch (ABBA).

The plugin runs at log level info (the harness starts it at debug, which logs every payload).
"""

from __future__ import annotations

import json
import secrets
import string
import subprocess
import sys
import threading
import time
from typing import Any

from tests.e2e.harness import (
    ENGINES,
    PLUGIN_DIR,
    SLEEPER,
    Engine,
    SessionLock,
    check_no_overlap,
    cleanup_leftovers,
    nsenter,
)

from .common import (
    ROOT,
    Record,
    UnixConnection,
    loadavg,
    log,
    ratio,
    rss_kib,
    schedstat,
    server_times,
    summary,
)

SUBNETS = {"pouch": "10.31.0.0/16", "bridge": "10.32.0.0/16", "floor": "10.33.0.0/16"}
NETS = {"pouch": "pdb-pouch", "bridge": "pdb-bridge"}
#: connect/disconnect and the parallel start also measure the floor plugin
WITH_FLOOR = {**NETS, "floor": "pdb-floor"}
HOME = "pdb-home"


class FloorPlugin:
    """``bench.floor_plugin`` in the engine's netns, discovered like ours (a v1 socket file
    named like the harness's plugins, so an interrupted run's socket is cleaned up with
    theirs)."""

    def __init__(self, eng: Engine) -> None:
        self.name = "pdt" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(5))
        self.socket = PLUGIN_DIR / f"{self.name}.sock"
        self.log_path = eng.base / "floor-plugin.log"
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                nsenter(
                    eng.netns,
                    [
                        sys.executable,
                        "-m",
                        "bench.floor_plugin",
                        "--socket",
                        str(self.socket),
                        "--prefix",
                        "pdf",
                    ],
                ),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=ROOT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"floor plugin did not start: {self.log_path.read_text()}")
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


class DockerAPI:
    """The Engine API over its Unix socket, one keep-alive connection per thread."""

    def __init__(self, sock: str, version: str = "") -> None:
        self.sock = sock
        self.version = version
        self._local = threading.local()

    def _conn(self) -> UnixConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = UnixConnection(self.sock)
        return conn

    def request(
        self, method: str, path: str, body: Any = None, conn: UnixConnection | None = None
    ) -> tuple[int, Any]:
        c = conn or self._conn()
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        c.request(method, f"{self.version}{path}", body=data, headers=headers)
        r = c.getresponse()
        raw = r.read()
        return r.status, (json.loads(raw) if raw.strip() else None)

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, doc = self.request(method, path, body)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {doc}")
        return doc


def connect_disconnect(api: DockerAPI, pairs: int, warmup: int = 2) -> dict[str, Any]:
    times: dict[str, dict[str, list[float]]] = {
        d: {"connect": [], "disconnect": []} for d in WITH_FLOOR
    }
    for i in range(warmup + pairs):
        for driver, net in WITH_FLOOR.items():  # pouch, bridge, floor, pouch, ...
            t0 = time.perf_counter()
            api.ok("POST", f"/networks/{net}/connect", {"Container": HOME})
            t1 = time.perf_counter()
            if i == 0:  # once: the container really got an address on the network
                info = api.ok("GET", f"/containers/{HOME}/json")
                ip = info["NetworkSettings"]["Networks"][net]["IPAddress"]
                if not ip:
                    raise RuntimeError(f"{HOME} has no address on {net} after connect")
            t2 = time.perf_counter()
            api.ok("POST", f"/networks/{net}/disconnect", {"Container": HOME, "Force": False})
            t3 = time.perf_counter()
            if i >= warmup:
                times[driver]["connect"].append(t1 - t0)
                times[driver]["disconnect"].append(t3 - t2)
    return times


def run_rm_api(api: DockerAPI, image: str, net: str) -> float:
    """``docker run --rm --network net image true`` as the CLI does it, minus attach."""
    t0 = time.perf_counter()
    doc = api.ok(
        "POST",
        "/containers/create",
        {"Image": image, "Cmd": ["true"], "HostConfig": {"AutoRemove": True, "NetworkMode": net}},
    )
    cid = doc["Id"]
    waiter = UnixConnection(api.sock)
    waiter.request("POST", f"{api.version}/containers/{cid}/wait?condition=removed")
    resp = waiter.getresponse()  # headers come once the wait is registered
    if resp.status != 200:
        raise RuntimeError(f"wait: {resp.status} {resp.read()!r}")
    api.ok("POST", f"/containers/{cid}/start")
    body = json.loads(resp.read())
    t1 = time.perf_counter()
    waiter.close()
    if body.get("StatusCode") != 0 or body.get("Error"):
        raise RuntimeError(f"run --rm on {net} failed: {body}")
    return t1 - t0


def run_rm(eng: Engine, api: DockerAPI, pairs: int, cli_pairs: int) -> dict[str, Any]:
    out: dict[str, dict[str, list[float]]] = {d: {"api": [], "cli": []} for d in NETS}
    for i in range(1 + pairs):
        for driver, net in NETS.items():
            t = run_rm_api(api, eng.image, net)
            if i:
                out[driver]["api"].append(t)
    for _ in range(cli_pairs):
        for driver, net in NETS.items():
            t0 = time.perf_counter()
            eng.docker("run", "--rm", "--network", net, eng.image, "true", timeout=60)
            out[driver]["cli"].append(time.perf_counter() - t0)
    return out


def parallel_start(
    api: DockerAPI, eng: Engine, net: str, n: int, tag: str, *, plugin_pid: int | None
) -> dict[str, Any]:
    """n containers created and started at once; wall time until the last start returned."""
    barrier = threading.Barrier(n + 1)
    errors: list[str] = []
    ids: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        barrier.wait()
        try:
            status, doc = api.request(
                "POST",
                f"/containers/create?name=pdb-{tag}-{i}",
                {"Image": eng.image, "Cmd": list(SLEEPER), "HostConfig": {"NetworkMode": net}},
            )
            if status != 201:
                raise RuntimeError(f"create: {status} {doc}")
            with lock:
                ids.append(doc["Id"])
            status, doc = api.request("POST", f"/containers/{doc['Id']}/start")
            if status != 204:
                raise RuntimeError(f"start: {status} {doc}")
        except Exception as exc:  # noqa: BLE001 - counted and reported, the others go on
            with lock:
                errors.append(f"{i}: {exc}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    daemons = {"plugin": plugin_pid, "dockerd": eng.proc.pid if eng.proc else None}
    cpu0 = {k: schedstat(p)[0] for k, p in daemons.items() if p}
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = {f"{k}_cpu_s": (schedstat(daemons[k] or 0)[0] - v) / 1e9 for k, v in cpu0.items()}
    running = 0
    addresses = set()
    for cid in ids:
        info = api.ok("GET", f"/containers/{cid}/json")
        ip = info["NetworkSettings"]["Networks"].get(net, {}).get("IPAddress")
        if info["State"]["Running"] and ip:
            running += 1
            addresses.add(ip)
    plugin_rss = rss_kib(plugin_pid) if plugin_pid else None

    def remove(cid: str) -> None:
        api.request("DELETE", f"/containers/{cid}?force=true")

    t1 = time.perf_counter()
    rm = [threading.Thread(target=remove, args=(cid,)) for cid in ids]
    for t in rm:
        t.start()
    for t in rm:
        t.join()
    rm_wall = time.perf_counter() - t1
    return {
        "n": n,
        "wall_s": wall,
        **cpu,
        "running_with_address": running,
        "distinct_addresses": len(addresses),
        "errors": errors[:5],
        "n_errors": len(errors),
        "remove_wall_s": rm_wall,
        "plugin_rss_kib": plugin_rss,
    }


def _mean(rounds: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rounds if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def _med(times: list[float]) -> float:
    return summary(times)["median"]


def e2e_lock(rec: Record, lock_wait: float) -> SessionLock:
    """The e2e harness's session lock: one dockerd on the machine at a time (sessions queue)."""
    lock = SessionLock()
    log("waiting for the e2e session lock (one dockerd on the machine at a time)...")
    t_wait = time.monotonic()
    lock.acquire(timeout=lock_wait)
    waited = time.monotonic() - t_wait
    log(f"got the e2e lock after {waited:.0f} s")
    rec.meta["docker_lock_wait_s"] = waited
    return lock


def run_all(
    rec: Record,
    *,
    pairs: int = 30,
    run_pairs: int = 15,
    cli_pairs: int = 3,
    parallel: int = 50,
    parallel_rounds: int = 2,
    lock_wait: float = 3600,
    locked: bool = False,
    engine: str = "20.10",
) -> None:
    """``locked``: the caller already holds the e2e lock (``e2e_lock``). ``engine``: a key
    of the e2e harness's ``ENGINES``."""
    check_no_overlap(*SUBNETS.values())
    lock = None if locked else e2e_lock(rec, lock_wait)
    try:
        cleanup_leftovers(log=lambda m: log(f"[pde2e] {m}"))
        eng = Engine(kind=ENGINES[engine])
        eng.plugin.extra_args = ("--log-level", "info")
        t0 = time.monotonic()
        try:
            eng.start()
            rec.meta["docker_engine_start_s"] = time.monotonic() - t0
            rec.meta["docker_engine_timings_s"] = dict(eng.timings)
            rec.meta["dockerd_version"] = eng.server_version
            rec.meta["load_after_engine_start"] = loadavg()
            floor = FloorPlugin(eng)
            try:
                _measure(
                    rec,
                    eng,
                    floor,
                    pairs=pairs,
                    run_pairs=run_pairs,
                    cli_pairs=cli_pairs,
                    parallel=parallel,
                    parallel_rounds=parallel_rounds,
                )
            finally:
                floor.close()
        finally:
            eng.close()
    finally:
        if lock is not None:
            lock.release()


def _measure(
    rec: Record,
    eng: Engine,
    floor: FloorPlugin,
    *,
    pairs: int,
    run_pairs: int,
    cli_pairs: int,
    parallel: int,
    parallel_rounds: int,
) -> None:
    for driver, plugin in (("pouch", eng.plugin.name), ("floor", floor.name)):
        eng.docker(
            "network",
            "create",
            "-d",
            plugin,
            "--ipam-driver",
            plugin,
            "--subnet",
            SUBNETS[driver],
            WITH_FLOOR[driver],
        )
    eng.docker("network", "create", "-d", "bridge", "--subnet", SUBNETS["bridge"], NETS["bridge"])
    eng.docker("run", "-d", "--name", HOME, eng.image, *SLEEPER, timeout=90)
    api = DockerAPI(str(eng.sock))
    api.version = "/v" + api.ok("GET", "/version")["ApiVersion"]
    rec.meta["docker_api"] = api.version

    mark = eng.plugin.log_offset()
    cd = connect_disconnect(api, pairs)
    calls = server_times(eng.plugin.log_path, mark)
    data: dict[str, Any] = {}
    # What the engine asked the plugin per pouch connect+disconnect (warm-up pairs included).
    asked = pairs + 2
    data["plugin_calls_per_connect_disconnect"] = {
        k: {"calls": len(v) / asked, "server_ms_total": sum(v) / asked * 1000}
        for k, v in sorted(calls.items())
    }
    data["plugin_server_ms_per_connect_disconnect"] = (
        sum(sum(v) for v in calls.values()) / asked * 1000
    )
    for op in ("connect", "disconnect"):
        p, b, f = (summary(cd[d][op]) for d in ("pouch", "bridge", "floor"))
        data[op] = {
            "pouch_ms": p,
            "bridge_ms": b,
            "ratio": ratio(p["median"], b["median"]),
            "floor_ms": f,
            "floor_ratio": ratio(f["median"], b["median"]),
            "pouch_over_floor": ratio(p["median"], f["median"]),
            "raw_pouch_ms": [x * 1000 for x in cd["pouch"][op]],
            "raw_bridge_ms": [x * 1000 for x in cd["bridge"][op]],
            "raw_floor_ms": [x * 1000 for x in cd["floor"][op]],
        }
    data["pairs"] = pairs
    data["via"] = "Engine API over its Unix socket"
    rec.put(
        "docker_connect_disconnect",
        data,
        f"docker network connect (API, median of {pairs} interleaved pairs): pouch "
        f"{data['connect']['pouch_ms']['median']:.0f} ms vs bridge "
        f"{data['connect']['bridge_ms']['median']:.0f} ms (ratio "
        f"{data['connect']['ratio']:.2f}); disconnect pouch "
        f"{data['disconnect']['pouch_ms']['median']:.0f} ms vs bridge "
        f"{data['disconnect']['bridge_ms']['median']:.0f} ms (ratio "
        f"{data['disconnect']['ratio']:.2f}); floor plugin (a remote driver answering "
        f"from memory): connect {data['connect']['floor_ms']['median']:.0f} ms (ratio "
        f"{data['connect']['floor_ratio']:.2f} to bridge), disconnect "
        f"{data['disconnect']['floor_ms']['median']:.0f} ms (ratio "
        f"{data['disconnect']['floor_ratio']:.2f}); plugin's own time (server side, "
        f"{sum(c['calls'] for c in data['plugin_calls_per_connect_disconnect'].values()):.0f}"
        f" calls) {data['plugin_server_ms_per_connect_disconnect']:.1f} ms per "
        "connect+disconnect",
    )

    rr = run_rm(eng, api, run_pairs, cli_pairs)
    run_data: dict[str, Any] = {"pairs": run_pairs, "cli_pairs": cli_pairs}
    for via in ("api", "cli"):
        p, b = rr["pouch"][via], rr["bridge"][via]
        if not p:
            continue
        run_data[via] = {
            "pouch_ms": summary(p),
            "bridge_ms": summary(b),
            "ratio": ratio(_med(p), _med(b)),
        }
    line = (
        f"docker run --rm (API: create+wait+start until removed, median of {run_pairs} "
        f"interleaved pairs): pouch {run_data['api']['pouch_ms']['median']:.0f} ms vs "
        f"bridge {run_data['api']['bridge_ms']['median']:.0f} ms (ratio "
        f"{run_data['api']['ratio']:.2f})"
    )
    if "cli" in run_data:
        line += (
            f"; via the CLI ({cli_pairs} pairs): pouch "
            f"{run_data['cli']['pouch_ms']['median']:.0f} ms vs bridge "
            f"{run_data['cli']['bridge_ms']['median']:.0f} ms"
        )
    rec.put("docker_run_rm", run_data, line)

    rounds: dict[str, list[dict[str, Any]]] = {d: [] for d in WITH_FLOOR}
    pids = {"pouch": eng.plugin.pid, "bridge": None, "floor": floor.proc.pid}
    for r in range(parallel_rounds):
        # ABCCBA: pouch, bridge, floor, floor, bridge, pouch, ... so no driver always goes first.
        order = list(WITH_FLOOR.items()) if r % 2 == 0 else list(reversed(WITH_FLOOR.items()))
        for driver, net in order:
            rounds[driver].append(
                parallel_start(api, eng, net, parallel, f"{driver[0]}{r}", plugin_pid=pids[driver])
            )
    par: dict[str, Any] = {"n": parallel, "rounds": rounds}
    for driver in WITH_FLOOR:
        walls = [x["wall_s"] for x in rounds[driver]]
        par[f"{driver}_wall_s"] = sum(walls) / len(walls)
        par[f"{driver}_wall_s_rounds"] = walls
        par[f"{driver}_all_ok"] = all(
            x["running_with_address"] == parallel and not x["n_errors"] for x in rounds[driver]
        )
    par["ratio"] = ratio(par["pouch_wall_s"], par["bridge_wall_s"])
    par["floor_ratio"] = ratio(par["floor_wall_s"], par["bridge_wall_s"])
    rec.put(
        "docker_parallel",
        par,
        f"{parallel} containers started in parallel (API, mean of {parallel_rounds} "
        f"interleaved rounds): pouch {par['pouch_wall_s']:.1f} s "
        f"({'all running with an address' if par['pouch_all_ok'] else 'FAILURES'}) vs bridge "
        f"{par['bridge_wall_s']:.1f} s "
        f"({'all running with an address' if par['bridge_all_ok'] else 'FAILURES'}); "
        f"ratio {par['ratio']:.2f}; floor plugin {par['floor_wall_s']:.1f} s "
        f"({'all running with an address' if par['floor_all_ok'] else 'FAILURES'}, ratio "
        f"{par['floor_ratio']:.2f}); CPU of the plugin during a pouch round "
        f"{_mean(rounds['pouch'], 'plugin_cpu_s'):.2f} s, of dockerd "
        f"{_mean(rounds['pouch'], 'dockerd_cpu_s'):.1f} s (bridge round: dockerd "
        f"{_mean(rounds['bridge'], 'dockerd_cpu_s'):.1f} s)",
    )
    if eng.plugin.pid:
        rec.results.setdefault("plugin_rss_kib", {})["docker_after_benchmarks"] = rss_kib(
            eng.plugin.pid
        )
