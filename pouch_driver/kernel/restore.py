"""One long-lived ``iptables-restore --noflush`` per command, fed one change at a time.

Why not a process per change: a one-shot ``iptables-restore`` that deleted a rule spends
20-45 ms in the ``close()`` of its netlink socket as it exits (nf_tables waits there for an RCU
grace period; ``strace -T`` shows it), while the commit itself takes under a millisecond, and
the spawn costs 2-3 ms more. A process that stays neither spawns nor closes: a change is its
commit (bench/README.md, the firewall's per-change cost).

``iptables-restore`` commits at each ``COMMIT`` line and then reads standard input for more,
and prints nothing when it succeeds. So a change is done when every byte written has been read
(``FIONREAD`` on our end of the pipe says 0) *and* the process is asleep in ``read(2)`` on its
standard input again (``/proc/<pid>/syscall``): it needs more input, so it has processed all
of ours. A line that fails makes it print why and exit, which is how an error is seen; the next
change starts a new process. Its cache of the ruleset is refreshed when the ruleset changed
under it (Docker's rules), as a new process would read it.

Where ``/proc/<pid>/syscall`` cannot be read, or ``read(2)``'s number on this architecture is
not known here, each change runs a process of its own, as before.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import os
import platform
import subprocess
import termios
import threading
import time
import weakref
from collections.abc import Sequence
from typing import IO

from ..errors import KernelError

log = logging.getLogger(__name__)

#: read(2)'s system call number, as /proc/<pid>/syscall prints it.
_READ = {"x86_64": 0, "aarch64": 63, "arm64": 63, "riscv64": 63}.get(platform.machine())
#: How long one change may take before the process is taken for hung and killed.
TIMEOUT = 60.0


class RestoreSession:
    """``argv`` is the whole command (``iptables-restore --noflush``, under ``nsenter`` in
    tests). Not for concurrent use: the firewall feeds it under its lock."""

    def __init__(self, argv: Sequence[str], name: str) -> None:
        self._argv = list(argv)
        self._name = name  # what errors are named after: "iptables-restore"
        self._proc: subprocess.Popen[bytes] | None = None
        self._ended: weakref.finalize[[subprocess.Popen[bytes]], RestoreSession] | None = None
        self._lock = threading.Lock()
        self.persistent = _READ is not None

    async def run(self, text: str) -> None:
        """Apply ``text`` (whole ``*table`` ... ``COMMIT`` blocks); a ``KernelError`` carrying
        the tool's message when a line fails."""
        await asyncio.to_thread(self._run, text.encode())

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            self._stop()

    # --- on a worker thread -----------------------------------------------------------------
    def _run(self, data: bytes) -> None:
        with self._lock:
            if self.persistent:
                proc = self._alive()
                if proc is not None:
                    self._feed(proc, data)
                    return
            self._once(data)

    def _alive(self) -> subprocess.Popen[bytes] | None:
        """The running process, started if need be; None when this host cannot watch one."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._stop()
        proc = subprocess.Popen(
            self._argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        os.set_blocking(_pipe(proc.stderr).fileno(), False)
        self._proc = proc
        # A session dropped without close() (garbage collected, maybe on the event loop):
        # its process still ends, reaped on a thread of its own.
        self._ended = weakref.finalize(self, _end_later, proc)
        if self._state(proc) is None:  # e.g. no /proc/<pid>/syscall here
            log.info("iptables-restore cannot be watched here: one process per change")
            self.persistent = False
            self._stop()
            return None
        return proc

    def _feed(self, proc: subprocess.Popen[bytes], data: bytes) -> None:
        with contextlib.suppress(BrokenPipeError):  # it died: its message is read below
            stdin = _pipe(proc.stdin)
            stdin.write(data)
            stdin.flush()
        deadline = time.monotonic() + TIMEOUT
        pause = 0.0002
        while True:
            if proc.poll() is not None:
                message = self._drain(proc)
                self._stop()
                raise KernelError(f"{self._name} failed: {message or 'exited'}")
            if self._done(proc):
                noise = self._drain(proc)
                if noise:
                    log.debug("%s said: %s", self._name, noise)
                return
            if time.monotonic() > deadline:
                self._stop()
                raise KernelError(f"{self._name} did not finish within {TIMEOUT:.0f}s")
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    def _done(self, proc: subprocess.Popen[bytes]) -> bool:
        unread = array.array("i", [0])
        fcntl.ioctl(_pipe(proc.stdin).fileno(), termios.FIONREAD, unread)
        # Asleep in read(0) with nothing left to read: that read started after ours was
        # consumed, so every line we wrote has been processed and committed (a line that
        # fails makes it exit instead, which poll() sees).
        return unread[0] == 0 and self._state(proc) == "reading"

    @staticmethod
    def _state(proc: subprocess.Popen[bytes]) -> str | None:
        """ "reading" (asleep in read(2) on fd 0), "busy", or None when it cannot be told."""
        try:
            with open(f"/proc/{proc.pid}/syscall") as f:
                fields = f.read().split()
        except FileNotFoundError:
            return "busy"  # gone: poll() sees it next
        except OSError:
            return None
        if not fields:
            return None
        if fields[0] == "running":
            return "busy"
        try:
            reading = int(fields[0]) == _READ and len(fields) > 1 and int(fields[1], 16) == 0
        except ValueError:
            return None
        return "reading" if reading else "busy"

    @staticmethod
    def _drain(proc: subprocess.Popen[bytes]) -> str:
        try:
            out = _pipe(proc.stderr).read() or b""
        except (BlockingIOError, ValueError):
            out = b""
        return out.decode(errors="replace").strip()

    def _once(self, data: bytes) -> None:
        done = subprocess.run(
            self._argv, input=data, capture_output=True, timeout=TIMEOUT, check=False
        )
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip()
            raise KernelError(f"{self._name} failed: {message}")

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if self._ended is not None:
            self._ended.detach()
            self._ended = None
        if proc is not None:
            _end(proc)


def _pipe(f: IO[bytes] | None) -> IO[bytes]:
    if f is None:  # (Popen was asked for the pipe: never the case)
        raise KernelError("iptables-restore was started without its pipes")
    return f


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()  # end of input: it exits
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def _end_later(proc: subprocess.Popen[bytes]) -> None:
    threading.Thread(target=_end, args=(proc,), name="restore-end", daemon=True).start()
