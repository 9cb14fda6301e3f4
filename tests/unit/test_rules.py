"""The pure firewall renderer: gateway modes, SNAT and trusted interfaces, rule by rule.

The real iptables reads the same plans in tests/kernel/test_firewall.py.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pouch_driver.errors import KernelError
from pouch_driver.kernel import FirewallPlan, NetworkRules, PortForward
from pouch_driver.kernel import rules as renderer
from pouch_driver.kernel.rule_changes import _edit, differences, restore_changes, table_of
from pouch_driver.kernel.rules import address_bucket, check_plan, port_bucket, render
from pouch_driver.model import GatewayMode
from pouch_driver.naming import PORT_BUCKETS, Names

NAMES = Names("pk")
B = "pkbaaaaaaaaaaaa"
NET = NetworkRules(
    bridge=B,
    subnets=(ipaddress.ip_network("10.61.0.0/24"), ipaddress.ip_network("fd70:61::/64")),
    icc=True,
    masquerade=True,
    internal=False,
)
# Each network's own chains: isolation (mangle), filter, masquerading, DNAT, raw.
ISO, FWD, POST, DNAT, RAW = (NAMES.net_chain(part, B) for part in "IFNDR")
WEB4 = PortForward(B, "tcp", None, 8080, ipaddress.ip_address("10.61.0.2"), 80)
WEB6 = PortForward(B, "tcp", None, 8080, ipaddress.ip_address("fd70:61::2"), 80)


def port_chain(part: str, f: PortForward) -> str:
    """The bucket chain holding a published port's rules of one part (F, D or N)."""
    return NAMES.port_chain(part, f.bridge, port_bucket(f))


# WEB4's accept, DNAT and hairpin, each in its bucket chain.
F4, D4, N4 = (port_chain(part, WEB4) for part in "FDN")
DROP_NEW = f"-A {ISO} ! -i {B} -o {B} -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"


def rules(plan: FirewallPlan, version: int = 4) -> list[str]:
    return [
        r for chain in render(plan, version, NAMES, docker_isolation=False).values() for r in chain
    ]


def chain(plan: FirewallPlan, name: str, version: int = 4) -> list[str]:
    return render(plan, version, NAMES, docker_isolation=False)[name]


def with_mode(mode: GatewayMode, *, masquerade: bool = True) -> NetworkRules:
    return replace(NET, mode_v4=mode, masquerade=masquerade)


def test_nat_is_todays_rule_set() -> None:
    """The defaults render exactly what a network without the new options always had."""
    old = NetworkRules(B, NET.subnets, icc=True, masquerade=True, internal=False)
    assert rules(FirewallPlan((old,), (WEB4,))) == rules(
        FirewallPlan((with_mode(GatewayMode.NAT),), (WEB4,))
    )
    got = rules(FirewallPlan((old,), (WEB4,)))
    assert f"-A {POST} -s 10.61.0.0/24 ! -o pkbaaaaaaaaaaaa -j MASQUERADE" in got
    assert f"-A {D4} -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.61.0.2:80" in got
    assert f"-A {DNAT} -j {D4}" in got
    assert DROP_NEW in got
    assert not any("RETURN" in r and "--dport" in r for r in got)


