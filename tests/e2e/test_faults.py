"""Fault injection through the real engine: the plugin dies (kill -9) mid-operation.

* ``test_kill_9_at_random_points_of_a_churn``: several docker CLI operations run concurrently
  (network create / rm, run -d, run --rm, connect, disconnect, restart, rm -f) while the plugin
  is killed and restarted at random instants. In-flight operations may fail (the engine
  retries for ~15 s, and a retry after a lost answer goes out with an empty body, docs/protocol.md
  §1.5); what must hold afterwards is consistency, and the engine's next operations working.
* ``test_crash_between_commit_and_answer``: the one instant a random kill rarely hits, made
  deterministic. A proxy on the plugin's socket forwards requests; for the chosen method it
  lets the plugin commit and answer, then kills the plugin -9 and drops the answer, as a crash
  right before the reply would. The engine sees a transport error, retries with an empty body,
  fails the operation and rolls back its own side; the plugin restarts with what it committed.

``PDE2E_SEED`` fixes the churn's random choices (the kill instants are then the same; which
request each kill lands in still depends on timing). ``PDE2E_KILLS`` sets the number of kills.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from .harness import SLEEPER, Engine, Plugin, Scope
from .oracle import (
    CRASH_INVARIANTS,
    assert_consistent,
    check,
    consistency_problems,
    engine_networks,
    gc,
    problems_after_settling,
    read_http_message,
    release_orphan_pools,
    requests_in_log,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

OP_TIMEOUT = 60.0  # a docker operation blocked on a dead plugin fails after ~15 s of retries


# --- engine-side state, as the engine reports it ---------------------------------------------


def settle_engine(e2e: Scope) -> list[str]:
    """Clear what the engine itself left stale after failed operations; return what was done.

    * An endpoint the engine still lists on a network although its container is not running
      (a DeleteEndpoint whose answer was lost: the engine puts the endpoint back in its store,
      docs/protocol.md §5.4): ``docker network disconnect -f``, as an operator would.
    * Containers left ``created`` by a failed ``docker run``: removed (they hold no network).
    """
    done: list[str] = []
    running = set(e2e.docker("ps", "-q", "--no-trunc").stdout.split())
    for net in engine_networks(e2e.engine).values():
        doc = e2e.engine.docker_json("network", "inspect", net.id)[0]
        for cid, info in (doc.get("Containers") or {}).items():
            if cid in running:
                continue
            name = info.get("Name") or cid
            r = e2e.docker("network", "disconnect", "-f", net.id, name, check=False)
            done.append(
                f"disconnect -f {net.name} {name} ({info.get('IPv4Address')}): "
                f"rc {r.returncode} {r.stderr.strip()}"
            )
    created = e2e.docker("ps", "-aq", "--filter", "status=created").stdout.split()
    if created:
        e2e.docker("rm", "-f", *created, check=False)
        done.append(f"removed {len(created)} containers left 'created'")
    return done


def assert_always_true(e2e: Scope) -> None:
    """What must hold right after a crash, before any gc: no interface of ours outside the
    store, no address of a running container free for someone else, no two containers on
    one address, and the store matches the kernel and the firewall."""
    problems = [str(p) for p in consistency_problems(e2e.engine) if p.kind in CRASH_INVARIANTS]
    assert not problems, "after the crash:\n  " + "\n  ".join(problems)
    r = check(e2e.engine, with_engine=False)
    assert r.returncode == 0, f"pouch-driver check (store/kernel/firewall):\n{r.stdout}"


def engine_works(e2e: Scope, tag: str) -> None:
    """The engine's next operations succeed: a network, two containers that ping."""
    net = e2e.create_network(f"ok{tag}")
    a = e2e.run_container(net, f"oka{tag}")
    b = e2e.run_container(net, f"okb{tag}")
    e2e.assert_ping(a, e2e.container_ip(b, net))
    e2e.remove_container(a)
    e2e.remove_container(b)
    e2e.remove_network(net)


@pytest.fixture
def contain_leaks(engine: Engine) -> Iterator[None]:
    """Request BEFORE ``e2e``: after its cleanup, remove what a plugin bug left in the
    session's plugin (so later tests start clean): ``gc --engine``, then release pools no
    engine network uses, as the engine would with ReleasePool."""
    yield
    if not engine.plugin.running:
        return
    gc(engine)
    for line in release_orphan_pools(engine):
        print(f"[containment] {line}")


