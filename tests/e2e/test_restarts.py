"""Crash safety with the real engine: the plugin and dockerd restart under running containers.

* Plugin restart (SIGTERM and kill -9): traffic keeps flowing (container to container and a
  published port from the remote host) while the plugin is down and after; the first engine
  operation after the restart works whatever it is; no address in use is handed out again.
* dockerd restart without live-restore (containers stopped, ``--restart always`` ones back),
  with ``--live-restore`` (nothing happens to us), and an unclean exit (kill -9) after which
  the engine may skip DeleteEndpoint (docs/protocol.md §5.6): the plugin's sweep or
  ``pouch-driver gc --engine`` makes our side match the engine's again; also with the plugin
  not ready while dockerd starts (the engine's ReleaseAddress fails too: the sweep releases).

After each scenario the oracle (engine vs plugin store vs kernel) agrees and
``pouch-driver check --engine`` exits 0.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .harness import ENGINE_ADDR, SLEEPER, Engine, Scope, wait_until
from .oracle import (
    assert_check_clean,
    assert_consistent,
    check,
    gc,
    read_http_message,
    requests_in_log,
    status,
    stored_addresses,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]


# --- helpers --------------------------------------------------------------------------------


def endpoint_id(e2e: Scope, container: str, network: str) -> str:
    nets = e2e.container_inspect(container)["NetworkSettings"]["Networks"]
    return str(nets[network]["EndpointID"])


def container_state(e2e: Scope, container: str) -> dict[str, object]:
    state: dict[str, object] = e2e.container_inspect(container)["State"]
    return state


def start_ping(
    e2e: Scope,
    container: str,
    target: str,
    seconds: int,
) -> subprocess.Popen[str]:
    """``ping -i 0.2 -w seconds target`` from ``container``'s netns, in the background.

    The host's busybox in the container's netns (``nsenter``), not ``docker exec``: the
    measurement must not depend on dockerd, which some tests restart meanwhile.
    """
    pid = container_state(e2e, container)["Pid"]
    return subprocess.Popen(
        [
            "nsenter",
            f"--net=/proc/{pid}/ns/net",
            "--",
            "busybox",
            "ping",
            "-i",
            "0.2",
            "-w",
            str(seconds),
            target,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def ping_loss(proc: subprocess.Popen[str], timeout: float = 60.0) -> tuple[int, int, str]:
    """(transmitted, received, output) of a finished :func:`start_ping`."""
    out, _ = proc.communicate(timeout=timeout)
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
    assert m, f"no ping summary:\n{out}"
    return int(m[1]), int(m[2]), out


def published_ok(engine: Engine, port: int) -> str:
    """The remote host fetches the published port on the engine's address."""
    return engine.remote_http_get(f"http://{ENGINE_ADDR}:{port}/").stdout


def serve_http(e2e: Scope, container: str) -> None:
    e2e.exec(container, "httpd", "-p", "80", "-h", "/www")


def requests_since(engine: Engine, offset: int) -> list[tuple[str, str, int]]:
    return requests_in_log(engine.plugin.log_text(offset))


def held_endpoints(engine: Engine) -> set[str]:
    return {e["EndpointID"] for e in status(engine)["Endpoints"]}


def port(e2e: Scope, base: int) -> int:
    """A host port per test (a test's teardown never races the next test's publish)."""
    return base + int(e2e.suffix.lstrip("t")) % 500


@pytest.fixture
def plugin_env(engine: Engine) -> Iterator[dict[str, str]]:
    """Set plugin environment for a test (restart the plugin to apply); restored after."""
    saved = dict(engine.plugin.env)
    yield engine.plugin.env
    if engine.plugin.env != saved:
        engine.plugin.env.clear()
        engine.plugin.env.update(saved)
        if engine.plugin.running:
            engine.plugin.restart()


HANDSHAKE = (
    "/Plugin.Activate",
    "/NetworkDriver.GetCapabilities",
    "/IpamDriver.GetCapabilities",
    "/IpamDriver.GetDefaultAddressSpaces",
)


@pytest.fixture
def revive(engine: Engine) -> Iterator[None]:
    """Request after ``e2e``: a test that restarts dockerd leaves it running, whatever
    happens (the session's later tests need it), before ``e2e`` cleans up."""
    yield
    if engine.proc is None or engine.proc.poll() is not None:
        engine.kill_dockerd(containerd=True)
        engine.start_dockerd()


