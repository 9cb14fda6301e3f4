"""End-to-end harness: a real dockerd drives the real plugin, isolated from the host.

Layout of one test session (``tag`` is 6 random characters)::

    /tmp/pde2e-<tag>/            base dir D (short: containerd puts unix sockets under it)
        data/ exec/              dockerd --data-root / --exec-root
        docker.sock docker.pid   the engine's API socket and pidfile
        dockerd.log plugin.log   stdout+stderr of the two daemons (kept for failure output)
        plugin-state/            the plugin's --state-dir
        img/                     the busybox image tree (pouch-test:busybox)
        cli/                     DOCKER_CONFIG for the docker client
    netns pde2e-<tag>            the "engine host": dockerd, containerd, the plugin, bridges
    netns pde2e-<tag>r           a "remote host", joined by a veth (198.51.100.1 <-> .2)
    cgroup /pde2e-<tag>          --cgroup-parent of every container
    /run/docker/plugins/pdt<5 letters>.sock   the plugin's socket (v1 discovery by file name)

Nothing here touches the host's interfaces or iptables: dockerd and the plugin are started with
``nsenter --net`` (not ``ip netns exec``, whose /sys remount breaks dockerd's cgroup checks).
Everything a session creates is named ``pde2e*``/``pdt*`` and :func:`cleanup_leftovers` removes
what an interrupted earlier run left behind. Only the standard library and subprocess are used,
so the oracle (``ip``, ``iptables-save``, the docker CLI) never shares code with the plugin.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, TypeVar

T = TypeVar("T")

PREFIX = "pde2e"
TMP = Path("/tmp")
LOCK_PATH = TMP / f"{PREFIX}.lock"
PLUGIN_DIR = Path("/run/docker/plugins")
NETNS_DIR = Path("/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")
IMAGE = "pouch-test:busybox"
#: 1-3 lowercase letters starting every interface and iptables chain the plugin creates.
PLUGIN_PREFIX = "pt"
#: Lines of the plugin's debug log not worth showing in a failure report.
PLUGIN_LOG_NOISE = r"^\S+ \S+ DEBUG +(pyroute2|asyncio)\b|^\s*$"

#: The link between the engine netns and the "remote host" netns. Never 192.0.2.0/24 or
#: fd00::/64: that is the machine's own uplink.
UPLINK_NET = ipaddress.ip_network("198.51.100.0/24")
ENGINE_ADDR = "198.51.100.1"
REMOTE_ADDR = "198.51.100.2"
ENGINE_UPLINK = "up0"  # inside the engine netns
REMOTE_UPLINK = "eth0"  # inside the remote netns
FORBIDDEN_NETS = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("fd00::/64"))

_BASE_RE = re.compile(rf"^{PREFIX}-[a-z0-9]{{6}}$")
_NETNS_RE = re.compile(rf"^{PREFIX}-[a-z0-9]{{6}}r?$")
_PLUGIN_SOCK_RE = re.compile(r"^pdt[a-z]{5}\.sock$")
_PLUGIN_ID_RE = re.compile(r"^[0-9a-f]{64}$")
#: In a session's base dir: ids of managed plugins created in its engine, one a line. Their
#: socket dirs, /run/docker/plugins/<id>/, are on the host and outlive the data-root.
MANAGED_PLUGINS = "managed-plugins"
#: Daemons of ours that an interrupted run may leave behind, by /proc/<pid>/comm.
_OUR_COMMS = frozenset(
    {
        "dockerd",
        "containerd",
        "containerd-shim",
        "containerd-shim-runc-v2",
        "docker-proxy",
        "runc",
        "nsenter",
        "python",
        "python3",
        "python3.11",
        "python3.12",
        "python3.13",
        "pouch-driver",
    }
)

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class EngineKind:
    """Which dockerd a session drives.

    ``bin_dir`` None: the system's dockerd (Debian 12's 20.10), which starts its own
    containerd. Otherwise a folder made by scripts/fetch-engine: dockerd, containerd 2.x,
    docker-proxy, docker-init and the system's runc, put first on dockerd's PATH; containerd
    2.x is started by the harness itself (dockerd only connects to it).
    """

    name: str
    bin_dir: Path | None = None


ENGINE_28_DIR = Path(os.environ.get("PDE2E_ENGINE28", "/var/cache/pouch-driver/engine-28.5.2"))
ENGINES = {
    "20.10": EngineKind("20.10"),
    "28.5.2": EngineKind("28.5.2", ENGINE_28_DIR / "bin"),
}

#: containerd 2.x's configuration: every path under the session's base dir, the CRI plugins
#: (Kubernetes only) off.
CONTAINERD_CONFIG = """\
version = 3
root = "{base}/containerd/root"
state = "{base}/containerd/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime",
  "io.containerd.podsandbox.controller.v1.podsandbox",
  "io.containerd.grpc.v1.sandbox-controllers", "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]
[grpc]
  address = "{base}/ctd.sock"
[ttrpc]
  address = "{base}/ctd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/containerd/opt"
