"""Our chains beside Docker's firewall layouts (20.10-27, 28, 29 and its nftables backend),
built by hand in a throwaway namespace and read back with iptables-save and nft.

The layouts are the ones /work/shared/ENGINES.md §3 lists; only their shape matters here
(which chains exist, what jumps where), not every rule Docker writes.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess

import pytest

from pouch_driver.kernel import FirewallPlan, NetworkRules
from pouch_driver.kernel.iptables import IptablesFirewall

from .conftest import Netns
from .packets import Lab, reaches
from .test_firewall import NET_A, PLAN, rules

STAGE2 = "DOCKER-ISOLATION-STAGE-2"
JUMP = f"-A PK-F-{NET_A.bridge} -i {NET_A.bridge} ! -o {NET_A.bridge} -j {STAGE2}"

# Engine 20.10-27: isolation in STAGE-1/2, which always end with a RETURN.
LAYOUT_27 = f"""*filter
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:{STAGE2} - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j {STAGE2}
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A {STAGE2} -o docker0 -j DROP
-A {STAGE2} -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
"""

# Engine 28.0.1+: everything behind DOCKER-FORWARD; STAGE-1/2 still there, reached from it.
LAYOUT_28 = f"""*filter
:DOCKER - [0:0]
:DOCKER-BRIDGE - [0:0]
:DOCKER-CT - [0:0]
:DOCKER-FORWARD - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:{STAGE2} - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-FORWARD
-A DOCKER ! -i docker0 -o docker0 -j DROP
-A DOCKER-BRIDGE -o docker0 -j DOCKER
-A DOCKER-CT -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A DOCKER-FORWARD -j DOCKER-CT
-A DOCKER-FORWARD -j DOCKER-ISOLATION-STAGE-1
-A DOCKER-FORWARD -j DOCKER-BRIDGE
-A DOCKER-FORWARD -i docker0 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j {STAGE2}
-A {STAGE2} -o docker0 -j DROP
COMMIT
"""


def restore(netns: Netns, text: str) -> None:
    subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns.name}", "iptables-restore", "--noflush"],
        input=text,
        text=True,
        check=True,
        capture_output=True,
        timeout=30,
    )


def engine_29_start(netns: Netns) -> subprocess.CompletedProcess[str]:
    """What Engine 29 does with the chains it dropped: unhook, flush, delete (its delete of
    STAGE-2 is the step a reference of ours would make fail)."""
    netns.sh("iptables", "-D", "DOCKER-FORWARD", "-j", "DOCKER-ISOLATION-STAGE-1", check=False)
    netns.sh("iptables", "-F", "DOCKER-ISOLATION-STAGE-1")
    netns.sh("iptables", "-F", STAGE2)
    netns.sh("iptables", "-X", "DOCKER-ISOLATION-STAGE-1")
    return netns.sh("iptables", "-X", STAGE2, check=False)


async def test_on_the_28_layout_we_take_no_reference_to_dockers_chains(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    """Docker 28's DOCKER-FORWARD (ahead of our jump) already keeps our traffic out of its
    bridges, so nothing of ours points at its chains, and Engine 29's start-up can delete
    STAGE-2 (``iptables -X`` refuses a chain something jumps to)."""
    restore(netns, LAYOUT_28)
    await firewall.apply(PLAN)
    ours = [r for r in rules(netns.iptables_save()) if "PK-" in r]
    assert ours and not any("-j DOCKER" in r for r in ours), ours
    assert await firewall.differences(PLAN) == []
    gone = engine_29_start(netns)
    assert gone.returncode == 0, gone.stderr
    assert f":{STAGE2} " not in netns.iptables_save()
    await firewall.apply(PLAN)
    assert await firewall.differences(PLAN) == []


async def test_a_docker_upgraded_under_us_from_27_to_29_gets_its_chain_back(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    """With Engine 27 the jump to STAGE-2 is there. Docker restarts as 29 while our networks
    live: its delete of STAGE-2 fails on our jump (only a warning to Docker) and leaves the
    chain empty. The next look (the sweep's ``differences``) reports our jump, the repair
    drops it, and Docker's next start deletes its chain."""
    restore(netns, LAYOUT_27)
    await firewall.apply(PLAN)
    assert JUMP in rules(netns.iptables_save())
    assert await firewall.differences(PLAN) == []
    # Docker 29 starts: the 28+ layout, then its attempt at removing STAGE-1/2.
    netns.sh("iptables", "-D", "FORWARD", "-j", "DOCKER-ISOLATION-STAGE-1")
    netns.sh("iptables", "-N", "DOCKER-FORWARD")
    netns.sh("iptables", "-I", "FORWARD", "2", "-j", "DOCKER-FORWARD")
    assert engine_29_start(netns).returncode != 0  # our reference holds it
    diffs = await firewall.differences(PLAN)
    assert diffs == [f"IPv4 unexpected rule: {JUMP}"], diffs
    await firewall.apply(PLAN)  # what the sweep does with a difference
    assert JUMP not in rules(netns.iptables_save())
    assert await firewall.differences(PLAN) == []
    assert netns.sh("iptables", "-X", STAGE2, check=False).returncode == 0


async def test_docker_27_to_28_while_we_run_drops_the_jump_at_the_next_repair(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    """A 28 engine still has STAGE-2 with rules in it; DOCKER-FORWARD appearing is what
    tells us it is not the isolation in force any more."""
    restore(netns, LAYOUT_27)
    await firewall.apply(PLAN)
    assert JUMP in rules(netns.iptables_save())
    netns.sh("iptables", "-N", "DOCKER-FORWARD")
    netns.sh("iptables", "-I", "FORWARD", "2", "-j", "DOCKER-FORWARD")
    assert await firewall.differences(PLAN) == [f"IPv4 unexpected rule: {JUMP}"]
    await firewall.apply(PLAN)
    assert JUMP not in rules(netns.iptables_save())
    assert await firewall.differences(PLAN) == []
    # And back (a downgrade, or a 28 engine replaced by 27): the jump returns.
    netns.sh("iptables", "-D", "FORWARD", "-j", "DOCKER-FORWARD")
    netns.sh("iptables", "-X", "DOCKER-FORWARD")
    assert await firewall.differences(PLAN) == [f"IPv4 missing rule: {JUMP}"]
    await firewall.apply(PLAN)
    assert JUMP in rules(netns.iptables_save())


FAST = (
    "-A DOCKER-USER -m comment --comment pk-driver -m physdev --physdev-is-bridged "
    "-m set --match-set PK-ICC4 src,src -j ACCEPT"
)


def counters(netns: Netns, chain: str) -> list[tuple[int, str]]:
    """(packets, rule) for each rule of a filter chain."""
    listed = netns.sh("iptables", "-L", chain, "-v", "-x", "-n").stdout.splitlines()[2:]
    return [(int(line.split()[0]), line) for line in listed]


@pytest.mark.parametrize("layout", [LAYOUT_27, LAYOUT_28], ids=["20.10-27", "28"])
async def test_traffic_inside_our_bridges_is_accepted_at_the_end_of_docker_user(
    firewall: IptablesFirewall, netns: Netns, layout: str
) -> None:
    """Docker's per-network rules between DOCKER-USER and our jump never decide on traffic
    inside one of our bridges, but every such packet walked them all (four per Docker
    network on 20.10, DOCKER-FORWARD's on 28: forwarded throughput fell with the number of
    Docker networks). One set lookup at the end of DOCKER-USER, after the operator's rules
    and before 20.10's trailing RETURN, accepts it there; Docker's chains and ours are never
    reached. The sweep notices it gone; it goes with the last network."""
    if shutil.which("ipset") is None:
        pytest.skip("needs ipset: scripts/setup installs it")
    restore(netns, layout)
    netns.sh("iptables", "-I", "DOCKER-USER", "-s", "10.99.0.0/16", "-j", "DROP")
    await firewall.apply(PLAN)
    user = [r for r in rules(netns.iptables_save()) if r.startswith("-A DOCKER-USER ")]
    want = ["-A DOCKER-USER -s 10.99.0.0/16 -j DROP", FAST]
    assert user == ([*want, "-A DOCKER-USER -j RETURN"] if layout is LAYOUT_27 else want)
    assert await firewall.differences(PLAN) == []
    with Lab(netns) as lab:
        lab.bridge(NET_A.bridge, "10.61.0.1/24")
        a1 = lab.container(NET_A.bridge, "10.61.0.2/24", "10.61.0.1")
        a2 = lab.container(NET_A.bridge, "10.61.0.3/24", "10.61.0.1")
        lab.serve(a2, 80)
        assert reaches(a1, "10.61.0.3", 80)
    counted = counters(netns, "DOCKER-USER")
    assert counted[1][0] > 0 and "PK-ICC4" in counted[1][1], counted
    later = counters(netns, "PK-FORWARD")
    assert all(packets == 0 for packets, _ in later), later
    # An operator flushing DOCKER-USER (or a firewall manager): the next look reports it.
    netns.sh("iptables", "-F", "DOCKER-USER")
    diffs = await firewall.differences(PLAN)
    assert diffs == [
        "IPv4 missing accept of traffic inside our bridges in filter/DOCKER-USER",
        # The lab made the bridge after the apply: its published port lacks this too.
        f"bridge {NET_A.bridge}: route_localnet is 0, not 1",
    ]
    await firewall.apply(PLAN)
    assert FAST in rules(netns.iptables_save())
    await firewall.apply(FirewallPlan())
    save = netns.iptables_save()
    assert "pk-driver" not in save and ":DOCKER-USER - [0:0]" in save


async def test_without_docker_user_there_is_no_fast_path_and_nothing_missing(
    firewall: IptablesFirewall, netns: Netns
) -> None:
    """No Docker (or its nftables backend): our jump from FORWARD decides as before."""
    await firewall.apply(PLAN)
    assert not any("DOCKER-USER" in r for r in rules(netns.iptables_save()))
    assert await firewall.differences(PLAN) == []


# Engine 29 with --firewall-backend=nftables: its own tables, no iptables chain; each base
# chain accepts by policy and drops only what enters a Docker bridge unpublished.
DOCKER_NFT = """
table {family} docker-bridges {{
    chain filter-forward-in__docker0 {{
        ct state established,related counter accept
        iifname "docker0" counter accept comment "ICC"
        counter drop comment "UNPUBLISHED PORT DROP"
    }}
    chain filter-forward-out__docker0 {{
        ct state established,related counter accept
        counter accept comment "OUTGOING"
    }}
    chain filter-FORWARD {{
        type filter hook forward priority filter; policy accept;
        counter
        oifname vmap {{ "docker0" : jump filter-forward-in__docker0 }}
        iifname vmap {{ "docker0" : jump filter-forward-out__docker0 }}
    }}
    chain raw-PREROUTING {{
        type filter hook prerouting priority raw; policy accept;
    }}
}}
"""

NET_C = NetworkRules(
    bridge="pkbcccccccccccc",
    subnets=(ipaddress.ip_network("10.63.0.0/24"),),
    icc=True,
    masquerade=True,
    internal=False,
)


def nft(netns: Netns, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns.name}", "nft", *args],
        input=stdin,
        text=True,
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout


def engine_29_nftables_start(netns: Netns) -> None:
    """Engine 27 (iptables) restarted as 29 with the nftables backend: its tables appear,
    and its iptables chains go, except STAGE-2, which our jump holds (flushed, left behind)."""
    for family in ("ip", "ip6"):
        nft(netns, "-f", "-", stdin=DOCKER_NFT.format(family=family))
    for rule in (
        ["-j", "DOCKER-ISOLATION-STAGE-1"],
        ["-o", "docker0", "-j", "DOCKER"],
        ["-i", "docker0", "!", "-o", "docker0", "-j", "ACCEPT"],
    ):
        netns.sh("iptables", "-D", "FORWARD", *rule)
    for chain in ("DOCKER", "DOCKER-ISOLATION-STAGE-1", STAGE2):
        netns.sh("iptables", "-F", chain)
    for chain in ("DOCKER", "DOCKER-ISOLATION-STAGE-1"):
        netns.sh("iptables", "-X", chain)
    assert netns.sh("iptables", "-X", STAGE2, check=False).returncode != 0


async def test_beside_dockers_nftables_backend(firewall: IptablesFirewall, netns: Netns) -> None:
    """Docker's nftables tables and our iptables(-nft) chains are separate base chains on the
    same hooks: a packet must pass both, and Docker's accept by policy. Our rules install,
    stay exact and idempotent, and isolate our networks as before; the STAGE-2 chain left from
    Docker's iptables days is not treated as isolation (it is empty), so our jump goes and
    Docker's next start can delete it."""
    if shutil.which("nft") is None:
        pytest.skip("needs nft: scripts/setup --test installs nftables")
    plan = FirewallPlan(networks=(NET_A, NET_C))
    restore(netns, LAYOUT_27)
    await firewall.apply(plan)
    assert JUMP in rules(netns.iptables_save())
    engine_29_nftables_start(netns)
    diffs = await firewall.differences(plan)
    assert f"IPv4 unexpected rule: {JUMP}" in diffs, diffs
    await firewall.apply(plan)
    first = netns.iptables_save()
    assert not any("-j DOCKER" in r for r in rules(first) if "PK-" in r)
    assert netns.sh("iptables", "-X", STAGE2, check=False).returncode == 0
    await firewall.apply(plan)
    assert rules(netns.iptables_save()) == rules(first)
    assert await firewall.differences(plan) == []
    assert "docker-bridges" in nft(netns, "list", "tables")  # untouched by us
    with Lab(netns) as lab:
        lab.bridge(NET_A.bridge, "10.61.0.1/24")
        lab.bridge(NET_C.bridge, "10.63.0.1/24")
        a1 = lab.container(NET_A.bridge, "10.61.0.2/24", "10.61.0.1")
        a2 = lab.container(NET_A.bridge, "10.61.0.3/24", "10.61.0.1")
        c1 = lab.container(NET_C.bridge, "10.63.0.2/24", "10.63.0.1")
        lab.serve(a2, 80)
        lab.serve(c1, 80)
        assert reaches(a1, "10.61.0.3", 80)  # one network: allowed
        assert not reaches(a1, "10.63.0.2", 80)  # two of ours: isolated both ways
        assert not reaches(c1, "10.61.0.3", 80)
        # Docker's own bridge, its nftables rules in force: neither side gets into the other,
        # while both still get out to a LAN host (the control: the way is open otherwise).
        lab.bridge("docker0", "172.17.0.1/16")
        d1 = lab.container("docker0", "172.17.0.2/16", "172.17.0.1")
        lan = lab.neighbour("10.99.0.1/24", "10.99.0.2/24")
        for ns in (d1, lan):
            lab.serve(ns, 80)
        assert reaches(a1, "10.99.0.2", 80) and reaches(d1, "10.99.0.2", 80)
        assert not reaches(a1, "172.17.0.2", 80)  # (Docker's nftables and ours drop it)
        assert not reaches(d1, "10.61.0.3", 80)
    # The packets went through Docker's base chain too (its counter moved).
    forward = nft(netns, "list", "chain", "ip", "docker-bridges", "filter-FORWARD")
    counted = re.search(r"counter packets (\d+)", forward)
    assert counted and int(counted.group(1)) > 0, forward
