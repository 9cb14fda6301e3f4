"""The plugin in this process but inside a test namespace, with an event-loop lag probe.

``run_in_netns`` runs a coroutine on a thread that has entered the namespace (network
namespaces are per thread), so everything the plugin does there (netlink workers, the bind()
probes of published ports, iptables) stays in the namespace; the adapters are also told the
namespace explicitly. The thread, and with it the namespace reference, ends with the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from pouch_driver.config import Settings
from pouch_driver.daemon import build_app
from pouch_driver.http import DRIVER
from pouch_driver.service.driver import Driver

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def run_in_netns(netns: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(main())`` on a fresh thread inside ``/run/netns/<netns>``."""
    out: dict[str, Any] = {}

    def target() -> None:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)
        try:
            out["value"] = asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=target, name=f"in-{netns}")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


@dataclass
class LoopProbe:
    """Sleeps 1 ms in a loop and records how late each wake-up is: the loop's stalls."""

    interval: float = 0.001
    max_stall: float = 0.0
    #: CPU time the loop's own thread used during the longest stall: close to the stall, the
    #: loop was busy running something; close to 0, it was not scheduled or waited for the GIL.
    max_stall_cpu: float = 0.0
    #: The most CPU the loop's thread used between two wake-ups: the longest stretch of the
    #: plugin's own work without yielding (blind to other processes and to GIL waits).
    max_busy: float = 0.0
    samples: int = 0
    stalls: list[tuple[float, float]] = field(default_factory=list)  # (wall, cpu) over 20 ms
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t0, c0 = time.perf_counter(), time.thread_time()
            await asyncio.sleep(self.interval)
            late = time.perf_counter() - t0 - self.interval
            cpu = time.thread_time() - c0
            self.samples += 1
            if late > self.max_stall:
                self.max_stall, self.max_stall_cpu = late, cpu
            self.max_busy = max(self.max_busy, cpu)
            if late > 0.02:
                self.stalls.append((round(late * 1000, 1), round(cpu * 1000, 1)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-probe")

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@dataclass
class InProc:
    settings: Settings
    service: Driver
    netns: str

    def cli(self, *args: str) -> list[str]:
        """argv of ``pouch-driver <args>`` run inside the namespace against this instance."""
        s = self.settings
        return [
            "nsenter",
            f"--net=/run/netns/{self.netns}",
            sys.executable,
            "-m",
            "pouch_driver",
            args[0],
            "--socket",
            str(s.socket),
            "--state-dir",
            str(s.state_dir),
            "--prefix",
            s.prefix,
            *args[1:],
        ]


@contextlib.asynccontextmanager
async def serve_in_netns(netns: str, root: Path, **overrides: Any) -> AsyncIterator[InProc]:
    """The real app on a Unix socket under ``root``, over the namespace's kernel.

    The test session's own objects (every collected test, hypothesis, pytest) are frozen out
    of the garbage collector meanwhile: a full collection scans the whole heap on the loop's
    thread, and the daemon's heap does not hold them (in a long pytest session that alone
    was a 50-110 ms pause; ~20 ms for a daemon-sized heap).
    """
    gc.collect()
    gc.freeze()
    settings = Settings(
        socket=root / "pd.sock", state_dir=root / "state", prefix="pk", gc_interval=0
    ).with_overrides(**overrides)
    app = build_app(settings, netns=netns)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        # The client shares this loop: its 200 connect()s all happen before the server's
        # accept callback runs, so the backlog must hold them (the daemon's is tested apart).
        await web.UnixSite(runner, str(settings.socket), backlog=1024).start()
        yield InProc(settings, app[DRIVER], netns)
    finally:
        await runner.cleanup()
        gc.unfreeze()


async def run_cli(
    argv: list[str], seconds: float = 120, cwd: Path | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd
    )
    out, err = await asyncio.wait_for(proc.communicate(), seconds)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
