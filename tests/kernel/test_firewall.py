"""Firewall against real iptables in a throwaway namespace, read back with iptables-save."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import subprocess
from dataclasses import replace

import pytest

from pouch_driver.errors import KernelError
from pouch_driver.kernel import (
    FirewallPlan,
    NetworkRules,
    PortForward,
    VxlanFilter,
    rule_changes,
    saved,
)
from pouch_driver.kernel import rules as renderer
from pouch_driver.kernel.iptables import IptablesFirewall
from pouch_driver.naming import Names

from .conftest import Netns
from .packets import Lab, reaches

net = ipaddress.ip_network

NET_A = NetworkRules(
    bridge="pkbaaaaaaaaaaaa",
    subnets=(net("10.61.0.0/24"), net("fd70:61::/64")),
    icc=True,
    masquerade=True,
    internal=False,
)
NET_B = NetworkRules(
    bridge="pkbbbbbbbbbbbbb",
    subnets=(net("10.62.0.0/24"),),
    icc=False,
    masquerade=True,
    internal=True,
)
FWD = PortForward(
    bridge=NET_A.bridge,
    proto="tcp",
    host_ip=None,
    host_port=8080,
    container_ip=ipaddress.ip_address("10.61.0.2"),
    container_port=80,
)
PLAN = FirewallPlan(networks=(NET_A, NET_B), forwards=(FWD,))


def rules(save: str, table: str | None = None) -> list[str]:
    """The "-A" lines of an iptables-save, of one table or all."""
    out, current = [], None
    for line in save.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif line.startswith("-A ") and table in (None, current):
            out.append(line)
    return out


async def test_apply_twice_gives_the_same_rules(firewall: IptablesFirewall, netns: Netns) -> None:
    await firewall.apply(PLAN)
    first = rules(netns.iptables_save())
    await firewall.apply(PLAN)
    assert rules(netns.iptables_save()) == first
    assert await firewall.differences(PLAN) == []
    # One jump of each kind, never duplicated by re-applying.
    assert sum("-j PK-FORWARD" in r for r in first) == 1
    assert sum("-j PK-ISOLATION" in r and r.startswith("-A FORWARD") for r in first) == 1
    assert rules(netns.iptables_save(), "mangle")[0] == (
        "-A FORWARD -m comment --comment pk-driver -j PK-ISOLATION"
    )


async def test_rules_say_what_the_policy_says(firewall: IptablesFirewall, netns: Netns) -> None:
    await firewall.apply(PLAN)
    got = rules(netns.iptables_save())
    a, b = NET_A.bridge, NET_B.bridge
    assert got[0] == "-A FORWARD -m comment --comment pk-driver -j PK-ISOLATION"
    # Each network's rules in chains of its own, the top-level chains jump there through
    # dispatch chains, one per letter after "pkb" (the kernel takes the "+" wildcard).
    assert "-A PK-FORWARD -o pkba+ -j PK-F-=oa" in got
    assert f"-A PK-F-=oa -o {a} -j PK-F-{a}" in got
    assert "-A PK-FORWARD -i pkba+ -j PK-F-=ia" in got
    assert f"-A PK-F-=ia -i {a} -j PK-F-{a}" in got
    assert "-A PK-ISOLATION -o pkba+ -g PK-I-=oa" in got
    assert f"-A PK-I-=oa -o {a} -g PK-I-{a}" in got
    assert f"-A PK-F-{a} -i {a} -o {a} -j ACCEPT" in got
    assert f"-A PK-F-{b} -i {b} -o {b} -j DROP" in got  # icc=false
    assert f"-A PK-F-{a} -i {a} ! -o {a} -j ACCEPT" in got
    assert f"-A PK-F-{b} -i {b} ! -o {b} -j ACCEPT" not in got  # internal: no way out
    assert f"-A PK-ISOLATION -i {b} -j DROP" in got
    assert f"-A PK-I-{b} ! -i {b} -o {b} -j DROP" in got
    assert f"-A PK-I-{a} ! -i {a} -o {a} -j PK-ISOLATION-2" in got
    assert "-A PK-ISOLATION-2 -i pkbb+ -g PK-I-=ib" in got
    assert f"-A PK-I-=ib -i {b} -j DROP" in got
    assert f"-A PK-N-{a} -s 10.61.0.0/24 ! -o pkbaaaaaaaaaaaa -j MASQUERADE" in got
    assert not any("10.62.0.0/24" in r and "MASQUERADE" in r for r in got)
    # A published port's rules in bucket chains, jumped to from the network's chains.
    d = Names("pk").port_chain("D", a, renderer.port_bucket(PLAN.forwards[0]))
    assert f"-A PK-D-{a} -j {d}" in got
    assert (f"-A {d} -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.61.0.2:80") in got
    v6 = rules(netns.iptables_save(v6=True))
    assert f"-A PK-N-{a} -s fd70:61::/64 ! -o pkbaaaaaaaaaaaa -j MASQUERADE" in v6
    assert netns.sh("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"


async def test_ipv6_published_ports_go_to_ip6tables(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    v6 = ipaddress.ip_address("fd70:61::2")
    plan = FirewallPlan(
        networks=(NET_A,),
        forwards=(
            PortForward(
                bridge=NET_A.bridge,
                proto="tcp",
                host_ip=None,
                host_port=8080,
                container_ip=v6,
                container_port=80,
            ),
            PortForward(
                bridge=NET_A.bridge,
                proto="udp",
                host_ip=ipaddress.ip_address("2001:db8::5"),
                host_port=5353,
                container_ip=v6,
                container_port=53,
            ),
        ),
    )
    await firewall.apply(plan)
    got6 = rules(netns.iptables_save(v6=True))
    tcp, udp = (
        (lambda part, f=f: Names("pk").port_chain(part, NET_A.bridge, renderer.port_bucket(f)))
        for f in plan.forwards
    )
    assert (
        f"-A {tcp('D')} -p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd70:61::2]:80"
    ) in got6
    assert (
        f"-A {udp('D')} -d 2001:db8::5/128 -p udp -m udp --dport 5353 -j DNAT "
        "--to-destination [fd70:61::2]:53"
    ) in got6
    assert (
        f"-A {tcp('F')} -d fd70:61::2/128 ! -i {NET_A.bridge} -o {NET_A.bridge} "
        "-p tcp -m tcp --dport 80 -j ACCEPT"
    ) in got6
    # The host's own ::1 is never DNAT'd (the kernel would drop a loopback source anyway).
    assert any(r.startswith("-A OUTPUT ! -d ::1/128") and "PK-DNAT" in r for r in got6), got6
    assert not any("DNAT" in r and "fd70" in r for r in rules(netns.iptables_save()))
    assert await firewall.differences(plan) == []


async def test_isolation_consults_dockers_chain_once_it_exists(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    """Docker lists every bridge network it manages in DOCKER-ISOLATION-STAGE-2, whatever the
    bridge's name; traffic leaving our networks goes through it. dockerd may start after us:
    the chain appearing later is drift that ``differences`` reports and ``apply`` repairs."""
    a = NET_A.bridge
    jump = f"-A PK-F-{a} -i {a} ! -o {a} -j DOCKER-ISOLATION-STAGE-2"
    await firewall.apply(PLAN)
    assert jump not in rules(netns.iptables_save())  # no Docker here (yet)
    netns.sh("iptables", "-N", "DOCKER-ISOLATION-STAGE-2")
    netns.sh("iptables", "-A", "DOCKER-ISOLATION-STAGE-2", "-o", "mycustombr", "-j", "DROP")
    diffs = await firewall.differences(PLAN)
    assert diffs == [f"IPv4 missing rule: {jump}"], diffs
    await firewall.apply(PLAN)
    got = rules(netns.iptables_save())
    fwd = rules(netns.iptables_save(), "filter")
    # Just before the rule that lets the network's traffic out: Docker's chain drops what
    # heads for a Docker bridge and returns the rest.
    assert fwd.index(jump) + 1 == fwd.index(f"-A PK-F-{a} -i {a} ! -o {a} -j ACCEPT")
    assert await firewall.differences(PLAN) == []
    # A masqueraded network takes no new connection from outside but published ports.
    assert (
        f"-A PK-I-{a} ! -i {a} -o {a} -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
    ) in got


async def test_isolation_chains_move_out_of_filter(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    """An earlier version kept the isolation chains in filter, where Docker's later networks
    insert their ACCEPTs above them. Found there, they are reported and moved."""
    netns.sh("iptables", "-N", "PK-ISOLATION")
    netns.sh("iptables", "-N", "PK-ISOLATION-2")
    netns.sh("iptables", "-A", "PK-ISOLATION", "-i", NET_A.bridge, "-j", "PK-ISOLATION-2")
    netns.sh(
        "iptables",
        "-I",
        "FORWARD",
        "1",
        "-m",
        "comment",
        "--comment",
        "pk-driver",
        "-j",
        "PK-ISOLATION",
    )
    diffs = await firewall.differences(PLAN)
    assert any("our chains in the wrong table (filter)" in d for d in diffs), diffs
    await firewall.apply(PLAN)
    save = netns.iptables_save()
    assert not any("PK-ISOLATION" in r for r in rules(save, "filter"))
    assert ":PK-ISOLATION " not in "\n".join(
        line for line in save.split("*filter")[1].split("COMMIT")[0].splitlines()
    )
    assert await firewall.differences(PLAN) == []


async def test_the_jumps_of_the_earlier_layout_are_replaced(names: Names, netns: Netns) -> None:
    """Before the dispatch chains, the top-level chains held a jump per network. A plugin
    restarted on such a host reports them, and its first apply leaves exactly the plan."""
    a, b = NET_A.bridge, NET_B.bridge
    first = IptablesFirewall(names, netns=netns.name)
    await first.apply(PLAN)
    await first.close()
    earlier = "\n".join(
        [
            "*mangle",
            ":PK-ISOLATION - [0:0]",
            ":PK-ISOLATION-2 - [0:0]",
            "-A PK-ISOLATION -m physdev --physdev-is-bridged -j RETURN",
            f"-A PK-ISOLATION -o {a} -g PK-I-{a}",
            f"-A PK-ISOLATION -o {b} -g PK-I-{b}",
            f"-A PK-ISOLATION -i {b} -j DROP",
            f"-A PK-ISOLATION-2 -i {a} -j DROP",
            f"-A PK-ISOLATION-2 -i {b} -j DROP",
            "COMMIT",
            "*filter",
            ":PK-FORWARD - [0:0]",
            *(f"-A PK-FORWARD -{d} {x} -j PK-F-{x}" for x in (a, b) for d in "oi"),
            "COMMIT",
            "",
        ]
    )
    subprocess.run(  # noqa: ASYNC221 (a test's setup, nothing else runs)
        ["nsenter", f"--net=/run/netns/{netns.name}", "iptables-restore", "--noflush"],
        input=earlier,
        text=True,
        check=True,
    )
    for table, part in (("mangle", "I"), ("filter", "F")):
        for key in ("oa", "ob", "ia", "ib"):
            netns.sh("iptables", "-t", table, "-F", f"PK-{part}-={key}")
            netns.sh("iptables", "-t", table, "-X", f"PK-{part}-={key}")
    restarted = IptablesFirewall(names, netns=netns.name)
    try:
        diffs = await restarted.differences(PLAN)
        assert f"IPv4 unexpected rule: -A PK-FORWARD -o {a} -j PK-F-{a}" in diffs, diffs
        assert "IPv4 missing rule: -A PK-ISOLATION -o pkba+ -g PK-I-=oa" in diffs, diffs
        await restarted.apply(PLAN)
        assert await restarted.differences(PLAN) == []
        got = rules(netns.iptables_save())
        assert not any(r.startswith(f"-A PK-FORWARD -o {a} ") for r in got), got
        assert f"-A PK-I-=oa -o {a} -g PK-I-{a}" in got
    finally:
        await restarted.close()


async def test_removing_a_network_removes_exactly_its_rules(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    await firewall.apply(PLAN)
    await firewall.apply(FirewallPlan(networks=(NET_B,)))
    got = "\n".join(rules(netns.iptables_save()))
    assert NET_A.bridge not in got
    assert "8080" not in got
    assert NET_B.bridge in got


async def test_foreign_rules_and_chains_are_untouched(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    netns.sh("iptables", "-N", "DOCKER-USER")
    netns.sh("iptables", "-A", "DOCKER-USER", "-s", "10.99.0.0/16", "-j", "DROP")
    netns.sh("iptables", "-A", "FORWARD", "-j", "DOCKER-USER")
    netns.sh("iptables", "-P", "FORWARD", "DROP")
    await firewall.apply(PLAN)
    await firewall.apply(FirewallPlan(networks=(NET_B,)))
    save = netns.iptables_save()
    # Our accepts come after DOCKER-USER, so the operator's policy applies to our networks
    # too; our drops are in mangle, ahead of any filter rule (they only ever drop).
    forward = [r for r in rules(save, "filter") if r.startswith("-A FORWARD")]
    assert forward.index("-A FORWARD -j DOCKER-USER") < forward.index(
        "-A FORWARD -m comment --comment pk-driver -j PK-FORWARD"
    )
    assert not any("PK-ISOLATION" in r for r in rules(save, "filter"))
    assert rules(save, "mangle")[0] == "-A FORWARD -m comment --comment pk-driver -j PK-ISOLATION"
    await firewall.apply(FirewallPlan())  # the last network is gone: so is all of ours
    save = netns.iptables_save()
    assert "-A DOCKER-USER -s 10.99.0.0/16 -j DROP" in save
    assert "-A FORWARD -j DOCKER-USER" in save
    assert ":FORWARD DROP" in save, "we never change a policy"
    assert "PK-" not in save and "pk-driver" not in save


async def test_no_network_left_means_nothing_of_ours_left(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    """Deleting the last network (docker plugin rm needs that) leaves no chain or jump, and a
    fresh start with no networks clears what an earlier run left behind."""
    await firewall.apply(PLAN)
    # A restarted daemon (built off the loop: it looks up ip6tables on PATH).
    later = await asyncio.to_thread(IptablesFirewall, firewall.names, netns=netns.name)
    diffs = await later.differences(FirewallPlan())
    assert any("unexpected jump" in d and "PK-FORWARD" in d for d in diffs), diffs
    assert any("unexpected chain nat/PK-DNAT" in d for d in diffs), diffs
    assert any(d.startswith("IPv6 unexpected chain") for d in diffs), diffs
    await later.apply(FirewallPlan())
    for v6 in (False, True):
        save = netns.iptables_save(v6=v6)
        assert "PK-" not in save and "pk-driver" not in save
    assert await later.differences(FirewallPlan()) == []
    await later.apply(FirewallPlan())  # known empty: nothing to do, nothing breaks
    await later.apply(PLAN)  # and the first network brings everything back
    assert await later.differences(PLAN) == []


async def test_differences_report_drift_and_remove_all_cleans_up(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    await firewall.apply(PLAN)
    a = NET_A.bridge
    netns.sh("iptables", "-D", f"PK-F-{a}", "-i", a, "-o", a, "-j", "ACCEPT")
    netns.sh("iptables", "-A", "PK-FORWARD", "-j", "ACCEPT")
    diffs = await firewall.differences(PLAN)
    assert any("missing rule" in d and NET_A.bridge in d for d in diffs)
    assert any("unexpected rule: -A PK-FORWARD -j ACCEPT" in d for d in diffs)
    await firewall.apply(PLAN)
    assert await firewall.differences(PLAN) == []
    await firewall.remove_all()
    for v6 in (False, True):
        save = netns.iptables_save(v6=v6)
        assert "PK-" not in save and "pk-driver" not in save


async def test_a_flushed_forward_chain_is_noticed_and_restored(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    """Applies skip re-checking jumps once seen; ``differences`` (the sweep) looks again."""
    await firewall.apply(PLAN)
    netns.sh("iptables", "-F", "FORWARD")
    await firewall.apply(PLAN)  # the cached apply rewrites our chains only
    assert "-j PK-FORWARD" not in netns.iptables_save()
    assert any("missing jump" in d for d in await firewall.differences(PLAN))
    await firewall.apply(PLAN)
    assert "-A FORWARD -m comment --comment pk-driver -j PK-FORWARD" in netns.iptables_save()
    assert await firewall.differences(PLAN) == []


async def test_route_localnet_is_written_once_per_bridge_and_repaired(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    """127.0.0.1:PORT needs route_localnet on the bridge of a published port. It is written
    when the bridge first publishes (not on every change: a key per bridge grew with the
    host), tried again while the bridge is missing, and a reset is reported by the sweep's
    ``differences`` and put back by the next apply."""
    a = NET_A.bridge
    key = f"/proc/sys/net/ipv4/conf/{a}/route_localnet"
    await firewall.apply(PLAN)  # no bridge yet: nothing to write, nothing to report
    assert await firewall.differences(PLAN) == []
    netns.sh("ip", "link", "add", a, "type", "bridge")
    await firewall.apply(PLAN)
    assert netns.sh("cat", key).stdout.strip() == "1"
    netns.sh("sh", "-c", f"echo 0 > {key}")
    await firewall.apply(PLAN)  # known to be written: not looked at again
    assert netns.sh("cat", key).stdout.strip() == "0"
    assert await firewall.differences(PLAN) == [f"bridge {a}: route_localnet is 0, not 1"]
    await firewall.apply(PLAN)
    assert netns.sh("cat", key).stdout.strip() == "1"
    assert await firewall.differences(PLAN) == []


async def test_docker_bridges_are_other_networks_and_loopback_ports_work(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    user_named = NetworkRules(
        bridge="br-mine", subnets=(net("10.63.0.0/24"),), icc=True, masquerade=True, internal=False
    )
    await firewall.apply(FirewallPlan(networks=(NET_A, user_named), forwards=(FWD,)))
    got = rules(netns.iptables_save())
    a = NET_A.bridge
    # Inside one network: never an isolation matter, even for a bridge named br-*.
    assert got.index("-A PK-I-br-mine -i br-mine -o br-mine -j RETURN") < got.index(
        "-A PK-I-br-mine -i br-+ -o br-mine -j DROP"
    )
    assert f"-A PK-I-{a} -i docker0 -o {a} -j DROP" in got
    # Out of our networks into Docker's: the drops of PK-ISOLATION-2 (from our bridges).
    assert "-A PK-ISOLATION -o docker0 -j PK-ISOLATION-2" in got
    assert "-A PK-ISOLATION -o br-+ -j PK-ISOLATION-2" in got
    assert f"-A PK-I-=ia -i {a} -j DROP" in got
    # A bridge name of the user's is no dispatch chain's: its rules stay at the top.
    assert "-A PK-ISOLATION-2 -i br-mine -j DROP" in got
    assert "-A PK-ISOLATION -o br-mine -g PK-I-br-mine" in got
    assert "-A PK-FORWARD -i br-mine -j PK-F-br-mine" in got
    # 127.0.0.1:8080 from the host: DNAT'd (no loopback exclusion) and masqueraded.
    assert "-A OUTPUT -m addrtype --dst-type LOCAL -m comment --comment pk-driver -j PK-DNAT" in got
    assert (f"-A PK-N-{a} -s 127.0.0.0/8 -o {a} -m addrtype --src-type LOCAL -j MASQUERADE") in got
    assert (
        await firewall.differences(FirewallPlan(networks=(NET_A, user_named), forwards=(FWD,)))
        == []
    )


async def test_vxlan_from_the_cluster_hosts_only_and_untracked(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    """The cluster's VXLAN filter: the peers' packets to our VTEP skip connection tracking and
    pass, anyone else's are dropped; a changed peer list is applied exactly, and ``differences``
    reads it back without drift."""
    local, peer = ipaddress.ip_address("198.51.100.11"), ipaddress.ip_address("198.51.100.12")
    plan = FirewallPlan(networks=(NET_A,), vxlan=VxlanFilter(local, 4789, (peer,)))
    await firewall.apply(plan)
    assert await firewall.differences(plan) == []
    assert rules(netns.iptables_save(), "raw")[-3:] == [
        "-A PK-RAW -s 198.51.100.12/32 -d 198.51.100.11/32 -p udp -m udp --dport 4789 "
        "-j CT --notrack",
        "-A PK-RAW -s 198.51.100.12/32 -d 198.51.100.11/32 -p udp -m udp --dport 4789 -j RETURN",
        "-A PK-RAW -d 198.51.100.11/32 -p udp -m udp --dport 4789 -j DROP",
    ]
    alone = FirewallPlan(networks=(NET_A,), vxlan=VxlanFilter(local, 4789, ()))
    await firewall.apply(alone)
    assert await firewall.differences(alone) == []
    assert [r for r in rules(netns.iptables_save(), "raw") if "4789" in r] == [
        "-A PK-RAW -d 198.51.100.11/32 -p udp -m udp --dport 4789 -j DROP"
    ]


def _bigger(networks: int, ports: int) -> FirewallPlan:
    others = tuple(
        NetworkRules(
            bridge=f"pkb{i:012d}",
            subnets=(net(f"10.70.{i}.0/24"),),
            icc=True,
            masquerade=True,
            internal=False,
        )
        for i in range(networks)
    )
    forwards = tuple(
        replace(FWD, host_port=9000 + i, container_ip=ipaddress.ip_address(f"10.61.1.{i}"))
        for i in range(ports)
    )
    return FirewallPlan(networks=(NET_A, NET_B, *others), forwards=(FWD, *forwards))


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_changes_edited_in_place_leave_exactly_the_plan(netns: Netns, variant: str) -> None:
    """Each change loads only the chains (or the rules) it touches, with either iptables
    backend; after every step ``iptables-save`` holds exactly what the plan renders."""
    names = Names("pk")
    steps = [
        _bigger(10, 20),
        _bigger(10, 21),  # a port more
        replace(_bigger(10, 21), forwards=_bigger(10, 21).forwards[2:]),  # two fewer
        _bigger(9, 21),  # a network fewer
        _bigger(12, 5),
        _bigger(0, 0),
    ]
    previous = None
    for plan in steps:
        chains = renderer.render(plan, 4, names, docker_isolation=False)
        present = {} if previous is None else None
        text = rule_changes.restore_changes(chains, 4, names, present=present, previous=previous)
        netns.sh("sh", "-c", f'printf %s "$1" | iptables-{variant}-restore --noflush', "x", text)
        previous = chains
        held = saved.parse_saved(netns.sh(f"iptables-{variant}-save").stdout)
        diffs = rule_changes.differences(plan, 4, names, held, docker_isolation=False)
        assert [d for d in diffs if "jump" not in d] == [], diffs


async def test_traffic_inside_a_bridge_is_accepted_by_one_set_lookup(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    """Inside one bridge the verdict is the network's first rule (icc); for the networks whose
    containers talk, one ipset lookup gives it, not a rule per network. icc=false still
    drops; the set is checked by ``differences``, refilled by the repair, and goes with the
    last network."""
    if shutil.which("ipset") is None:
        pytest.skip("needs ipset: scripts/setup installs it")
    quiet = replace(NET_A, bridge="pkbdddddddddddd", subnets=(net("10.64.0.0/24"),), icc=False)
    plan = FirewallPlan(networks=(NET_A, quiet))
    await firewall.apply(plan)
    saved = netns.sh("ipset", "save", "PK-ICC4").stdout
    assert f"add PK-ICC4 10.61.0.0/24,{NET_A.bridge}" in saved
    assert quiet.bridge not in saved
    with Lab(netns) as lab:
        lab.bridge(NET_A.bridge, "10.61.0.1/24")
        lab.bridge(quiet.bridge, "10.64.0.1/24")
        a1 = lab.container(NET_A.bridge, "10.61.0.2/24", "10.61.0.1")
        a2 = lab.container(NET_A.bridge, "10.61.0.3/24", "10.61.0.1")
        q1 = lab.container(quiet.bridge, "10.64.0.2/24", "10.64.0.1")
        q2 = lab.container(quiet.bridge, "10.64.0.3/24", "10.64.0.1")
        lab.serve(a2, 80)
        lab.serve(q2, 80)
        assert reaches(a1, "10.61.0.3", 80)
        assert not reaches(q1, "10.64.0.3", 80)  # icc=false
    listed = netns.sh("iptables", "-t", "filter", "-L", "PK-FORWARD", "-v", "-x", "-n").stdout
    first = listed.splitlines()[2]
    assert "match-set PK-ICC4 src,src" in first and int(first.split()[0]) > 0, listed
    assert await firewall.differences(plan) == []
    netns.sh("ipset", "flush", "PK-ICC4")
    diffs = await firewall.differences(plan)
    assert f"IPv4 set PK-ICC4 lacks 10.61.0.0/24,{NET_A.bridge}" in diffs, diffs
    await firewall.apply(plan)
    assert await firewall.differences(plan) == []
    await firewall.apply(FirewallPlan())
    assert netns.sh("ipset", "list", "-n").stdout.strip() == ""


class _NoIpset(IptablesFirewall):
    """An ipset command whose kernel has no ip_set: every ipset call fails."""

    async def _exec(self, argv: list[str], stdin: str | None = None) -> str:
        if argv[0] == "ipset":
            raise KernelError("ipset failed: Kernel error received: Operation not supported")
        return await super()._exec(argv, stdin)


async def test_without_a_working_ipset_the_rules_go_on_without_the_set(netns: Netns) -> None:
    """The set only speeds a verdict up: an ipset that fails is dropped, never a change."""
    firewall = _NoIpset(Names("pk"), netns=netns.name)
    firewall._has_ipset = True
    await firewall.apply(PLAN)
    assert "match-set" not in netns.iptables_save()
    assert f"-A PK-F-{NET_A.bridge} -i {NET_A.bridge} -o {NET_A.bridge} -j ACCEPT" in rules(
        netns.iptables_save()
    )
    assert await firewall.differences(PLAN) == []
