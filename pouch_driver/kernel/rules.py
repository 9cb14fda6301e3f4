"""The firewall's rules as text: a plan in, our chains and their rules out. Pure.

Every input is a parameter: the plan, the address family, the instance's names, whether
Docker's isolation chain exists, and (for the jumps into our chains) the parsed
``iptables-save`` of the family. ``rule_changes`` turns what this renders into
``iptables-restore`` input; ``iptables`` runs it.

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
  traffic, which a Docker host's FORWARD policy (DROP) would otherwise drop. Traffic that stays
  inside one of our bridges is also accepted at the end of DOCKER-USER itself (``fast_path``:
  one set lookup, after the operator's rules, before a trailing RETURN): Docker's own rules
  between there and our jump (four per Docker network on 20.10, ``DOCKER-FORWARD``'s on 28)
  never decide on it, but every packet would walk them all. On Docker 20.10-27
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

Each of those chains holds jumps; a network's rules live in chains of its own
(``<P>-I/F/N/D/R-<bridge>``), so that a change rewrites (``rule_changes``: or edits in
place) only what it changes, and a packet inside one bridge is decided without walking a rule
per network (``render``, ``_isolation``). The jumps into them are spread over dispatch chains
(``Names.dispatch_chain``: ``_by_interface``, ``_by_hash``), so that adding or removing a
network edits a chain of a few rules: iptables-restore reads every rule of a chain it edits
by position, and the top-level chains would otherwise hold a rule or two per network.
"""

from __future__ import annotations

import functools
import ipaddress
import zlib
from dataclasses import dataclass

from ..errors import KernelError
from ..model import GatewayMode, IPAddress, IPNetwork
from ..naming import DISPATCH_BUCKETS, PORT_BUCKETS, Names
from . import FirewallPlan, NetworkRules, PortForward, VxlanFilter
from .saved import Saved, normalize

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
#: Docker's chain for the operator's own rules, jumped to first from filter FORWARD.
DOCKER_USER = "DOCKER-USER"


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


def fast_path(names: Names, version: int, present: Saved) -> tuple[str, str] | None:
    """(position, match) of our accept of traffic inside one of our bridges (the bridged set)
    in Docker's DOCKER-USER, or None where that chain does not exist (no Docker, or its
    nftables backend). Placed last but before a trailing ``-j RETURN`` (20.10-27 end the chain
    with one), so the operator's rules, which Docker tells to insert at the top, come first."""
    filter_ = present.get(FILTER, [])
    if not any(r.startswith(f":{DOCKER_USER} ") for r in filter_):
        return None
    match = (
        f'-m comment --comment "{names.comment}" -m physdev --physdev-is-bridged '
        f"-m set --match-set {names.bridged_set(version)} src,src -j ACCEPT"
    )
    held = [r for r in filter_ if r.startswith(f"-A {DOCKER_USER} ")]
    if held and normalize(held[-1]) == f"-A {DOCKER_USER} -j RETURN":
        return f"-I {DOCKER_USER} {len(held)}", match
    return f"-A {DOCKER_USER}", match


def _internal(net: NetworkRules, version: int) -> bool:
    return net.internal or net.mode(version) is GatewayMode.ISOLATED


def _drops_new_inbound(net: NetworkRules, version: int) -> bool:
    """New connections into the network must be published ports (or the exceptions)."""
    mode = net.mode(version)
    return mode is GatewayMode.ROUTED or (mode is GatewayMode.NAT and net.masquerade)


def _icmp(version: int) -> str:
    return "icmp" if version == 4 else "ipv6-icmp"


