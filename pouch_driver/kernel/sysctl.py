"""Writing the ``net.*`` sysctls a bridge network needs (forwarding, bridge netfilter).

Each key is written only if it differs, on a worker thread. A managed plugin sees a read-only
/proc/sys: plugin/config.json mounts the host's /proc/sys/net elsewhere and ``sysctl_dir``
points there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
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
        await self.write_many([(rel, value)], missing_ok={rel} if missing_ok else ())

    async def write_many(
        self, keys: Sequence[tuple[str, str]], *, missing_ok: Collection[str] = ()
    ) -> set[str]:
        """``write`` for several keys in one worker-thread hop (a hop costs more than the
        write itself); ``missing_ok``: the keys that may be absent. Returns the keys that
        exist (now holding their value)."""
        if not keys:
            return set()
        if self._netns is not None:  # the files as the target namespace sees them
            script = (
                'while [ $# -gt 0 ]; do if [ -e "$1" ]; then echo "$2" > "$1"; echo "$1"; '
                'elif [ "$3" = 0 ]; then exit 1; fi; shift 3; done'
            )
            argv = ["sh", "-c", script, "sysctl"]
            for rel, value in keys:
                argv += [str(PROC_SYS / rel), value, str(int(rel in missing_ok))]
            out = await process.run(argv, netns=self._netns)
            done = set(out.split())
            return {rel for rel, _ in keys if str(PROC_SYS / rel) in done}

        def write() -> set[str]:
            present: set[str] = set()
            for rel, value in keys:
                path = self._dir / rel
                try:
                    if path.read_text().strip() != value:
                        path.write_text(value)
                except FileNotFoundError:
                    if rel not in missing_ok:
                        raise KernelError(f"{path} does not exist") from None
                    continue
                except OSError as exc:
                    key = rel.replace("/", ".")
                    raise KernelError(
                        f"cannot set {key}={value} ({path}): {exc.strerror}; set it on the "
                        f"host (sysctl -w {key}={value})"
                    ) from exc
                present.add(rel)
            return present

        return await asyncio.get_running_loop().run_in_executor(None, write)

    async def read_many(self, rels: Sequence[str]) -> dict[str, str | None]:
        """The values of several keys (``None``: absent), in one hop."""
        if not rels:
            return {}
        if self._netns is not None:
            script = 'for f; do if [ -e "$f" ]; then echo "$f $(cat "$f")"; fi; done'
            out = await process.run(
                ["sh", "-c", script, "sysctl", *(str(PROC_SYS / r) for r in rels)],
                netns=self._netns,
            )
            got = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
            return {r: got.get(str(PROC_SYS / r)) for r in rels}

        def read() -> dict[str, str | None]:
            out: dict[str, str | None] = {}
            for rel in rels:
                try:
                    out[rel] = (self._dir / rel).read_text().strip()
                except OSError:
                    out[rel] = None
            return out

        return await asyncio.get_running_loop().run_in_executor(None, read)

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
