"""Serve the app on the plugin's Unix socket until SIGTERM/SIGINT, then shut down gracefully.

The socket is created 0660 (group configurable). A stale socket file is replaced; a symlink,
a non-socket, or a socket some live process still answers on makes us refuse to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import grp
import logging
import os
import signal
import socket
import stat
from pathlib import Path

from aiohttp import web

from .config import Settings, parse_listen
from .daemon import build_app
from .errors import DriverError
from .http import DRIVER
from .http.middleware import OBSERVERS
from .metrics import Metrics

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 30.0  # seconds in-flight requests get to finish
LISTEN_BACKLOG = 4096  # the engine opens many connections at once; the kernel caps it anyway


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def _probe(path: Path) -> bool:
    """Whether a live process accepts connections on ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def bind_socket(settings: Settings) -> socket.socket:
    path = settings.socket
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise StartupError(f"{path} is a symlink; refusing to serve through it")
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket; remove it first")
        if _probe(path):
            raise StartupError(f"another process is already serving on {path}")
        path.unlink()  # stale, left by a killed plugin
    gid = -1
    if settings.socket_group:
        try:
            gid = grp.getgrnam(settings.socket_group).gr_gid
        except KeyError:
            if not settings.socket_group.isdigit():
                raise StartupError(
                    f"socket group {settings.socket_group!r} does not exist"
                ) from None
            gid = int(settings.socket_group)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)  # bind creates the file 0660: no window where it is wider
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if gid >= 0:
        os.chown(path, -1, gid)
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


SD_LISTEN_FDS_START = 3


def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed us (socket activation), if any.

    With a .socket unit the socket outlives the daemon: the engine's requests queue in its
    backlog while the plugin restarts, instead of failing and being retried for 15 s.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)  # not for our children
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise StartupError("the socket passed by systemd is not a Unix stream socket")
    sock.setblocking(False)
    return sock


def _clear_stale_socket(path: Path) -> None:
    """Start-up only (nothing is served yet): remove a stale socket, refuse anything else."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() or not stat.S_ISSOCK(path.lstat().st_mode):
            raise StartupError(f"metrics path {path} exists and is not a socket")
        path.unlink()


async def _start_metrics(app: web.Application, settings: Settings) -> web.AppRunner:
    """Prometheus text on GET /metrics, on a Unix socket or a loopback port only."""
    metrics = Metrics()
    app[OBSERVERS].append(metrics.observe)

    async def scrape(_request: web.Request) -> web.Response:
        driver = app.get(DRIVER)
        status = driver.status() if driver is not None else None
        return web.Response(
            text=metrics.render(status),
            content_type="text/plain",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    mapp = web.Application()
    mapp.router.add_get("/metrics", scrape)
    runner = web.AppRunner(mapp, handle_signals=False, access_log=None)
    await runner.setup()
    host, where = parse_listen(settings.metrics)
    if host == "unix":
        path = Path(str(where))
        _clear_stale_socket(path)
        old = os.umask(0o117)
        try:
            await web.UnixSite(runner, str(path)).start()
        finally:
            os.umask(old)
    else:
        await web.TCPSite(runner, host, int(where)).start()
    log.info("metrics on %s", settings.metrics)
    return runner


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    # Bound before the store is opened and reconciled: the engine's requests wait in the
    # listen backlog meanwhile instead of failing with ECONNREFUSED.
    sock = inherited_socket()
    owned = sock is None
    if sock is None:
        sock = bind_socket(settings)
    ino = os.stat(settings.socket).st_ino if owned else -1
    app = build_app(settings)
    metrics_runner = await _start_metrics(app, settings) if settings.metrics else None
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await runner.setup()
        except DriverError as exc:
            raise StartupError(str(exc)) from exc
        # Start-up objects (the loaded state, modules) live as long as the daemon: keep them
        # out of the collector's full passes, which otherwise stall the loop for ~20 ms.
        gc.collect()
        gc.freeze()
        # aiohttp would listen() again with a backlog of 128; the engine connects in bursts.
        await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
        log.info(
            "pouch-driver %s serving on %s%s",
            settings.driver_name,
            settings.socket,
            "" if owned else " (socket from systemd)",
        )
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down: finishing in-flight requests")
    finally:
        with contextlib.suppress(OSError):
            # Remove the socket only if we made it and it is still ours (not a successor's);
            # an inherited one belongs to systemd and stays for the next start.
            if owned and os.stat(settings.socket).st_ino == ino:
                settings.socket.unlink()
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