def test_routed_has_no_nat_and_opens_the_published_container_port() -> None:
    plan = FirewallPlan((with_mode(GatewayMode.ROUTED),), (WEB4, WEB6))
    v4 = rules(plan)
    assert not any("MASQUERADE" in r or "DNAT --to" in r or "SNAT" in r for r in v4), v4
    iso = chain(plan, ISO)
    opened = f"-A {ISO} -d 10.61.0.2/32 ! -i {B} -o {B} -p tcp -m tcp --dport 80 -j RETURN"
    icmp = f"-A {ISO} ! -i {B} -o {B} -p icmp -j RETURN"
    replies = f"-A PK-ISOLATION -i {B} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
    # Ahead of every drop (and of the jump to the inter-network drops), after the RETURN
    # for traffic inside the network; everything else new coming in is dropped.
    assert iso[:3] == [f"-A {ISO} -i {B} -o {B} -j RETURN", icmp, opened], iso
    # Replies leaving it are let through ahead of the goto into any network's chain (after
    # the one rule that returns what stays inside one bridge).
    assert chain(plan, "PK-ISOLATION")[:3] == [
        "-A PK-ISOLATION -m physdev --physdev-is-bridged -j RETURN",
        replies,
        "-A PK-ISOLATION -o pkba+ -g PK-I-=oa",  # its dispatch chain (by the name's letter)
    ]
    assert chain(plan, "PK-I-=oa") == [f"-A PK-I-=oa -o {B} -g {ISO}"]
    assert DROP_NEW in iso
    fwd = chain(plan, FWD)
    # Last: every rule before it accepts or matches only what leaves the bridge, so the order
    # changes no verdict, and a new port is an append (iptables-restore reads a chain only to
    # edit it by position), in a bucket chain of its own.
    assert fwd[-1] == f"-A {FWD} ! -i {B} -o {B} -j {F4}", fwd
    published = f"-A {F4} -d 10.61.0.2/32 ! -i {B} -o {B} -p tcp -m tcp --dport 80 -j ACCEPT"
    assert chain(plan, F4) == [published]
    assert all(r.endswith("-j ACCEPT") or f" -i {B} " in r for r in fwd), fwd
    assert f"-A {FWD} -o {B} -p icmp -j ACCEPT" in fwd
    # IPv6 keeps its own (default) mode: NAT.
    v6 = rules(plan, 6)
    assert f"-A {POST} -s fd70:61::/64 ! -o {B} -j MASQUERADE" in v6
    d6 = port_chain("D", WEB6)
    assert f"-A {d6} -p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd70:61::2]:80" in v6
    assert not any("RETURN" in r and "--dport" in r for r in v6)


def test_routed_ipv6_uses_icmpv6() -> None:
    plan = FirewallPlan((replace(NET, mode_v6=GatewayMode.ROUTED),))
    assert f"-A {FWD} -o {B} -p ipv6-icmp -j ACCEPT" in rules(plan, 6)
    assert not any("icmp" in r for r in rules(plan, 4))


def test_routed_ignores_masquerade_off_and_still_drops_unpublished() -> None:
    plan = FirewallPlan((with_mode(GatewayMode.ROUTED, masquerade=False),), (WEB4,))
    assert DROP_NEW in rules(plan)


def test_nat_unprotected_lets_any_port_in_and_still_masquerades() -> None:
    plan = FirewallPlan((with_mode(GatewayMode.NAT_UNPROTECTED),), (WEB4,))
    got = rules(plan)
    assert DROP_NEW not in got
    assert f"-A {FWD} ! -i {B} -o {B} -j ACCEPT" in got
    assert f"-A {POST} -s 10.61.0.0/24 ! -o {B} -j MASQUERADE" in got
    assert f"-A {D4} -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.61.0.2:80" in got
    # Other networks stay out: the isolation jump is still there.
    assert f"-A {ISO} ! -i {B} -o {B} -j PK-ISOLATION-2" in got


def test_isolated_is_internal_for_its_family_only() -> None:
    plan = FirewallPlan((with_mode(GatewayMode.ISOLATED),))
    v4, v6 = rules(plan), rules(plan, 6)
    assert f"-A PK-ISOLATION -i {B} -j DROP" in v4  # out of it, to a bridge not ours
    assert f"-A {ISO} ! -i {B} -o {B} -j DROP" in v4  # into it
    assert f"-A {FWD} -i {B} ! -o {B} -j ACCEPT" not in v4
    assert not any("MASQUERADE" in r for r in v4)
    assert f"-A {FWD} -i {B} ! -o {B} -j ACCEPT" in v6


def test_host_ip_is_the_snat_source() -> None:
    net = replace(
        NET, snat_v4=ipaddress.ip_address("10.9.8.7"), snat_v6=ipaddress.ip_address("2001:db8::7")
    )
    v4, v6 = rules(FirewallPlan((net,), (WEB4,))), rules(FirewallPlan((net,)), 6)
    assert f"-A {POST} -s 10.61.0.0/24 ! -o {B} -j SNAT --to-source 10.9.8.7" in v4
    assert f"-A {POST} -s 10.61.0.0/24 ! -o {B} -j MASQUERADE" not in v4
    assert f"-A {POST} -s fd70:61::/64 ! -o {B} -j SNAT --to-source 2001:db8::7" in v6
    # The hairpin of published ports still masquerades (its source must be the bridge's).
    assert (f"-A {N4} -s 10.61.0.2/32 -d 10.61.0.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE") in v4
    # No NAT at all in routed mode, so no SNAT either; nor with masquerading off.
    routed = replace(net, mode_v4=GatewayMode.ROUTED)
    assert not any("SNAT" in r for r in rules(FirewallPlan((routed,))))
    off = replace(net, masquerade=False)
    assert not any("SNAT" in r for r in rules(FirewallPlan((off,))))