# --- 1. random kills in a concurrent churn ---------------------------------------------------


@dataclass
class Outcome:
    op: str
    args: tuple[str, ...]
    rc: int | None
    err: str
    seconds: float


@dataclass
class Churn:
    e2e: Scope
    base: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    nets: list[str] = field(default_factory=list)  # created churn networks
    containers: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    counter: Iterator[int] = field(default_factory=lambda: iter(range(1, 1_000_000)))

    def docker(self, op: str, *args: str) -> int | None:
        t0 = time.monotonic()
        try:
            r = self.e2e.engine.docker(*args, check=False, timeout=OP_TIMEOUT)
            rc, err = r.returncode, r.stderr.strip()
        except AssertionError as exc:  # timed out
            rc, err = None, str(exc).splitlines()[0]
        with self.lock:
            self.outcomes.append(Outcome(op, args, rc, err, time.monotonic() - t0))
        return rc

    def name(self, kind: str) -> str:
        with self.lock:
            return self.e2e.name(f"{kind}{next(self.counter)}")

    def step(self, rng: random.Random) -> None:
        with self.lock:
            nets = [self.base, *self.nets]
            containers = list(self.containers)
            churn_nets = list(self.nets)
        op = rng.choices(
            ["net_create", "run", "run_rm", "connect", "disconnect", "restart", "rm", "net_rm"],
            weights=[
                2 if len(churn_nets) < 3 else 0,
                4 if len(containers) < 8 else 0,
                2,
                3,
                2,
                1,
                1 if len(containers) > 3 else 0,
                1,
            ],
        )[0]
        image = self.e2e.engine.image
        if op == "net_create":
            name = self.name("n")
            with self.lock:
                self.e2e.networks.append(name)  # removed at teardown even if half-made
            d = self.e2e.driver
            if self.docker(op, "network", "create", "-d", d, "--ipam-driver", d, name) == 0:
                with self.lock:
                    self.nets.append(name)
        elif op == "run":
            name = self.name("c")
            with self.lock:
                self.e2e.containers.append(name)
                self.containers.append(name)
            self.docker(
                op, "run", "-d", "--name", name, "--network", rng.choice(nets), image, *SLEEPER
            )
        elif op == "run_rm":
            self.docker(op, "run", "--rm", "--network", rng.choice(nets), image, "true")
        elif op in ("connect", "disconnect") and containers:
            self.docker(op, "network", op, rng.choice(nets), rng.choice(containers))
        elif op == "restart" and containers:
            self.docker(op, "restart", "-t", "1", rng.choice(containers))
        elif op == "rm" and containers:
            name = rng.choice(containers)
            if self.docker(op, "rm", "-f", name) == 0:
                with self.lock:
                    if name in self.containers:
                        self.containers.remove(name)
        elif op == "net_rm" and churn_nets:
            name = rng.choice(churn_nets)
            if self.docker(op, "network", "rm", name) == 0:
                with self.lock:
                    if name in self.nets:
                        self.nets.remove(name)

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            self.step(rng)

    def summary(self) -> str:
        by_op: Counter[tuple[str, str]] = Counter(
            (o.op, "ok" if o.rc == 0 else "timeout" if o.rc is None else "failed")
            for o in self.outcomes
        )
        slow = sum(1 for o in self.outcomes if o.seconds > 5)
        return (
            ", ".join(f"{op} {res} {n}" for (op, res), n in sorted(by_op.items()))
            + f"; {slow} took > 5 s"
        )


