"""Addresses on a cluster network are unique across hosts, under load and under races.

Blocks of the subnet are claimed in etcd, so two hosts never hand out the same address; an
address pinned with ``--ip`` on two hosts at once goes to exactly one of them.
"""

from __future__ import annotations

import functools
import ipaddress
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.harness import SLEEPER, Scope

from .conftest import Pair
from .harness import containers_on, parallel, wait_announced

PER_HOST = 50


def _run_detached(
    scope: Scope, network: str, base: str, *, ip: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``docker run -d`` that does not raise; the container is removed at teardown."""
    name = scope.name(base)
    scope.containers.append(name)
    args = ["run", "-d", "--name", name, "--hostname", base, "--network", network]
    if ip:
        args += ["--ip", ip]
    return scope.docker(*args, scope.engine.image, *SLEEPER, check=False, timeout=240)


def _remove_all(scope: Scope) -> None:
    """One ``docker rm -f`` for all the scope's containers (one by one takes a minute);
    whatever it could not remove stays for the scope's own cleanup."""
    if scope.containers:
        scope.docker("rm", "-f", *scope.containers, check=False, timeout=240)
        left = set(scope.docker("ps", "-a", "--format", "{{.Names}}").stdout.split())
        scope.containers[:] = [c for c in scope.containers if c in left]


@pytest.mark.timeout(420)
def test_fifty_containers_per_host_at_once_never_share_an_address(mh: Pair) -> None:
    """50 ``docker run`` at once on each host, 100 in flight: every one starts, and the 100
    addresses (engine's view and kernel's view) are distinct, in the subnet, and announced."""
    subnet = ipaddress.ip_network("10.67.0.0/16")
    net = mh.mesh("many", str(subnet))
    jobs = [(s, f"n{i:02d}") for i in range(PER_HOST) for s in mh.scopes]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: _run_detached(job[0], net, job[1]), jobs))
    failed = [
        (s.engine.netns, base, r.stderr.strip())
        for (s, base), r in zip(jobs, results, strict=True)
        if r.returncode != 0
    ]
    try:
        assert not failed, f"{len(failed)} of {len(jobs)} docker run failed: {failed[:5]}"
        seen = [containers_on(h, net) for h in mh.hosts.hosts]
        assert [len(s) for s in seen] == [PER_HOST, PER_HOST], [len(s) for s in seen]
        v4 = [addr for s in seen for addr, _v6, _mac in s.values()]
        dup = {a: n for a, n in Counter(v4).items() if n > 1}
        assert not dup, f"addresses given twice: {dup}"
        gateway = str(subnet.network_address + 1)
        for a in v4:
            assert ipaddress.ip_address(a) in subnet and a != gateway, a
        macs = [mac for s in seen for _v4, _v6, mac in s.values()]
        assert len(set(macs)) == len(macs), "a MAC address given twice"
        # Each host's kernel forwards every container of the other one, and only those.
        a_addrs = [addr for addr, _v6, _mac in seen[0].values()]
        b_addrs = [addr for addr, _v6, _mac in seen[1].values()]
        wait_announced(mh.ha, mh.hb, b_addrs, timeout=30)
        wait_announced(mh.hb, mh.ha, a_addrs, timeout=30)
        assert mh.ha.entries_towards(mh.hb)[1] == set(b_addrs)
        assert mh.hb.entries_towards(mh.ha)[1] == set(a_addrs)
        # And a few of them talk across.
        a_names, b_names = sorted(seen[0]), sorted(seen[1])
        mh.a.assert_ping(a_names[0], seen[1][b_names[-1]][0])
        mh.b.assert_ping(b_names[0], seen[0][a_names[-1]][0])
    finally:
        parallel(*(lambda s=s: _remove_all(s) for s in mh.scopes))


def test_same_pinned_address_on_both_hosts_at_once_has_one_winner(mh: Pair) -> None:
    """``--ip X`` on both hosts at the same instant, three rounds: each time exactly one
    container gets X, the other ``docker run`` fails with an error naming X, and the loser's
    host forwards X to the winner."""
    net = mh.mesh("pin", "10.68.0.0/16")
    for round_no, addr in enumerate(("10.68.3.50", "10.68.200.7", "10.68.0.9")):
        ra, rb = parallel(
            functools.partial(_run_detached, mh.a, net, f"pa{round_no}", ip=addr),
            functools.partial(_run_detached, mh.b, net, f"pb{round_no}", ip=addr),
        )
        outcomes = {"a": ra, "b": rb}
        winners = [k for k, r in outcomes.items() if r.returncode == 0]
        assert len(winners) == 1, {k: (r.returncode, r.stderr.strip()) for k, r in outcomes.items()}
        winner = winners[0]
        loser = "b" if winner == "a" else "a"
        error = outcomes[loser].stderr
        assert addr in error, f"the loser's error does not name {addr}: {error!r}"
        w_host, l_host = (mh.ha, mh.hb) if winner == "a" else (mh.hb, mh.ha)
        w_scope = mh.a if winner == "a" else mh.b
        w_name = w_scope.name(f"p{winner}{round_no}")
        assert w_scope.container_ip(w_name, net) == addr
        assert addr not in {v4 for v4, _v6, _mac in containers_on(l_host, net).values()}
        wait_announced(l_host, w_host, [addr])