def test_trusted_interfaces_reach_published_container_ports() -> None:
    net = replace(NET, trusted=("eth1", "vxlan.1"))
    iso = chain(FirewallPlan((net,), (WEB4,)), ISO)
    for t in ("eth1", "vxlan.1"):
        rule = f"-A {ISO} -d 10.61.0.2/32 -i {t} -o {B} -p tcp -m tcp --dport 80 -j RETURN"
        assert rule in iso
        assert iso.index(rule) < iso.index(DROP_NEW)
    # Only published ports, only for them: no blanket RETURN for the interface.
    assert not any("-i eth1" in r and "--dport" not in r for r in iso)
    # Nothing to open where nothing inbound is dropped.
    off = replace(net, masquerade=False)
    assert not any("eth1" in r for r in rules(FirewallPlan((off,), (WEB4,))))


def test_a_routed_port_is_never_a_trusted_exception() -> None:
    net = replace(NET, mode_v4=GatewayMode.ROUTED, trusted=("eth1",))
    assert not any("eth1" in r for r in rules(FirewallPlan((net,), (WEB4,))))


@pytest.mark.parametrize(
    "net",
    [
        with_mode(GatewayMode.ROUTED),
        with_mode(GatewayMode.NAT_UNPROTECTED),
        replace(
            NET,
            mode_v6=GatewayMode.ROUTED,
            trusted=("eth1",),
            snat_v4=ipaddress.ip_address("10.9.8.7"),
        ),
    ],
)
def test_what_we_render_is_what_check_finds_in_sync(net: NetworkRules) -> None:
    """``differences`` against exactly the rendered rules: nothing to report."""
    plan = FirewallPlan((net,), (WEB4, WEB6))
    for version in (4, 6):
        rendered = render(plan, version, NAMES, docker_isolation=False)
        present: dict[str, list[str]] = {}
        for c, lines in rendered.items():
            present.setdefault(table_of(NAMES, c), []).extend([f":{c} - [0:0]", *lines])
        missing_jumps = [
            d
            for d in differences(plan, version, NAMES, present, docker_isolation=False)
            if "jump" not in d
        ]
        assert missing_jumps == []
        assert rendered == render(plan, version, NAMES, docker_isolation=False)


def test_trusted_names_and_snat_addresses_are_checked_before_iptables() -> None:
    bad = replace(NET, trusted=("eth1 -j ACCEPT",))
    with pytest.raises(KernelError, match="refusing to put"):
        check_plan(FirewallPlan((bad,)))


def touched_chain(line: str) -> str | None:
    """The chain a line of iptables-restore input declares or changes."""
    if line.startswith(":"):
        return line[1:].split(maxsplit=1)[0]
    if line[:3] in ("-A ", "-D ", "-I ", "-X "):
        return line.split()[1]
    return None


def apply_edits(rules: list[str], chain: str, lines: list[str]) -> list[str]:
    """What iptables does with ``-D N``, ``-I N RULE`` and ``-A RULE`` to one chain."""
    out = list(rules)
    for line in lines:
        op, _, rest = line.split(" ", 2)
        if op == "-D":
            del out[int(rest) - 1]
        elif op == "-I":
            pos, body = rest.split(" ", 1)
            assert 1 <= int(pos) <= len(out), line
            out.insert(int(pos) - 1, f"-A {chain} {body}")
        else:
            out.append(f"-A {chain} {rest}")
    return out


@given(
    st.lists(st.integers(0, 30), max_size=40),
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 30)), max_size=6),
    st.lists(st.integers(0, 40), max_size=6),
)
def test_edits_in_place_reach_exactly_the_new_chain(
    old: list[int], inserts: list[tuple[int, int]], deletes: list[int]
) -> None:
    """Positional edits from the end of the chain keep every position right."""
    before = [f"-A C -j R{i}" for i in old]
    after = list(before)
    for at in deletes:
        if after:
            del after[at % len(after)]
    for at, value in inserts:
        after.insert(at % (len(after) + 1), f"-A C -j N{value}")
    lines = _edit("C", before, after)
    if lines is not None:
        assert apply_edits(before, "C", lines) == after


