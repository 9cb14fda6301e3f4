"""The way out, and living with Docker's firewall (issue 3, items 2, 5 and 6).

The engine netns is a Docker host: FORWARD policy DROP, Docker's chains in place. The remote
host (198.51.100.2) routes everything back through the engine netns, so it *could* reach a
container's own address: only the firewall stops it, which is what the negative checks test.
"""

from __future__ import annotations

import shlex

import pytest

from .harness import ENGINE_ADDR, REMOTE_ADDR, Scope
from .netcheck import (
    BOTH,
    assert_remote_cannot_get,
    assert_remote_gets,
    container_routes,
    docker_rules,
    expect_reach,
    expect_remote_unreachable,
    forward_chain,
    masquerade_rules,
    mentions,
    our_rules,
    rules,
    seen_source,
    serve_http,
)

pytestmark = pytest.mark.docker

OPT_MASQ = "com.docker.network.bridge.enable_ip_masquerade"


def test_outbound_masquerade_and_enable_ip_masquerade_false(e2e: Scope) -> None:
    eng = e2e.engine
    masq = e2e.create_network("masq", subnet="10.70.0.0/24")
    plain = e2e.create_network("plain", subnet="10.70.1.0/24", options={OPT_MASQ: "false"})
    a = e2e.run_container(masq, "a")
    c = e2e.run_container(plain, "c")
    ip_a, ip_c = e2e.container_ip(a, masq), e2e.container_ip(c, plain)
    with eng.remote_http_server(8000) as url:
        assert seen_source(e2e, a, url) == ENGINE_ADDR, "outbound traffic not masqueraded"
        assert seen_source(e2e, c, url) == ip_c, "masquerade=false still rewrote the source"
    assert masquerade_rules(eng, "10.70.0.0/24"), rules(eng, "nat")
    assert masquerade_rules(eng, "10.70.1.0/24") == [], "MASQUERADE despite masquerade=false"

    # Nothing opens the way in: the remote host routes to the containers through the engine
    # netns, yet reaches neither (no port is published).
    for x in (a, c):
        serve_http(e2e, x)
    for ip in (ip_a, ip_c):  # control: the servers are up
        assert (
            eng.in_engine_ns(
                "timeout", "3", "busybox", "wget", "-O-", f"http://{ip}/", check=False
            ).returncode
            == 0
        )
    expect_remote_unreachable(eng, [ip_a, ip_c], what="unsolicited, nothing published")


def test_internal_network_has_no_way_out(e2e: Scope) -> None:
    eng = e2e.engine
    internal = e2e.create_network("int", subnet="10.70.2.0/24", extra=["--internal"])
    normal = e2e.create_network("ext", subnet="10.70.3.0/24")
    i1 = e2e.run_container(internal, "i1")
    # i2 may add routes: a container that tries its own way out must still be stopped.
    i2 = e2e.run_container(internal, "i2", extra=["--cap-add", "NET_ADMIN"])
    e = e2e.run_container(normal, "e")
    ip_i1, ip_i2 = e2e.container_ip(i1, internal), e2e.container_ip(i2, internal)
    ip_e = e2e.container_ip(e, normal)
    for x in (i1, i2, e):
        serve_http(e2e, x)

    # No default route, no docker_gwbridge interface: eth0 only.
    routes = container_routes(e2e, i1)
    assert not [r for r in routes if r.startswith("default")], routes
    assert sorted(e2e.container_addrs(i1)) == ["eth0", "lo"]
    # Inside the network everything works.
    expect_reach(e2e, i1, {ip_i2: True, i2: True}, kind=BOTH, what="inside an internal network")

    e2e.exec(i2, "ip", "route", "add", "default", "via", "10.70.2.1")
    with eng.remote_http_server(8000) as url:
        assert seen_source(e2e, e, url) == ENGINE_ADDR  # control: the way out works
        r = e2e.http_get(i2, f"{url}/cgi-bin/ip", timeout=2, check=False)
        assert r.returncode != 0, f"internal container reached the remote host: {r.stdout}"
    expect_reach(
        e2e, i2, {ip_e: False}, kind=BOTH, ping_only={REMOTE_ADDR: False}, what="internal -> out"
    )
    expect_reach(e2e, e, {ip_i1: False}, kind=BOTH, what="other network -> internal")
    expect_remote_unreachable(eng, [ip_i1, ip_i2], what="into an internal network")
    assert masquerade_rules(eng, "10.70.2.0/24") == []


def _docker_user_first(eng_forward: list[str]) -> bool:
    rules_ = [r for r in eng_forward if r.startswith("-A FORWARD")]
    return bool(rules_) and rules_[0] == "-A FORWARD -j DOCKER-USER"