def render(
    plan: FirewallPlan,
    version: int,
    names: Names,
    *,
    docker_isolation: bool,
    bridged_set: bool = False,
) -> dict[str, list[str]]:
    """The rules of each of our chains, in ``iptables-save`` syntax, for one family.

    Our top-level chains hold only jumps (and the few rules that are not one network's); each
    network's rules live in chains of its own (``Names.net_chain``), so a change to one network
    or its ports changes only its chains. Only non-empty per-network chains are rendered.
    ``docker_isolation``: Docker's isolation chain is in force in this family's filter table
    (``has_docker_isolation``). ``bridged_set``: the ipset ``Names.bridged_set`` holds
    ``bridged_members`` (see ``<P>-FORWARD``'s first rule).
    """
    n = names
    chains: dict[str, list[str]] = {c: [] for c in n.all_chains()}
    fwd, raw = chains[n.chain_forward], chains[n.chain_raw]
    if bridged_set and plan.networks:
        # What stays inside one bridge (br_netfilter) of a network whose containers may talk:
        # accepted by one hash lookup, as that network's first rule would accept it (the
        # dispatch below walks a rule per network). Not in the set: the same rules decide.
        fwd.append(
            f"-A {n.chain_forward} -m physdev --physdev-is-bridged "
            f"-m set --match-set {n.bridged_set(version)} src,src -j ACCEPT"
        )
    forwards = _by_bridge(plan, version)
    published = {f.bridge for f in plan.forwards}
    pieces = [
        (
            net.bridge,
            _bridge(
                n,
                net.bridge,
                net,
                tuple(forwards.get(net.bridge, ())),
                version,
                docker_isolation=docker_isolation,
                published=net.bridge in published,
            ),
        )
        for net in plan.networks
    ]
    held = {net.bridge for net in plan.networks}
    pieces += [
        (b, _bridge(n, b, None, tuple(fs), version, docker_isolation=False, published=True))
        for b, fs in forwards.items()
        if b not in held
    ]
    # The pieces' lists are shared with the memo and with the previous apply's result (which
    # ``rule_changes.restore_changes`` compares by identity first): never modified once made.
    entries: dict[str, list[tuple[str, str]]] = {k: [] for k in _JUMP_KINDS}
    for b, piece in pieces:
        chains.update(piece.chains)
        for kind, body in piece.jumps:
            entries[kind].append((b, body))
    _isolation(n, plan, version, entries, chains)
    for direction in "oi":
        fwd.extend(
            _by_interface(
                n, n.chain_forward, "F", direction, entries[direction], verb="-j", chains=chains
            )
        )
    for part in "ND":  # (nat: the first packet of a connection only)
        chains[_top(n, part)].extend(_by_hash(n, part, entries[part], chains))
    # Every packet of the host passes raw PREROUTING: there a jump per publishing network,
    # each behind its address match, costs a packet less than jumps into hashed chains would.
    raw.extend(f"-A {n.chain_raw} {body}" for _, body in entries["R"])
    if plan.vxlan is not None and plan.vxlan.local.version == version:
        raw.extend(_vxlan_filter(n, plan.vxlan))
    return chains


#: The top-level jumps a network's piece asks for: into <P>-ISOLATION by its bridge as the
#: output ("Io") and <P>-ISOLATION-2 by it as the input ("Ii"), <P>-FORWARD both ways ("o",
#: "i"), <P>-POSTROUTING ("N"), <P>-DNAT ("D") and <P>-RAW ("R").
_JUMP_KINDS = ("Io", "Ii", "o", "i", "N", "D", "R")


@dataclass(frozen=True)
class _Piece:
    """One bridge's own chains (only non-empty ones) and the jumps into them, as
    (kind, rule after ``-A CHAIN``) in ``_JUMP_KINDS``."""

    chains: tuple[tuple[str, list[str]], ...]
    jumps: tuple[tuple[str, str], ...]


