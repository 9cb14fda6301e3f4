"""Writing the ``net.*`` sysctls a bridge network needs (forwarding, bridge netfilter).

Each key is written only if it differs, on a worker thread. A managed plugin sees a read-only
/proc/sys: plugin/config.json mounts the host's /proc/sys/net elsewhere and ``sysctl_dir``
points there.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..errors import KernelError
from . import process

PROC_SYS = Path("/proc/sys")


class Sysctls:
    """``netns`` (tests only) writes the keys as that namespace sees them."""

    def __init__(self, sysctl_dir: Path = PROC_SYS, netns: str | None = None) -> None:
        self._dir = sysctl_dir
        self._netns = netns

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
        """Bridged traffic passes iptables (what icc=false needs, as Docker's bridge does)."""
        loaded = await asyncio.get_running_loop().run_in_executor(
            None, (self._dir / "net/bridge").exists
        )
        if not loaded:
            await process.run(["modprobe", "br_netfilter"], netns=self._netns)
        await self.write("net/bridge/bridge-nf-call-iptables", "1")
        await self.write("net/bridge/bridge-nf-call-ip6tables", "1")
