"""The systemd way: pouch-driver.service's ExecStart, socket-activated as pouch-driver.socket does.

There is no systemd PID 1 here, so: ``systemd-socket-activate -l SOCKET`` binds the socket and
hands it over (what the .socket unit does), and ``socket_holder.py`` does PID 1's other part:
it keeps the socket open and restarts the daemon when it exits (``Restart=always``). The daemon
runs the unit's ExecStart word for word, except that the program path is this checkout's
installed ``pouch-driver``; its settings come from the environment, as from the unit's
EnvironmentFile. All of it runs in the engine netns, as a v1 plugin named ``pdt?????``.

What this shows: with the socket held across a restart, a request the engine sends while the
daemon is down waits in the socket's backlog and succeeds once the daemon is back; the engine
sees no connection error at all, so it never falls into its retry loop (PROTOCOL §1.5, §5.9).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .harness import (
    PLUGIN_DIR,
    PLUGIN_LOG_NOISE,
    Engine,
    Scope,
    file_size,
    nsenter,
    random_tag,
    socket_answers,
    tail,
    wait_until,
)

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "packaging" / "systemd"
HOLDER = Path(__file__).with_name("socket_holder.py")
PREFIX = "ps"
#: Longer than the unit's RestartSec=1, so that a request surely arrives while no daemon runs.
RESTART_SEC = 4.0
_EVENT = re.compile(r"^(\d+\.\d+) (start|exit) (\d+)(?: (-?\d+))?$")


def unit_values(path: Path, section: str, key: str) -> list[str]:
    """Every value of ``key`` in ``[section]`` of a systemd unit file (no continuation lines)."""
    values: list[str] = []
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        assert not line.endswith("\\"), f"{path.name}: continuation lines are not parsed"
        k, _, v = line.partition("=")
        if current == section and k.strip() == key:
            values.append(v.strip())
    return values


def exec_start() -> list[str]:
    """pouch-driver.service's ExecStart as argv, the program replaced by this checkout's."""
    (line,) = unit_values(UNITS / "pouch-driver.service", "Service", "ExecStart")
    argv = shlex.split(line)
    assert argv[0][0] == "/", f"ExecStart must be an absolute path without prefixes: {line}"
    program = Path(sys.executable).with_name(Path(argv[0]).name)
    if not program.is_file():
        pytest.fail(f"{program} is missing: install the package (scripts/setup --test)")
    return [str(program), *argv[1:]]


@dataclass
class Service:
    """systemd-socket-activate + socket_holder + the daemon, in the engine netns."""

    engine: Engine
    name: str = field(default_factory=lambda: "pdt" + random_tag(5, string.ascii_lowercase))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return PLUGIN_DIR / f"{self.name}.sock"

    @property
    def dir(self) -> Path:
        return self.engine.base / f"svc-{self.name}"

    @property
    def events_path(self) -> Path:
        return self.dir / "events"

    @property
    def log_path(self) -> Path:
        return self.dir / "daemon.log"

    @property
    def pidfile(self) -> Path:
        return self.dir / "daemon.pid"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    def environment(self) -> dict[str, str]:
        """What /etc/default/pouch-driver would hold for this instance."""
        return {
            "POUCH_DRIVER_SOCKET": str(self.socket),
            "POUCH_DRIVER_STATE_DIR": str(self.state_dir),
            "POUCH_DRIVER_PREFIX": PREFIX,
            "POUCH_DRIVER_LOG_LEVEL": "debug",
            "PYTHONUNBUFFERED": "1",
        }

    def command(self) -> list[str]:
        # systemd-socket-activate hands its child only PATH, HOME, USER, TERM and -E values.
        setenv = [f"--setenv={k}={v}" for k, v in self.environment().items()]
        return nsenter(
            self.engine.netns,
            [
                "systemd-socket-activate",
                "-l",
                str(self.socket),
                *setenv,
                "--",
                sys.executable,
                str(HOLDER),
                "--restart-sec",
                str(RESTART_SEC),
                "--pidfile",
                str(self.pidfile),
                "--",
                *exec_start(),
            ],
        )

    def start(self) -> None:
        self.state_dir.mkdir(parents=True)
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("POUCH_DRIVER_", "LISTEN_"))
        }
        with self.events_path.open("ab") as out, self.log_path.open("ab") as err:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        wait_until(
            lambda: self.exited() or self.socket.is_socket(),
            timeout=10,
            message="the socket to be bound",
        )
        # The first connection makes systemd-socket-activate exec the holder, which starts
        # the daemon: on-demand start, as with the .socket unit.
        wait_until(
            lambda: self.exited() or socket_answers(self.socket),
            timeout=30,
            message="the daemon to answer",
        )
        assert not self.exited(), f"exited:\n{self.log()}"
        # It runs with this instance's settings (not the defaults: the host's state dir).
        assert (
            f"pouch-driver {self.name} serving on {self.socket} (socket from systemd)" in self.log()
        ), self.log()
        assert (self.state_dir / "state.db").is_file()

    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def events(self) -> list[tuple[float, str, int, int | None]]:
        out = []
        for line in self.events_path.read_text().splitlines():
            if m := _EVENT.match(line):
                out.append((float(m[1]), m[2], int(m[3]), None if m[4] is None else int(m[4])))
        return out

    def queued(self) -> int:
        """Connections waiting in the socket's accept queue (``ss``: Recv-Q of a listener)."""
        out = self.engine.in_engine_ns("ss", "-xlH").stdout
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[4] == str(self.socket):
                return int(fields[2])
        raise AssertionError(f"{self.socket} is not listening:\n{out}")

    def daemon_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pidfile.read_text())
        return None

    def log(self, since: int = 0) -> str:
        return tail(self.log_path, 80, since, drop=PLUGIN_LOG_NOISE)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the holder stops the daemon, then exits
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(OSError):
            self.socket.unlink()