# --- 1. plugin restart ----------------------------------------------------------------------


@pytest.mark.timeout(240, func_only=True)
@pytest.mark.parametrize("first_op", ["stop", "connect", "run"])
@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_plugin_restart_under_running_containers(e2e: Scope, how: str, first_op: str) -> None:
    eng = e2e.engine
    net = e2e.create_network("net", subnet="10.51.0.0/24")
    net2 = e2e.create_network("net2", subnet="10.52.0.0/24")
    hport = port(e2e, 18000)
    a = e2e.run_container(net, "a")
    b = e2e.run_container(net, "b", publish=[f"{hport}:80"])
    c = e2e.run_container(net, "c")
    d = e2e.run_container(net2, "d")
    serve_http(e2e, b)
    ip_a, ip_b = (e2e.container_ip(x, net) for x in (a, b))
    ip_d = e2e.container_ip(d, net2)
    assert "pouch-e2e-ok" in published_ok(eng, hport)
    before = {x: endpoint_id(e2e, x, net) for x in (a, b, c)}
    assert_consistent(eng)

    # Traffic across the whole outage and restart.
    pinger = start_ping(e2e, a, ip_b, seconds=10)
    time.sleep(1.5)
    t0 = time.monotonic()
    if how == "kill9":
        eng.plugin.kill()
        assert eng.plugin.socket.exists(), "kill -9 leaves the socket file behind"
    else:
        assert eng.plugin.stop() == 0
        assert not eng.plugin.socket.exists(), "a graceful stop removes the socket file"
    # While the plugin is down, the data path is the kernel's alone.
    e2e.assert_ping(b, ip_a)
    assert "pouch-e2e-ok" in published_ok(eng, hport)
    offset = eng.plugin.log_offset()
    eng.plugin.start()
    restart_s = time.monotonic() - t0
    sent, got, out = ping_loss(pinger)
    assert sent >= 40 and got == sent, f"ping lost packets across the plugin restart:\n{out}"
    assert "pouch-e2e-ok" in published_ok(eng, hport)
    # Start-up found everything in place: no repair, nothing forgotten.
    startup = eng.plugin.log_text(offset)
    assert "start-up repair" not in startup, startup
    assert held_endpoints(eng) >= set(before.values())

    # The first engine operation after the restart, whatever it is.
    op_offset = eng.plugin.log_offset()
    if first_op == "stop":
        e2e.docker("stop", c)
        reqs = requests_since(eng, op_offset)
        ep_c = before[c][:12]
        assert reqs and ep_c in reqs[0][1], f"first request was not about c: {reqs}"
        got_paths = {p for p, ids, code in reqs if ep_c in ids and code == 200}
        assert {"/NetworkDriver.Leave", "/NetworkDriver.DeleteEndpoint"} <= got_paths, reqs
        assert ("/IpamDriver.ReleaseAddress", 200) in {(p, s) for p, _, s in reqs}, reqs
        assert before[c] not in held_endpoints(eng)
        e2e.docker("start", c)  # and back, on a fresh endpoint
        new_c = e2e.container_ip(c, net)
        e2e.assert_ping(a, new_c)
    elif first_op == "connect":
        e2e.connect(net2, a)
        reqs = requests_since(eng, op_offset)
        # The engine first refreshes the container's other endpoint (made before the
        # restart), then requests an address for the new one.
        assert reqs[0][0] in ("/NetworkDriver.EndpointOperInfo", "/IpamDriver.RequestAddress")
        if reqs[0][0] == "/NetworkDriver.EndpointOperInfo":
            assert before[a][:12] in reqs[0][1], reqs
        paths = [p for p, _, _ in reqs]
        assert (
            paths.index("/IpamDriver.RequestAddress")
            < paths.index("/NetworkDriver.CreateEndpoint")
            < paths.index("/NetworkDriver.Join")
        ), reqs
        assert all(code == 200 for _, _, code in reqs), reqs
        ip_a2 = e2e.container_ip(a, net2)
        assert e2e.container_addrs(a).get("eth1") == [f"{ip_a2}/24"]
        e2e.assert_ping(a, ip_d)
        e2e.assert_ping(d, ip_a2)
    else:
        e = e2e.run_container(net, "e")
        reqs = requests_since(eng, op_offset)
        assert reqs[0][0] == "/IpamDriver.RequestAddress", reqs
        assert all(code == 200 for _, _, code in reqs), reqs
        e2e.assert_ping(e, ip_a)
        e2e.assert_ping(a, e2e.container_ip(e, net))
    e2e.assert_ping(a, ip_b)

    # An address in use is never handed out again: pinning one fails, and many new
    # containers (started concurrently) all get addresses distinct from the survivors'.
    survivors = {x: e2e.container_ip(x, net) for x in (a, b, c)}
    dup = e2e.name("dup")
    e2e.containers.append(dup)
    r = e2e.docker(
        "run",
        "-d",
        "--name",
        dup,
        "--network",
        net,
        "--ip",
        ip_a,
        eng.image,
        *SLEEPER,
        check=False,
        timeout=90,
    )
    assert r.returncode != 0, f"a second container got {ip_a}, already a's"
    assert "already" in r.stderr, r.stderr
    e2e.remove_container(dup)
    names = [e2e.name(f"m{i}") for i in range(8)]
    e2e.containers.extend(names)
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda n: e2e.docker(
                    "run", "-d", "--name", n, "--network", net, eng.image, *SLEEPER, timeout=90
                ),
                names,
            )
        )
    fresh = {n: e2e.container_ip(n, net) for n in names}
    clash = set(fresh.values()) & set(survivors.values())
    assert not clash, f"addresses handed out twice: {clash} ({survivors}, {fresh})"
    assert len(set(fresh.values())) == len(fresh), f"duplicate addresses: {fresh}"
    e2e.assert_ping(names[0], ip_b)
    assert_consistent(eng)
    print(
        f"[{how}/{first_op}] plugin down->answering in {restart_s:.2f}s; "
        f"ping {got}/{sent}; {len(reqs)} requests in the first op"
    )


