"""Addressing options (issue 3, items 2 and 8): ``--ip``, ``--ip6``, ``--ip-range``,
``--gateway``, ``--aux-address`` and dual stack with ``--ipv6``.

IPv6 prefixes are ULAs of our own (fd70:e2e::/64, ...), never fd00::/64: that is the
machine's own uplink.
"""

from __future__ import annotations

import ipaddress

import pytest

from .harness import ENGINE_ADDR, Scope, addresses, check_no_overlap
from .netcheck import (
    BOTH,
    container_routes,
    expect_reach,
    mentions,
    seen_source,
    serve_http,
)

pytestmark = pytest.mark.docker


def test_static_ip_ip_range_gateway_and_aux_addresses(e2e: Scope) -> None:
    eng = e2e.engine
    subnet, ip_range = "10.77.0.0/24", "10.77.0.128/28"
    gateway, static = "10.77.0.254", "10.77.0.10"
    # The aux addresses are the first ones of the range: a dynamic allocation that ignored
    # them would hand them out first.
    aux = {"10.77.0.128", "10.77.0.129"}
    net = e2e.create_network(
        "addr",
        subnet=subnet,
        gateway=gateway,
        extra=[
            "--ip-range",
            ip_range,
            "--aux-address",
            "r1=10.77.0.128",
            "--aux-address",
            "r2=10.77.0.129",
        ],
    )
    link = eng.link(eng.bridge_name(e2e.network_id(net)))
    assert link is not None
    assert addresses(link) == [f"{gateway}/24"], "the bridge does not carry --gateway"

    s = e2e.run_container(net, "s", ip=static)
    assert e2e.container_ip(s, net) == static
    assert e2e.container_addrs(s).get("eth0") == [f"{static}/24"]
    dyn = [e2e.run_container(net, f"d{i}") for i in range(3)]
    ips = [e2e.container_ip(d, net) for d in dyn]
    assert len(set(ips)) == 3
    for d, ip in zip(dyn, ips, strict=True):
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(ip_range), (
            f"{d} got {ip}, outside --ip-range {ip_range}"
        )
        assert ip not in aux, f"{d} got aux address {ip}"
        assert e2e.container_addrs(d).get("eth0") == [f"{ip}/24"]
    for c in (s, dyn[0]):
        routes = container_routes(e2e, c)
        assert [r for r in routes if r.startswith("default")] == [
            f"default via {gateway} dev eth0"
        ], routes
    expect_reach(e2e, s, {gateway: True, ips[0]: True, ips[1]: True})
    expect_reach(e2e, dyn[2], {static: True})
    with eng.remote_http_server(8000) as url:
        assert seen_source(e2e, dyn[0], url) == ENGINE_ADDR
    # The static address is taken: a second claim fails.
    r = e2e.docker(
        "run",
        "-d",
        "--name",
        e2e.name("dup"),
        "--network",
        net,
        "--ip",
        static,
        eng.image,
        "sleep",
        "60",
        check=False,
        timeout=90,
    )
    e2e.containers.append(e2e.name("dup"))
    assert r.returncode != 0, "two containers were given the same --ip"


def test_dual_stack_ipv6(e2e: Scope) -> None:
    eng = e2e.engine
    v6a, v6b = "fd70:e2e::/64", "fd70:e2f::/64"
    check_no_overlap(v6a, v6b)
    n6 = e2e.create_network("v6", subnet="10.78.0.0/24", extra=["--ipv6", "--subnet", v6a])
    other = e2e.create_network("v6b", subnet="10.78.1.0/24", extra=["--ipv6", "--subnet", v6b])
    bridge = eng.bridge_name(e2e.network_id(n6))
    link = eng.link(bridge)
    assert link is not None
    assert addresses(link) == ["10.78.0.1/24"]
    assert [a for a in addresses(link, "inet6") if not a.startswith("fe80:")] == ["fd70:e2e::1/64"]

    a = e2e.run_container(n6, "a")
    b = e2e.run_container(n6, "b", extra=["--ip6", "fd70:e2e::99"])
    c = e2e.run_container(other, "c")
    six = {}
    for x, net in ((a, n6), (b, n6), (c, other)):
        info = e2e.container_inspect(x)["NetworkSettings"]["Networks"][net]
        six[x] = str(info["GlobalIPv6Address"])
        assert six[x], f"{x} has no IPv6 address: {info}"
        assert e2e.container_addrs(x, v6=True).get("eth0") == [f"{six[x]}/64"]
        assert e2e.container_addrs(x).get("eth0") == [f"{info['IPAddress']}/24"]
    assert six[b] == "fd70:e2e::99"
    assert ipaddress.ip_address(six[a]) in ipaddress.ip_network(v6a)
    routes6 = container_routes(e2e, a, v6=True)
    assert [r for r in routes6 if r.startswith("default")] == [
        "default via fd70:e2e::1 dev eth0 metric 1024"
    ], routes6

    # The engine netns routes IPv6 for these networks, so the isolation checked below is the
    # firewall's doing, not a side effect of forwarding being off.
    assert eng.sysctl("net/ipv6/conf/all/forwarding") == "1"
    for x in (a, b, c):
        serve_http(e2e, x)
    expect_reach(
        e2e,
        a,
        {six[b]: True, six[c]: False},
        kind=BOTH,
        ping_only={"fd70:e2e::1": True},
        what="IPv6",
    )
    expect_reach(e2e, b, {six[a]: True}, kind=BOTH, what="IPv6")
    expect_reach(
        e2e,
        c,
        {six[a]: False, six[b]: False},
        kind=BOTH,
        ping_only={"fd70:e2f::1": True},
        what="IPv6",
    )

    for x in (a, b, c):
        e2e.remove_container(x)
    e2e.remove_network(n6)
    assert mentions(eng, bridge) == [], "IPv4/IPv6 rules of a removed network are left"