@pytest.mark.timeout(300, func_only=True)
def test_kill_9_at_random_points_of_a_churn(
    contain_leaks: None, sweeping_plugin: Plugin, e2e: Scope
) -> None:
    eng = e2e.engine
    seed = int(os.environ.get("PDE2E_SEED", "0")) or random.randrange(1, 1_000_000)
    kills = int(os.environ.get("PDE2E_KILLS", "8"))
    rng = random.Random(seed)
    print(f"[churn] seed {seed} (PDE2E_SEED={seed} repeats the choices), {kills} kills")
    base = e2e.create_network("base", subnet="10.61.0.0/24")
    s1 = e2e.run_container(base, "s1")
    s2 = e2e.run_container(base, "s2")
    ip_s2 = e2e.container_ip(s2, base)
    churn = Churn(e2e, base)
    offset = eng.plugin.log_offset()
    workers = [
        threading.Thread(
            target=churn.worker, args=(rng.randrange(1 << 30),), name=f"churn{i}", daemon=True
        )
        for i in range(4)
    ]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    downtime: list[float] = []
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(1.0, 4.0))
            eng.plugin.kill()
            t1 = time.monotonic()
            time.sleep(rng.uniform(0.0, 1.0))
            eng.plugin.start()
            downtime.append(time.monotonic() - t1)
    finally:
        churn.stop.set()
        for w in workers:
            w.join(OP_TIMEOUT + 30)
    churn_s = time.monotonic() - t0
    assert not any(w.is_alive() for w in workers), "a docker operation hung"
    print(
        f"[churn] {churn_s:.0f}s, {len(churn.outcomes)} operations: {churn.summary()}; "
        f"plugin down {min(downtime):.1f}-{max(downtime):.1f}s per kill"
    )
    reqs = requests_in_log(eng.plugin.log_text(offset))
    empty = [p for p, ids, code in reqs if code == 400 and not ids]
    print(
        f"[churn] {len(reqs)} plugin requests, {len(empty)} empty-body retries answered 400: "
        f"{Counter(empty)}"
    )

    # The survivors never noticed.
    e2e.assert_ping(s1, ip_s2)
    # What must hold whatever the engine did.
    for line in settle_engine(e2e):
        print(f"[churn] engine-side: {line}")
    assert_always_true(e2e)
    # Engine vs plugin, before any operator action: the plugin's own start-up and sweep (2 s
    # here, and leftovers of lost answers are taken once 5 s passed since the last start).
    problems = problems_after_settling(eng, timeout=20, interval=1)
    # The engine's next operations succeed, whatever was left.
    engine_works(e2e, "x")
    if problems:
        repaired = gc(eng).stdout
        after_gc = [str(p) for p in consistency_problems(eng)]
        pytest.fail(
            f"after {kills} kills (seed {seed}) engine and plugin disagree:\n"
            + "".join(f"  {p}\n" for p in problems)
            + f"  pouch-driver gc --engine: {repaired.strip()}\n"
            + "".join(f"  still after gc: {p}\n" for p in after_gc),
            pytrace=False,
        )
    assert_consistent(eng)


# --- 2. a crash between commit and answer, deterministically ---------------------------------


class CrashBeforeAnswer:
    """A proxy on the plugin's socket path; the plugin's own socket is renamed aside.

    Every request is forwarded. The first one for ``method`` is answered by the plugin, then
    ``fired`` is set and the engine's connection is closed without the answer; the test then
    kills the plugin -9 (:meth:`crash`) and starts it again on its usual socket.
    """

    def __init__(self, plugin: Plugin, method: str) -> None:
        self.plugin = plugin
        self.method = method
        self.aside = plugin.socket.with_name(f"{plugin.name}.real")
        self.fired = threading.Event()
        self.request = b""
        self.answer = b""
        self._listener: socket.socket | None = None

    def __enter__(self) -> CrashBeforeAnswer:
        # A fresh plugin process first: the engine's keep-alive connections to the old one
        # would bypass the proxy (renaming a socket file does not move connections).
        self.plugin.restart()
        os.rename(self.plugin.socket, self.aside)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.plugin.socket))
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()
        if self.aside.exists():  # never fired: give the plugin its socket back
            if self.plugin.running:
                with contextlib.suppress(OSError):
                    self.plugin.socket.unlink()
                os.rename(self.aside, self.plugin.socket)
            else:
                self.aside.unlink()

    def _close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                self.plugin.socket.unlink()

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            while True:
                try:
                    req = read_http_message(conn, buf)
                except OSError:
                    return
                if req is None or self.fired.is_set():
                    return
                path = req.split(b" ", 2)[1].decode(errors="replace")
                try:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
                        up.connect(str(self.aside))
                        up.sendall(req)
                        answer = read_http_message(up, bytearray())
                except OSError:
                    return
                if answer is None:
                    return
                if path == self.method and not self.fired.is_set():
                    self.request, self.answer = req, answer
                    self.fired.set()
                    return  # closes the engine's connection: no answer
                try:
                    conn.sendall(answer)
                except OSError:
                    return

    def crash(self) -> None:
        """kill -9 the plugin (it has answered), drop the proxy, start the plugin again."""
        self.plugin.kill()
        self._close()
        with contextlib.suppress(OSError):
            self.aside.unlink()
        self.plugin.start()