@functools.lru_cache(maxsize=1 << 12)
def _bridge(
    n: Names,
    b: str,
    net: NetworkRules | None,
    forwards: tuple[PortForward, ...],
    version: int,
    *,
    docker_isolation: bool,
    published: bool,
) -> _Piece:
    """Everything of one bridge: its network's chains (``net``; None for ports on a bridge
    the plan holds no network for) and its published ports' (``forwards``, this family's),
    remembered: on a host of hundreds of networks an apply renders the one that changed and
    looks the others up. ``published``: the bridge has ports in either family."""
    chains: dict[str, list[str]] = {}
    jumps: list[tuple[str, str]] = []

    def own(part: str) -> list[str]:
        return chains.setdefault(n.net_chain(part, b), [])

    trusted: tuple[str, ...] | None = None
    routed = False
    subnets: tuple[IPNetwork, ...] = ()
    if net is not None:
        c = n.net_chain("I", b)
        jumps += [("Io", f"-o {b} -g {c}"), ("Ii", f"-i {b} -j DROP")]
        exceptions = _exceptions(c, net, version, forwards)
        chains[c] = list(_network_isolation(n, net, version, exceptions))
        forward, nat = _network_rules(n, net, version, docker_isolation, published)
        own("F").extend(forward)
        if nat:
            own("N").extend(nat)
        # Gateway mode nat: published ports are the only way in, so the raw table drops what
        # is routed straight to a publishing container (routed and nat-unprotected mean
        # reachable).
        if net.masquerade and net.mode(version) is GatewayMode.NAT and not _internal(net, version):
            trusted = net.trusted
        routed, subnets = net.mode(version) is GatewayMode.ROUTED, net.subnets
    dispatch: tuple[str, ...] = ()
    if forwards:
        placed, tails, dispatch = _publish(
            n, b, forwards, version, trusted=trusted, routed=routed, subnets=subnets
        )
        for chain, rules in placed:
            chains[chain] = list(rules)
        for part, jumps_to in tails.items():
            if jumps_to:
                own(part).extend(jumps_to)
    # A packet is matched against a network's FORWARD rules only if it enters or leaves its
    # bridge (every rule there names the bridge); NAT and raw rules match on addresses.
    for part, kinds, matches in (
        ("F", "oi", (f"-o {b} ", f"-i {b} ")),
        ("N", "N", ("",)),
        ("D", "D", ("",)),
        ("R", "R" * len(dispatch), dispatch),
    ):
        name = n.net_chain(part, b)
        if chains.get(name):
            jumps += [(k, f"{m}-j {name}") for k, m in zip(kinds, matches, strict=True)]
        else:
            chains.pop(name, None)
    return _Piece(tuple(chains.items()), tuple(jumps))


def _by_interface(
    n: Names,
    top: str,
    part: str,
    direction: str,
    rules: list[tuple[str, str]],
    *,
    verb: str,
    chains: dict[str, list[str]],
) -> list[str]:
    """The lines of the top-level chain ``top`` (its dispatch chains named after ``part``)
    for ``rules`` ((bridge, rule after ``-A CHAIN``), each
    matching ``-o``/``-i`` (``direction``) that bridge): a bridge named ``<prefix>b<c>...``
    (all but user-named ones) is reached through ``-<direction> <prefix>b<c>+ <verb>`` and the
    dispatch chain of ``c``, which holds its rules in their order; any other keeps its rules
    in the top-level chain. A packet walks the few dispatch jumps and one chain of a
    sixteenth of the networks, not a rule per network, and a network added or removed edits
    that chain (iptables-restore reads every rule of a chain it edits by position).
    ``verb`` ``-g`` keeps a goto's meaning: what the bridge's chain returns ends the caller."""
    lead = f"{n.prefix}b"
    held: dict[str, list[str]] = {}
    out: list[str] = []
    for b, body in rules:
        if b.startswith(lead) and len(b) > len(lead):
            held.setdefault(b[len(lead)], []).append(body)
        else:  # (a user's bridge name: no wildcard of ours matches it)
            out.append(f"-A {top} {body}")
    for c in sorted(held):
        bucket = n.dispatch_chain(part, f"{direction}{c}")
        chains[bucket] = [f"-A {bucket} {body}" for body in held[c]]
        out.append(f"-A {top} -{direction} {lead}{c}+ {verb} {bucket}")
    return out