@pytest.fixture
def service(engine: Engine) -> Iterator[Service]:
    for tool in ("systemd-socket-activate", "sh"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (Debian package systemd; scripts/setup --test)")
    svc = Service(engine)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def _restart_while_request(
    e2e: Scope, svc: Service, sig: signal.Signals, *, net: str, container: str, peer: str
) -> None:
    """Stop the daemon with ``sig``, start a container on ``net`` while none runs; the
    container's endpoint requests wait for the restarted daemon and succeed."""
    eng = e2e.engine
    old = svc.daemon_pid()
    assert old is not None
    inode = svc.socket.stat().st_ino
    dockerd_from = file_size(eng.log_path)
    os.kill(old, sig)
    wait_until(
        lambda: any(e[1] == "exit" and e[2] == old for e in svc.events()),
        timeout=40,
        message=f"daemon {old} to exit after {sig.name}",
    )
    assert svc.daemon_pid() is None
    assert svc.socket.stat().st_ino == inode  # the same socket, still there ...
    sent = time.time()  # ... and the engine sends its requests to it now
    e2e.containers.append(e2e.name(container))
    run = subprocess.Popen(
        [
            "docker",
            "run",
            "-d",
            "--name",
            e2e.name(container),
            "--network",
            net,
            eng.image,
            "sh",
            "-c",
            "trap 'exit 0' TERM; sleep 86400 & wait",
        ],
        env=eng.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The engine's request is there, waiting in the accept queue, while no daemon runs.
    wait_until(
        lambda: svc.queued() > 0 or run.poll() is not None,
        timeout=RESTART_SEC / 2,
        interval=0.02,
        message="the engine's connection to queue in the socket",
    )
    assert run.poll() is None, f"docker run ended while the daemon was down: {run.communicate()}"
    assert svc.daemon_pid() is None, "the daemon came back too early for this test"
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, f"docker run failed across the restart: {err}\n{svc.log()}"
    events = svc.events()
    exited = next(i for i, e in enumerate(events) if e[1] == "exit" and e[2] == old)
    restarted = next((e for e in events[exited:] if e[1] == "start"), None)
    assert restarted is not None, f"the daemon was not restarted: {events}"
    assert restarted[0] > sent, "the new daemon started before the request was sent"
    # No connection error reached the engine: it never entered its retry loop.
    dockerd_log = tail(eng.log_path, 10_000, dockerd_from)
    assert "Unable to connect to plugin" not in dockerd_log, dockerd_log
    assert svc.socket.stat().st_ino == inode
    assert out.strip()
    c = e2e.name(container)
    e2e.assert_ping(c, e2e.container_ip(peer, net))
    e2e.assert_ping(peer, e2e.container_ip(c, net))


@pytest.mark.timeout(300)
def test_service_unit_socket_activated_survives_restarts(service: Service, e2e: Scope) -> None:
    eng = e2e.engine
    argv = exec_start()
    assert argv[1:] == ["serve"], (
        f"ExecStart should take every setting from the environment: {argv}"
    )
    log_from = file_size(service.log_path)
    net = e2e.create_network("snet", subnet="10.37.0.0/24", driver=service.name)
    info = e2e.network_inspect(net)
    assert info["Driver"] == service.name
    assert info["IPAM"]["Driver"] == service.name
    assert eng.link(eng.bridge_name(info["Id"], PREFIX)), eng.prefixed_links(PREFIX)
    assert "/NetworkDriver.CreateNetwork" in service.log(log_from), service.log(log_from)
    a = e2e.run_container(net, "a")
    b = e2e.run_container(net, "b")
    e2e.assert_ping(a, e2e.container_ip(b, net))
    e2e.assert_ping(b, e2e.container_ip(a, net))

    # systemctl restart (SIGTERM), then a crash (SIGKILL): both times the engine's request
    # waits in the held socket instead of failing.
    _restart_while_request(e2e, service, signal.SIGTERM, net=net, container="c", peer=a)
    _restart_while_request(e2e, service, signal.SIGKILL, net=net, container="d", peer=b)
    starts = [e for e in service.events() if e[1] == "start"]
    assert len(starts) == 3, service.events()

    for c in list(reversed(e2e.containers)):
        e2e.remove_container(c)
    e2e.remove_network(net)
    assert eng.prefixed_links(PREFIX) == []
