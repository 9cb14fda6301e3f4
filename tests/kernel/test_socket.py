"""Socket security of the real daemon (issue 7): who may connect, what it refuses to serve
through, and that nothing but the Unix socket listens.

Each daemon runs as its own process in a throwaway namespace (``tests/plugin_process.py``).
"""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..plugin_process import PluginProcess
from .conftest import Netns

OTHER_GROUP = "nogroup"
NOBODY = 65534


@pytest.fixture
def daemon(netns: Netns, short_tmp: Path) -> Iterator[PluginProcess]:
    """A daemon not yet started; stopped (if running) at the end."""
    p = PluginProcess(
        socket_path=short_tmp / "run" / "pd.sock",
        state_dir=short_tmp / "state",
        netns=netns.name,
        prefix="pk",
    )
    yield p
    p.stop()


def run_to_exit(p: PluginProcess, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Start the daemon in the foreground and wait for it to give up."""
    return subprocess.run(p.argv(), capture_output=True, text=True, timeout=timeout, check=False)


def connect_as(uid: int, gid: int, path: Path) -> subprocess.CompletedProcess[str]:
    """connect() to ``path`` as uid:gid with no supplementary groups."""
    code = (
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1]); print('connected')\n"
        "except OSError as e:\n print(type(e).__name__)\n"
    )
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def open_for_others(path: Path) -> None:
    """Let other users reach the socket's directory (the test tmp dir is 0700)."""
    for d in (path.parent, path.parent.parent):
        d.chmod(0o711)


def test_socket_is_0660_owned_by_root_by_default(daemon: PluginProcess) -> None:
    daemon.start()
    st = daemon.socket_path.lstat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    assert (st.st_uid, st.st_gid) == (0, 0)
    open_for_others(daemon.socket_path)
    assert connect_as(NOBODY, NOBODY, daemon.socket_path).stdout.strip() == "PermissionError"


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_socket_group_lets_that_group_in_and_no_one_else(
    daemon: PluginProcess, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gid = grp.getgrnam(OTHER_GROUP).gr_gid
    if how == "flag":
        daemon.extra_args = ["--socket-group", OTHER_GROUP]
    else:
        monkeypatch.setenv("POUCH_DRIVER_SOCKET_GROUP", OTHER_GROUP)
    daemon.start()
    st = daemon.socket_path.lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, gid)
    open_for_others(daemon.socket_path)
    assert connect_as(NOBODY, gid, daemon.socket_path).stdout.strip() == "connected"
    assert connect_as(NOBODY, 1, daemon.socket_path).stdout.strip() == "PermissionError"


def test_unknown_socket_group_refuses_to_start(daemon: PluginProcess) -> None:
    daemon.extra_args = ["--socket-group", "no-such-group-pd"]
    out = run_to_exit(daemon)
    assert out.returncode != 0
    assert "socket group 'no-such-group-pd' does not exist" in out.stderr
    assert not daemon.socket_path.exists()


@pytest.mark.parametrize("kind", ["symlink-to-file", "dangling-symlink", "symlink-to-socket"])
def test_symlink_at_the_socket_path_refuses_to_start(
    daemon: PluginProcess, short_tmp: Path, kind: str
) -> None:
    daemon.socket_path.parent.mkdir(parents=True)
    target = short_tmp / "target"
    if kind == "symlink-to-file":
        target.write_text("precious")
    elif kind == "symlink-to-socket":
        with socket.socket(socket.AF_UNIX) as s:  # a stale socket somewhere else
            s.bind(str(target))
    daemon.socket_path.symlink_to(target)
    out = run_to_exit(daemon)
    assert out.returncode != 0
    assert f"{daemon.socket_path} is a symlink; refusing to serve through it" in out.stderr
    assert daemon.socket_path.is_symlink() and os.readlink(daemon.socket_path) == str(target)
    if kind == "symlink-to-file":
        assert target.read_text() == "precious"
    elif kind == "symlink-to-socket":
        assert stat.S_ISSOCK(target.lstat().st_mode), "the link's target was replaced"
    else:
        assert not target.exists(), "something was created through a dangling link"


@pytest.mark.parametrize("kind", ["file", "directory", "fifo"])
def test_non_socket_at_the_socket_path_refuses_to_start(daemon: PluginProcess, kind: str) -> None:
    path = daemon.socket_path
    path.parent.mkdir(parents=True)
    if kind == "file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    out = run_to_exit(daemon)
    assert out.returncode != 0
    assert f"{path} exists and is not a socket; remove it first" in out.stderr
    if kind == "file":
        assert path.read_text() == "precious"


def test_second_instance_on_a_live_socket_refuses_to_start(
    daemon: PluginProcess, short_tmp: Path
) -> None:
    daemon.start()
    first_inode = daemon.socket_path.stat().st_ino
    second = PluginProcess(
        socket_path=daemon.socket_path,
        state_dir=short_tmp / "state2",
        netns=daemon.netns,
        prefix="pq",
    )
    t0 = time.monotonic()
    out = run_to_exit(second)
    print(f"\nsecond instance gave up in {time.monotonic() - t0:.2f}s")
    assert out.returncode != 0
    assert f"another process is already serving on {daemon.socket_path}" in out.stderr
    assert daemon.socket_path.stat().st_ino == first_inode, "the live socket was replaced"
    assert daemon.answers(), "the first instance no longer answers"


def test_second_instance_on_the_same_state_dir_refuses_to_start(
    daemon: PluginProcess, short_tmp: Path
) -> None:
    daemon.start()
    second = PluginProcess(
        socket_path=short_tmp / "other.sock",
        state_dir=daemon.state_dir,
        netns=daemon.netns,
        prefix="pk",
    )
    out = run_to_exit(second)
    assert out.returncode != 0
    assert str(daemon.state_dir) in out.stderr, out.stderr[-2000:]
    assert daemon.answers()


def test_stale_socket_after_kill_9_is_replaced(daemon: PluginProcess) -> None:
    daemon.start()
    assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
    stale = daemon.socket_path.lstat()
    assert stat.S_ISSOCK(stale.st_mode), "kill -9 leaves the socket file"
    assert not daemon.answers()
    daemon.start()
    fresh = daemon.socket_path.lstat()
    # (The inode number may be reused by the new file; its change time may not.)
    assert (fresh.st_ino, fresh.st_ctime_ns) != (stale.st_ino, stale.st_ctime_ns)
    assert stat.S_IMODE(daemon.socket_path.stat().st_mode) == 0o660
    assert daemon.answers()


def _listening(netns: Netns, proto: str) -> list[str]:
    out = netns.sh("ss", "-H", f"-l{proto}np")
    return [line for line in out.stdout.splitlines() if line.strip()]


def test_no_tcp_or_udp_listener(daemon: PluginProcess, netns: Netns) -> None:
    daemon.start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    assert _listening(netns, "t") == [], "something listens on TCP in the daemon's namespace"
    assert _listening(netns, "u") == [], "something listens on UDP in the daemon's namespace"
    # The kernel's own view, through the daemon's /proc: no TCP socket in LISTEN (0A).
    for table in ("tcp", "tcp6"):
        rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        assert [r for r in rows if r.split()[3] == "0A"] == [], f"{table} listener"
    # And every socket the process holds is a Unix one, or a netlink one (pyroute2).
    inodes = {
        os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1]
        for fd in os.listdir(f"/proc/{pid}/fd")
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")
    }
    inet = {
        line.split()[9]
        for table in ("tcp", "tcp6", "udp", "udp6")
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
    }
    assert inodes and not (inodes & inet), "the daemon holds an IP socket"


def test_connection_burst_beyond_128_is_not_refused(daemon: PluginProcess) -> None:
    """An engine starting many containers at once opens a connection per request."""
    daemon.start()
    socks, refused = [], 0
    try:
        for _ in range(1000):  # like Go: non-blocking connect, EAGAIN is a failure
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            socks.append(s)
            try:
                s.connect(str(daemon.socket_path))
            except BlockingIOError:
                refused += 1
    finally:
        for s in socks:
            s.close()
    assert refused == 0, f"{refused} of 1000 simultaneous connections refused (EAGAIN)"