# --- 2. engine restart ----------------------------------------------------------------------


@pytest.mark.timeout(240, func_only=True)
def test_dockerd_restart_without_live_restore(e2e: Scope, revive: None) -> None:
    """dockerd stops the containers (cleanup calls reach us); ``--restart always`` ones come
    back on fresh endpoints, connected, talking, with their published port."""
    eng = e2e.engine
    assert not eng.live_restore
    net = e2e.create_network("net", subnet="10.53.0.0/24")
    net2 = e2e.create_network("net2", subnet="10.54.0.0/24")
    hport = port(e2e, 18500)
    always = ("--restart", "always")
    a = e2e.run_container(net, "a", extra=always)
    b = e2e.run_container(net, "b", publish=[f"{hport}:80"], extra=always)
    c = e2e.run_container(net, "c")  # no restart policy: stays stopped
    e2e.connect(net2, a)
    serve_http(e2e, b)
    old = {(x, n): endpoint_id(e2e, x, n) for x, n in ((a, net), (b, net), (c, net), (a, net2))}
    assert_consistent(eng)

    offset = eng.plugin.log_offset()
    t0 = time.monotonic()
    eng.restart_dockerd()
    took = time.monotonic() - t0
    for x in (a, b):
        wait_until(
            lambda x=x: container_state(e2e, x)["Running"],
            timeout=30,
            message=f"{x} to be restarted",
        )
    assert not container_state(e2e, c)["Running"]

    reqs = requests_since(eng, offset)
    for (x, n), ep in old.items():
        for call in ("/NetworkDriver.Leave", "/NetworkDriver.DeleteEndpoint"):
            assert (call, 200) in {(p, s) for p, ids, s in reqs if ep[:12] in ids}, (
                f"no {call} for {x} on {n} at dockerd shutdown: {reqs}"
            )
    assert not any(s != 200 for _, _, s in reqs), reqs
    held = held_endpoints(eng)
    assert not held & set(old.values()), "endpoints of the stopped containers are still held"
    new = {(x, n): endpoint_id(e2e, x, n) for x, n in ((a, net), (b, net), (a, net2))}
    assert not set(new.values()) & set(old.values())
    assert set(new.values()) <= held

    serve_http(e2e, b)  # the restarted httpd-less container: serve again
    e2e.assert_ping(a, e2e.container_ip(b, net))
    e2e.assert_ping(b, e2e.container_ip(a, net))
    assert "pouch-e2e-ok" in published_ok(eng, hport)
    assert_consistent(eng)
    print(f"[no live-restore] dockerd restart {took:.1f}s, {len(reqs)} plugin requests")