@dataclass(frozen=True)
class Scenario:
    """``prepare`` makes what the operation needs; ``operation`` triggers ``method`` (it may
    fail); ``again`` is the engine's next operation, which must succeed afterwards."""

    method: str
    prepare: Callable[[Scope, dict[str, str]], None]
    operation: Callable[[Scope, dict[str, str]], list[str]]
    again: Callable[[Scope, dict[str, str]], None]


def _nothing(e2e: Scope, ctx: dict[str, str]) -> None:
    pass


def _net_create(e2e: Scope, ctx: dict[str, str]) -> list[str]:
    name = e2e.name("net")
    e2e.networks.append(name)
    d = e2e.driver
    return ["network", "create", "-d", d, "--ipam-driver", d, "--subnet", ctx["subnet"], name]


def _net_create_again(e2e: Scope, ctx: dict[str, str]) -> None:
    """The same command again (the user retries): it must work, with the same subnet."""
    name = e2e.name("net")
    if e2e.docker("network", "inspect", name, check=False).returncode == 0:
        e2e.remove_network(name)  # (the engine kept it after all: remove, then retry)
    while name in e2e.networks:
        e2e.networks.remove(name)
    e2e.create_network("net", subnet=ctx["subnet"])
    a = e2e.run_container(name, "a")
    b = e2e.run_container(name, "b")
    e2e.assert_ping(a, e2e.container_ip(b, name))


def _with_net(e2e: Scope, ctx: dict[str, str]) -> None:
    ctx["net"] = e2e.create_network("net", subnet=ctx["subnet"])
    ctx["peer"] = e2e.run_container(ctx["net"], "peer")


def _run_pinned(e2e: Scope, ctx: dict[str, str]) -> list[str]:
    name = e2e.name("c")
    e2e.containers.append(name)
    return [
        "run",
        "-d",
        "--name",
        name,
        "--network",
        ctx["net"],
        "--ip",
        ctx["pinned"],
        e2e.engine.image,
        *SLEEPER,
    ]


def _run_pinned_again(e2e: Scope, ctx: dict[str, str]) -> None:
    """``docker rm -f`` the failed container and run it again with the same ``--ip``."""
    name = e2e.name("c")
    running = e2e.docker("inspect", "-f", "{{.State.Running}}", name, check=False)
    if running.stdout.strip() != "true":
        e2e.remove_container(name, check=False)
        e2e.run_container(ctx["net"], "c", ip=ctx["pinned"])
    e2e.assert_ping(name, e2e.container_ip(ctx["peer"], ctx["net"]))
    e2e.assert_ping(ctx["peer"], ctx["pinned"])


def _with_container(e2e: Scope, ctx: dict[str, str]) -> None:
    _with_net(e2e, ctx)
    ctx["c"] = e2e.run_container(ctx["net"], "c", ip=ctx["pinned"])


def _stop(e2e: Scope, ctx: dict[str, str]) -> list[str]:
    return ["stop", "-t", "1", ctx["c"]]


def _start_again(e2e: Scope, ctx: dict[str, str]) -> None:
    e2e.docker("start", ctx["c"])
    e2e.assert_ping(ctx["c"], e2e.container_ip(ctx["peer"], ctx["net"]))
    e2e.assert_ping(ctx["peer"], ctx["pinned"])


def _with_empty_net(e2e: Scope, ctx: dict[str, str]) -> None:
    ctx["net"] = e2e.create_network("net", subnet=ctx["subnet"])


def _net_rm(e2e: Scope, ctx: dict[str, str]) -> list[str]:
    return ["network", "rm", ctx["net"]]


