"""Shared plumbing: statistics, the result record, namespaces, the daemon and HTTP clients.

Everything the benchmarks create on the host is named ``pdb-<6 hex>`` (namespaces, the
/tmp directories holding sockets and stores) and removed afterwards; ``cleanup_leftovers``
removes what an interrupted run left, while holding the bench lock.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.harness import TMP, SessionLock, unmount_under

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "pdb"
NETNS_DIR = Path("/run/netns")
_NAME_RE = re.compile(rf"^{PREFIX}-[0-9a-f]{{6}}$")
#: The plugin's interface/chain prefix in the kernel benchmarks ("pb" + b/h/c + ID).
PLUGIN_PREFIX = "pb"


# ------------------------------------------------------------------------------------------
# Statistics and the result record
# ------------------------------------------------------------------------------------------


def summary(seconds: Sequence[float]) -> dict[str, float]:
    """Milliseconds: n, median, p10, p90, mean, min, max (the raw list is kept separately)."""
    ms = sorted(s * 1000 for s in seconds)
    if not ms:
        return {"n": 0}

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, round(p * (len(ms) - 1)))]

    return {
        "n": len(ms),
        "median": statistics.median(ms),
        "p10": pct(0.1),
        "p90": pct(0.9),
        "mean": statistics.fmean(ms),
        "min": ms[0],
        "max": ms[-1],
    }


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB (from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def schedstat(pid: int) -> tuple[int, int, int, int]:
    """(on-CPU ns, run-queue wait ns) of all threads, then of the main thread alone.

    The wait is time the threads were runnable but another process had the CPU: the part
    of a latency that machine load adds.
    """
    run_ns = wait_ns = main_run = main_wait = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except OSError:
            continue  # the thread just ended
        r, w = int(fields[0]), int(fields[1])
        run_ns += r
        wait_ns += w
        if int(tid) == pid:
            main_run, main_wait = r, w
    return run_ns, wait_ns, main_run, main_wait


def task_cpu(pid: int) -> dict[int, int]:
    """On-CPU ns of each thread of ``pid``, by thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            out[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return out


@dataclass
class Record:
    """What a run measured: ``results[bench] = {...}``, plus the machine and its load."""

    results: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def put(self, key: str, data: dict[str, Any], line: str) -> None:
        """Keep a benchmark's numbers and print its one-line summary."""
        self.results[key] = data
        print(f"[bench] {line}", flush=True)

    def note(self, text: str) -> None:
        self.meta.setdefault("notes", []).append(text)
        print(f"[bench] note: {text}", flush=True)

    def to_json(self) -> str:
        return json.dumps(
            {"meta": self.meta, "results": self.results}, indent=1, sort_keys=False, default=str
        )


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# ------------------------------------------------------------------------------------------
# Namespaces and leftovers
# ------------------------------------------------------------------------------------------


def run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


def new_name() -> str:
    return f"{PREFIX}-{secrets.token_hex(3)}"


def _netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in_netns(name: str) -> list[int]:
    ino = _netns_inode(str(NETNS_DIR / name))
    if ino is None:
        return []
    me = os.getpid()
    return [
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and int(p) != me and _netns_inode(f"/proc/{p}/ns/net") == ino
    ]


def kill_netns_processes(name: str) -> None:
    pids = pids_in_netns(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.05)


def delete_netns(name: str) -> None:
    kill_netns_processes(name)
    run("ip", "netns", "delete", name, check=False)
    unmount_under([str(NETNS_DIR / name)])
    with contextlib.suppress(OSError):
        (NETNS_DIR / name).unlink()


@contextlib.contextmanager
def netns() -> Iterator[str]:
    """A throwaway network namespace with lo up; its processes are killed at the end."""
    name = new_name()
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        delete_netns(name)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A short /tmp/pdb-xxxxxx directory (Unix socket paths must stay under 108 bytes)."""
    path = TMP / new_name()
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def cleanup_leftovers() -> None:
    """Namespaces, processes and directories of an interrupted bench run (hold the lock)."""
    if NETNS_DIR.is_dir():
        for ns in NETNS_DIR.iterdir():
            if _NAME_RE.match(ns.name):
                log(f"removing leftover netns {ns.name}")
                delete_netns(ns.name)
    for d in TMP.glob(f"{PREFIX}-*"):
        if d.is_dir() and _NAME_RE.match(d.name):
            log(f"removing leftover dir {d}")
            shutil.rmtree(d, ignore_errors=True)


def bench_lock() -> SessionLock:
    """One bench run at a time (its leftover cleanup would hit another run's namespaces)."""
    return SessionLock(TMP / f"{PREFIX}.lock")


# ------------------------------------------------------------------------------------------
# HTTP over a Unix socket (the plugin's protocol and the Engine API)
# ------------------------------------------------------------------------------------------


class UnixConnection(http.client.HTTPConnection):
    """``http.client`` over AF_UNIX: keep-alive, no event loop, ~50 us of client overhead."""

    def __init__(self, path: str | Path, timeout: float = 120.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class CallFailed(RuntimeError):
    pass


PLUGIN_HEADERS = {"Accept": "application/vnd.docker.plugins.v1.2+json"}


class PluginClient:
    """Calls the plugin like the engine does: POST, JSON body, the v1.2 Accept header."""

    def __init__(self, path: str | Path) -> None:
        self.conn = UnixConnection(path)

    def call(self, method: str, body: Any = None) -> dict[str, Any]:
        data = b"" if body is None else json.dumps(body).encode()
        self.conn.request("POST", f"/{method}", body=data, headers=PLUGIN_HEADERS)
        r = self.conn.getresponse()
        raw = r.read()
        doc: dict[str, Any] = json.loads(raw) if raw else {}
        if r.status != 200:
            raise CallFailed(f"{method}: {r.status} {doc}")
        return doc

    def timed(self, method: str, body: Any = None) -> tuple[float, dict[str, Any]]:
        t0 = time.perf_counter()
        doc = self.call(method, body)
        return time.perf_counter() - t0, doc

    def close(self) -> None:
        self.conn.close()


# ------------------------------------------------------------------------------------------
# The daemon, in a namespace
# ------------------------------------------------------------------------------------------

_REQUEST_RE = re.compile(r" /\w+\.(\w+) .*?-> (\d+) in ([\d.]+) ms")


def server_times(log_path: Path, since: int = 0) -> dict[str, list[float]]:
    """Server-side durations (seconds) of the plugin's answered requests, by short call name
    (``Join``), from its request log lines (level info) after byte offset ``since``."""
    out: dict[str, list[float]] = {}
    text = log_path.read_bytes()[since:].decode(errors="replace")
    for line in text.splitlines():
        m = _REQUEST_RE.search(line)
        if m:
            out.setdefault(m[1], []).append(float(m[3]) / 1000)
    return out


_LOG_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


@dataclass
class Daemon:
    """``pouch-driver serve`` in ``netns`` at log level info (production default).

    ``src``: a directory holding a ``pouch_driver`` package to run instead of the installed
    one (A/B experiments on a scratch copy).
    """

    netns: str
    base: Path
    prefix: str = PLUGIN_PREFIX
    src: Path | None = None
    log_level: str = "info"
    proc: subprocess.Popen[bytes] | None = None
    started_wall: float = 0.0

    @property
    def socket(self) -> Path:
        return self.base / "pd.sock"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def log_path(self) -> Path:
        return self.base / "plugin.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        return [
            "nsenter",
            f"--net={NETNS_DIR / self.netns}",
            "--",
            sys.executable,
            "-m",
            "pouch_driver",
            "serve",
            "--socket",
            str(self.socket),
            "--state-dir",
            str(self.state_dir),
            "--prefix",
            self.prefix,
            "--log-level",
            self.log_level,
        ]

    def spawn(self) -> float:
        """Start the process; return its ``perf_counter`` start time."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("POUCH_DRIVER_")}
        env["PYTHONUNBUFFERED"] = "1"
        cwd = ROOT
        if self.src is not None:
            env["PYTHONPATH"] = str(self.src)
            cwd = self.src
        with self.log_path.open("ab") as out:
            out.write(f"=== bench: start at {time.strftime('%H:%M:%S')} ===\n".encode())
            out.flush()
            self.started_wall = time.time()
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        return t0

    def wait_ready(self, t0: float, timeout: float = 120.0) -> float:
        """Seconds from ``t0`` to the first answered request.

        The daemon binds its socket before loading the store and reconciling, so one
        request sent as soon as connect() succeeds is answered exactly when it is ready.
        """
        assert self.proc is not None
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"plugin exited with {self.proc.returncode}:\n{self.tail()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"plugin did not answer within {timeout}s:\n{self.tail()}")
            try:
                client = PluginClient(self.socket)
                client.call("Plugin.Activate")
                client.close()
                return time.perf_counter() - t0
            except (OSError, http.client.HTTPException):
                time.sleep(0.001)

    def start(self, timeout: float = 120.0) -> float:
        """Start it; return the seconds from process start to its first answered request."""
        return self.wait_ready(self.spawn(), timeout)

    def phases(self) -> dict[str, float]:
        """Seconds from process start to the daemon's own log lines of the last start."""
        text = self.log_path.read_text(errors="replace").split("=== bench: start")[-1]
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = _LOG_TIME_RE.match(line)
            if not m:
                continue
            t = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000
            if " loaded " in line and "store_loaded" not in out:
                out["store_loaded"] = t - self.started_wall
            elif " serving on " in line and "serving" not in out:
                out["serving"] = t - self.started_wall
        return out

    def server_times(self, since: int = 0) -> dict[str, list[float]]:
        """Per-call server-side durations from the log written after byte offset ``since``."""
        return server_times(self.log_path, since)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def link_names(ns: str, prefixes: tuple[str, ...]) -> list[str]:
    """Interfaces in ``ns`` whose names start with one of ``prefixes`` (``ip -json``)."""
    out = run("ip", "-n", ns, "-json", "link", "show").stdout
    return [x["ifname"] for x in json.loads(out or "[]") if x["ifname"].startswith(prefixes)]
