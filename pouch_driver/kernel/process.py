"""Running a fixed binary (iptables-restore, modprobe, sh) without blocking the event loop.

Arguments are a list, never a shell line; a non-zero exit is a ``KernelError`` carrying the
tool's own message. ``netns`` (tests only) runs the command inside a named network namespace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..errors import KernelError


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}", *argv] if netns else list(argv)


async def run(argv: Sequence[str], stdin: str | None = None, *, netns: str | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *in_netns(netns, argv),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if proc.returncode != 0:
        raise KernelError(f"{argv[0]} failed: {err.decode(errors='replace').strip()}")
    return out.decode()
