"""The firewall: our own iptables chains, rewritten whole from a plan in one transaction.

Each ``apply`` renders every chain we own from the plan and loads it with one
``iptables-restore --noflush`` per address family: declaring a chain there empties it, so
the result is exact and idempotent, and chains and rules of others (Docker's, the user's)
are never touched. Only the jumps into our chains live in built-in chains; they carry a
comment that marks them ours. Never imports ``service`` or ``http``.

Where our rules sit, and why:
* ``<P>-ISOLATION`` is the first rule of the **mangle** table's FORWARD, which runs before any
  filter rule. Docker inserts each new network's ACCEPT rules at the *top* of filter FORWARD,
  above anything we could place there, so only there do our drops keep their precedence. It
  only ever drops (traffic between two of our networks, from Docker's default bridges,
  leaving/entering an internal network, and *new* connections into a masqueraded network
  that are not published ports, i.e. not DNAT'd: so a Docker network of any bridge name, made
  before or after ours, gets no way in), so putting it first weakens nothing.
* ``<P>-FORWARD`` is appended to FORWARD, after Docker's DOCKER-USER, so an operator's
  DOCKER-USER policy applies to our networks as it does to Docker's. It accepts our bridges'
  traffic, which a Docker host's FORWARD policy (DROP) would otherwise drop; traffic leaving
  for another network first goes through Docker's own ``DOCKER-ISOLATION-STAGE-2`` when that
  chain exists (it drops towards every Docker bridge, whatever its name).
* ``<P>-POSTROUTING`` (nat) masquerades our subnets leaving through another interface, and
  hairpins published ports; ``<P>-DNAT`` (nat, from PREROUTING and OUTPUT for local
  destinations) publishes ports.

With no network left, the plan is empty and every chain and jump of ours is removed: deleting
the last network (which ``docker plugin rm`` requires) leaves the firewall as we found it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..errors import KernelError
from ..naming import Names
from . import FirewallPlan, NetworkRules

log = logging.getLogger(__name__)

SYSCTL = Path("/proc/sys")
# Bridges Docker names for its own networks (docker0, br-<id>): kept out even where Docker runs
# without its iptables chains. Custom bridge names are covered by the conntrack rule (inbound)
# and DOCKER-ISOLATION-STAGE-2 (outbound).
DOCKER_BRIDGES = ("docker0", "br-+")
_MANGLE, _FILTER, _NAT = "mangle", "filter", "nat"
#: Docker (20.10-27) keeps here one "-o <bridge> -j DROP" per bridge network it manages.
DOCKER_ISOLATION = "DOCKER-ISOLATION-STAGE-2"


class IptablesFirewall:
    """The real ``Firewall``. ``netns`` (tests only) runs every command in a named netns."""

    def __init__(
        self, names: Names, netns: str | None = None, sysctl_dir: Path = SYSCTL
    ) -> None:
        self.names = names
        # A managed plugin sees a read-only /proc/sys; plugin/config.json mounts the host's
        # /proc/sys/net elsewhere and points this there.
        self._sysctl_dir = sysctl_dir
        self._prefix: list[str] = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
        self._sysctl_cmd = netns is not None
        self._lock = asyncio.Lock()
        self._v6_used = True  # clean IPv6 chains once at start, then only while needed
        # Families whose jumps into our chains are known present: their applies skip the
        # iptables-save that checks for them (one exec instead of two per change).
        self._jumps_ok: set[int] = set()
        # Known to hold nothing of ours (after an empty plan): further empty plans cost no
        # exec. Unknown at start, so the first empty plan clears what an earlier run left.
        self._absent = False
        # Families where Docker's isolation chain existed at the last iptables-save.
        self._docker_isolation: set[int] = set()
        # The table each of our chains lives in.
        self._tables: dict[str, list[str]] = {
            _MANGLE: [names.chain_isolation, names.chain_isolation2],
            _FILTER: [names.chain_forward],
            _NAT: [names.chain_postrouting, names.chain_dnat],
        }
        self._table_of = {c: t for t, chains in self._tables.items() for c in chains}
        self._has_ip6tables = shutil.which("ip6tables-restore") is not None

    # --- process plumbing ---------------------------------------------------------------------
    async def _exec(self, argv: Sequence[str], stdin: str | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self._prefix, *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if proc.returncode != 0:
            raise KernelError(f"{argv[0]} failed: {err.decode(errors='replace').strip()}")
        return out.decode()

    async def _sysctl(self, rel: str, value: str, *, missing_ok: bool = False) -> None:
        """Write ``<sysctl dir>/<rel>`` (e.g. ``net/ipv4/ip_forward``) if it differs.

        ``missing_ok``: a per-interface key of an interface that is gone is not an error.
        """
        if self._sysctl_cmd:  # tests: the file as the target namespace sees it
            script = f'[ -e "$1" ] || exit {0 if missing_ok else 1}; echo "$2" > "$1"'
            await self._exec(["sh", "-c", script, "sysctl", str(SYSCTL / rel), value])
            return
        path = self._sysctl_dir / rel

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

    # --- rendering ------------------------------------------------------------------------------
    def _jumps(self) -> list[tuple[str, str, str, str]]:
        """(table, chain, position, match) for each jump into our chains."""
        n = self.names
        c = f'-m comment --comment "{n.comment}"'
        return [
            ("mangle", "FORWARD", "-I FORWARD 1", f"{c} -j {n.chain_isolation}"),
            ("filter", "FORWARD", "-A FORWARD", f"{c} -j {n.chain_forward}"),
            ("nat", "POSTROUTING", "-A POSTROUTING", f"{c} -j {n.chain_postrouting}"),
            ("nat", "PREROUTING", "-A PREROUTING",
             f"-m addrtype --dst-type LOCAL {c} -j {n.chain_dnat}"),
            # IPv4 includes 127.0.0.0/8 (-p 127.0.0.1::80); ::1 cannot be DNAT'd out.
            ("nat", "OUTPUT", "-A OUTPUT",
             f"{{not_loopback}}-m addrtype --dst-type LOCAL {c} -j {n.chain_dnat}"),
        ]

    def _isolate(self, net: NetworkRules, iso: list[str], iso2: list[str]) -> None:
        n, b = self.names, net.bridge
        if net.internal:
            iso.append(f"-A {n.chain_isolation} -i {b} ! -o {b} -j DROP")
            iso.append(f"-A {n.chain_isolation} ! -i {b} -o {b} -j DROP")
            return
        iso.append(f"-A {n.chain_isolation} -i {b} ! -o {b} -j {n.chain_isolation2}")
        iso2.append(f"-A {n.chain_isolation2} -o {b} -j DROP")
        if net.masquerade:
            # A routed (non-masqueraded) network is meant to be reached; a NATed one only
            # through its published ports.
            iso.append(f"-A {n.chain_isolation} ! -i {b} -o {b} -m conntrack "
                       "! --ctstate RELATED,ESTABLISHED,DNAT -j DROP")
        # Docker's own bridges (default names) are other networks too: keep them out.
        iso.extend(f"-A {n.chain_isolation} -i {d} -o {b} -j DROP" for d in DOCKER_BRIDGES)

    def render(self, plan: FirewallPlan, version: int) -> dict[str, list[str]]:
        """The rules of each of our chains, in ``iptables-save`` syntax, for one family."""
        n = self.names
        chains: dict[str, list[str]] = {c: [] for c in n.all_chains()}
        iso, iso2, fwd = chains[n.chain_isolation], chains[n.chain_isolation2], \
            chains[n.chain_forward]
        post, dnat = chains[n.chain_postrouting], chains[n.chain_dnat]

        def family(nets: NetworkRules) -> list[str]:
            return [str(s) for s in nets.subnets if s.version == version]

        # Traffic inside one network is never an isolation matter (and a user may name a pouch
        # bridge br-something, which the Docker-bridge rules below would otherwise catch).
        iso.extend(f"-A {n.chain_isolation} -i {net.bridge} -o {net.bridge} -j RETURN"
                   for net in plan.networks)
        for net in plan.networks:
            b = net.bridge
            self._isolate(net, iso, iso2)
            verdict = "ACCEPT" if net.icc else "DROP"
            fwd.append(f"-A {n.chain_forward} -i {b} -o {b} -j {verdict}")
            fwd.append(
                f"-A {n.chain_forward} -o {b} -m conntrack --ctstate RELATED,ESTABLISHED "
                "-j ACCEPT"
            )
            if not net.internal:
                if version in self._docker_isolation:
                    fwd.append(f"-A {n.chain_forward} -i {b} ! -o {b} -j {DOCKER_ISOLATION}")
                fwd.append(f"-A {n.chain_forward} -i {b} ! -o {b} -j ACCEPT")
                if net.masquerade:
                    for subnet in family(net):
                        post.append(f"-A {n.chain_postrouting} -s {subnet} ! -o {b} -j MASQUERADE")
                if version == 4 and any(f.bridge == b for f in plan.forwards):
                    # 127.0.0.1:PORT reached from the host itself: hide the loopback source.
                    post.append(f"-A {n.chain_postrouting} -s 127.0.0.0/8 -o {b} -m addrtype "
                                "--src-type LOCAL -j MASQUERADE")
        if any(not net.internal for net in plan.networks):
            iso2.extend(f"-A {n.chain_isolation2} -o {d} -j DROP" for d in DOCKER_BRIDGES)
        for f in plan.forwards:
            if f.container_ip.version != version:
                continue
            if f.host_ip is not None and f.host_ip.version != version:
                continue
            # Host addresses are written as iptables-save prints them (/32, /128), so that
            # ``differences`` compares like with like.
            cip = f"{f.container_ip}/{f.container_ip.max_prefixlen}"
            dst = (
                f"-d {f.host_ip}/{f.host_ip.max_prefixlen} "
                if f.host_ip is not None and not f.host_ip.is_unspecified else ""
            )
            target = (
                f"{f.container_ip}:{f.container_port}" if version == 4
                else f"[{f.container_ip}]:{f.container_port}"
            )
            # No "! -i <bridge>": containers of the same network reach the published port
            # through the host's address too (Docker leaves that to docker-proxy, which the
            # engine does not run for remote drivers).
            dnat.append(
                f"-A {n.chain_dnat} {dst}-p {f.proto} -m {f.proto} "
                f"--dport {f.host_port} -j DNAT --to-destination {target}"
            )
            # Inserted before the bridge's "leaving" rules is not needed: this accepts traffic
            # entering the bridge, which no other rule of ours does for NEW connections.
            fwd.insert(
                0,
                f"-A {n.chain_forward} -d {cip} ! -i {f.bridge} -o {f.bridge} "
                f"-p {f.proto} -m {f.proto} --dport {f.container_port} -j ACCEPT",
            )
            post.append(
                f"-A {n.chain_postrouting} -s {cip} -d {cip} "
                f"-p {f.proto} -m {f.proto} --dport {f.container_port} -j MASQUERADE"
            )
        return chains

    def _restore_input(self, plan: FirewallPlan, version: int,
                       present: dict[str, list[str]] | None) -> str:
        """``present``: the parsed iptables-save, when the jumps must be checked."""
        text = self._render_input(plan, version, present)
        for line in text.splitlines():
            # Defence in depth: every value we render is validated upstream, but a rule line
            # must never smuggle a newline, NUL or a second table into iptables-restore.
            if "\x00" in line or "\r" in line:
                raise KernelError(f"refusing to load a firewall rule with control characters: "
                                  f"{line!r}")
        return text

    def _check_plan(self, plan: FirewallPlan) -> None:
        names = [n.bridge for n in plan.networks] + [f.bridge for f in plan.forwards]
        values = names + [str(s) for n in plan.networks for s in n.subnets] + [
            str(v) for f in plan.forwards for v in (f.host_ip, f.container_ip) if v is not None
        ]
        for value in values:
            if not value or any(c.isspace() or c in "%\"'!#;" for c in value):
                raise KernelError(f"refusing to put {value!r} into a firewall rule")

    def _render_input(self, plan: FirewallPlan, version: int,
                      present: dict[str, list[str]] | None) -> str:
        chains = self.render(plan, version)
        not_loopback = "" if version == 4 else "! -d ::1/128 "
        out: list[str] = []
        for table, ours in self._tables.items():
            out.append(f"*{table}")
            out.extend(f":{c} - [0:0]" for c in ours)  # declaring empties it (--noflush)
            for c in ours:
                out.extend(chains[c])
            for t, chain, position, match in self._jumps():
                rule_match = match.format(not_loopback=not_loopback)
                if present is None or t != table:
                    continue
                if not _has_rule(present, table, chain, rule_match):
                    out.append(f"{position} {rule_match}")
            if present is not None:
                out.extend(self._old_layout(present, table))
            out.append("COMMIT")
        return "\n".join(out) + "\n"

    def _old_layout(self, present: dict[str, list[str]], table: str) -> list[str]:
        """Lines removing our chains from a table they no longer live in (the isolation
        chains were in filter before they moved to mangle), with the jumps into them."""
        stale = [c for c in self.names.all_chains() if self._table_of[c] != table
                 and any(r.startswith(f":{c} ") for r in present.get(table, []))]
        jumps = [r.replace("-A ", "-D ", 1) for r in present.get(table, [])
                 if r.startswith("-A ") and any(r.endswith(f"-j {c}") for c in stale)
                 and not any(r.startswith(f"-A {c} ") for c in stale)]
        return [*jumps, *(f"-F {c}" for c in stale), *(f"-X {c}" for c in stale)]

    # --- verbs ------------------------------------------------------------------------------------
    async def apply(self, plan: FirewallPlan) -> None:
        self._check_plan(plan)
        async with self._lock:
            if not plan.networks and not plan.forwards:
                if not self._absent:
                    await self._remove_all()
                return
            self._absent = False
            if any(not net.internal for net in plan.networks):
                await self._sysctl("net/ipv4/ip_forward", "1")
            # Published ports reach 127.0.0.1 too: the DNAT'd packet leaves through the bridge
            # with a loopback source, which the kernel drops unless route_localnet is on.
            for bridge in sorted({f.bridge for f in plan.forwards}):
                await self._sysctl(f"net/ipv4/conf/{bridge}/route_localnet", "1",
                                   missing_ok=True)
            if any(not net.icc for net in plan.networks):
                await self._ensure_bridge_netfilter()
            await self._apply_family(plan, 4)
            if self._has_ip6tables and (plan.needs_ipv6() or self._v6_used):
                if plan.needs_ipv6() and any(
                    not net.internal and any(s.version == 6 for s in net.subnets)
                    for net in plan.networks
                ):
                    await self._sysctl("net/ipv6/conf/all/forwarding", "1")
                await self._apply_family(plan, 6)
                self._v6_used = plan.needs_ipv6()

    async def _apply_family(self, plan: FirewallPlan, version: int) -> None:
        restore = "iptables-restore" if version == 4 else "ip6tables-restore"
        present = None if version in self._jumps_ok else await self._read(version)
        try:
            await self._exec([restore, "--noflush"], self._restore_input(plan, version, present))
        except KernelError:
            self._jumps_ok.discard(version)
            if present is not None:
                raise
            # What we knew may be stale (FORWARD flushed, Docker's chain gone): look again.
            present = await self._read(version)
            await self._exec([restore, "--noflush"], self._restore_input(plan, version, present))
        self._jumps_ok.add(version)

    async def _read(self, version: int) -> dict[str, list[str]]:
        """One family's iptables-save, parsed; notes whether Docker's isolation chain is
        there (every look at the firewall keeps that knowledge current)."""
        present = _saved_rules(
            await self._exec(["iptables-save" if version == 4 else "ip6tables-save"]))
        if any(r.startswith(f":{DOCKER_ISOLATION} ") for r in present.get(_FILTER, [])):
            self._docker_isolation.add(version)
        else:
            self._docker_isolation.discard(version)
        return present

    async def _ensure_bridge_netfilter(self) -> None:
        """icc=false needs bridged traffic to pass iptables (as Docker's bridge does)."""
        loaded = await asyncio.get_running_loop().run_in_executor(
            None, (self._sysctl_dir / "net/bridge").exists
        )
        if not loaded:
            await self._exec(["modprobe", "br_netfilter"])
        await self._sysctl("net/bridge/bridge-nf-call-iptables", "1")
        await self._sysctl("net/bridge/bridge-nf-call-ip6tables", "1")

    async def differences(self, plan: FirewallPlan) -> list[str]:
        """What ``apply(plan)`` would change, one line each; empty when in sync."""
        if not plan.networks and not plan.forwards:
            return await self._leftovers()
        out: list[str] = []
        families = [4] + ([6] if self._has_ip6tables and plan.needs_ipv6() else [])
        for version in families:
            present = await self._read(version)
            chains = self.render(plan, version)
            not_loopback = "" if version == 4 else "! -d ::1/128 "
            tag = f"IPv{version}"
            for chain, want in chains.items():
                table = self._table_of[chain]
                have = [r for r in present.get(table, []) if r.startswith(f"-A {chain} ")]
                want_norm = [_normalize(r) for r in want]
                have_norm = [_normalize(r) for r in have]
                out.extend(f"{tag} missing rule: {r}" for r in want_norm if r not in have_norm)
                out.extend(f"{tag} unexpected rule: {r}" for r in have_norm if r not in want_norm)
            for table, chain, _, match in self._jumps():
                if not _has_rule(present, table, chain, match.format(not_loopback=not_loopback)):
                    out.append(f"{tag} missing jump in {table}/{chain} to our chain")
                    self._jumps_ok.discard(version)
            for table in self._tables:
                if stale := self._old_layout(present, table):
                    out.append(f"{tag} our chains in the wrong table ({table}): "
                               + "; ".join(stale))
                    self._jumps_ok.discard(version)
        return out

    async def remove_all(self) -> None:
        """Remove every jump and chain of ours (what an empty plan does)."""
        async with self._lock:
            await self._remove_all()

    def _families(self) -> tuple[int, ...]:
        return (4, 6) if self._has_ip6tables else (4,)

    async def _ours(self, version: int) -> dict[str, tuple[list[str], list[str]]]:
        """Table -> (our jumps in built-in chains, our chains), as iptables-save lists them."""
        present = await self._read(version)
        out: dict[str, tuple[list[str], list[str]]] = {}
        for table in self._tables:
            rules = present.get(table, [])
            jumps = [r for r in rules if r.startswith("-A ") and (
                f'--comment "{self.names.comment}"' in r or f"--comment {self.names.comment}" in r)]
            chains = [c for c in self.names.all_chains() if any(
                r.startswith(f":{c} ") for r in rules)]
            out[table] = (jumps, chains)
        return out

    async def _remove_all(self) -> None:
        for version in self._families():
            lines: list[str] = []
            for table, (jumps, chains) in (await self._ours(version)).items():
                lines.append(f"*{table}")
                lines.extend(r.replace("-A ", "-D ", 1) for r in jumps)
                lines.extend(f":{c} - [0:0]" for c in chains)
                lines.extend(f"-X {c}" for c in chains)
                lines.append("COMMIT")
            restore = "iptables-restore" if version == 4 else "ip6tables-restore"
            await self._exec([restore, "--noflush"], "\n".join(lines) + "\n")
            self._jumps_ok.discard(version)
        self._v6_used = False
        self._absent = True

    async def _leftovers(self) -> list[str]:
        out: list[str] = []
        for version in self._families():
            for table, (jumps, chains) in (await self._ours(version)).items():
                out.extend(f"IPv{version} unexpected jump (no networks): {r}" for r in jumps)
                out.extend(f"IPv{version} unexpected chain {table}/{c} (no networks)"
                           for c in chains)
        if out:
            self._absent = False
        return out


def _saved_rules(saved: str) -> dict[str, list[str]]:
    """``iptables-save`` output as {table: [":CHAIN ..." and "-A ..." lines]}."""
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in saved.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
        elif current is not None and (line.startswith("-A ") or line.startswith(":")):
            current.append(line)
    return tables


def _normalize(rule: str) -> str:
    """iptables-save prints comments unquoted and some matches in its own order and forms."""
    return " ".join(rule.replace('"', "").split())


def _has_rule(present: dict[str, list[str]], table: str, chain: str, match: str) -> bool:
    want = _normalize(f"-A {chain} {match}")
    return any(_normalize(r) == want for r in present.get(table, []))