def _by_hash(
    n: Names, part: str, rules: list[tuple[str, str]], chains: dict[str, list[str]]
) -> list[str]:
    """The top-level lines of ``part`` (nat) for ``rules`` ((bridge, rule after
    ``-A CHAIN``)), spread over ``DISPATCH_BUCKETS`` dispatch chains by a hash of the bridge
    name: what one network adds or removes edits one of them. Their order is free
    (``render``), and a bucket holds the rules of a bridge together, in their order."""
    top = _top(n, part)
    held: dict[int, list[str]] = {}
    for b, body in rules:
        held.setdefault(zlib.crc32(b.encode()) % DISPATCH_BUCKETS, []).append(body)
    out = []
    for k in sorted(held):
        bucket = n.dispatch_chain(part, f"h{k:x}")
        chains[bucket] = [f"-A {bucket} {body}" for body in held[k]]
        out.append(f"-A {top} -j {bucket}")
    return out


def _by_bridge(plan: FirewallPlan, version: int) -> dict[str, list[PortForward]]:
    """The plan's forwards of one family, by bridge, in the plan's order."""
    forwards: dict[str, list[PortForward]] = {}
    for f in plan.forwards:
        if f.container_ip.version != version:
            continue
        if f.host_ip is not None and f.host_ip.version != version:
            continue
        forwards.setdefault(f.bridge, []).append(f)
    return forwards