def test_a_change_rewrites_only_the_chains_it_touches() -> None:
    """A published port is one network's business: the next apply declares (and so rewrites)
    only that network's chains, whatever else the host holds; no change, no input at all."""
    others = tuple(
        replace(
            NET,
            bridge=f"pkb{i:012d}",
            subnets=(ipaddress.ip_network(f"10.70.{i}.0/24"),),
        )
        for i in range(50)
    )
    before = FirewallPlan((NET, *others), (WEB4,))
    old = render(before, 4, NAMES, docker_isolation=False)

    def port(bucket_as_web4: bool) -> PortForward:
        """Another port of WEB4's container (its address's raw rules are there already)."""
        return next(
            f
            for p in range(8081, 9000)
            if (port_bucket(f := replace(WEB4, host_port=p)) == port_bucket(WEB4)) is bucket_as_web4
        )

    # A port in WEB4's bucket: its rule appended there in each part: iptables-restore reads a
    # chain's rules only to edit it by position.
    web2 = port(True)
    new = render(replace(before, forwards=(WEB4, web2)), 4, NAMES, docker_isolation=False)
    text = restore_changes(new, 4, NAMES, present=None, previous=old)
    touched = {touched_chain(line) for line in text.splitlines()} - {None}
    assert touched == {F4, N4, D4}, touched
    assert len([line for line in text.splitlines() if touched_chain(line)]) == 3, text
    assert all(line.startswith("-A ") for line in text.splitlines() if touched_chain(line))
    assert restore_changes(new, 4, NAMES, present=None, previous=new) == ""
    # In a bucket of its own: that bucket's chains are made, one jump appended to each
    # network chain that holds the buckets.
    web3 = port(False)
    new = render(replace(before, forwards=(WEB4, web3)), 4, NAMES, docker_isolation=False)
    text = restore_changes(new, 4, NAMES, present=None, previous=old)
    made = {port_chain(part, web3) for part in "FDN"}
    touched = {touched_chain(line) for line in text.splitlines()} - {None}
    assert touched == {FWD, POST, DNAT, *made}, touched
    edits = [line for line in text.splitlines() if touched_chain(line) in {FWD, POST, DNAT}]
    # (Buckets are jumped to in their order: a new one may be inserted before another.)
    assert len(edits) == 3, text
    for parent, part in ((FWD, "F"), (POST, "N"), (DNAT, "D")):
        (line,) = (e for e in edits if e.split()[1] == parent)
        assert line[:3] in ("-A ", "-I "), line
        assert line.endswith(f"-j {port_chain(part, web3)}"), line
    # A new container's port: its address's raw rule goes to that address's bucket only.
    web4 = replace(web2, container_ip=ipaddress.ip_address("10.61.0.3"))
    new = render(replace(before, forwards=(WEB4, web4)), 4, NAMES, docker_isolation=False)
    text = restore_changes(new, 4, NAMES, present=None, previous=old)
    raw_bucket = NAMES.port_chain("R", B, address_bucket(web4.container_ip))
    touched = {touched_chain(line) for line in text.splitlines()} - {None}
    assert touched & {RAW, *(NAMES.port_chain("R", B, k) for k in range(PORT_BUCKETS))} <= {
        RAW,
        raw_bucket,
    }
    assert f"-A {raw_bucket} -d 10.61.0.3/32 ! -i {B} -j DROP" in text, text
    # A network gone: its chains are deleted, the top-level chains that jumped there rewritten.
    gone = render(replace(before, networks=(NET, *others[1:])), 4, NAMES, docker_isolation=False)
    text = restore_changes(gone, 4, NAMES, present=None, previous=old)
    deleted = {line.split()[1] for line in text.splitlines() if line.startswith("-X ")}
    assert deleted == {NAMES.net_chain(p, others[0].bridge) for p in "IFN"}, deleted
    # Its jumps are deleted from the dispatch chains by position, before the chains go; the
    # top-level chains keep theirs (the other networks share the dispatch chains).
    assert "-D PK-I-=o0 " in text and "PK-DNAT" not in text, text
    assert text.index("-D PK-I-=o0 ") < text.index(f"-X {NAMES.net_chain('I', others[0].bridge)}")
    tops = ("-D PK-ISOLATION ", "-D PK-FORWARD ", "-D PK-POSTROUTING ")
    assert not any(line.startswith(tops) for line in text.splitlines()), text