"""
#: Default container command: sleeps, but exits at once on SIGTERM (a bare ``sleep`` as PID 1
#: ignores it, which makes every ``docker stop`` and dockerd shutdown wait 10 s).
SLEEPER = ("sh", "-c", "trap 'exit 0' TERM INT; sleep 86400 & wait")


class CommandFailed(AssertionError):
    """A command exited non-zero (or timed out); the message carries its whole output."""

    def __init__(
        self, cmd: Sequence[str], returncode: int | None, stdout: str, stderr: str, note: str = ""
    ) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        status = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(
            f"command {status}{note}: {' '.join(self.cmd)}\n"
            f"--- stdout ---\n{stdout.rstrip()}\n--- stderr ---\n{stderr.rstrip()}"
        )


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    env: dict[str, str] | None = None,
    input: str | bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output, kill it after ``timeout`` seconds.

    ``check=True`` raises :class:`CommandFailed` (an AssertionError, so pytest shows it as a
    test failure with the full output) on a non-zero exit; a timeout always raises.
    """
    data = input.encode() if isinstance(input, str) else input
    try:
        proc = subprocess.run(  # noqa: PLW1510 - checked below with a better message
            list(cmd),
            input=data,
            capture_output=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(
            cmd, None, _text(exc.stdout), _text(exc.stderr), f" after {timeout:g}s"
        ) from None
    result = subprocess.CompletedProcess(
        proc.args, proc.returncode, _text(proc.stdout), _text(proc.stderr)
    )
    if check and result.returncode != 0:
        raise CommandFailed(cmd, result.returncode, result.stdout, result.stderr)
    return result


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode(errors="replace")


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.1,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


def random_tag(n: int = 6, alphabet: str = string.ascii_lowercase + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def tail(path: Path, lines: int = 200, start: int = 0, *, drop: str | None = None) -> str:
    """The last ``lines`` lines of ``path`` from byte offset ``start`` on.

    ``drop``: a regex; matching lines are left out (e.g. pyroute2's netlink debug chatter).
    """
    try:
        with path.open("rb") as f:
            f.seek(start)
            data = f.read()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    text = data.decode(errors="replace").splitlines()
    if drop:
        pattern = re.compile(drop)
        text = [line for line in text if not pattern.search(line)]
    cut = text[-lines:]
    head = f"<{len(text) - len(cut)} earlier lines omitted>\n" if len(text) > len(cut) else ""
    return head + "\n".join(cut)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------
# Session lock and leftovers of interrupted runs
# --------------------------------------------------------------------------------------------


class SessionLock:
    """An exclusive flock on /tmp/pde2e.lock for the life of one e2e session.

    Two sessions must not run at once (two dockerd fight, and each would treat the other's
    namespaces as leftovers). Holding the lock is also what makes everything ``pde2e*`` that
    exists at start-up a leftover: its owner is gone.
    """

    #: Lock files this process holds (flock conflicts between two descriptors of one process
    #: too, so a second suite of the same pytest run must ask before waiting on itself).
    _held: ClassVar[set[Path]] = set()

    def __init__(self, path: Path = LOCK_PATH) -> None:
        self.path = path
        self._file: IO[str] | None = None

    @classmethod
    def held_here(cls, path: Path = LOCK_PATH) -> bool:
        """True if this process already holds the lock on ``path``."""
        return path in cls._held

    def acquire(self, timeout: float = 0.0) -> None:
        f = self.path.open("a+")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    owner = f.read().strip() or "?"
                    f.close()
                    raise RuntimeError(
                        f"another e2e session holds {self.path} (pid {owner}); "
                        "only one dockerd may run at a time"
                    ) from None
                time.sleep(0.5)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        self._held.add(self.path)

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            self._held.discard(self.path)


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    me = os.getpid()
    for pid in set(pids):
        if pid in (me, os.getppid(), 1):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        alive = [
            p
            for p in pids
            if Path(f"/proc/{p}").exists()
            and _read(f"/proc/{p}/stat").split(") ")[-1][:1] not in ("Z", "X", "")
        ]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def stop_pid(pid: int, *, timeout: float = 20.0) -> None:
    """SIGTERM, wait, then SIGKILL."""
    _kill_pids([pid], signal.SIGTERM)
    if _wait_gone([pid], timeout):
        _kill_pids([pid], signal.SIGKILL)
        _wait_gone([pid], 5.0)


def _our_cgroup_dirs() -> list[Path]:
    """Every ``/sys/fs/cgroup/<controller>[/unified]/pde2e-*`` directory (v1 and v2)."""
    out: list[Path] = []
    if not CGROUP_ROOT.is_dir():
        return out
    roots = [CGROUP_ROOT, *(p for p in CGROUP_ROOT.iterdir() if p.is_dir())]
    for root in roots:
        with contextlib.suppress(OSError):
            out.extend(p for p in root.glob(f"{PREFIX}-*") if p.is_dir() and _BASE_RE.match(p.name))
    return out


def _cgroup_pids(dirs: Iterable[Path]) -> set[int]:
    pids: set[int] = set()
    for top in dirs:
        for procs in top.rglob("cgroup.procs"):
            pids.update(int(x) for x in _read(str(procs)).split() if x.isdigit())
    return pids


def _remove_cgroup_dirs(dirs: Iterable[Path]) -> None:
    for top in dirs:
        subdirs = sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        )
        for d in [*subdirs, top]:
            with contextlib.suppress(OSError):
                d.rmdir()


def _mounts_under(prefixes: Sequence[str]) -> list[str]:
    points = []
    for line in _read("/proc/self/mountinfo").splitlines():
        parts = line.split()
        if len(parts) > 4:
            point = parts[4].replace("\\040", " ")
            if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
                points.append(point)
    return points


def unmount_under(prefixes: Sequence[str]) -> None:
    """Lazily unmount everything mounted at or below any of ``prefixes``, deepest first."""
    for _ in range(3):
        points = _mounts_under(prefixes)
        if not points:
            return
        for point in sorted(set(points), key=lambda p: p.count("/"), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)


def _leftover_processes(
    netns: Sequence[Path], cgroups: Sequence[Path], base_strs: Sequence[str]
) -> set[int]:
    """Processes in our netns or cgroups, or ours by name and command line."""
    inodes = {ino for p in netns if (ino := _netns_inode(str(p))) is not None}
    victims: set[int] = set(_cgroup_pids(cgroups))
    for pid in _pids():
        if pid == os.getpid():
            continue
        if inodes and _netns_inode(f"/proc/{pid}/ns/net") in inodes:
            victims.add(pid)
            continue
        if _read(f"/proc/{pid}/comm").strip() not in _OUR_COMMS:
            continue
        cmdline = _read(f"/proc/{pid}/cmdline").replace("\0", " ")
        if any(b in cmdline for b in base_strs) or re.search(r"/pdt[a-z]{5}\.sock", cmdline):
            victims.add(pid)
    return victims


def cleanup_leftovers(log: Callable[[str], None] = lambda _msg: None) -> None:
    """Remove what an interrupted e2e run left behind. Call only while holding the lock.

    Targets, all by name: dockerd whose pidfile lives in /tmp/pde2e-*; every process in a
    pde2e* netns or cgroup (containerd, shims, docker-proxy, the plugin, container processes);
    processes of ours whose command line names a /tmp/pde2e-* dir; mounts under those dirs;
    the netns; the cgroups; the dirs; /run/docker/plugins/pdt?????.sock.
    """
    bases = [p for p in TMP.glob(f"{PREFIX}-*") if p.is_dir() and _BASE_RE.match(p.name)]
    netns = [p for p in NETNS_DIR.glob(f"{PREFIX}-*") if _NETNS_RE.match(p.name)]
    cgroups = _our_cgroup_dirs()

    # 1. dockerd, politely: it stops its containers and containerd.
    for base in bases:
        pid_text = _read(str(base / "docker.pid")).strip()
        if pid_text.isdigit() and str(base) in _read(f"/proc/{pid_text}/cmdline"):
            log(f"stopping leftover dockerd {pid_text} of {base}")
            stop_pid(int(pid_text), timeout=20)

    # 2. Everything else of ours, by netns, cgroup and command line.
    base_strs = [str(b) for b in bases]
    victims = _leftover_processes(netns, cgroups, base_strs)
    if victims:
        log(f"killing leftover processes {sorted(victims)}")
        _kill_pids(victims)
        _wait_gone(victims, 10)

    # 3. Mounts, namespaces, cgroups, files.
    for base in bases:
        remove_managed_plugin_dirs(base, log)
    unmount_under(base_strs)
    for ns in netns:
        log(f"deleting leftover netns {ns.name}")
        subprocess.run(
            ["ip", "netns", "delete", ns.name], capture_output=True, timeout=30, check=False
        )
        unmount_under([str(ns)])
        with contextlib.suppress(OSError):
            ns.unlink()
    _remove_cgroup_dirs(cgroups)
    for base in bases:
        log(f"removing leftover dir {base}")
        shutil.rmtree(base, ignore_errors=True)
    if PLUGIN_DIR.is_dir():
        for sock in PLUGIN_DIR.iterdir():
            if _PLUGIN_SOCK_RE.match(sock.name):
                log(f"removing leftover plugin socket {sock}")
                with contextlib.suppress(OSError):
                    sock.unlink()


def remove_managed_plugin_dirs(
    base: Path,
    log: Callable[[str], None] = lambda _m: None,
) -> None:
    """Remove /run/docker/plugins/<id>/ of the managed plugins listed in ``base``."""
    for plugin_id in _read(str(base / MANAGED_PLUGINS)).split():
        path = PLUGIN_DIR / plugin_id
        if _PLUGIN_ID_RE.match(plugin_id) and path.is_dir():
            log(f"removing leftover managed-plugin dir {path}")
            unmount_under([str(path)])
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Namespaces
# --------------------------------------------------------------------------------------------


def check_no_overlap(*nets: str) -> None:
    """Refuse addresses that overlap the machine's own uplink or the host's routes."""
    host_routes = []
    for family in ("-4", "-6"):
        out = run(["ip", "-json", family, "route", "show", "table", "all"], check=False).stdout
        for r in json.loads(out or "[]"):
            dst = r.get("dst", "")
            if dst and dst not in ("default", "multicast") and "/" in dst:
                with contextlib.suppress(ValueError):
                    host_routes.append(ipaddress.ip_network(dst, strict=False))
    for text in nets:
        net = ipaddress.ip_network(text, strict=False)
        for bad in (*FORBIDDEN_NETS, *host_routes):
            if (
                net.version == bad.version
                and net.overlaps(bad)
                and not bad.is_loopback
                and not bad.is_link_local
                and not bad.is_multicast
            ):
                raise RuntimeError(f"{net} overlaps {bad} on this machine; refusing to use it")


def nsenter(ns: str, cmd: Sequence[str]) -> list[str]:
    """Command line that runs ``cmd`` in netns ``ns`` with nothing else switched."""
    return ["nsenter", f"--net={NETNS_DIR / ns}", "--", *cmd]


def setup_namespaces(engine_ns: str, remote_ns: str) -> None:
    check_no_overlap(str(UPLINK_NET))
    steps = [
        ["ip", "netns", "add", engine_ns],
        ["ip", "netns", "add", remote_ns],
        ["ip", "-n", engine_ns, "link", "set", "lo", "up"],
        ["ip", "-n", remote_ns, "link", "set", "lo", "up"],
        [
            "ip",
            "-n",
            engine_ns,
            "link",
            "add",
            ENGINE_UPLINK,
            "type",
            "veth",
            "peer",
            "name",
            REMOTE_UPLINK,
            "netns",
            remote_ns,
        ],
        ["ip", "-n", engine_ns, "addr", "add", f"{ENGINE_ADDR}/24", "dev", ENGINE_UPLINK],
        ["ip", "-n", remote_ns, "addr", "add", f"{REMOTE_ADDR}/24", "dev", REMOTE_UPLINK],
        ["ip", "-n", engine_ns, "link", "set", ENGINE_UPLINK, "up"],
        ["ip", "-n", remote_ns, "link", "set", REMOTE_UPLINK, "up"],
        ["ip", "-n", engine_ns, "route", "add", "default", "via", REMOTE_ADDR],
        ["ip", "-n", remote_ns, "route", "add", "default", "via", ENGINE_ADDR],
        # Forwarding off, whatever the machine has (a new namespace may copy the host's
        # value, and every Docker host forwards): dockerd turns it on itself, and only when it
        # does so does it set the FORWARD policy to DROP, as on a fresh Docker host.
        nsenter(engine_ns, ["sysctl", "-qw", *ENGINE_NS_SYSCTLS]),
    ]
    for cmd in steps:
        run(cmd, timeout=30)


ENGINE_NS_SYSCTLS = (
    "net.ipv4.ip_forward=0",
    "net.ipv6.conf.all.forwarding=0",
    "net.ipv6.conf.default.forwarding=0",
)


def delete_namespace(ns: str) -> None:
    run(["ip", "netns", "delete", ns], check=False, timeout=30)
    unmount_under([str(NETNS_DIR / ns)])
    with contextlib.suppress(OSError):
        (NETNS_DIR / ns).unlink()


def _pids_in_netns(ns: str) -> set[int]:
    ino = _netns_inode(str(NETNS_DIR / ns))
    if ino is None:
        return set()
    return {p for p in _pids() if p != os.getpid() and _netns_inode(f"/proc/{p}/ns/net") == ino}


# --------------------------------------------------------------------------------------------
# The plugin process
# --------------------------------------------------------------------------------------------


def socket_accepts(path: Path) -> bool:
    """True if a connect() to Unix socket ``path`` succeeds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def socket_answers(path: Path, *, timeout: float = 2.0) -> bool:
    """True if a plugin on Unix socket ``path`` answers ``POST /Plugin.Activate`` with 200."""
    request = (
        b"POST /Plugin.Activate HTTP/1.1\r\nHost: plugin\r\n"
        b"Accept: application/vnd.docker.plugins.v1.2+json\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(request)
            head = s.recv(64)
        except OSError:
            return False
    return head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200")


@dataclass
class Plugin:
    """The pouch-driver daemon, run inside the engine netns.

    ``start``/``stop``/``kill``/``restart`` keep the same socket and state dir, so tests can
    crash it and bring it back. Its stderr accumulates in ``log_path`` across restarts, with a
    ``=== harness: ...`` marker line before each start.
    """

    name: str
    netns: str
    state_dir: Path
    log_path: Path
    prefix: str = PLUGIN_PREFIX
    extra_args: tuple[str, ...] = ()
    #: Extra environment of the daemon (e.g. ``POUCH_DRIVER_GC_INTERVAL``), read at each start.
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0

    @property
    def socket(self) -> Path:
        return PLUGIN_DIR / f"{self.name}.sock"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self) -> list[str]:
        return nsenter(
            self.netns,
            [
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
                "debug",
                *self.extra_args,
            ],
        )

    def _mark(self, text: str) -> None:
        with self.log_path.open("a") as f:
            f.write(f"=== harness: {text} at {time.strftime('%H:%M:%S')} ===\n")

    def start(self, *, timeout: float = 30.0) -> None:
        if self.running:
            raise RuntimeError(f"plugin {self.name} is already running (pid {self.pid})")
        PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self._mark(f"start #{self.starts}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("POUCH_DRIVER_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        self.wait_ready(timeout=timeout)

    def wait_ready(self, *, timeout: float = 30.0) -> None:
        """Poll the socket until the plugin answers a request; fail early if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(
                    f"plugin {self.name} exited (code {code}) before listening on "
                    f"{self.socket}\n--- plugin log ---\n{tail(self.log_path, 60)}"
                )
            if self.answers():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"plugin {self.name} not answering on {self.socket} after {timeout:g}s\n"
                    f"--- plugin log ---\n{tail(self.log_path, 60)}"
                )
            time.sleep(0.05)

    def answers(self) -> bool:
        """True once ``POST /Plugin.Activate`` gets an HTTP 200.

        connect() alone can succeed while start-up is still reconciling; an answered request
        is what the engine needs.
        """
        return socket_answers(self.socket)

    def accepts(self) -> bool:
        """True if a connect() on the socket succeeds."""
        return socket_accepts(self.socket)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``). Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._mark("SIGTERM")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._mark(f"still alive {timeout:g}s after SIGTERM, SIGKILL")
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL, as a crash would; the socket file and state stay behind."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._mark("SIGKILL")
            self.proc.kill()
            self.proc.wait(10)
        return self.proc.returncode

    def restart(self, *, kill: bool = False, timeout: float = 30.0) -> None:
        """Stop (or kill -9) and start again with the same socket and state dir."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start(timeout=timeout)

    def log_offset(self) -> int:
        return file_size(self.log_path)

    def log_text(self, since: int = 0) -> str:
        """The plugin's log from byte offset ``since`` (see :meth:`log_offset`)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except OSError:
            return ""


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