@functools.lru_cache(maxsize=1 << 12)
def _network_rules(
    n: Names, net: NetworkRules, version: int, docker_isolation: bool, published: bool
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(filter, nat) rules of one network, remembered like ``_forward_rules``: an apply on a
    host with hundreds of networks renders only the one that changed."""
    b = net.bridge
    fc, nc = n.net_chain("F", b), n.net_chain("N", b)
    verdict = "ACCEPT" if net.icc else "DROP"
    forward = [
        f"-A {fc} -i {b} -o {b} -j {verdict}",
        f"-A {fc} -o {b} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    nat: list[str] = []
    if _internal(net, version):
        return tuple(forward), ()
    if docker_isolation:
        forward.append(f"-A {fc} -i {b} ! -o {b} -j {DOCKER_ISOLATION}")
    forward.append(f"-A {fc} -i {b} ! -o {b} -j ACCEPT")
    forward.extend(_mode_accepts(n, net, version))
    if net.masquerade and net.mode(version) is not GatewayMode.ROUTED:
        source = net.snat(version)
        target = f"SNAT --to-source {source}" if source is not None else "MASQUERADE"
        nat.extend(
            f"-A {nc} -s {s} ! -o {b} -j {target}" for s in net.subnets if s.version == version
        )
    if version == 4 and net.mode(4) is not GatewayMode.ROUTED and published:
        # 127.0.0.1:PORT reached from the host itself: hide the loopback source.
        nat.append(f"-A {nc} -s 127.0.0.0/8 -o {b} -m addrtype --src-type LOCAL -j MASQUERADE")
    return tuple(forward), tuple(nat)


@functools.lru_cache(maxsize=1 << 12)
def _publish(
    n: Names,
    b: str,
    forwards: tuple[PortForward, ...],
    version: int,
    *,
    trusted: tuple[str, ...] | None,
    routed: bool,
    subnets: tuple[IPNetwork, ...],
) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], dict[str, tuple[str, ...]], tuple[str, ...]]:
    """The ACCEPT, DNAT, hairpin and raw rules of one bridge's published ports: (bucket chain
    and its rules, ...), the jumps to the buckets by the part whose network chain ends with
    them, and the matches of the jumps into ``<P>-R-<bridge>`` (``_raw_dispatch``).

    Remembered, keyed on the bridge's forwards (``PortForward`` hashes cheaply and
    ``desired.firewall_plan`` hands the same objects back while an endpoint is unchanged):
    an apply on a host with a hundred publishing networks renders only the one that changed.

    The rules go to ``Names.port_chain`` buckets (``port_bucket``; in raw ``address_bucket``,
    the rules of one address kept together and in order), jumped to from the end of the
    network's chains: a removal is an edit by position, and iptables-restore reads the rules
    of the chain it edits, so a port among a thousand costs what one among sixty does. Raw
    rules all name a container's (or a loopback) address, which the jumps into
    ``<P>-R-<bridge>`` are dispatched on. At the end of ``<P>-F-<bridge>``: every rule before
    ACCEPTs or concerns traffic leaving the bridge, and the ACCEPTs match only new traffic
    entering it (! -i b -o b), so the order changes no verdict; the bulk (inside the bridge,
    replies into it) is decided before them. DNATs never overlap (a host port is published
    once) and a hairpin matches only its own container's address, so neither's order matters.
    """
    chains: dict[str, list[str]] = {}
    seen: set[str] = set()
    for f in forwards:
        placed, raw_chain, hardening = _forward_rules(n, f, version, trusted, routed)
        for chain, rule in placed:
            chains.setdefault(chain, []).append(rule)
        if hardening:
            raw = chains.setdefault(raw_chain, [])
            for rule in hardening:
                if rule not in seen:  # two ports of one container share their address's rule
                    seen.add(rule)
                    raw.append(rule)
    tails: dict[str, tuple[str, ...]] = {}
    used: dict[str, list[str]] = {}
    for part, match in (("F", f"! -i {b} -o {b} "), ("D", ""), ("N", ""), ("R", "")):
        top = n.net_chain(part, b)
        used[part] = [c for k in range(PORT_BUCKETS) if (c := n.port_chain(part, b, k)) in chains]
        tails[part] = tuple(f"-A {top} {match}-j {name}" for name in used[part])
    raw_rules = tuple(rule for name in used["R"] for rule in chains[name])
    return (
        tuple((c, tuple(r)) for c, r in chains.items()),
        tails,
        _raw_dispatch(b, raw_rules, subnets),
    )


def port_bucket(f: PortForward) -> int:
    """The ``Names.port_chain`` bucket of a published port: the same on every apply."""
    key = f"{f.proto}/{f.host_ip}/{f.host_port}/{f.container_ip}/{f.container_port}"
    return zlib.crc32(key.encode()) % PORT_BUCKETS


def address_bucket(address: IPAddress) -> int:
    """The raw ``Names.port_chain`` bucket of a container address's rules."""
    return zlib.crc32(address.packed) % PORT_BUCKETS


@functools.lru_cache(maxsize=1 << 16)
def _forward_rules(
    n: Names, f: PortForward, version: int, trusted: tuple[str, ...] | None, routed: bool
) -> tuple[tuple[tuple[str, str], ...], str, tuple[str, ...]]:
    """((chain, rule) of its ACCEPT, DNAT and hairpin; its raw chain; its raw hardening) of
    one published port, remembered: a host with a thousand ports renders only the one that
    changed. ``trusted``: the network's trusted interfaces where its containers are protected
    (gateway mode nat), else None."""
    b = f.bridge
    fc, dc, nc = (n.port_chain(part, b, port_bucket(f)) for part in "FDN")
    rc = n.port_chain("R", b, address_bucket(f.container_ip))
    # Host addresses are written as iptables-save prints them (/32, /128), so that
    # ``rule_changes.differences`` compares like with like.
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
    accept = (
        f"-A {fc} -d {cip} ! -i {b} -o {b} "
        f"-p {f.proto} -m {f.proto} --dport {f.container_port} -j ACCEPT"
    )
    hardening = tuple(_harden(rc, f, cip, trusted=trusted, routed=routed))
    if routed:
        # The container port itself: no DNAT, no hairpin.
        return ((fc, accept),), rc, hardening
    # No "! -i <bridge>": containers of the same network reach the published port through the
    # host's address too (Docker leaves that to docker-proxy, which the engine does not run
    # for remote drivers).
    dnat = (
        f"-A {dc} {dst}-p {f.proto} -m {f.proto} "
        f"--dport {f.host_port} -j DNAT --to-destination {target}"
    )
    hairpin = (
        f"-A {nc} -s {cip} -d {cip} "
        f"-p {f.proto} -m {f.proto} --dport {f.container_port} -j MASQUERADE"
    )
    return ((fc, accept), (dc, dnat), (nc, hairpin)), rc, hardening


