"""Connectivity and isolation (issue 3, item 4), over ICMP and TCP, in both directions.

test_basic.py has the two-network picture (A and B on net1, B and C on net2). This extends it:
a third network D is isolated from everything else, B's second address is no back door, every
check runs both ways and over TCP too, and names resolve through Docker's embedded DNS.
"""

from __future__ import annotations

import pytest

from .harness import Scope
from .netcheck import BOTH, expect_reach, serve_http

pytestmark = pytest.mark.docker


def test_three_networks_talk_inside_and_stay_isolated(e2e: Scope) -> None:
    n1 = e2e.create_network("iso1", subnet="10.67.0.0/24")
    n2 = e2e.create_network("iso2", subnet="10.67.1.0/24")
    n3 = e2e.create_network("iso3", subnet="10.67.2.0/24")
    a = e2e.run_container(n1, "a")
    b = e2e.run_container(n1, "b")
    c = e2e.run_container(n2, "c")
    d = e2e.run_container(n3, "d")
    e2e.connect(n2, b)
    a1, b1 = e2e.container_ip(a, n1), e2e.container_ip(b, n1)
    b2, c2 = e2e.container_ip(b, n2), e2e.container_ip(c, n2)
    d3 = e2e.container_ip(d, n3)
    for x in (a, b, c, d):
        serve_http(e2e, x)

    # What each container may reach: its networks' members (by address and by name through
    # the embedded DNS) and its gateway; nothing on a network it is not on.
    matrix = {
        a: {b1: True, b: True, b2: False, c2: False, d3: False},
        b: {a1: True, a: True, c2: True, c: True, d3: False},
        c: {b2: True, b: True, a1: False, b1: False, d3: False},
        d: {a1: False, b1: False, b2: False, c2: False},
    }
    gateway = {a: "10.67.0.1", b: "10.67.0.1", c: "10.67.1.1", d: "10.67.2.1"}
    for src, expected in matrix.items():
        expect_reach(e2e, src, expected, kind=BOTH, ping_only={gateway[src]: True})

    # The name resolves to the address on the network the two share.
    r = e2e.exec(c, "nslookup", b, check=False)
    assert b2 in r.stdout and b1 not in r.stdout, r.stdout + r.stderr
    r = e2e.exec(a, "nslookup", b, check=False)
    assert b1 in r.stdout and b2 not in r.stdout, r.stdout + r.stderr


def test_isolated_from_dockers_own_bridge_network(e2e: Scope) -> None:
    """A pouch network and Docker's default ``bridge`` network do not reach each other, as two
    Docker bridge networks do not (Docker's DOCKER-ISOLATION chains)."""
    net = e2e.create_network("isod", subnet="10.67.3.0/24")
    p = e2e.run_container(net, "p")
    q = e2e.run_container("bridge", "q")
    ip_p = e2e.container_ip(p, net)
    ip_q = e2e.container_ip(q, "bridge")
    gw_q = e2e.container_inspect(q)["NetworkSettings"]["Networks"]["bridge"]["Gateway"]
    serve_http(e2e, p)
    serve_http(e2e, q)
    expect_reach(
        e2e, p, {ip_q: False}, kind=BOTH, ping_only={"10.67.3.1": True}, what="pouch -> docker0"
    )
    expect_reach(e2e, q, {ip_p: False}, kind=BOTH, ping_only={gw_q: True}, what="docker0 -> pouch")


def test_isolated_from_docker_networks_made_later_whatever_their_bridge_name(
    e2e: Scope,
) -> None:
    """Docker bridge networks created after the pouch network, one with a bridge the user
    named (not ``br-<id>``): no new connection either way. Docker puts each new network's
    ACCEPT rules at the top of filter FORWARD, above anything of ours there, so pouch drops
    in mangle (nothing new into a masqueraded network but published ports) and, outbound,
    goes through Docker's own DOCKER-ISOLATION-STAGE-2, which lists every Docker bridge."""
    net = e2e.create_network("isoc", subnet="10.67.4.0/24")
    p = e2e.run_container(net, "p")
    ip_p = e2e.container_ip(p, net)
    serve_http(e2e, p)
    for base, subnet, options in (
        ("dockc", "10.67.5.0/24", {"com.docker.network.bridge.name": "dkrcustom0"}),
        ("dockd", "10.67.6.0/24", {}),
    ):
        docker_net = e2e.create_network(
            base, subnet=subnet, driver="bridge", ipam=False, options=options
        )
        q = e2e.run_container(docker_net, f"q{base}")
        ip_q = e2e.container_ip(q, docker_net)
        serve_http(e2e, q)
        gw_q = subnet.replace(".0/24", ".1")
        expect_reach(
            e2e,
            p,
            {ip_q: False},
            kind=BOTH,
            ping_only={"10.67.4.1": True},
            what=f"pouch -> Docker network {base}",
        )
        expect_reach(
            e2e,
            q,
            {ip_p: False},
            kind=BOTH,
            ping_only={gw_q: True},
            what=f"Docker network {base} -> pouch",
        )