def test_rules_coexist_with_dockers_and_go_with_the_network(e2e: Scope) -> None:
    eng = e2e.engine
    docker_before = docker_rules(eng)
    assert "-P FORWARD DROP" in docker_before["filter"]
    net = e2e.create_network("fw", subnet="10.71.0.0/24")
    bridge = eng.bridge_name(e2e.network_id(net))
    a = e2e.run_container(net, "a", publish=["8085:80"])
    b = e2e.run_container(net, "b")
    ip_a = e2e.container_ip(a, net)
    text = serve_http(e2e, a)
    # Traffic that Docker's FORWARD policy (DROP) would stop flows.
    expect_reach(e2e, b, {ip_a: True})
    assert_remote_gets(eng, ENGINE_ADDR, 8085, text)

    forward = forward_chain(eng)
    assert "-P FORWARD DROP" in forward
    assert _docker_user_first(forward), (
        "DOCKER-USER is not the first rule of FORWARD:\n" + "\n".join(forward)
    )
    # Inside one of our bridges the verdict is one set lookup at the end of DOCKER-USER,
    # ahead of Docker's per-network rules (tests/kernel/test_docker_layouts.py).
    listed = eng.in_engine_ns("iptables", "-L", "DOCKER-USER", "-v", "-x", "-n").stdout
    fast = [line for line in listed.splitlines() if f"{eng.plugin.prefix.upper()}-ICC4" in line]
    assert fast and int(fast[0].split()[0]) > 0, listed
    ours = our_rules(eng) + our_rules(eng, "nat")
    assert [r for r in ours if bridge in r], "no rule of ours for the bridge"
    assert [r for r in ours if f"{ip_a}:80" in r], "no DNAT for the published port"
    assert docker_rules(eng) == docker_before, "Docker's own chains or rules were changed"

    e2e.remove_container(a)
    e2e.remove_container(b)
    e2e.remove_network(net)
    assert mentions(eng, bridge) == [], "rules of a removed network are left"
    assert mentions(eng, f"{ip_a}:80") == [], "DNAT of a removed container is left"
    assert docker_rules(eng) == docker_before, "Docker's own chains or rules were changed"


def _flush_our_chains(e2e: Scope) -> None:
    eng = e2e.engine
    p = eng.plugin.prefix.upper()
    for table in ("filter", "nat", "mangle"):
        for r in rules(eng, table):
            if r.startswith(f"-N {p}-"):
                eng.in_engine_ns("iptables", "-t", table, "-F", r.split()[1])
    # and our accept inside our bridges, at the end of Docker's DOCKER-USER
    for r in rules(eng, "filter"):
        if r.startswith("-A DOCKER-USER ") and f"{eng.plugin.prefix}-driver" in r:
            eng.in_engine_ns("iptables", *shlex.split("-D" + r[2:]))


def test_rules_reapplied_when_plugin_restarts(e2e: Scope) -> None:
    eng = e2e.engine
    net = e2e.create_network("rst", subnet="10.71.1.0/24")
    a = e2e.run_container(net, "a", publish=["8086:80"])
    b = e2e.run_container(net, "b")
    ip_a = e2e.container_ip(a, net)
    text = serve_http(e2e, a)
    with eng.remote_http_server(8000) as url:
        expect_reach(e2e, b, {ip_a: True})
        assert_remote_gets(eng, ENGINE_ADDR, 8086, text)
        assert seen_source(e2e, b, url) == ENGINE_ADDR
        wanted = {t: sorted(our_rules(eng, t)) for t in ("filter", "nat", "mangle")}
        docker_before = docker_rules(eng)

        eng.plugin.stop()
        _flush_our_chains(e2e)
        # With our rules gone (and the plugin down, so nothing repairs them) Docker's policy
        # drops the traffic: this is what the rules carry.
        assert our_rules(eng) == [] and our_rules(eng, "nat") == []
        expect_reach(e2e, b, {ip_a: False}, what="rules flushed")
        assert_remote_cannot_get(eng, ENGINE_ADDR, 8086)

        eng.plugin.start()
        got = {t: sorted(our_rules(eng, t)) for t in ("filter", "nat", "mangle")}
        assert got == wanted, "start-up did not restore the rules exactly"
        expect_reach(e2e, b, {ip_a: True}, what="after restart")
        assert_remote_gets(eng, ENGINE_ADDR, 8086, text)
        assert seen_source(e2e, b, url) == ENGINE_ADDR
        assert docker_rules(eng) == docker_before


def test_docker_user_stays_first_when_plugin_restores_its_jumps(e2e: Scope) -> None:
    """A host whose firewall lost the plugin's jumps (reboot, firewall reload): dockerd has
    set up FORWARD (DOCKER-USER first), then the plugin starts and adds its jumps. The
    operator's DOCKER-USER rules must still come before anything of ours."""
    eng = e2e.engine
    n1 = e2e.create_network("du1", subnet="10.71.2.0/24")
    n2 = e2e.create_network("du2", subnet="10.71.3.0/24")
    x = e2e.run_container(n1, "x")
    y = e2e.run_container(n2, "y")
    ip_x, ip_y = e2e.container_ip(x, n1), e2e.container_ip(y, n2)
    assert _docker_user_first(forward_chain(eng))
    comment = f"{eng.plugin.prefix}-driver"

    eng.plugin.stop()
    jumps = [
        (t, r)
        for t in ("filter", "nat", "mangle")
        for r in rules(eng, t)
        if r.startswith("-A ") and comment in r
    ]
    assert len(jumps) >= 3, jumps
    for table, r in jumps:
        eng.in_engine_ns("iptables", "-t", table, *shlex.split("-D" + r[2:]))
    eng.plugin.start()

    for table, r in jumps:
        assert r in rules(eng, table), f"jump not restored: {r}"
    expect_reach(e2e, x, {"10.71.2.1": True, ip_y: False})
    expect_reach(e2e, y, {"10.71.3.1": True, ip_x: False})
    forward = forward_chain(eng)
    assert "-P FORWARD DROP" in forward
    assert _docker_user_first(forward), (
        "the plugin put its rules before DOCKER-USER:\n" + "\n".join(forward)
    )