@functools.lru_cache(maxsize=1 << 12)
def _raw_dispatch(
    b: str, rules: tuple[str, ...], subnets: tuple[IPNetwork, ...]
) -> tuple[str, ...]:
    """The matches of the jumps into a network's raw chain: every packet of the host passes
    raw PREROUTING, so it enters a network's chain only if its destination is one that chain
    names (every rule there has ``-d ADDRESS/LEN``): for a container's address the network's
    subnet holding it, and not from the bridge itself (what could match there is ``! -i b``
    or a trusted host interface); for a loopback address of a published port, that address
    from anywhere (a neighbour's packet for 127.0.0.1 is what that rule drops)."""
    # dict: the first of each match, in the rules' order
    return tuple(dict.fromkeys(_dispatch_match(b, rule, subnets) for rule in rules))


@functools.lru_cache(maxsize=1 << 16)
def _dispatch_match(b: str, rule: str, subnets: tuple[IPNetwork, ...]) -> str:
    """One raw rule's dispatch match (``_raw_dispatch``), remembered: parsing a thousand
    addresses on every apply would make a port's cost grow with the others'."""
    words = rule.split()
    dst = ipaddress.ip_network(words[words.index("-d") + 1])
    if "lo" in words:  # ! -i lo: the loopback address of a published port
        return f"-d {dst} "
    wider = next((s for s in subnets if _within(dst, s)), dst)
    return f"-d {wider} ! -i {b} "


