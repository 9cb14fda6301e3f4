"""The firewall's rules as text: a plan in, ``iptables-restore`` input out. Pure.

Every input is a parameter: the plan, the address family, the instance's names, whether
Docker's isolation chain exists, and (where jumps must be checked) the parsed
``iptables-save`` of the family. ``iptables`` runs what this renders.

Where our rules sit, and why:
* ``<P>-ISOLATION`` is the first rule of the **mangle** table's FORWARD, which runs before any
  filter rule. Docker (20.10-27) inserts each new network's ACCEPT rules at the *top* of filter
  FORWARD, above anything we could place there, so only there do our drops keep their
  precedence. It only ever drops (traffic between two of our networks, from Docker's default
  bridges, leaving/entering an internal network, and *new* connections into a masqueraded
  network that are not published ports, i.e. not DNAT'd: so a Docker network of any bridge
  name, made before or after ours, gets no way in), so putting it first weakens nothing.
* ``<P>-FORWARD`` is appended to FORWARD, after Docker's DOCKER-USER, so an operator's
  DOCKER-USER policy applies to our networks as it does to Docker's. It accepts our bridges'
  traffic, which a Docker host's FORWARD policy (DROP) would otherwise drop; on Docker 20.10-27
  traffic leaving for another network first goes through Docker's own
  ``DOCKER-ISOLATION-STAGE-2`` (it drops towards every Docker bridge, whatever its name). From
  28 Docker's ``DOCKER-FORWARD`` (ahead of our jump) drops what enters its bridges unpublished,
  and 29 deletes STAGE-2 at start, which our reference would make fail: there we take none
  (``has_docker_isolation``).
* ``<P>-RAW`` (raw, from PREROUTING) hardens published ports as Engine 28 does, before
  conntrack or NAT see a packet: a packet routed straight to a publishing container's address
  from anywhere but its bridge is dropped (on a masqueraded network that protects its ports),
  and so is one for a port published on a loopback address that did not come in on ``lo``
  (our DNAT would otherwise forward a neighbour's packet for 127.0.0.1:PORT to the container).
* ``<P>-POSTROUTING`` (nat) masquerades our subnets leaving through another interface, and
  hairpins published ports; ``<P>-DNAT`` (nat, from PREROUTING and OUTPUT for local
  destinations) publishes ports.
* Gateway modes, per family (Docker's bridge options): ``routed`` has no NAT; its published
  container ports and ICMP are let through ``<P>-ISOLATION`` from anywhere, as Docker lets
  other networks reach a routed network's ports, and every other new connection in is
  dropped. ``nat-unprotected`` drops nothing inbound and accepts it in ``<P>-FORWARD``.
  ``isolated`` is internal. Trusted host interfaces reach a NAT network's published ports at
  the container's address. These exceptions come right after the same-bridge RETURNs, ahead
  of every drop.
"""

from __future__ import annotations

from ..errors import KernelError
from ..model import GatewayMode
from ..naming import Names
from . import FirewallPlan, NetworkRules, PortForward, VxlanFilter

MANGLE, FILTER, NAT, RAW = "mangle", "filter", "nat", "raw"
# Bridges Docker names for its own networks (docker0, br-<id>): kept out even where Docker runs
# without its iptables chains. Custom bridge names are covered by the conntrack rule (inbound)
# and by Docker's own rules (outbound: DOCKER-ISOLATION-STAGE-2 up to 27, DOCKER-FORWARD from 28,
# its docker-bridges nftables table on the nftables backend).
DOCKER_BRIDGES = ("docker0", "br-+")
#: Docker (20.10-27) keeps here one "-o <bridge> -j DROP" per bridge network it manages.
DOCKER_ISOLATION = "DOCKER-ISOLATION-STAGE-2"
#: Docker 28+ (iptables backend): its FORWARD rules live here; its presence marks that layout.
DOCKER_FORWARD = "DOCKER-FORWARD"

Saved = dict[str, list[str]]  # table -> its ":CHAIN ..." and "-A ..." lines


def tables(names: Names) -> dict[str, list[str]]:
    """The table each of our chains lives in."""
    return {
        MANGLE: [names.chain_isolation, names.chain_isolation2],
        FILTER: [names.chain_forward],
        NAT: [names.chain_postrouting, names.chain_dnat],
        RAW: [names.chain_raw],
    }


