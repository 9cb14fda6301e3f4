"""Faults: a host crashes, etcd loses a member or all of them, a plugin restarts.

The plugins run with ``--cluster-lease-ttl 3``. What a host's kernel forwards to another host
is read with ``bridge -json fdb`` / ``ip -json neigh`` (harness ``entries_towards``).
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter

import pytest

from tests.e2e.harness import SLEEPER, wait_until

from .conftest import Pair
from .harness import (
    HTTPD,
    LEASE_TTL,
    PAGE,
    containers_on,
    wait_announced,
    wait_withdrawn,
)

#: How long after its lease's TTL a dead host's entries may linger elsewhere: the watch
#: event, a reconciliation pass, and a loaded 2-core machine.
WITHDRAW_SLACK = 12.0


def _mac(mh: Pair, scope_is_a: bool, container: str, network: str) -> str:
    h = mh.ha if scope_is_a else mh.hb
    return str(containers_on(h, network)[container][2])


@pytest.mark.timeout(240)
def test_crashed_host_is_withdrawn_after_its_lease_then_rejoins(mh: Pair) -> None:
    """kill -9 of host b's plugin, dockerd and containerd: host a keeps b's entries while
    b's lease lives, withdraws them once it expires, and nothing of b's old container comes
    back when b restarts; b's new container then talks to a's both ways."""
    net = mh.mesh("crash", "10.71.0.0/16")
    a1 = mh.a.run_container(net, "a1")
    b1 = mh.b.run_container(net, "b1")
    ip_a1, ip_b1 = mh.a.container_ip(a1, net), mh.b.container_ip(b1, net)
    mac_b1 = _mac(mh, False, b1, net)
    wait_announced(mh.ha, mh.hb, [ip_b1])
    wait_announced(mh.hb, mh.ha, [ip_a1])
    mh.a.assert_ping(a1, ip_b1)
    a_veths = mh.ha.host_veths()

    mh.hb.crash()
    t0 = time.monotonic()
    macs, addrs = mh.ha.entries_towards(mh.hb)
    assert ip_b1 in addrs and mac_b1 in macs, "withdrawn before b's lease could expire"
    wait_withdrawn(mh.ha, mh.hb, timeout=LEASE_TTL + WITHDRAW_SLACK)
    took = time.monotonic() - t0
    print(f"host b's entries withdrawn from host a {took:.2f}s after the crash")
    # Host a itself is untouched: its container's link is there, its vxlan device too.
    assert mh.ha.host_veths() == a_veths
    assert mh.ha.vxlan_of(net)

    mh.hb.revive()
    b2 = mh.b.run_container(net, "b2")
    ip_b2 = mh.b.container_ip(b2, net)
    mac_b2 = _mac(mh, False, b2, net)
    wait_announced(mh.ha, mh.hb, [ip_b2])
    wait_announced(mh.hb, mh.ha, [ip_a1])
    mh.a.assert_ping(a1, ip_b2)
    mh.b.assert_ping(b2, ip_a1)

    # Nothing leaks: a forwards to b exactly b's live container; b keeps one veth (b2's),
    # the dead b1's endpoint is gone from b's kernel once its dockerd cleaned it up.
    def settled() -> bool:
        macs, addrs = mh.ha.entries_towards(mh.hb)
        return macs == {mac_b2} and addrs == {ip_b2} and len(mh.hb.host_veths()) == 1

    try:
        wait_until(settled, timeout=LEASE_TTL + WITHDRAW_SLACK, message="settled")
    except AssertionError:
        raise AssertionError(
            f"after b's restart: a forwards {mh.ha.entries_towards(mh.hb)} to b "
            f"(want {{{mac_b2}}}, {{{ip_b2}}}); b's veths {mh.hb.host_veths()}"
        ) from None
    # b1 died with b's dockerd, which took it off the network when it came back (its
    # address may well be b2's now: it was free again).
    assert b1 not in containers_on(mh.hb, net)


@pytest.mark.timeout(180)
def test_one_etcd_member_down_the_cluster_keeps_working(mh: Pair) -> None:
    """With the etcd leader killed, containers (and a new cluster network) are still
    created on both hosts and talk across."""
    net = mh.mesh("quorum", "10.72.0.0/16")
    a1 = mh.a.run_container(net, "a1", *HTTPD)
    etcd = mh.hosts.etcd
    leader = etcd.leader()
    etcd.kill(leader)
    print(f"killed etcd member {leader} (the leader)")

    b1 = mh.b.run_container(net, "b1", *HTTPD)
    a2 = mh.a.run_container(net, "a2")
    ips = {c: s.container_ip(c, net) for s, c in ((mh.a, a1), (mh.b, b1), (mh.a, a2))}
    assert len(set(ips.values())) == 3, ips
    wait_announced(mh.ha, mh.hb, [ips[b1]])
    wait_announced(mh.hb, mh.ha, [ips[a1], ips[a2]])
    mh.a.assert_ping(a2, ips[b1])
    mh.b.assert_ping(b1, ips[a2])
    assert PAGE in mh.b.http_get(b1, f"http://{ips[a1]}/").stdout
    assert PAGE in mh.a.http_get(a1, f"http://{ips[b1]}/").stdout

    net2 = mh.mesh("quorum2", "10.73.0.0/16")
    c_a = mh.a.run_container(net2, "qa")
    c_b = mh.b.run_container(net2, "qb")
    mh.a.assert_ping(c_a, mh.b.container_ip(c_b, net2))


@pytest.mark.timeout(300)
def test_etcd_down_old_traffic_flows_new_endpoints_fail_clearly_then_recover(mh: Pair) -> None:
    """All etcd members killed: traffic between existing containers keeps flowing past the
    lease TTL; a new container on the cluster network fails with an error naming the cluster
    store; a local network still works. After etcd restarts, new containers work again, and
    no address or entry is duplicated."""
    net = mh.mesh("dark", "10.74.0.0/16")
    a1 = mh.a.run_container(net, "a1", *HTTPD)
    b1 = mh.b.run_container(net, "b1", *HTTPD)
    ip_a1, ip_b1 = mh.a.container_ip(a1, net), mh.b.container_ip(b1, net)
    wait_announced(mh.ha, mh.hb, [ip_b1])
    wait_announced(mh.hb, mh.ha, [ip_a1])

    mh.hosts.etcd.kill_all()
    mh.a.assert_ping(a1, ip_b1)
    time.sleep(LEASE_TTL + 2)  # every lease would have expired by now
    mh.a.assert_ping(a1, ip_b1)
    mh.b.assert_ping(b1, ip_a1)
    assert PAGE in mh.a.http_get(a1, f"http://{ip_b1}/").stdout
    assert ip_b1 in mh.ha.entries_towards(mh.hb)[1]

    name = mh.a.name("lost")
    mh.a.containers.append(name)
    r = mh.a.docker(
        "run", "-d", "--name", name, "--network", net, mh.a.engine.image, *SLEEPER,
        check=False, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0, "a container joined a cluster network with no etcd"
    assert "cluster store etcd" in r.stderr, r.stderr

    loc = mh.a.create_network("loc", subnet="10.57.5.0/24")
    l1 = mh.a.run_container(loc, "l1")
    l2 = mh.a.run_container(loc, "l2")
    mh.a.assert_ping(l1, mh.a.container_ip(l2, loc))
    mh.a.assert_ping(a1, ip_b1)  # still, after all that

    mh.hosts.etcd.heal()
    attempt = 0

    def new_container_works() -> str | None:
        nonlocal attempt
        attempt += 1
        n = mh.a.name(f"back{attempt}")
        mh.a.containers.append(n)
        r = mh.a.docker(
            "run", "-d", "--name", n, "--network", net, mh.a.engine.image, *SLEEPER,
            check=False, timeout=120,
        )  # fmt: skip
        if r.returncode == 0:
            return n
        mh.a.remove_container(n, check=False)
        return None

    a2 = wait_until(new_container_works, timeout=30, interval=1, message="a container again")
    assert a2 is not None
    b2 = mh.b.run_container(net, "b2")
    ip_a2, ip_b2 = mh.a.container_ip(a2, net), mh.b.container_ip(b2, net)
    wait_announced(mh.ha, mh.hb, [ip_b1, ip_b2])
    wait_announced(mh.hb, mh.ha, [ip_a1, ip_a2])
    mh.a.assert_ping(a2, ip_b2)
    mh.b.assert_ping(b2, ip_a2)
    mh.a.assert_ping(a1, ip_b2)
    mh.b.assert_ping(b1, ip_a2)

    seen = [containers_on(h, net) for h in mh.hosts.hosts]
    v4 = [addr for s in seen for addr, _v6, _mac in s.values()]
    assert len(v4) == 4 and len(set(v4)) == 4, seen
    for seer, owner, want in ((mh.ha, mh.hb, {ip_b1, ip_b2}), (mh.hb, mh.ha, {ip_a1, ip_a2})):
        neighbours = [addr for _br, addr, _mac in seer.remote_neighbours()]
        assert not {a: n for a, n in Counter(neighbours).items() if n > 1}, neighbours
        assert seer.entries_towards(owner)[1] == want, (seer, seer.entries_towards(owner))


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "kill9"])
@pytest.mark.timeout(180)
def test_plugin_restart_rebuilds_the_kernel_entries(mh: Pair, kill: bool) -> None:
    """Host a's plugin restarts (SIGTERM or kill -9; same dockerd) after its kernel lost
    every entry towards host b: the entries come back from etcd, and traffic flows both ways,
    also for a container created after the restart."""
    net = mh.mesh("rs", "10.75.0.0/16", subnet6="fd61:75::/64")
    a1 = mh.a.run_container(net, "a1")
    b1 = mh.b.run_container(net, "b1")
    ip_a1, ip_b1 = mh.a.container_ip(a1, net), mh.b.container_ip(b1, net)
    b1_v6 = str(ipaddress.ip_address(containers_on(mh.hb, net)[b1][1]))
    wait_announced(mh.ha, mh.hb, [ip_b1, b1_v6])
    wait_announced(mh.hb, mh.ha, [ip_a1])
    before = mh.ha.entries_towards(mh.hb)

    if kill:
        mh.ha.plugin.kill()
    else:
        mh.ha.plugin.stop()
    mh.ha.forget_remote()
    assert not mh.ha.remote_fdb() and not mh.ha.remote_neighbours()
    mh.ha.plugin.start()

    wait_announced(mh.ha, mh.hb, [ip_b1, b1_v6])
    if kill:
        # The dead instance's lease runs out now; whatever b does about it must settle.
        time.sleep(LEASE_TTL + 1)
    wait_announced(mh.hb, mh.ha, [ip_a1])
    assert mh.ha.entries_towards(mh.hb) == before
    mh.a.assert_ping(a1, ip_b1)
    mh.b.assert_ping(b1, ip_a1)
    mh.a.assert_ping(a1, b1_v6)

    a2 = mh.a.run_container(net, "a2")
    ip_a2 = mh.a.container_ip(a2, net)
    wait_announced(mh.hb, mh.ha, [ip_a2])
    mh.b.assert_ping(b1, ip_a2)


@pytest.mark.timeout(180)
def test_plugin_restart_while_etcd_is_down_keeps_existing_traffic(mh: Pair) -> None:
    """etcd gone, then host a's plugin restarted: it cannot re-read etcd, and must leave
    what the kernel knows alone (forwarding entries, and the VXLAN filter's peers), so the
    existing containers keep talking; once etcd is back a new container works again."""
    net = mh.mesh("blind", "10.76.0.0/16")
    a1 = mh.a.run_container(net, "a1", *HTTPD)
    b1 = mh.b.run_container(net, "b1", *HTTPD)
    ip_a1, ip_b1 = mh.a.container_ip(a1, net), mh.b.container_ip(b1, net)
    wait_announced(mh.ha, mh.hb, [ip_b1])
    wait_announced(mh.hb, mh.ha, [ip_a1])
    before = mh.ha.entries_towards(mh.hb)

    mh.hosts.etcd.kill_all()
    mh.ha.plugin.restart()
    mh.a.assert_ping(a1, ip_b1)
    mh.b.assert_ping(b1, ip_a1)
    assert PAGE in mh.a.http_get(a1, f"http://{ip_b1}/").stdout
    assert mh.ha.entries_towards(mh.hb) == before

    mh.hosts.etcd.heal()
    attempt = 0

    def new_container() -> str | None:
        nonlocal attempt
        attempt += 1
        n = mh.a.name(f"a{attempt + 1}")
        mh.a.containers.append(n)
        r = mh.a.docker(
            "run", "-d", "--name", n, "--network", net, mh.a.engine.image, *SLEEPER,
            check=False, timeout=120,
        )  # fmt: skip
        if r.returncode == 0:
            return n
        mh.a.remove_container(n, check=False)
        return None

    a2 = wait_until(new_container, timeout=30, interval=1, message="a container again")
    assert a2 is not None
    ip_a2 = mh.a.container_ip(a2, net)
    wait_announced(mh.hb, mh.ha, [ip_a1, ip_a2])
    mh.b.assert_ping(b1, ip_a2)
    assert mh.ha.entries_towards(mh.hb) == before