SCENARIOS = {
    "RequestPool": Scenario("/IpamDriver.RequestPool", _nothing, _net_create, _net_create_again),
    "CreateNetwork": Scenario(
        "/NetworkDriver.CreateNetwork", _nothing, _net_create, _net_create_again
    ),
    "RequestAddress": Scenario(
        "/IpamDriver.RequestAddress", _with_net, _run_pinned, _run_pinned_again
    ),
    "CreateEndpoint": Scenario(
        "/NetworkDriver.CreateEndpoint", _with_net, _run_pinned, _run_pinned_again
    ),
    "Join": Scenario("/NetworkDriver.Join", _with_net, _run_pinned, _run_pinned_again),
    "DeleteEndpoint": Scenario(
        "/NetworkDriver.DeleteEndpoint", _with_container, _stop, _start_again
    ),
    "ReleaseAddress": Scenario("/IpamDriver.ReleaseAddress", _with_container, _stop, _start_again),
    "DeleteNetwork": Scenario(
        "/NetworkDriver.DeleteNetwork", _with_empty_net, _net_rm, _net_create_again
    ),
}


@pytest.fixture
def sweeping_plugin(engine: Engine) -> Iterator[Plugin]:
    """The plugin with a 2 s sweep, so its own garbage collection gets its chance."""
    saved = dict(engine.plugin.env)
    engine.plugin.env["POUCH_DRIVER_GC_INTERVAL"] = "2"
    engine.plugin.env["POUCH_DRIVER_LEFTOVER_GRACE"] = "5"
    engine.plugin.restart()
    yield engine.plugin
    engine.plugin.env.clear()
    engine.plugin.env.update(saved)
    if engine.plugin.running:
        engine.plugin.restart()


@pytest.mark.timeout(180, func_only=True)
@pytest.mark.parametrize("which", list(SCENARIOS))
def test_crash_between_commit_and_answer(
    contain_leaks: None, e2e: Scope, sweeping_plugin: Plugin, which: str
) -> None:
    eng = e2e.engine
    sc = SCENARIOS[which]
    i = list(SCENARIOS).index(which)
    ctx = {"subnet": f"10.62.{i}.0/24", "pinned": f"10.62.{i}.50"}
    sc.prepare(e2e, ctx)
    assert_consistent(eng)
    args = sc.operation(e2e, ctx)
    offset = eng.plugin.log_offset()
    with CrashBeforeAnswer(eng.plugin, sc.method) as proxy:
        result: list[subprocess.CompletedProcess[str]] = []
        t = threading.Thread(
            target=lambda: result.append(e2e.docker(*args, check=False, timeout=OP_TIMEOUT)),
            daemon=True,
        )
        t.start()
        assert proxy.fired.wait(30), f"{sc.method} never came for docker {' '.join(args)}"
        proxy.crash()
        t.join(OP_TIMEOUT + 10)
    assert result, f"docker {' '.join(args)} hung"
    r = result[0]
    reqs = requests_in_log(eng.plugin.log_text(offset))
    print(f"[{which}] docker {' '.join(args[:2])} -> rc {r.returncode}: {r.stderr.strip()[:300]}")
    print(
        f"[{which}] the plugin saw: "
        f"{[(p, c) for p, _, c in reqs if not p.startswith(('/Plugin.', '/Pouch.'))]}"
    )
    for line in settle_engine(e2e):
        print(f"[{which}] engine-side: {line}")
    assert_always_true(e2e)
    # The plugin's sweep (every 2 s) takes leftovers of the lost answer once its grace period
    # (5 s here, the engine's retry window in production) has passed since the restart.
    problems = problems_after_settling(eng, timeout=12, interval=0.5)
    retry_error = ""
    try:
        sc.again(e2e, ctx)
    except AssertionError as exc:
        retry_error = str(exc)
    if not problems and not retry_error:
        assert_consistent(eng)
        return
    # A plugin bug: say what broke, and whether the operator's gc would have repaired it.
    repaired = gc(eng).stdout
    after_gc = [str(p) for p in consistency_problems(eng)]
    pytest.fail(
        f"after a crash between committing and answering {sc.method} "
        f"(docker {' '.join(args[:2])} -> rc {r.returncode}: {r.stderr.strip()[:200]}):\n"
        + "".join(f"  engine vs plugin: {p}\n" for p in problems)
        + (f"  the engine's next operation failed: {retry_error[:700]}\n" if retry_error else "")
        + f"  pouch-driver gc --engine: {repaired.strip()}\n"
        + "".join(f"  still after gc: {p}\n" for p in after_gc),
        pytrace=False,
    )