@pytest.mark.timeout(240, func_only=True)
def test_dockerd_restart_with_live_restore(e2e: Scope, revive: None) -> None:
    """Containers keep running, keep their endpoints, addresses and traffic; the engine sends
    the plugin nothing (no replay: RequiresRequestReplay is false); nothing leaks."""
    eng = e2e.engine
    eng.restart_dockerd(live_restore=True)
    try:
        net = e2e.create_network("net", subnet="10.55.0.0/24")
        net2 = e2e.create_network("net2", subnet="10.56.0.0/24")
        hport = port(e2e, 19000)
        a = e2e.run_container(net, "a")
        b = e2e.run_container(net, "b", publish=[f"{hport}:80"])
        e2e.connect(net2, a)
        serve_http(e2e, b)
        keys = ((a, net), (b, net), (a, net2))
        before = {k: (endpoint_id(e2e, *k), e2e.container_ip(*k)) for k in keys}
        pids = {x: container_state(e2e, x)["Pid"] for x in (a, b)}
        assert_consistent(eng)

        pinger = start_ping(e2e, a, before[(b, net)][1], seconds=12)
        time.sleep(1)
        offset = eng.plugin.log_offset()
        t0 = time.monotonic()
        eng.restart_dockerd()
        took = time.monotonic() - t0
        sent, got, out = ping_loss(pinger)

        assert {x: container_state(e2e, x)["Pid"] for x in (a, b)} == pids
        after = {k: (endpoint_id(e2e, *k), e2e.container_ip(*k)) for k in keys}
        assert after == before
        assert got == sent and sent > 0, f"ping lost packets across the restart:\n{out}"
        # Restoring the live sandboxes loads the driver: the v1 handshake, and nothing that
        # changes anything (no CreateNetwork/CreateEndpoint/Join replay, no IPAM replay:
        # RequiresRequestReplay is false). Engine 28 also reads each restored endpoint's
        # EndpointOperInfo (docs/protocol.md §3.5).
        reqs = requests_since(eng, offset)
        allowed = {*HANDSHAKE, "/NetworkDriver.EndpointOperInfo"}
        assert {p for p, _, _ in reqs} <= allowed, (
            f"the engine called the plugin across a live-restore: {reqs}"
        )
        e2e.assert_ping(a, before[(b, net)][1])
        assert "pouch-e2e-ok" in published_ok(eng, hport)
        assert_consistent(eng)

        # Endpoints made before the dockerd restart are torn down and remade normally.
        e2e.docker("stop", a)
        reqs = requests_since(eng, offset)
        for k in ((a, net), (a, net2)):
            assert ("/NetworkDriver.DeleteEndpoint", 200) in {
                (p, s) for p, ids, s in reqs if before[k][0][:12] in ids
            }, reqs
        e2e.docker("start", a)
        e2e.assert_ping(a, before[(b, net)][1])
        assert_consistent(eng)
        print(f"[live-restore] dockerd restart {took:.1f}s, ping {got}/{sent}")
    finally:
        # Leave the session's engine as it was: without live-restore, and with nothing of
        # this test running (a non-live-restore start would kill what still runs).
        problems = e2e.cleanup()
        eng.restart_dockerd(live_restore=False)
        assert not problems, problems


def forget_dead(eng: Engine, dead: set[str], offset: int, *, sweep: bool) -> None:
    """The endpoints the engine forgot go: by the plugin's sweep, or by ``gc --engine``
    (``check --engine`` first reports them)."""
    if sweep:
        wait_until(
            lambda: not held_endpoints(eng) & dead,
            timeout=15,
            interval=0.5,
            message="the sweep to forget the dead endpoints",
        )
        log = eng.plugin.log_text(offset)
        for ep in dead:
            # The sweep forgets it, unless a restarting container given the same address got
            # there first (CreateEndpoint drops a holder whose veth is gone).
            assert (
                f"sweep: forgot endpoint {ep[:12]}" in log or f"endpoint {ep[:12]} held" in log
            ), log[-3000:]
        return
    stale = held_endpoints(eng) & dead
    assert stale, "the plugin heard of the dead endpoints after all"
    r = check(eng)
    assert r.returncode == 1, r.stdout
    for ep in stale:
        assert ep[:12] in r.stdout, r.stdout
    out = gc(eng).stdout
    for ep in stale:
        assert f"forgot endpoint {ep[:12]}" in out, out
    assert not held_endpoints(eng) & dead


