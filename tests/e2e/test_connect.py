"""The Connect flow (issue 3, item 9): ``docker network connect``/``disconnect`` on running and
stopped containers, a container on three networks, and ``--network container:X``."""

from __future__ import annotations

import pytest

from .harness import SLEEPER, Scope
from .netcheck import (
    BOTH,
    bridge_ports,
    container_ifaces,
    container_routes,
    endpoint_id,
    expect_reach,
    host_veth,
    serve_http,
    sysfs,
    wait_links_gone,
)

pytestmark = pytest.mark.docker


def _gateway(e2e: Scope, container: str, network: str) -> str:
    return str(e2e.container_inspect(container)["NetworkSettings"]["Networks"][network]["Gateway"])


def test_connect_and_disconnect_running_container(e2e: Scope) -> None:
    eng = e2e.engine
    n1 = e2e.create_network("cr1", subnet="10.80.0.0/24")
    n2 = e2e.create_network("cr2", subnet="10.80.1.0/24")
    br2 = eng.bridge_name(e2e.network_id(n2))
    a = e2e.run_container(n1, "a")
    c = e2e.run_container(n2, "c")
    ip_c = e2e.container_ip(c, n2)
    serve_http(e2e, c)
    expect_reach(e2e, a, {ip_c: False}, what="before connect")

    e2e.connect(n2, a)
    ip_a2 = e2e.container_ip(a, n2)
    assert e2e.container_addrs(a).get("eth1") == [f"{ip_a2}/24"]
    veth = host_veth(eng, endpoint_id(e2e, a, n2))
    assert veth in bridge_ports(eng, br2)
    expect_reach(
        e2e,
        a,
        {ip_c: True, c: True},
        kind=BOTH,
        ping_only={"10.80.0.1": True},
        what="after connect",
    )
    expect_reach(e2e, c, {ip_a2: True}, what="after connect")

    e2e.disconnect(n2, a)
    assert container_ifaces(e2e, a) == ["eth0", "lo"]
    wait_links_gone(eng, [veth])
    assert sorted(e2e.container_inspect(a)["NetworkSettings"]["Networks"]) == [n1]
    expect_reach(
        e2e, a, {ip_c: False}, kind=BOTH, ping_only={"10.80.0.1": True}, what="after disconnect"
    )


def test_connect_and_disconnect_stopped_container(e2e: Scope) -> None:
    eng = e2e.engine
    n1 = e2e.create_network("cs1", subnet="10.80.2.0/24")
    n2 = e2e.create_network("cs2", subnet="10.80.3.0/24")
    br1 = eng.bridge_name(e2e.network_id(n1))
    br2 = eng.bridge_name(e2e.network_id(n2))
    c = e2e.run_container(n2, "c")
    ip_c = e2e.container_ip(c, n2)
    c_veth = host_veth(eng, endpoint_id(e2e, c, n2))
    s = e2e.run_container(n1, "s")
    s_veth = host_veth(eng, endpoint_id(e2e, s, n1))
    e2e.docker("stop", s)
    wait_links_gone(eng, [s_veth])

    # Connecting a stopped container records it; no endpoint exists until it starts.
    e2e.connect(n2, s)
    assert bridge_ports(eng, br1) == []
    assert bridge_ports(eng, br2) == [c_veth]
    e2e.docker("start", s)
    ip_s1, ip_s2 = e2e.container_ip(s, n1), e2e.container_ip(s, n2)
    addrs = e2e.container_addrs(s)
    assert sorted(addrs) == ["eth0", "eth1", "lo"], addrs
    assert sorted([*addrs["eth0"], *addrs["eth1"]]) == sorted([f"{ip_s1}/24", f"{ip_s2}/24"])
    assert len(bridge_ports(eng, br1)) == 1
    assert len(bridge_ports(eng, br2)) == 2
    expect_reach(e2e, s, {ip_c: True, "10.80.2.1": True}, what="connected while stopped")

    # Disconnecting a stopped container: after the start it is not on that network.
    e2e.docker("stop", s)
    e2e.disconnect(n2, s)
    e2e.docker("start", s)
    addrs = e2e.container_addrs(s)
    assert sorted(addrs) == ["eth0", "lo"], addrs
    assert addrs["eth0"] == [f"{e2e.container_ip(s, n1)}/24"]
    assert bridge_ports(eng, br2) == [c_veth]
    expect_reach(e2e, s, {ip_c: False, "10.80.2.1": True}, what="disconnected while stopped")


def test_container_on_three_networks(e2e: Scope) -> None:
    nets = [e2e.create_network(f"tri{i}", subnet=f"10.80.{4 + i}.0/24") for i in range(3)]
    peers = [e2e.run_container(n, f"p{i}") for i, n in enumerate(nets)]
    m = e2e.run_container(nets[0], "m")
    e2e.connect(nets[1], m)
    e2e.connect(nets[2], m)

    addrs = e2e.container_addrs(m)
    assert sorted(addrs) == ["eth0", "eth1", "eth2", "lo"], addrs
    routes = container_routes(e2e, m)
    dev_of = {}
    for i, n in enumerate(nets):
        ip = e2e.container_ip(m, n)
        dev = next((d for d, a in addrs.items() if a == [f"{ip}/24"]), None)
        assert dev is not None, f"no interface of m carries {ip} ({n}): {addrs}"
        dev_of[n] = dev
        want = f"10.80.{4 + i}.0/24 dev {dev} scope link src {ip}"
        assert want in routes, f"missing connected route {want!r}: {routes}"
    assert sorted(dev_of.values()) == ["eth0", "eth1", "eth2"]
    defaults = [r for r in routes if r.startswith("default")]
    assert len(defaults) == 1, f"want one default route: {routes}"
    gw_ok = [f"default via {_gateway(e2e, m, n)} dev {dev_of[n]}" for n in nets]
    assert defaults[0] in gw_ok, f"{defaults[0]} is not via a network's gateway on its device"

    for i, (n, p) in enumerate(zip(nets, peers, strict=True)):
        expect_reach(e2e, m, {e2e.container_ip(p, n): True, f"10.80.{4 + i}.1": True})
        expect_reach(e2e, p, {e2e.container_ip(m, n): True})


def test_network_container_mode_shares_interfaces(e2e: Scope) -> None:
    eng = e2e.engine
    net = e2e.create_network("share", subnet="10.80.7.0/24")
    x = e2e.run_container(net, "x")
    peer = e2e.run_container(net, "peer")
    links_before = eng.plugin_links()
    y = e2e.name("y")
    e2e.containers.append(y)
    e2e.docker(
        "run", "-d", "--name", y, "--network", f"container:{x}", eng.image, *SLEEPER, timeout=90
    )
    assert e2e.container_addrs(y) == e2e.container_addrs(x)
    assert sysfs(e2e, y, "eth0", "address") == sysfs(e2e, x, "eth0", "address")
    assert eng.plugin_links() == links_before, "a shared netns got an endpoint of its own"
    serve_http(e2e, y)  # a server started in y answers on x's address
    expect_reach(e2e, y, {e2e.container_ip(peer, net): True, "10.80.7.1": True})
    expect_reach(e2e, peer, {e2e.container_ip(x, net): True}, kind="http")
