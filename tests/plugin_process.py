"""A real ``pouch-driver serve`` process in a network namespace, and a client like the engine's."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp


class CallError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


@dataclass
class PluginProcess:
    socket_path: Path
    state_dir: Path
    netns: str | None = None
    prefix: str = "pt"
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "pouch_driver",
            "serve",
            "--socket",
            str(self.socket_path),
            "--state-dir",
            str(self.state_dir),
            "--prefix",
            self.prefix,
            "--log-level",
            "debug",
            *self.extra_args,
        ]
        if self.netns:
            cmd = ["nsenter", f"--net=/run/netns/{self.netns}", *cmd]
        return cmd

    def start(self, timeout: float = 20.0) -> None:
        log = self.log_path or self.state_dir.parent / "plugin.log"
        self.log_path = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv(), stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"plugin exited with {self.proc.returncode}:\n{self.log()}")
            # connect() alone succeeds as soon as the socket listens, while start-up still
            # reconciles: ready means a request was answered.
            if self.answers():
                return
            time.sleep(0.05)
        raise RuntimeError(f"plugin did not listen within {timeout}s:\n{self.log()}")

    def answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            try:
                s.connect(str(self.socket_path))
                s.sendall(b"POST /Plugin.Activate HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.0 200") or False
            except OSError:
                return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:] if self.log_path else ""

    def signal(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        self.proc = None
        return rc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        self.proc = None


class EngineClient:
    """Talks like dockerd: POST, no Content-Type, empty body for argument-less calls."""

    def __init__(self, socket_path: Path) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(socket_path)),
            timeout=aiohttp.ClientTimeout(total=60),
        )

    async def close(self) -> None:
        await self._session.close()

    async def call(self, method: str, body: Any = None) -> dict[str, Any]:
        data = b"" if body is None else json.dumps(body).encode()
        async with self._session.post(f"http://plugin.moby.localhost/{method}", data=data) as r:
            doc: dict[str, Any] = json.loads(await r.read())
            if r.status != 200:
                raise CallError(r.status, doc)
            return doc

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