@pytest.mark.timeout(240, func_only=True)
@pytest.mark.parametrize("cleanup", ["engine", "sweep", "gc-cli"])
def test_dockerd_killed_then_restarted(
    e2e: Scope, revive: None, plugin_env: dict[str, str], cleanup: str
) -> None:
    """kill -9 dockerd under running containers, start it again.

    * ``engine``: the network uses our IPAM, so the engine's start-up looks the IPAM driver
      up (activating the v1 plugin) before its stale-endpoint cleanup, which therefore
      reaches us (Leave skipped, DeleteEndpoint + ReleaseAddress sent).
    * ``sweep`` / ``gc-cli``: our driver with the engine's default IPAM. Nothing activates
      the plugin before the cleanup, so the engine skips DeleteEndpoint (docs/protocol.md §5.6).
      The plugin's sweep (``POUCH_DRIVER_GC_INTERVAL=2``), or with the sweep off
      ``pouch-driver gc --engine``, forgets the endpoints the engine forgot.

    In the last two the engine's IPAM, having released the dead endpoints' addresses, hands
    the first one straight back to the ``--restart always`` container; the plugin must accept
    it even though one of its dead endpoints still claims it (checked last).
    """
    eng = e2e.engine
    if cleanup == "sweep":
        plugin_env["POUCH_DRIVER_GC_INTERVAL"] = "2"
    elif cleanup == "gc-cli":
        plugin_env["POUCH_DRIVER_GC_INTERVAL"] = "0"
    if plugin_env != {}:
        eng.plugin.restart()
    ours = cleanup == "engine"
    net = e2e.create_network("net", subnet="10.57.0.0/24", ipam=ours)
    a = e2e.run_container(net, "a", extra=("--restart", "always"))
    b = e2e.run_container(net, "b")
    c = e2e.run_container(net, "c")
    old = {x: endpoint_id(e2e, x, net) for x in (a, b, c)}
    ip_a = e2e.container_ip(a, net)
    assert_consistent(eng)

    offset = eng.plugin.log_offset()
    # containerd too: a managed containerd outliving its dockerd dies of SIGPIPE on its next
    # log line, and the new dockerd, which found it alive, then times out waiting for it.
    containerd = eng.containerd_pids()
    eng.kill_dockerd(containerd=True)
    t0 = time.monotonic()
    eng.start_dockerd()
    took = time.monotonic() - t0
    try:
        wait_until(
            lambda: container_state(e2e, a)["Running"], timeout=10, message="a to be restarted"
        )
        came_back = ""
    except AssertionError:
        came_back = (
            f"{a} (--restart always) did not come back after the dockerd restart: "
            f"{container_state(e2e, a).get('Error')}"
        )
    for x in (b, c):
        assert not container_state(e2e, x)["Running"], f"{x} survived a non-live-restore start"
    reqs = requests_since(eng, offset)
    deleted = {ids for p, ids, s in reqs if p == "/NetworkDriver.DeleteEndpoint" and s == 200}
    sent_delete = {x for x, ep in old.items() if any(ep[:12] in ids for ids in deleted)}

    if ours:
        assert sent_delete == {a, b, c}, f"the engine skipped DeleteEndpoint: {reqs}"
    else:
        # The cleanup that docs/protocol.md §5.6 describes: DeleteEndpoint skipped.
        assert not sent_delete, f"expected the engine to skip DeleteEndpoint: {reqs}"
        forget_dead(eng, set(old.values()), offset, sweep=cleanup == "sweep")
    if came_back:  # the operator starts it (now that the dead endpoints are gone)
        e2e.docker("start", a)
    assert endpoint_id(e2e, a, net) not in old.values()
    assert_consistent(eng)
    d = e2e.run_container(net, "d")
    e2e.assert_ping(d, e2e.container_ip(a, net))
    assert_check_clean(eng)
    print(
        f"[kill -9 dockerd, {cleanup}] restart {took:.1f}s; containerd before {containerd}, "
        f"after {eng.containerd_pids()}; DeleteEndpoint sent for {sorted(sent_delete)}; "
        f"a came back by itself: {not came_back}"
    )
    if cleanup == "sweep":
        return  # whether the 2 s sweep ran before the engine restarted a is a race
    bounced = [
        line for line in eng.plugin.log_text(offset).splitlines() if "CreateEndpoint failed" in line
    ]
    assert not came_back, (
        f"{came_back}\n(a's address {ip_a} was released by the engine's IPAM and granted again; "
        f"the plugin refused it for a dead endpoint it still held):\n" + "\n".join(bounced)
    )