def jumps(names: Names, version: int) -> list[tuple[str, str, str, str]]:
    """(table, chain, position, match) for each jump into our chains."""
    n = names
    c = f'-m comment --comment "{n.comment}"'
    not_loopback = "" if version == 4 else "! -d ::1/128 "
    return [
        (MANGLE, "FORWARD", "-I FORWARD 1", f"{c} -j {n.chain_isolation}"),
        (FILTER, "FORWARD", "-A FORWARD", f"{c} -j {n.chain_forward}"),
        (NAT, "POSTROUTING", "-A POSTROUTING", f"{c} -j {n.chain_postrouting}"),
        (RAW, "PREROUTING", "-A PREROUTING", f"{c} -j {n.chain_raw}"),
        (NAT, "PREROUTING", "-A PREROUTING", f"-m addrtype --dst-type LOCAL {c} -j {n.chain_dnat}"),
        # IPv4 includes 127.0.0.0/8 (-p 127.0.0.1::80); ::1 cannot be DNAT'd out.
        (
            NAT,
            "OUTPUT",
            "-A OUTPUT",
            f"{not_loopback}-m addrtype --dst-type LOCAL {c} -j {n.chain_dnat}",
        ),
    ]


def _internal(net: NetworkRules, version: int) -> bool:
    return net.internal or net.mode(version) is GatewayMode.ISOLATED


def _drops_new_inbound(net: NetworkRules, version: int) -> bool:
    """New connections into the network must be published ports (or the exceptions)."""
    mode = net.mode(version)
    return mode is GatewayMode.ROUTED or (mode is GatewayMode.NAT and net.masquerade)


def _icmp(version: int) -> str:
    return "icmp" if version == 4 else "ipv6-icmp"