def test_a_network_added_or_removed_edits_only_small_chains() -> None:
    """The top-level chains hold a jump per dispatch chain, not per network: on a host of 200
    networks (half of them publishing a port), adding or removing one edits by position only
    chains of a few rules (iptables-restore reads every rule of a chain it edits), and never
    a top-level chain whose size follows the number of networks."""

    def network(i: int) -> tuple[NetworkRules, PortForward]:
        bridge = "pkb" + hashlib.sha256(str(i).encode()).hexdigest()[:12]
        subnet = ipaddress.ip_network(f"10.{100 + i // 250}.{i % 250}.0/24")
        net = replace(NET, bridge=bridge, subnets=(subnet,))
        return net, PortForward(bridge, "tcp", None, 20000 + i, subnet[2], 80)

    host = [network(i) for i in range(200)]
    plan = FirewallPlan(
        tuple(net for net, _ in host), tuple(f for i, (_, f) in enumerate(host) if i % 2)
    )
    old = render(plan, 4, NAMES, docker_isolation=False)
    # (<P>-RAW keeps a jump per publishing network, each behind its address match: every
    # packet of the host passes it, rules/render's _tops says why.)
    tops = [top for top in NAMES.all_chains() if top != NAMES.chain_raw]
    assert max(len(old[top]) for top in tops) <= 2 * 16 + 4
    new_net, new_port = network(999)
    grown = FirewallPlan((*plan.networks, new_net), (*plan.forwards, new_port))
    new = render(grown, 4, NAMES, docker_isolation=False)
    for before, after in ((old, new), (new, old)):
        text = restore_changes(after, 4, NAMES, present=None, previous=before)
        declared = {touched_chain(line) for line in text.splitlines() if line.startswith(":")}
        edited = {
            line.split()[1] for line in text.splitlines() if line[:3] in ("-A ", "-D ", "-I ")
        } - declared
        assert edited, text
        assert max(len(before[c]) for c in edited - {NAMES.chain_raw}) <= 40, text
        # Edits and rewrites together give what the new plan renders, chain by chain.
        for c, rules_ in after.items():
            if c in declared:
                continue
            lines = [line for line in text.splitlines() if touched_chain(line) == c]
            assert apply_edits(before.get(c, []), c, lines) == rules_, c


def test_remembered_pieces_render_what_a_cold_start_does() -> None:
    """Each bridge's rules are remembered between applies (``_bridge``): along a run of
    changes (ports, gateway modes, icc, a network's removal) every render equals one made
    with nothing remembered, and an unchanged network's chains are the very same lists."""

    def cold(plan: FirewallPlan, version: int) -> dict[str, list[str]]:
        for cached in (
            renderer._bridge,
            renderer._publish,
            renderer._forward_rules,
            renderer._network_rules,
            renderer._network_isolation,
            renderer._raw_dispatch,
            renderer._dispatch_match,
        ):
            cached.cache_clear()
        return render(plan, version, NAMES, docker_isolation=False, bridged_set=True)

    others = tuple(
        replace(NET, bridge=f"pkb{i:012x}", subnets=(ipaddress.ip_network(f"10.80.{i}.0/24"),))
        for i in range(20)
    )
    web = replace(WEB4, bridge=others[3].bridge, container_ip=ipaddress.ip_address("10.80.3.2"))
    steps = [
        FirewallPlan((NET, *others), (WEB4, WEB6)),
        FirewallPlan((NET, *others), (WEB4, WEB6, web)),
        FirewallPlan((with_mode(GatewayMode.ROUTED), *others), (WEB4, WEB6, web)),
        FirewallPlan((NET, replace(others[0], icc=False), *others[1:]), (WEB4, web)),
        FirewallPlan((NET, *others[1:]), (web,)),
        FirewallPlan((NET, *others[1:]), (web, replace(web, host_port=9090))),
    ]
    # Warm first, all along the run: an unchanged network's chains stay the same lists.
    f5 = NAMES.net_chain("F", others[5].bridge)
    warm: list[dict[str, list[str]]] = []
    for plan in steps:
        for version in (4, 6):
            got = render(plan, version, NAMES, docker_isolation=False, bridged_set=True)
            again = render(plan, version, NAMES, docker_isolation=False, bridged_set=True)
            assert again == got
            assert all(again[c] is got[c] for c in got if NAMES.is_net_chain(c) and "=" not in c)
            if version == 4 and warm:
                assert warm[-2][f5] is got[f5]
            warm.append(got)
    # Then each from nothing.
    for k, plan in enumerate(steps):
        for j, version in enumerate((4, 6)):
            assert cold(plan, version) == warm[2 * k + j]