class NotReady:
    """Answers every request on the plugin's socket with HTTP 500, as a plugin still starting
    (or failing) would. Activation errors are not retried (docs/protocol.md §1.4), so the
    engine gives up at once instead of retrying for ~15 s per lookup."""

    def __init__(self, socket_path: Path) -> None:
        self.path = socket_path
        self.calls: list[str] = []
        self._sock: socket.socket | None = None

    def __enter__(self) -> NotReady:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        self._sock.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _serve(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        body = b'{"Err":"pouch-driver is not ready"}'
        answer = (
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        with conn, contextlib.suppress(OSError):
            msg = read_http_message(conn, bytearray())
            if msg is not None:
                self.calls.append(msg.split(b" ", 2)[1].decode(errors="replace"))
                conn.sendall(answer)


@pytest.mark.timeout(240, func_only=True)
def test_dockerd_killed_while_plugin_not_ready(
    e2e: Scope, revive: None, plugin_env: dict[str, str]
) -> None:
    """kill -9 dockerd, and the plugin is not ready while dockerd starts again (it fails every
    call): the engine's stale-endpoint cleanup skips DeleteEndpoint AND its ReleaseAddress
    fails, so the engine forgets endpoints and addresses the plugin still holds. Once the
    plugin is back, its sweep forgets the dead endpoints and parks their addresses: never
    handed out dynamically; by name given back at once, owing the late release that never
    comes (so the address outlives its new holder: a leak, never a duplicate)."""
    eng = e2e.engine
    plugin_env["POUCH_DRIVER_GC_INTERVAL"] = "2"
    eng.plugin.restart()
    net = e2e.create_network("net", subnet="10.58.0.0/24")
    a = e2e.run_container(net, "a", extra=("--restart", "always"))
    b = e2e.run_container(net, "b")
    old = {x: (endpoint_id(e2e, x, net), e2e.container_ip(x, net)) for x in (a, b)}
    assert_consistent(eng)

    eng.kill_dockerd(containerd=True)
    eng.plugin.stop()
    with NotReady(eng.plugin.socket) as refuser:
        eng.start_dockerd()
        # The engine's cleanup has run (before its API answered); a's restart failed.
        time.sleep(1)
    print(f"[plugin not ready] the engine called: {refuser.calls}")
    assert refuser.calls, "the engine never tried the plugin during its start-up"
    assert not container_state(e2e, a)["Running"]
    held_ips = {addr for rows in stored_addresses(eng).values() for addr, _ in rows}
    assert {ip for _, ip in old.values()} <= held_ips  # the plugin still holds them
    offset = eng.plugin.log_offset()
    eng.plugin.start()
    dead = {ep for ep, _ in old.values()}
    wait_until(
        lambda: not held_endpoints(eng) & dead,
        timeout=15,
        interval=0.5,
        message="the sweep to forget the endpoints the engine forgot",
    )
    log = eng.plugin.log_text(offset)
    for x, (ep, ip) in old.items():
        assert re.search(rf"forgot endpoint {ep[:12]} .*reclaimed {re.escape(ip)}", log), (
            f"{x}: {log[-3000:]}"
        )
    kinds = {addr: kind for rows in stored_addresses(eng).values() for addr, kind in rows}
    assert all(kinds.get(ip) == "reclaimed" for _, ip in old.values()), (
        f"dead endpoints' addresses are not parked: {kinds}"
    )
    e2e.docker("start", a)  # the operator restarts what could not come back
    d = e2e.run_container(net, "d", ip=old[b][1])  # b's old address, by name
    e2e.assert_ping(d, e2e.container_ip(a, net))
    assert_consistent(eng)