def _isolate(
    names: Names, net: NetworkRules, version: int, iso: list[str], iso2: list[str]
) -> None:
    n, b = names, net.bridge
    if _internal(net, version):
        iso.append(f"-A {n.chain_isolation} -i {b} ! -o {b} -j DROP")
        iso.append(f"-A {n.chain_isolation} ! -i {b} -o {b} -j DROP")
        return
    iso.append(f"-A {n.chain_isolation} -i {b} ! -o {b} -j {n.chain_isolation2}")
    iso2.append(f"-A {n.chain_isolation2} -o {b} -j DROP")
    if _drops_new_inbound(net, version):
        # A network without masquerading is meant to be reached; a NATed one only through its
        # published ports, a routed one only at them (the exceptions before this).
        iso.append(
            f"-A {n.chain_isolation} ! -i {b} -o {b} -m conntrack "
            "! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        )
    # Docker's own bridges (default names) are other networks too: keep them out.
    iso.extend(f"-A {n.chain_isolation} -i {d} -o {b} -j DROP" for d in DOCKER_BRIDGES)


def render(
    plan: FirewallPlan, version: int, names: Names, *, docker_isolation: bool
) -> dict[str, list[str]]:
    """The rules of each of our chains, in ``iptables-save`` syntax, for one family.

    ``docker_isolation``: Docker's isolation chain is in force in this family's filter table
    (``has_docker_isolation``).
    """
    n = names
    chains: dict[str, list[str]] = {c: [] for c in n.all_chains()}
    iso, iso2 = chains[n.chain_isolation], chains[n.chain_isolation2]
    fwd, post, dnat = chains[n.chain_forward], chains[n.chain_postrouting], chains[n.chain_dnat]
    raw = chains[n.chain_raw]
    # Gateway mode nat: published ports are the only way in, so the raw table drops what is
    # routed straight to a publishing container (routed and nat-unprotected mean reachable).
    protected = {
        net.bridge: net.trusted
        for net in plan.networks
        if net.masquerade and net.mode(version) is GatewayMode.NAT and not _internal(net, version)
    }

    def family(nets: NetworkRules) -> list[str]:
        return [str(s) for s in nets.subnets if s.version == version]

    # Traffic inside one network is never an isolation matter (and a user may name a pouch
    # bridge br-something, which the Docker-bridge rules below would otherwise catch).
    iso.extend(
        f"-A {n.chain_isolation} -i {net.bridge} -o {net.bridge} -j RETURN" for net in plan.networks
    )
    for net in plan.networks:
        b = net.bridge
        _isolate(n, net, version, iso, iso2)
        verdict = "ACCEPT" if net.icc else "DROP"
        fwd.append(f"-A {n.chain_forward} -i {b} -o {b} -j {verdict}")
        fwd.append(
            f"-A {n.chain_forward} -o {b} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        )
        if _internal(net, version):
            continue
        if docker_isolation:
            fwd.append(f"-A {n.chain_forward} -i {b} ! -o {b} -j {DOCKER_ISOLATION}")
        fwd.append(f"-A {n.chain_forward} -i {b} ! -o {b} -j ACCEPT")
        fwd.extend(_mode_accepts(n, net, version))
        if net.masquerade and net.mode(version) is not GatewayMode.ROUTED:
            source = net.snat(version)
            target = f"SNAT --to-source {source}" if source is not None else "MASQUERADE"
            for subnet in family(net):
                post.append(f"-A {n.chain_postrouting} -s {subnet} ! -o {b} -j {target}")
        if (
            version == 4
            and net.mode(4) is not GatewayMode.ROUTED
            and any(f.bridge == b for f in plan.forwards)
        ):
            # 127.0.0.1:PORT reached from the host itself: hide the loopback source.
            post.append(
                f"-A {n.chain_postrouting} -s 127.0.0.0/8 -o {b} -m addrtype "
                "--src-type LOCAL -j MASQUERADE"
            )
    if any(not _internal(net, version) for net in plan.networks):
        iso2.extend(f"-A {n.chain_isolation2} -o {d} -j DROP" for d in DOCKER_BRIDGES)
    routed = {net.bridge for net in plan.networks if net.mode(version) is GatewayMode.ROUTED}
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
            if f.host_ip is not None and not f.host_ip.is_unspecified
            else ""
        )
        target = (
            f"{f.container_ip}:{f.container_port}"
            if version == 4
            else f"[{f.container_ip}]:{f.container_port}"
        )
        # This accepts traffic entering the bridge, which no other rule of ours does for NEW
        # connections, so it goes first.
        fwd.insert(
            0,
            f"-A {n.chain_forward} -d {cip} ! -i {f.bridge} -o {f.bridge} "
            f"-p {f.proto} -m {f.proto} --dport {f.container_port} -j ACCEPT",
        )
        _harden(n, f, cip, protected=protected, routed=routed, raw=raw)
        if f.bridge in routed:
            continue  # the container port itself is published: no DNAT, no hairpin
        # No "! -i <bridge>": containers of the same network reach the published port through
        # the host's address too (Docker leaves that to docker-proxy, which the engine does not
        # run for remote drivers).
        dnat.append(
            f"-A {n.chain_dnat} {dst}-p {f.proto} -m {f.proto} "
            f"--dport {f.host_port} -j DNAT --to-destination {target}"
        )
        post.append(
            f"-A {n.chain_postrouting} -s {cip} -d {cip} "
            f"-p {f.proto} -m {f.proto} --dport {f.container_port} -j MASQUERADE"
        )
    same_network = len(plan.networks)
    iso[same_network:same_network] = _exceptions(n, plan, version)
    if plan.vxlan is not None and plan.vxlan.local.version == version:
        raw.extend(_vxlan_filter(n, plan.vxlan))
    return chains


def _vxlan_filter(n: Names, v: VxlanFilter) -> list[str]:
    """Only the cluster's hosts may send us VXLAN: the kernel would decapsulate any packet
    with a VNI it knows, from anyone, onto the bridge. The accepted ones are not tracked: the
    inner packets are tracked on the bridge, and tracking the tunnel as well cost about a tenth
    of the cross-host throughput (bench/cluster.py)."""
    bits = v.local.max_prefixlen
    match = f"-d {v.local}/{bits} -p udp -m udp --dport {v.port}"
    out = []
    for peer in v.peers:
        out.append(f"-A {n.chain_raw} -s {peer}/{bits} {match} -j CT --notrack")
        out.append(f"-A {n.chain_raw} -s {peer}/{bits} {match} -j RETURN")
    out.append(f"-A {n.chain_raw} {match} -j DROP")
    return out


def _harden(
    n: Names,
    f: PortForward,
    cip: str,
    *,
    protected: dict[str, tuple[str, ...]],
    routed: set[str],
    raw: list[str],
) -> None:
    """Engine 28's published-port hardening, in ``<P>-RAW``: a publishing container is not
    reached by routing to its address from outside its bridge (trusted host interfaces may),
    and a port published on 127.0.0.1 only from the host itself."""
    rules: list[str] = []
    if f.bridge in protected:
        rules.extend(f"-A {n.chain_raw} -d {cip} -i {t} -j RETURN" for t in protected[f.bridge])
        rules.append(f"-A {n.chain_raw} -d {cip} ! -i {f.bridge} -j DROP")
    if f.bridge not in routed and f.host_ip is not None and f.host_ip.is_loopback:
        # ::1 is refused upstream; routed networks map no host port.
        rules.append(
            f"-A {n.chain_raw} -d {f.host_ip}/{f.host_ip.max_prefixlen} ! -i lo "
            f"-p {f.proto} -m {f.proto} --dport {f.host_port} -j DROP"
        )
    raw.extend(r for r in rules if r not in raw)


def _mode_accepts(names: Names, net: NetworkRules, version: int) -> list[str]:
    """What a gateway mode lets into a (not internal) network besides published ports."""
    n, b = names, net.bridge
    mode = net.mode(version)
    if mode is GatewayMode.ROUTED:
        return [f"-A {n.chain_forward} -o {b} -p {_icmp(version)} -j ACCEPT"]
    if mode is GatewayMode.NAT_UNPROTECTED:
        return [f"-A {n.chain_forward} ! -i {b} -o {b} -j ACCEPT"]
    return []


def _exceptions(names: Names, plan: FirewallPlan, version: int) -> list[str]:
    """``<P>-ISOLATION`` RETURNs ahead of every drop: a routed network's ICMP, published
    container ports and replies, and published ports seen from trusted host interfaces."""
    n = names
    out: list[str] = []
    by_bridge: dict[str, NetworkRules] = {}
    for net in plan.networks:
        if _internal(net, version):
            continue
        b = net.bridge
        by_bridge[b] = net
        if net.mode(version) is GatewayMode.ROUTED:
            # Replies leaving for a network that would not take new connections from here.
            out.append(
                f"-A {n.chain_isolation} -i {b} -m conntrack --ctstate RELATED,ESTABLISHED "
                "-j RETURN"
            )
            out.append(f"-A {n.chain_isolation} ! -i {b} -o {b} -p {_icmp(version)} -j RETURN")
    for f in plan.forwards:
        owner = by_bridge.get(f.bridge)
        if owner is None or f.container_ip.version != version:
            continue
        if f.host_ip is not None and f.host_ip.version != version:
            continue
        b = f.bridge
        match = (
            f"-d {f.container_ip}/{f.container_ip.max_prefixlen} %s -o {b} "
            f"-p {f.proto} -m {f.proto} --dport {f.container_port} -j RETURN"
        )
        if owner.mode(version) is GatewayMode.ROUTED:
            out.append(f"-A {n.chain_isolation} " + match % f"! -i {b}")
        elif _drops_new_inbound(owner, version):
            out.extend(f"-A {n.chain_isolation} " + match % f"-i {t}" for t in owner.trusted)
    return out


def check_plan(plan: FirewallPlan) -> None:
    """Every value that becomes part of a rule is a plain token."""
    names = [n.bridge for n in plan.networks] + [f.bridge for f in plan.forwards]
    names += [t for n in plan.networks for t in n.trusted]
    values = (
        names
        + [str(s) for n in plan.networks for s in n.subnets]
        + [str(a) for n in plan.networks for a in (n.snat_v4, n.snat_v6) if a is not None]
        + [str(v) for f in plan.forwards for v in (f.host_ip, f.container_ip) if v is not None]
        + ([str(a) for a in (plan.vxlan.local, *plan.vxlan.peers)] if plan.vxlan else [])
    )
    for value in values:
        if not value or any(c.isspace() or c in "%\"'!#;" for c in value):
            raise KernelError(f"refusing to put {value!r} into a firewall rule")


def restore_input(
    plan: FirewallPlan,
    version: int,
    names: Names,
    *,
    docker_isolation: bool,
    present: Saved | None,
) -> str:
    """``iptables-restore --noflush`` input that makes our chains exactly ``plan``.

    ``present``: the parsed iptables-save, when the jumps into our chains (and chains of ours
    left in an old table) must be checked; None when they are known to be in place.
    """
    chains = render(plan, version, names, docker_isolation=docker_isolation)
    out: list[str] = []
    for table, ours in tables(names).items():
        out.append(f"*{table}")
        out.extend(f":{c} - [0:0]" for c in ours)  # declaring empties it (--noflush)
        for c in ours:
            out.extend(chains[c])
        if present is not None:
            for t, chain, position, match in jumps(names, version):
                if t == table and not has_rule(present, table, chain, match):
                    out.append(f"{position} {match}")
            out.extend(old_layout(present, table, names))
        out.append("COMMIT")
    text = "\n".join(out) + "\n"
    for line in text.splitlines():
        # Defence in depth: every value we render is validated upstream, but a rule line must
        # never smuggle a newline, NUL or a second table into iptables-restore.
        if "\x00" in line or "\r" in line:
            raise KernelError(f"refusing to load a firewall rule with control characters: {line!r}")
    return text


def old_layout(present: Saved, table: str, names: Names) -> list[str]:
    """Lines removing our chains from a table they no longer live in (the isolation chains
    were in filter before they moved to mangle), with the jumps into them."""
    table_of = {c: t for t, chains in tables(names).items() for c in chains}
    stale = [
        c
        for c in names.all_chains()
        if table_of[c] != table and any(r.startswith(f":{c} ") for r in present.get(table, []))
    ]
    jumps_in = [
        r.replace("-A ", "-D ", 1)
        for r in present.get(table, [])
        if r.startswith("-A ")
        and any(r.endswith(f"-j {c}") for c in stale)
        and not any(r.startswith(f"-A {c} ") for c in stale)
    ]
    return [*jumps_in, *(f"-F {c}" for c in stale), *(f"-X {c}" for c in stale)]


def differences(
    plan: FirewallPlan, version: int, names: Names, present: Saved, *, docker_isolation: bool
) -> list[str]:
    """What applying ``plan`` would change in one family, one line each."""
    out: list[str] = []
    tag = f"IPv{version}"
    table_of = {c: t for t, chains in tables(names).items() for c in chains}
    for chain, want in render(plan, version, names, docker_isolation=docker_isolation).items():
        have = [r for r in present.get(table_of[chain], []) if r.startswith(f"-A {chain} ")]
        want_norm = [normalize(r) for r in want]
        have_norm = [normalize(r) for r in have]
        out.extend(f"{tag} missing rule: {r}" for r in want_norm if r not in have_norm)
        out.extend(f"{tag} unexpected rule: {r}" for r in have_norm if r not in want_norm)
    for table, chain, _, match in jumps(names, version):
        if not has_rule(present, table, chain, match):
            out.append(f"{tag} missing jump in {table}/{chain} to our chain")
    for table in tables(names):
        if stale := old_layout(present, table, names):
            out.append(f"{tag} our chains in the wrong table ({table}): " + "; ".join(stale))
    return out


def ours(present: Saved, names: Names) -> dict[str, tuple[list[str], list[str]]]:
    """Table -> (our jumps in built-in chains, our chains), as iptables-save lists them."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for table in tables(names):
        lines = present.get(table, [])
        jumps_in = [
            r
            for r in lines
            if r.startswith("-A ")
            and (f'--comment "{names.comment}"' in r or f"--comment {names.comment}" in r)
        ]
        chains = [c for c in names.all_chains() if any(r.startswith(f":{c} ") for r in lines)]
        out[table] = (jumps_in, chains)
    return out


def removal_input(present: Saved, names: Names) -> str:
    """``iptables-restore --noflush`` input removing every jump and chain of ours."""
    lines: list[str] = []
    for table, (jumps_in, chains) in ours(present, names).items():
        lines.append(f"*{table}")
        lines.extend(r.replace("-A ", "-D ", 1) for r in jumps_in)
        lines.extend(f":{c} - [0:0]" for c in chains)
        lines.extend(f"-X {c}" for c in chains)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def parse_saved(saved: str) -> Saved:
    """``iptables-save`` output as {table: [":CHAIN ..." and "-A ..." lines]}."""
    out: Saved = {}
    current: list[str] | None = None
    for line in saved.splitlines():
        if line.startswith("*"):
            current = out.setdefault(line[1:], [])
        elif current is not None and (line.startswith("-A ") or line.startswith(":")):
            current.append(line)
    return out


def has_docker_isolation(present: Saved) -> bool:
    """Docker's isolation chain is the one that isolates its bridges: there, holding rules,
    and Docker not on its 28+ layout.

    On 28+ ``DOCKER-FORWARD`` already drops what enters a Docker bridge unpublished, whatever
    it comes from, and 29 (or a switch to its nftables backend) flushes STAGE-2 and deletes it
    at start: a jump of ours would make that delete fail, and the empty chain linger. 20.10-27
    always end the chain with a RETURN, so an empty one is such a leftover.
    """
    filter_ = present.get(FILTER, [])
    in_use = any(r.startswith(f"-A {DOCKER_ISOLATION} ") for r in filter_)
    return in_use and not any(r.startswith(f":{DOCKER_FORWARD} ") for r in filter_)


def normalize(rule: str) -> str:
    """iptables-save prints comments unquoted and some matches in its own order and forms."""
    return " ".join(rule.replace('"', "").split())


def has_rule(present: Saved, table: str, chain: str, match: str) -> bool:
    want = normalize(f"-A {chain} {match}")
    return any(normalize(r) == want for r in present.get(table, []))
