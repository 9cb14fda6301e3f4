"""A real three-member etcd cluster on loopback, for the cluster backend's tests.

* ``etcd_cluster`` (session): members ``pdetcd0..2``, clients on 127.0.0.1:23790+, peers on
  127.0.0.1:23800+, data under a short ``/tmp/pdetcd-*`` directory. Started once, killed and
  erased at session end. An flock on ``/tmp/pdetcd.lock`` keeps two sessions apart; once it is
  held, any etcd whose data dir is under ``/tmp/pdetcd-`` is a leftover of an interrupted run
  and is killed, and its directory removed.
* ``etcd`` (function): the same cluster, healed after each test (every member continued and
  running again), so a test that stops members does not leak its faults into the next one.

Skipped when ``etcd`` is not installed (``scripts/setup --test`` installs it); under
``POUCH_DRIVER_TEST_STRICT=1`` (scripts/test) that is a failure, as in tests/e2e/conftest.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import STRICT
from tests.etcd_members import ETCD, member_argv

NAME_PREFIX = "pdetcd"
DIR_PREFIX = "/tmp/pdetcd-"
LOCK_PATH = "/tmp/pdetcd.lock"
CLIENT_PORT = 23790
PEER_PORT = 23800
MEMBERS = 3


@dataclass
class Member:
    index: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    stopped: bool = False  # SIGSTOPped

    @property
    def name(self) -> str:
        return f"{NAME_PREFIX}{self.index}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{CLIENT_PORT + self.index}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{PEER_PORT + self.index}"


@dataclass
class EtcdCluster:
    root: Path
    token: str
    members: list[Member] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def _argv(self, m: Member) -> list[str]:
        return member_argv(
            m.name,
            m.data_dir,
            clients=[m.client_url],
            peer=m.peer_url,
            cluster=[(x.name, x.peer_url) for x in self.members],
            token=self.token,
        )

    def start(self, index: int) -> None:
        m = self.members[index]
        if m.process is not None and m.process.poll() is None:
            return
        with m.log_path.open("ab") as log:
            m.process = subprocess.Popen(
                self._argv(m), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        m.stopped = False

    def stop(self, index: int) -> None:
        """SIGSTOP: the member keeps its sockets open and answers nothing."""
        m = self.members[index]
        assert m.process is not None
        m.process.send_signal(signal.SIGSTOP)
        m.stopped = True

    def cont(self, index: int) -> None:
        m = self.members[index]
        if m.process is not None and m.stopped:
            m.process.send_signal(signal.SIGCONT)
        m.stopped = False

    def kill(self, index: int) -> None:
        m = self.members[index]
        if m.process is None:
            return
        m.process.kill()  # SIGKILL ends a stopped process too
        m.process.wait(timeout=10)
        m.process = None
        m.stopped = False

    def restart(self, index: int) -> None:
        self.kill(index)
        self.start(index)

    def healthy(self, index: int) -> bool:
        try:
            with urllib.request.urlopen(  # noqa: S310 - a fixed http://127.0.0.1 URL
                self.members[index].client_url + "/health", timeout=0.5
            ) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def wait_healthy(self, indexes: list[int] | None = None, limit: float = 20.0) -> None:
        wanted = list(range(len(self.members))) if indexes is None else indexes
        give_up = time.monotonic() + limit
        while True:
            sick = [i for i in wanted if not self.healthy(i)]
            if not sick:
                return
            for i in sick:
                proc = self.members[i].process
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{self.members[i].name} exited:\n{self.log_tail(i)}")
            if time.monotonic() > give_up:
                logs = "\n".join(self.log_tail(i) for i in sick)
                raise RuntimeError(f"etcd members {sick} not healthy in {limit}s:\n{logs}")
            time.sleep(0.1)

    def heal(self) -> None:
        """Every member continued and running, the cluster healthy."""
        for i, m in enumerate(self.members):
            self.cont(i)
            if m.process is None or m.process.poll() is not None:
                self.start(i)
        self.wait_healthy()

    def log_tail(self, index: int, lines: int = 20) -> str:
        path = self.members[index].log_path
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {self.members[index].name} ---\n" + "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)
        shutil.rmtree(self.root, ignore_errors=True)


def _leftover_pids() -> list[int]:
    """etcd processes whose data dir is under our prefix (an interrupted earlier run)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or os.path.basename(argv[0]) != b"etcd":
            continue
        if any(a.startswith(b"--data-dir=" + DIR_PREFIX.encode()) for a in argv):
            found.append(int(entry.name))
    return found


def _cleanup_leftovers() -> None:
    for pid in _leftover_pids():
        print(f"[pdetcd] killing leftover etcd {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for path in Path("/tmp").glob(Path(DIR_PREFIX).name + "*"):
        if not path.is_dir():
            continue
        print(f"[pdetcd] removing leftover {path}")
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    if not os.access(ETCD, os.X_OK):
        reason = f"cluster tests need {ETCD} (apt-get install etcd-server; scripts/setup --test)"
        if STRICT:
            pytest.fail(f"{reason}; POUCH_DRIVER_TEST_STRICT=1, so this is an error, not a skip")
        pytest.skip(reason)
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _cleanup_leftovers()
        root = Path(tempfile.mkdtemp(prefix=Path(DIR_PREFIX).name, dir="/tmp"))
        cluster = EtcdCluster(root=root, token=f"{NAME_PREFIX}-{os.getpid()}-{time.time_ns()}")
        for i in range(MEMBERS):
            cluster.members.append(
                Member(index=i, data_dir=root / f"m{i}", log_path=root / f"m{i}.log")
            )
        try:
            t0 = time.monotonic()
            for i in range(MEMBERS):
                cluster.start(i)
            cluster.wait_healthy()
            print(f"[pdetcd] 3 members healthy in {time.monotonic() - t0:.2f}s")
            yield cluster
        finally:
            cluster.close()


@pytest.fixture
def etcd(etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    etcd_cluster.heal()
    yield etcd_cluster
    etcd_cluster.heal()