class Engine:
    """One dockerd in its own netns, the plugin next to it, and a remote-host netns."""

    def __init__(
        self,
        *,
        tag: str | None = None,
        plugin_name: str | None = None,
        kind: EngineKind = ENGINES["20.10"],
    ) -> None:
        self.kind = kind
        self.tag = tag or random_tag()
        self.base = TMP / f"{PREFIX}-{self.tag}"
        self.netns = f"{PREFIX}-{self.tag}"
        self.remote_netns = f"{self.netns}r"
        self.cgroup_parent = f"/{PREFIX}-{self.tag}"
        self.sock = self.base / "docker.sock"
        self.pidfile = self.base / "docker.pid"
        self.log_path = self.base / "dockerd.log"
        self.image = IMAGE
        self.plugin = Plugin(
            name=plugin_name or "pdt" + random_tag(5, string.ascii_lowercase),
            netns=self.netns,
            state_dir=self.base / "plugin-state",
            log_path=self.base / "plugin.log",
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.containerd: subprocess.Popen[bytes] | None = None  # ours, with kind.bin_dir
        self.server_version = ""
        #: Start dockerd with ``--live-restore`` (see :meth:`restart_dockerd`).
        self.live_restore = False
        self.timings: dict[str, float] = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(
            DOCKER_HOST=f"unix://{self.sock}",
            DOCKER_CONFIG=str(self.base / "cli"),
            DOCKER_CLI_HINTS="false",
        )
        self.env = env

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if len(str(self.base / "exec" / "containerd" / "containerd.sock.ttrpc")) >= 100:
            raise RuntimeError(f"base dir {self.base} too long for unix sockets")
        self.base.mkdir(mode=0o700)
        (self.base / "cli").mkdir()
        (self.base / "daemon.json").write_text("{}\n")
        t0 = time.monotonic()
        setup_namespaces(self.netns, self.remote_netns)
        self.timings["netns"] = time.monotonic() - t0

        t0 = time.monotonic()
        self.start_dockerd()
        self.timings["dockerd start"] = time.monotonic() - t0

        self.check_docker_host()

        t0 = time.monotonic()
        self.plugin.start()
        self.timings["plugin start"] = time.monotonic() - t0

        t0 = time.monotonic()
        self.build_image()
        self.timings["image build"] = time.monotonic() - t0

    def dockerd_command(self) -> list[str]:
        b = self.base
        return nsenter(
            self.netns,
            [
                "dockerd",
                "--data-root",
                str(b / "data"),
                "--exec-root",
                str(b / "exec"),
                "-H",
                f"unix://{self.sock}",
                "--pidfile",
                str(self.pidfile),
                "--storage-driver",
                "vfs",
                "--config-file",
                str(b / "daemon.json"),
                "--cgroup-parent",
                self.cgroup_parent,
                "--log-level",
                "debug",
                *(["--live-restore"] if self.live_restore else []),
                *self._own_binaries(),
            ],
        )

    def _own_binaries(self) -> list[str]:
        """dockerd flags that point at the fetched engine's containerd, proxy and init."""
        bin_dir = self.kind.bin_dir
        if bin_dir is None:
            return []
        return [
            "--containerd",
            str(self.base / "ctd.sock"),
            "--userland-proxy-path",
            str(bin_dir / "docker-proxy"),
            "--init-path",
            str(bin_dir / "docker-init"),
        ]

    def daemon_env(self) -> dict[str, str]:
        """dockerd's and containerd's environment: no DOCKER_* of ours, the engine's PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        if self.kind.bin_dir is not None:
            env["PATH"] = f"{self.kind.bin_dir}:{env.get('PATH', '/usr/sbin:/usr/bin')}"
        return env

    def start_containerd(self, *, timeout: float = 30.0) -> None:
        """Start the fetched engine's containerd in the engine netns (once per dockerd start
        that finds it gone: a crash test may have killed it)."""
        if self.kind.bin_dir is None:
            return
        sock = self.base / "ctd.sock"
        # By what the namespace holds, not by Popen.poll(): a crash test kills containerd by
        # pid, and poll() can answer None for a child it does not manage to reap at once.
        if self.containerd_pids() and socket_accepts(sock):
            return
        config = self.base / "containerd.toml"
        config.write_text(CONTAINERD_CONFIG.format(base=self.base))
        with contextlib.suppress(OSError):
            sock.unlink()
        with (self.base / "containerd.log").open("ab") as log:
            self.containerd = subprocess.Popen(
                self.containerd_command(config),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.daemon_env(),
                start_new_session=True,
            )
        wait_until(
            lambda: (
                self.containerd is not None
                and (self.containerd.poll() is not None or socket_accepts(sock))
            ),
            timeout=timeout,
            message="containerd to listen",
        )
        if self.containerd.poll() is not None:
            raise RuntimeError(
                f"containerd exited with {self.containerd.returncode}\n"
                f"--- containerd log ---\n{tail(self.base / 'containerd.log', 40)}"
            )

    def containerd_command(self, config: Path) -> list[str]:
        return nsenter(self.netns, ["containerd", "--config", str(config)])

    def stop_containerd(self, *, timeout: float = 20.0) -> None:
        if self.containerd is None or self.containerd.poll() is not None:
            return
        self.containerd.send_signal(signal.SIGTERM)
        try:
            self.containerd.wait(timeout)
        except subprocess.TimeoutExpired:
            self.containerd.kill()
            self.containerd.wait(10)

    def start_dockerd(self, *, timeout: float = 60.0) -> None:
        """Start dockerd in the engine netns; return once ``docker version`` answers."""
        self.start_containerd()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.dockerd_command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.daemon_env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with {self.proc.returncode}\n"
                    f"--- dockerd log ---\n{tail(self.log_path, 60)}"
                )
            if self.sock.exists():
                try:
                    r = run(
                        self._docker_cmd("version", "--format", "{{.Server.Version}}"),
                        check=False,
                        timeout=10,
                        env=self.env,
                    )
                except CommandFailed:  # timed out: the API listens before start-up is done
                    r = None
                if r is not None and r.returncode == 0:
                    self.server_version = r.stdout.strip()
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"dockerd did not answer within {timeout:g}s\n"
                    f"--- dockerd log ---\n{tail(self.log_path, 60)}"
                )
            time.sleep(0.2)

    def sysctl(self, key: str) -> str:
        """A sysctl of the engine netns, e.g. ``net/ipv4/ip_forward``."""
        return self.in_engine_ns("cat", f"/proc/sys/{key}").stdout.strip()

    def forward_policy(self) -> str:
        """The policy of the filter FORWARD chain in the engine netns (``DROP``/``ACCEPT``)."""
        for line in self.in_engine_ns("iptables", "-S", "FORWARD").stdout.splitlines():
            if line.startswith("-P FORWARD "):
                return line.split()[2]
        raise AssertionError("no FORWARD policy in iptables -S output")

    def check_docker_host(self) -> None:
        """The engine netns must look like a Docker host: forwarding on, FORWARD policy DROP,
        bridged traffic through iptables. Anything else would let a driver pass that fails
        on a real host."""
        problems = []
        if self.sysctl("net/ipv4/ip_forward") != "1":
            problems.append("net.ipv4.ip_forward is not 1")
        if self.forward_policy() != "DROP":
            problems.append(f"FORWARD policy is {self.forward_policy()}, not DROP")
        if self.sysctl("net/bridge/bridge-nf-call-iptables") != "1":
            problems.append("net.bridge.bridge-nf-call-iptables is not 1")
        if problems:
            raise RuntimeError(
                "the engine netns does not look like a Docker host: " + "; ".join(problems)
            )

    def stop_dockerd(self, *, timeout: float = 30.0) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout``)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def stop_daemons(self) -> list[str]:
        """Containers removed, then dockerd, its own containerd and the plugin stopped; each
        step runs whatever the others did. Returns what failed."""
        errors: list[str] = []
        steps = (
            self._remove_all_containers,
            self.stop_dockerd,
            self.stop_containerd,
            self.plugin.stop,
        )
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - keep tearing down, report at the end
                errors.append(f"{getattr(step, '__name__', step)}: {exc}")
        return errors

    def close(self) -> None:
        """Stop everything and remove every trace; safe to call on a half-started engine."""
        t0 = time.monotonic()
        errors = self.stop_daemons()
        # Whatever still lives in our namespaces or cgroup (shims, proxies, containers).
        for ns in (self.netns, self.remote_netns):
            pids = _pids_in_netns(ns)
            if pids:
                _kill_pids(pids)
                _wait_gone(pids, 10)
        cgroups = [d for d in _our_cgroup_dirs() if d.name == f"{PREFIX}-{self.tag}"]
        if pids := _cgroup_pids(cgroups):
            _kill_pids(pids)
            _wait_gone(pids, 10)
        unmount_under([str(self.base)])
        for ns in (self.netns, self.remote_netns):
            delete_namespace(ns)
        _remove_cgroup_dirs(cgroups)
        with contextlib.suppress(OSError):
            self.plugin.socket.unlink()
        remove_managed_plugin_dirs(self.base)
        self._keep_logs()
        shutil.rmtree(self.base, ignore_errors=True)
        self.timings["teardown"] = time.monotonic() - t0
        if errors:
            raise RuntimeError("engine teardown: " + "; ".join(errors))

    def _keep_logs(self) -> None:
        """Copy the daemons' logs to ``$PDE2E_LOG_DIR`` (if set) before the base dir goes."""
        keep = os.environ.get("PDE2E_LOG_DIR")
        if not keep:
            return
        dest = Path(keep)
        dest.mkdir(parents=True, exist_ok=True)
        for path in (self.log_path, self.plugin.log_path, self.base / "containerd.log"):
            if path.exists():
                shutil.copyfile(path, dest / f"{self.netns}-{path.name}")

    def restart_dockerd(
        self,
        *,
        timeout: float = 60.0,
        live_restore: bool | None = None,
    ) -> None:
        """SIGTERM dockerd (it stops running containers unless live-restore is on, §5.8) and
        start it again; ``live_restore`` (if given) sets :attr:`live_restore` for the new one."""
        self.stop_dockerd()
        if live_restore is not None:
            self.live_restore = live_restore
        self.start_dockerd(timeout=timeout)

    def containerd_pids(self) -> list[int]:
        """The containerd daemon(s) in the engine netns (not the shims)."""
        return sorted(
            p
            for p in _pids_in_netns(self.netns)
            if _read(f"/proc/{p}/comm").strip() == "containerd"
        )

    def kill_dockerd(self, *, containerd: bool = False) -> None:
        """SIGKILL dockerd, as a crash would (no container is stopped, no plugin call is
        made); with ``containerd`` also its containerd. Shims and containers live on."""
        victims = self.containerd_pids() if containerd else []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if containerd and self.containerd is not None:  # ours (kind.bin_dir): reap it too
            self.containerd.kill()
            self.containerd.wait(10)
        if victims:
            _kill_pids(victims)
            _wait_gone(victims, 10)
            # The dead containerd may linger as a zombie (our pid 1 may not reap it), which
            # the next dockerd takes for a live one ("containerd is still running") and then
            # times out on: drop its pidfile so a fresh one is started.
            with contextlib.suppress(OSError):
                (self.base / "exec" / "containerd" / "containerd.pid").unlink()

    def _remove_all_containers(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        ids = self.docker("ps", "-aq", check=False, timeout=20).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False, timeout=60)

    # ---- image ------------------------------------------------------------------------------

    def build_image(self) -> None:
        """pouch-test:busybox: /bin/busybox + one symlink per applet, /www/index.html."""
        root = self.base / "img"
        (root / "bin").mkdir(parents=True)
        busybox = shutil.which("busybox")
        if busybox is None:
            raise RuntimeError("busybox (busybox-static) is not installed")
        shutil.copy2(busybox, root / "bin" / "busybox")
        applets = run([busybox, "--list"], timeout=10).stdout.split()
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                (root / "bin" / applet).symlink_to("busybox")
        for d in ("sbin", "usr/bin", "usr/sbin"):
            (root / d).parent.mkdir(parents=True, exist_ok=True)
            (root / d).symlink_to("/bin")
        for d in ("etc", "tmp", "www", "proc", "sys", "dev", "root"):
            (root / d).mkdir(exist_ok=True)
        (root / "tmp").chmod(0o1777)
        (root / "www" / "index.html").write_text("pouch-e2e-ok\n")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc" / "group").write_text("root:x:0:\n")
        tar_path = self.base / "img.tar"

        def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info

        with tarfile.open(tar_path, "w") as tar:
            for child in sorted(root.iterdir()):
                tar.add(child, arcname=child.name, filter=owned_by_root)
        self.docker("import", "--change", 'CMD ["sh"]', str(tar_path), self.image, timeout=120)
        tar_path.unlink()
        shutil.rmtree(root)

    def note_managed_plugin(self, plugin_id: str) -> None:
        """Record a managed plugin made in this engine: its host dir is removed at teardown
        and by :func:`cleanup_leftovers` after an interrupted run."""
        if not _PLUGIN_ID_RE.match(plugin_id):
            raise ValueError(f"not a plugin id: {plugin_id!r}")
        with (self.base / MANAGED_PLUGINS).open("a") as f:
            f.write(plugin_id + "\n")

    # ---- commands ---------------------------------------------------------------------------

    def _docker_cmd(self, *args: str) -> list[str]:
        return ["docker", *args]

    def docker(
        self,
        *args: str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """The docker CLI against this engine (DOCKER_HOST set), output captured."""
        return run(self._docker_cmd(*args), check=check, timeout=timeout, env=self.env, input=input)

    def docker_json(self, *args: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
        return json.loads(self.docker(*args, timeout=timeout).stdout)

    def in_engine_ns(
        self,
        *cmd: str,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a host tool inside the engine netns (ip, iptables-save; ``busybox ping``/``nc``/
        ``wget``: the host has no iputils)."""
        return run(nsenter(self.netns, cmd), check=check, timeout=timeout, input=input)

    def in_remote(
        self,
        *cmd: str,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a host tool inside the remote-host netns (198.51.100.2)."""
        return run(nsenter(self.remote_netns, cmd), check=check, timeout=timeout, input=input)

    def popen_in_remote(self, *cmd: str) -> subprocess.Popen[str]:
        """Start a long-running command (e.g. a listener) in the remote netns."""
        return subprocess.Popen(
            nsenter(self.remote_netns, cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def remote_http_get(
        self,
        url: str,
        *,
        timeout: int = 5,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Fetch ``url`` from the remote host (e.g. a published port on 198.51.100.1)."""
        return self.in_remote(
            "timeout",
            str(timeout),
            "busybox",
            "wget",
            "-O-",
            url,
            check=check,
            timeout=timeout + 10,
        )

    @contextlib.contextmanager
    def remote_http_server(self, port: int = 8000) -> Iterator[str]:
        """An HTTP server on the remote host, 198.51.100.2:``port``; yields its base URL.

        ``/`` answers ``remote-ok``; ``/cgi-bin/ip`` answers the client's source address as
        the remote host saw it (for masquerade checks).
        """
        root = self.base / f"remote-www-{port}"
        (root / "cgi-bin").mkdir(parents=True, exist_ok=True)
        (root / "index.html").write_text("remote-ok\n")
        script = root / "cgi-bin" / "ip"
        script.write_text(
            '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n%s\\n" "$REMOTE_ADDR"\n'
        )
        script.chmod(0o755)
        url = f"http://{REMOTE_ADDR}:{port}"
        proc = self.popen_in_remote(
            "busybox", "httpd", "-f", "-p", f"{REMOTE_ADDR}:{port}", "-h", str(root)
        )
        try:
            wait_until(
                lambda: (
                    proc.poll() is not None
                    or self.in_remote(
                        "timeout", "2", "busybox", "wget", "-O-", f"{url}/", check=False
                    ).returncode
                    == 0
                ),
                timeout=10,
                message=f"remote httpd on {url}",
            )
            if proc.poll() is not None:
                raise RuntimeError(f"remote httpd exited: {proc.communicate()}")
            yield url
        finally:
            proc.kill()
            proc.communicate(timeout=10)

    # ---- the oracle: kernel state of the engine netns --------------------------------------

    def links(self) -> list[dict[str, Any]]:
        """``ip -json -details addr show`` in the engine netns (links with their addresses)."""
        out = self.in_engine_ns("ip", "-json", "-details", "addr", "show").stdout
        links: list[dict[str, Any]] = json.loads(out)
        return links

    def link(self, name: str) -> dict[str, Any] | None:
        return next((lk for lk in self.links() if lk.get("ifname") == name), None)

    def plugin_links(self) -> list[str]:
        """Names of the interfaces in the engine netns carrying the plugin's prefix."""
        return self.prefixed_links(self.plugin.prefix)

    def prefixed_links(self, prefix: str) -> list[str]:
        """Interfaces in the engine netns named like a pouch-driver with ``prefix`` names them
        (bridges, host and container veth ends), e.g. those of a second driver instance."""
        return sorted(
            lk["ifname"]
            for lk in self.links()
            if re.match(rf"^{prefix}[bhc][0-9a-z]+$", lk.get("ifname", ""))
        )

    def pids_in_netns(self) -> set[int]:
        """Every process in the engine netns (dockerd, containerd, plugins, containers)."""
        return _pids_in_netns(self.netns)

    def iptables_save(self, table: str | None = None) -> str:
        args = ["iptables-save"] + (["-t", table] if table else [])
        return self.in_engine_ns(*args).stdout

    def bridge_name(self, network_id: str, prefix: str | None = None) -> str:
        """The bridge name the plugin documents: ``<prefix>b<id>`` cut to 15 bytes
        (``prefix``: another instance's, default the session plugin's)."""
        p = prefix or self.plugin.prefix
        return f"{p}b{network_id[: 15 - len(p) - 1]}"


def addresses(link: dict[str, Any], family: str = "inet") -> list[str]:
    """``local/prefixlen`` of each address of ``family`` on a link from :meth:`Engine.links`."""
    return [
        f"{a['local']}/{a['prefixlen']}"
        for a in link.get("addr_info", [])
        if a.get("family") == family
    ]


def link_kind(link: dict[str, Any]) -> str | None:
    kind = link.get("linkinfo", {}).get("info_kind")
    return None if kind is None else str(kind)


# --------------------------------------------------------------------------------------------
# Per-test scope: what one test creates, removed afterwards
# --------------------------------------------------------------------------------------------


class Scope:
    """The helper tests use. Names get a per-test suffix; everything is removed at teardown."""

    def __init__(self, engine: Engine, index: int) -> None:
        self.engine = engine
        self.suffix = f"t{index}"
        self.networks: list[str] = []
        self.containers: list[str] = []

    @property
    def plugin(self) -> Plugin:
        return self.engine.plugin

    @property
    def driver(self) -> str:
        return self.engine.plugin.name

    def name(self, base: str) -> str:
        return f"{base}-{self.suffix}"

    def docker(
        self,
        *args: str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        return self.engine.docker(*args, check=check, timeout=timeout)

    # ---- networks ---------------------------------------------------------------------------

    def create_network(
        self,
        base: str,
        *,
        subnet: str | None = None,
        gateway: str | None = None,
        ipam: bool = True,
        options: dict[str, str] | None = None,
        extra: Sequence[str] = (),
        check: bool = True,
        driver: str | None = None,
    ) -> str:
        """``docker network create -d <plugin> [--ipam-driver <plugin>] ...``; returns the name.

        ``driver``: another driver than the session's plugin (e.g. ``name:latest`` of a
        managed plugin), used for both ``-d`` and ``--ipam-driver``.
        The network is removed at teardown even if creation fails half-way.
        """
        name = self.name(base)
        driver = driver or self.driver
        args = ["network", "create", "-d", driver]
        if ipam:
            args += ["--ipam-driver", driver]
        if subnet:
            check_no_overlap(subnet)
            args += ["--subnet", subnet]
        if gateway:
            args += ["--gateway", gateway]
        for k, v in (options or {}).items():
            args += ["-o", f"{k}={v}"]
        args += [*extra, name]
        self.networks.append(name)
        self.docker(*args, check=check)
        return name

    def network_inspect(self, name: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = self.engine.docker_json("network", "inspect", name)
        return data[0]

    def network_id(self, name: str) -> str:
        return str(self.network_inspect(name)["Id"])

    def remove_network(
        self,
        name: str,
        *,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        r = self.docker("network", "rm", name, check=check)
        if r.returncode == 0 and name in self.networks:
            self.networks.remove(name)
        return r

    # ---- containers -------------------------------------------------------------------------

    def run_container(
        self,
        network: str,
        base: str,
        *cmd: str,
        ip: str | None = None,
        publish: Sequence[str] = (),
        extra: Sequence[str] = (),
        check: bool = True,
    ) -> str:
        """``docker run -d --name <base>-tN --network <network> pouch-test:busybox cmd...``.

        The default command (:data:`SLEEPER`) sleeps; returns the container name.
        """
        name = self.name(base)
        args = ["run", "-d", "--name", name, "--hostname", base, "--network", network]
        if ip:
            args += ["--ip", ip]
        for p in publish:
            args += ["-p", p]
        args += [*extra, self.engine.image, *(cmd or SLEEPER)]
        self.containers.append(name)
        self.docker(*args, check=check, timeout=90)
        return name

    def exec(
        self,
        container: str,
        *cmd: str,
        check: bool = True,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        return self.docker("exec", container, *cmd, check=check, timeout=timeout)

    def connect(
        self, network: str, container: str, *, ip: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        args = ["network", "connect"] + (["--ip", ip] if ip else []) + [network, container]
        return self.docker(*args, check=check)

    def disconnect(
        self,
        network: str,
        container: str,
        *,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        return self.docker("network", "disconnect", network, container, check=check)

    def remove_container(self, name: str, *, check: bool = True) -> None:
        self.docker("rm", "-f", name, check=check, timeout=60)
        if name in self.containers:
            self.containers.remove(name)

    def container_inspect(self, name: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = self.engine.docker_json("container", "inspect", name)
        return data[0]

    def container_ip(self, container: str, network: str) -> str:
        nets = self.container_inspect(container)["NetworkSettings"]["Networks"]
        if network not in nets:
            raise AssertionError(f"{container} is not on {network}: {sorted(nets)}")
        ip = str(nets[network]["IPAddress"])
        if not ip:
            raise AssertionError(f"{container} has no IPv4 address on {network}: {nets[network]}")
        return ip

    def container_addrs(self, container: str, *, v6: bool = False) -> dict[str, list[str]]:
        """Interface name -> IPv4 (``v6``: global IPv6) ``addr/len`` list, as seen inside the
        container (``ip``)."""
        args = ("-6", "addr", "show", "scope", "global") if v6 else ("-4", "addr", "show")
        out = self.exec(container, "ip", "-o", *args).stdout
        family = "inet6" if v6 else "inet"
        result: dict[str, list[str]] = {}
        for line in out.splitlines():
            parts = line.split()
            # "2: eth0    inet 10.31.0.2/24 brd ... scope global eth0"
            if len(parts) >= 4 and parts[2] == family:
                result.setdefault(parts[1].split("@")[0], []).append(parts[3])
        return result

    def ping(
        self,
        container: str,
        target: str,
        *,
        count: int = 1,
        wait: int = 2,
    ) -> subprocess.CompletedProcess[str]:
        """One ping from inside ``container``; returns the process (check returncode)."""
        return self.exec(
            container,
            "ping",
            "-c",
            str(count),
            "-W",
            str(wait),
            target,
            check=False,
            timeout=count * wait + 15,
        )

    def assert_ping(self, container: str, target: str, *, attempts: int = 3) -> None:
        """``container`` reaches ``target`` (a few tries: the first packet may trigger ARP)."""
        last: subprocess.CompletedProcess[str] | None = None
        for _ in range(attempts):
            last = self.ping(container, target)
            if last.returncode == 0:
                return
        assert last is not None
        raise AssertionError(f"{container} cannot ping {target}:\n{last.stdout}{last.stderr}")

    def http_get(
        self,
        container: str,
        url: str,
        *,
        timeout: int = 5,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``wget -O- url`` inside ``container``, killed after ``timeout`` s.

        (This busybox's wget segfaults with ``-q`` or ``-T``, so the limit is ``timeout``.)
        """
        return self.exec(
            container,
            "timeout",
            str(timeout),
            "wget",
            "-O-",
            url,
            check=check,
            timeout=timeout + 15,
        )

    def assert_no_ping(self, container: str, target: str) -> None:
        r = self.ping(container, target, count=2, wait=1)
        assert r.returncode != 0, (
            f"{container} CAN ping {target} but must not:\n{r.stdout}{r.stderr}"
        )

    # ---- teardown ---------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Remove this test's containers then networks; return what could not be removed."""
        problems: list[str] = []
        if not self.plugin.running:
            # A test that stopped or killed the plugin: bring it back so removal reaches it.
            try:
                self.plugin.start()
            except Exception as exc:  # noqa: BLE001
                problems.append(f"restarting plugin: {exc}")
        for name in reversed(self.containers):
            r = self.docker("rm", "-f", name, check=False, timeout=60)
            if r.returncode != 0 and "No such container" not in r.stderr:
                problems.append(f"docker rm -f {name}: {r.stderr.strip()}")
        self.containers.clear()
        for name in reversed(self.networks):
            r = self.docker("network", "rm", name, check=False, timeout=60)
            if r.returncode != 0 and "not found" not in r.stderr:
                problems.append(f"docker network rm {name}: {r.stderr.strip()}")
        self.networks.clear()
        return problems
