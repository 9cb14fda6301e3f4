"""Writing the ``net.*`` sysctls a bridge network needs (forwarding, bridge netfilter).

Each key is written only if it differs, on a worker thread. A managed plugin sees a read-only
/proc/sys: plugin/config.json mounts the host's /proc/sys/net elsewhere and ``sysctl_dir``
points there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from ..errors import KernelError
from . import process

PROC_SYS = Path("/proc/sys")
BR_NETFILTER_FIX = "load br_netfilter on the host: modprobe br_netfilter"


class Sysctls:
    """``netns`` (tests only) writes the keys as that namespace sees them; ``modprobe`` is
    the command that loads a module (tests give a stand-in)."""

    def __init__(
        self,
        sysctl_dir: Path = PROC_SYS,
        netns: str | None = None,
        modprobe: Sequence[str] = ("modprobe",),
    ) -> None:
        self._dir = sysctl_dir
        self._netns = netns
        self._modprobe = tuple(modprobe)

    async def write(self, rel: str, value: str, *, missing_ok: bool = False) -> None:
        """Write ``<sysctl dir>/<rel>`` (e.g. ``net/ipv4/ip_forward``) if it differs.

        ``missing_ok``: a per-interface key of an interface that is gone is not an error.
        """
        if self._netns is not None:  # the file as the target namespace sees it
            script = f'[ -e "$1" ] || exit {0 if missing_ok else 1}; echo "$2" > "$1"'
            await process.run(
                ["sh", "-c", script, "sysctl", str(PROC_SYS / rel), value], netns=self._netns
            )
            return
        path = self._dir / rel

        def write() -> None:
            try:
                if path.read_text().strip() != value:
                    path.write_text(value)
            except FileNotFoundError:
                if not missing_ok:
                    raise KernelError(f"{path} does not exist") from None
            except OSError as exc:
                key = rel.replace("/", ".")
                raise KernelError(
                    f"cannot set {key}={value} ({path}): {exc.strerror}; set it on the host "
                    f"(sysctl -w {key}={value})"
                ) from exc

        await asyncio.get_running_loop().run_in_executor(None, write)

    async def ensure_bridge_netfilter(self) -> None:
        """Bridged traffic passes iptables: what icc=false and a container reaching its own
        network's published port through the host need (dockerd 27.4+ loads br_netfilter
        only for its own networks that need it, so it may never be loaded for us). Where
        that cannot be done (no modprobe, no permission, a managed plugin without the
        module): a ``KernelError`` that says how to fix the host."""
        bridge = self._dir / "net/bridge"
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, bridge.exists):
            try:
                await process.run([*self._modprobe, "br_netfilter"], netns=self._netns)
            except (KernelError, OSError) as exc:
                detail = exc.message if isinstance(exc, KernelError) else str(exc)
                raise KernelError(
                    f"bridged traffic cannot pass iptables ({bridge} is missing and "
                    f"modprobe br_netfilter failed: {detail}); {BR_NETFILTER_FIX}"
                ) from exc
            if not await loop.run_in_executor(None, bridge.exists):
                raise KernelError(
                    f"bridged traffic cannot pass iptables ({bridge} is still missing after "
                    f"modprobe br_netfilter); {BR_NETFILTER_FIX}"
                )
        await self.write("net/bridge/bridge-nf-call-iptables", "1")
        await self.write("net/bridge/bridge-nf-call-ip6tables", "1")