def _within(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.subnet_of(b)  # type: ignore[arg-type]


def _top(n: Names, part: str) -> str:
    return {
        "I": n.chain_isolation,
        "F": n.chain_forward,
        "N": n.chain_postrouting,
        "D": n.chain_dnat,
        "R": n.chain_raw,
    }[part]


def _isolation(
    n: Names,
    plan: FirewallPlan,
    version: int,
    entries: dict[str, list[tuple[str, str]]],
    chains: dict[str, list[str]],
) -> None:
    """``<P>-ISOLATION`` and ``<P>-ISOLATION-2`` (mangle), which reach each network's
    ``<P>-I-<bridge>`` (``_bridge``) through ``entries`` "Io" and "Ii".

    Every rule here is a RETURN or a DROP, and every RETURN of the old single chain came
    before every DROP: a packet is dropped if no exception matches and some drop does. So
    the top chain sends (``-g``, goto: a RETURN there ends ``<P>-ISOLATION`` as a whole) each
    packet entering one of our bridges to that bridge's chain, which holds every exception and
    every drop that can match a packet entering it: traffic inside the network, the
    exceptions of its published ports, and the drops of what comes from another of our
    networks (``<P>-ISOLATION-2`` lists our bridges), from Docker's default bridges, or new
    and not published. What leaves our bridges for anything else: an internal network's
    traffic is dropped, the others' is dropped only towards Docker's bridges. Replies leaving
    a routed network are let through first, for any destination.
    """
    iso, iso2 = chains[n.chain_isolation], chains[n.chain_isolation2]
    top = n.chain_isolation
    if plan.networks:
        # A bridged packet (br_netfilter) enters and leaves the same bridge: inside one of our
        # networks that is the first RETURN below, and no rule here matches it inside anyone
        # else's bridge. One rule, whatever the number of networks, for the bulk of the
        # traffic (ours, Docker's, everyone's) that this chain sees first.
        iso.append(f"-A {top} -m physdev --physdev-is-bridged -j RETURN")
    for net in plan.networks:
        if not _internal(net, version) and net.mode(version) is GatewayMode.ROUTED:
            # Replies leaving for a network that would not take new connections from here.
            iso.append(
                f"-A {top} -i {net.bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
            )
    # Through dispatch chains (``_by_interface``), by goto: a packet for one of our bridges
    # meets exactly one of these, and what that bridge's chain returns ends <P>-ISOLATION.
    # (One for a bridge that carries our name but is not in the plan, one being made or
    # deleted with no container on it, ends it there too, past the drops below.)
    iso.extend(_by_interface(n, top, "I", "o", entries["Io"], verb="-g", chains=chains))
    # <P>-ISOLATION-2 only drops, so its order is free.
    iso2.extend(
        _by_interface(n, n.chain_isolation2, "I", "i", entries["Ii"], verb="-g", chains=chains)
    )
    for net in plan.networks:
        if _internal(net, version):
            iso.append(f"-A {top} -i {net.bridge} -j DROP")
    if any(not _internal(net, version) for net in plan.networks):
        # Out of our networks into Docker's (default names): those drops for every network.
        iso.extend(f"-A {top} -o {d} -j {n.chain_isolation2}" for d in DOCKER_BRIDGES)


@functools.lru_cache(maxsize=1 << 12)
def _network_isolation(
    n: Names, net: NetworkRules, version: int, exceptions: tuple[str, ...]
) -> tuple[str, ...]:
    """One network's ``<P>-I-<bridge>`` (see ``_isolation``), remembered."""
    b, c = net.bridge, n.net_chain("I", net.bridge)
    rules = [f"-A {c} -i {b} -o {b} -j RETURN"]
    if _internal(net, version):
        rules.append(f"-A {c} ! -i {b} -o {b} -j DROP")
        return tuple(rules)
    rules.extend(exceptions)
    # From another of our networks (internal or not).
    rules.append(f"-A {c} ! -i {b} -o {b} -j {n.chain_isolation2}")
    if _drops_new_inbound(net, version):
        # A network without masquerading is meant to be reached; a NATed one only through
        # its published ports, a routed one only at them (the exceptions before this).
        rules.append(
            f"-A {c} ! -i {b} -o {b} -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        )
    # Docker's own bridges (default names) are other networks too: keep them out.
    rules.extend(f"-A {c} -i {d} -o {b} -j DROP" for d in DOCKER_BRIDGES)
    return tuple(rules)


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
    c: str, f: PortForward, cip: str, *, trusted: tuple[str, ...] | None, routed: bool
) -> list[str]:
    """Engine 28's published-port hardening, in ``c`` (its address's raw bucket): a
    publishing container is not reached by routing to its address from outside its bridge
    (trusted host interfaces may), and a port published on 127.0.0.1 only from the host
    itself."""
    rules: list[str] = []
    if trusted is not None:
        rules.extend(f"-A {c} -d {cip} -i {t} -j RETURN" for t in trusted)
        rules.append(f"-A {c} -d {cip} ! -i {f.bridge} -j DROP")
    if not routed and f.host_ip is not None and f.host_ip.is_loopback:
        # ::1 is refused upstream; routed networks map no host port.
        rules.append(
            f"-A {c} -d {f.host_ip}/{f.host_ip.max_prefixlen} ! -i lo "
            f"-p {f.proto} -m {f.proto} --dport {f.host_port} -j DROP"
        )
    return rules


def _mode_accepts(names: Names, net: NetworkRules, version: int) -> list[str]:
    """What a gateway mode lets into a (not internal) network besides published ports."""
    b = net.bridge
    c = names.net_chain("F", b)
    mode = net.mode(version)
    if mode is GatewayMode.ROUTED:
        return [f"-A {c} -o {b} -p {_icmp(version)} -j ACCEPT"]
    if mode is GatewayMode.NAT_UNPROTECTED:
        return [f"-A {c} ! -i {b} -o {b} -j ACCEPT"]
    return []


def _exceptions(
    chain: str, net: NetworkRules, version: int, forwards: tuple[PortForward, ...]
) -> tuple[str, ...]:
    """RETURNs ahead of every drop of a (not internal) network's ``<P>-I-<bridge>``: a routed
    network's ICMP and published container ports, and published ports seen from trusted host
    interfaces."""
    b = net.bridge
    out: list[str] = []
    routed = net.mode(version) is GatewayMode.ROUTED
    if routed:
        out.append(f"-A {chain} ! -i {b} -o {b} -p {_icmp(version)} -j RETURN")
    elif _internal(net, version) or not (net.trusted and _drops_new_inbound(net, version)):
        return ()  # no port of this network is an exception: do not walk them
    # Routed: each port from anywhere; otherwise (NAT, protected): from each trusted interface.
    sources = (f"! -i {b}",) if routed else tuple(f"-i {t}" for t in net.trusted)
    for f in forwards:
        match = (
            f"-d {f.container_ip}/{f.container_ip.max_prefixlen} %s -o {b} "
            f"-p {f.proto} -m {f.proto} --dport {f.container_port} -j RETURN"
        )
        out.extend(f"-A {chain} " + match % source for source in sources)
    return tuple(out)


def bridged_members(plan: FirewallPlan, version: int) -> frozenset[str]:
    """The entries of ``Names.bridged_set``: (subnet, bridge) of every network whose
    containers talk to each other. What the set does not hold (another source address: a
    link-local one) gets the same verdict from the network's rules, one rule per network
    later. (One entry per network with any address, in two /1 halves since /0 is refused,
    would put every entry in one hash bucket: ipset fills it at a few dozen.)"""
    return frozenset(
        f"{s},{net.bridge}"
        for net in plan.networks
        if net.icc
        for s in net.subnets
        if s.version == version
    )


def set_input(
    names: Names, version: int, members: frozenset[str], previous: frozenset[str] | None
) -> str:
    """``ipset restore`` input taking the set from ``previous`` (None: unknown, refill) to
    ``members``; empty when nothing changes."""
    name = n = names.bridged_set(version)
    family = "inet" if version == 4 else "inet6"
    out = [f"create {name} hash:net,iface family {family} -exist"]
    if previous is None:
        out.append(f"flush {n}")
        out.extend(f"add {n} {m}" for m in sorted(members))
    else:
        if previous == members:
            return ""
        out.extend(f"del {n} {m} -exist" for m in sorted(previous - members))
        out.extend(f"add {n} {m} -exist" for m in sorted(members - previous))
    return "\n".join(out) + "\n"


def check_plan(plan: FirewallPlan) -> None:
    """Every value that becomes part of a rule is a plain token."""
    for net in plan.networks:
        _check_network(net)
    for f in plan.forwards:
        _check_forward(f)
    if plan.vxlan:
        _check_values(tuple(str(a) for a in (plan.vxlan.local, *plan.vxlan.peers)))


@functools.lru_cache(maxsize=1 << 12)
def _check_network(net: NetworkRules) -> None:
    values = [net.bridge, *net.trusted, *(str(s) for s in net.subnets)]
    values += [str(a) for a in (net.snat_v4, net.snat_v6) if a is not None]
    _check_values(tuple(values))


@functools.lru_cache(maxsize=1 << 16)
def _check_forward(f: PortForward) -> None:
    """Remembered once passed (a refused value raises, and is never remembered)."""
    _check_values((f.bridge, *(str(v) for v in (f.host_ip, f.container_ip) if v is not None)))


def _check_values(values: tuple[str, ...]) -> None:
    for value in values:
        if not value or any(c.isspace() or c in "%\"'!#;" for c in value):
            raise KernelError(f"refusing to put {value!r} into a firewall rule")


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
