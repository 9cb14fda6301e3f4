"""Published ports (issue 3, item 7): ``docker run -p`` on a pouch network, reached from the
remote host over TCP and UDP, ranges, host addresses (``host_binding_ipv4``, ``-p IP:..``,
loopback), IPv6 host addresses on dual-stack networks, hairpin from the same network, and the
rules' life with the container's.

The engine runs no docker-proxy for remote drivers, so every one of these is the plugin's
DNAT at work. The DNAT rules are read with ``iptables -S`` (the oracle); traffic decides.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import pytest

from .harness import (
    ENGINE_ADDR,
    ENGINE_UPLINK,
    REMOTE_ADDR,
    REMOTE_UPLINK,
    SLEEPER,
    Engine,
    Scope,
)
from .netcheck import (
    assert_remote_cannot_get,
    assert_remote_gets,
    dnat_rules,
    engine_address,
    remote_udp,
    rules,
    serve_http,
    udp_echo,
)

pytestmark = pytest.mark.docker

OPT_HOST_IP = "com.docker.network.bridge.host_binding_ipv4"
SECOND_ADDR = "198.51.100.3"
_DNAT_RE = re.compile(
    r"^-A \S+ (?:-d (?P<host>\S+)/32 )?-p (?P<proto>\w+) -m \w+ --dport (?P<port>\d+) "
    r"-j DNAT --to-destination (?P<to>\S+)$"
)


def _dnat(e2e: Scope, container_ip: str) -> set[tuple[str | None, str, int, str]]:
    """{(host ip or None, proto, host port, "ip:port")} of the DNAT rules to a container."""
    out = set()
    for r in dnat_rules(e2e.engine, container_ip):
        m = _DNAT_RE.match(r)
        assert m, f"unexpected DNAT rule shape: {r}"
        out.add((m["host"], m["proto"], int(m["port"]), m["to"]))
    return out


def test_published_tcp_udp_and_range_follow_the_container(e2e: Scope) -> None:
    eng = e2e.engine
    net = e2e.create_network("pub", subnet="10.74.0.0/24")
    a = e2e.run_container(net, "a", publish=["8080:80", "8082:5000/udp", "9000-9001:9000-9001"])
    ip_a = e2e.container_ip(a, net)
    texts = {port: serve_http(e2e, a, port) for port in (80, 9000, 9001)}
    assert _dnat(e2e, ip_a) == {
        (None, "tcp", 8080, f"{ip_a}:80"),
        (None, "udp", 8082, f"{ip_a}:5000"),
        (None, "tcp", 9000, f"{ip_a}:9000"),
        (None, "tcp", 9001, f"{ip_a}:9001"),
    }

    assert_remote_gets(eng, ENGINE_ADDR, 8080, texts[80])
    assert_remote_gets(eng, ENGINE_ADDR, 9000, texts[9000])
    assert_remote_gets(eng, ENGINE_ADDR, 9001, texts[9001])
    assert_remote_cannot_get(eng, ENGINE_ADDR, 8081)  # not published
    with udp_echo(e2e, a, 5000):
        answer = remote_udp(eng, ENGINE_ADDR, 8082, "hello")
        assert answer == f"echo hello from {REMOTE_ADDR}", answer
        assert remote_udp(eng, ENGINE_ADDR, 8083, "nope") is None  # not published

    # Stopped: the DNAT goes with the endpoint, nothing answers.
    e2e.docker("stop", a)
    assert _dnat(e2e, ip_a) == set(), rules(eng, "nat")
    assert_remote_cannot_get(eng, ENGINE_ADDR, 8080)
    # Started again (a new endpoint, possibly a new address): published again, to it.
    e2e.docker("start", a)
    ip_a2 = e2e.container_ip(a, net)
    text = serve_http(e2e, a, 80, "again")
    assert (None, "tcp", 8080, f"{ip_a2}:80") in _dnat(e2e, ip_a2)
    if ip_a2 != ip_a:
        assert _dnat(e2e, ip_a) == set()
    assert_remote_gets(eng, ENGINE_ADDR, 8080, text)
    e2e.remove_container(a)
    assert _dnat(e2e, ip_a2) == set()
    assert_remote_cannot_get(eng, ENGINE_ADDR, 8080)


def test_published_port_from_same_network_and_engine_host(e2e: Scope) -> None:
    """Hairpin: another container of the network, and the engine host itself, reach the
    published port through the host's address."""
    eng = e2e.engine
    net = e2e.create_network("hp", subnet="10.74.1.0/24")
    a = e2e.run_container(net, "a", publish=["8087:80"])
    b = e2e.run_container(net, "b")
    text = serve_http(e2e, a)
    r = e2e.http_get(b, f"http://{ENGINE_ADDR}:8087/", timeout=3, check=False)
    assert r.returncode == 0 and text in r.stdout, f"b -> {ENGINE_ADDR}:8087: {r.stderr}"
    r = eng.in_engine_ns(
        "timeout", "3", "busybox", "wget", "-O-", f"http://{ENGINE_ADDR}:8087/", check=False
    )
    assert r.returncode == 0 and text in r.stdout, f"engine host -> :8087: {r.stderr}"


def test_container_reaches_its_own_published_port(e2e: Scope) -> None:
    """The container behind a published port reaches it through the host's address too
    (Docker: docker-proxy, or hairpin mode on the bridge port without it)."""
    net = e2e.create_network("self", subnet="10.74.4.0/24")
    a = e2e.run_container(net, "a", publish=["8088:80"])
    text = serve_http(e2e, a)
    r = e2e.http_get(a, f"http://{ENGINE_ADDR}:8088/", timeout=3, check=False)
    assert r.returncode == 0 and text in r.stdout, (
        f"a cannot reach its own published port {ENGINE_ADDR}:8088 (rc {r.returncode}): {r.stderr}"
    )


def test_host_binding_ipv4_and_explicit_host_ip(e2e: Scope) -> None:
    eng = e2e.engine
    with engine_address(eng, f"{SECOND_ADDR}/24"):
        bound = e2e.create_network("hb", subnet="10.74.2.0/24", options={OPT_HOST_IP: SECOND_ADDR})
        anyaddr = e2e.create_network("hbany", subnet="10.74.5.0/24")
        d = e2e.run_container(bound, "d", publish=["8090:80", f"{ENGINE_ADDR}:8091:80"])
        e = e2e.run_container(anyaddr, "e", publish=["8092:80"])
        ip_d = e2e.container_ip(d, bound)
        text_d, text_e = serve_http(e2e, d), serve_http(e2e, e)
        assert _dnat(e2e, ip_d) == {
            (SECOND_ADDR, "tcp", 8090, f"{ip_d}:80"),  # the network's default host address
            (ENGINE_ADDR, "tcp", 8091, f"{ip_d}:80"),  # -p IP:port:port wins over it
        }
        assert_remote_gets(eng, SECOND_ADDR, 8090, text_d)
        assert_remote_cannot_get(eng, ENGINE_ADDR, 8090)
        assert_remote_gets(eng, ENGINE_ADDR, 8091, text_d)
        assert_remote_cannot_get(eng, SECOND_ADDR, 8091)
        # Control: without the option a port is published on every host address.
        assert_remote_gets(eng, ENGINE_ADDR, 8092, text_e)
        assert_remote_gets(eng, SECOND_ADDR, 8092, text_e)


def test_loopback_published_port(e2e: Scope) -> None:
    """``-p 127.0.0.1::80``: reachable on the engine host's loopback only."""
    eng = e2e.engine
    net = e2e.create_network("lo", subnet="10.74.3.0/24")
    a = e2e.run_container(net, "a", publish=["127.0.0.1::80"])
    ip_a = e2e.container_ip(a, net)
    text = serve_http(e2e, a)
    found = [x for x in _dnat(e2e, ip_a) if x[0] == "127.0.0.1" and x[1] == "tcp"]
    assert len(found) == 1, f"no single loopback DNAT to {ip_a}:80: {dnat_rules(eng, ip_a)}"
    port = found[0][2]
    assert_remote_cannot_get(eng, ENGINE_ADDR, port)
    r = eng.in_engine_ns(
        "timeout", "3", "busybox", "wget", "-O-", f"http://127.0.0.1:{port}/", check=False
    )
    assert r.returncode == 0 and text in r.stdout, (
        f"127.0.0.1:{port} on the engine host does not reach the container (rc "
        f"{r.returncode}): {r.stderr}"
    )


#: Documentation prefix (RFC 3849) on the test uplink; never fd00::/64, the machine's own.
V6_ENGINE, V6_REMOTE = "2001:db8:74::1", "2001:db8:74::2"


@contextlib.contextmanager
def ipv6_uplink(eng: Engine) -> Iterator[None]:
    """IPv6 on the link between the engine host and the remote host, for the duration."""
    eng.in_engine_ns("ip", "-6", "addr", "add", f"{V6_ENGINE}/64", "dev", ENGINE_UPLINK, "nodad")
    eng.in_remote("ip", "-6", "addr", "add", f"{V6_REMOTE}/64", "dev", REMOTE_UPLINK, "nodad")
    try:
        yield
    finally:
        eng.in_remote(
            "ip", "-6", "addr", "del", f"{V6_REMOTE}/64", "dev", REMOTE_UPLINK, check=False
        )
        eng.in_engine_ns(
            "ip", "-6", "addr", "del", f"{V6_ENGINE}/64", "dev", ENGINE_UPLINK, check=False
        )


def test_published_ports_on_ipv6(e2e: Scope) -> None:
    """Dual stack: ``-p 8093:80`` is reached on the host's IPv6 address as well as its IPv4
    one (as with Docker's bridge); ``-p [v6]:8094:80`` on that address only. On a network
    without IPv6, an IPv6 host address is refused with an error that says why."""
    eng = e2e.engine
    with ipv6_uplink(eng):
        net = e2e.create_network(
            "p6", subnet="10.74.6.0/24", extra=["--ipv6", "--subnet", "fd71:74:6::/64"]
        )
        a = e2e.run_container(net, "a", publish=["8093:80", f"[{V6_ENGINE}]:8094:80"])
        text = serve_http(e2e, a)
        assert_remote_gets(eng, V6_ENGINE, 8093, text)
        assert_remote_gets(eng, ENGINE_ADDR, 8093, text)
        assert_remote_gets(eng, V6_ENGINE, 8094, text)
        assert_remote_cannot_get(eng, ENGINE_ADDR, 8094)
        e2e.remove_container(a)
        assert_remote_cannot_get(eng, V6_ENGINE, 8093)  # revoked with the container

        v4only = e2e.create_network("p4", subnet="10.74.7.0/24")
        name = e2e.name("b")
        e2e.containers.append(name)
        r = e2e.docker(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            v4only,
            "-p",
            f"[{V6_ENGINE}]:8095:80",
            eng.image,
            *SLEEPER,
            check=False,
            timeout=90,
        )
        assert r.returncode != 0, r.stdout
        assert "has no IPv6 address on this network" in r.stderr, r.stderr


@contextlib.contextmanager
def remote_routes_loopback_to_engine(eng: Engine) -> Iterator[None]:
    """The remote host sends 127.0.0.1 to the engine host, as a hostile LAN neighbour can:
    its own loopback address goes, 127.0.0.1 is routed via the engine, and route_localnet
    lets such packets leave its uplink. Restored afterwards (the namespace is ours)."""
    sysctl = f"net.ipv4.conf.{REMOTE_UPLINK}.route_localnet"
    eng.in_remote("ip", "addr", "del", "127.0.0.1/8", "dev", "lo")
    try:
        eng.in_remote("sysctl", "-qw", f"{sysctl}=1")
        eng.in_remote("ip", "route", "add", "127.0.0.1/32", "via", ENGINE_ADDR)
        yield
    finally:
        eng.in_remote("ip", "route", "del", "127.0.0.1/32", check=False)
        eng.in_remote("sysctl", "-qw", f"{sysctl}=0", check=False)
        eng.in_remote("ip", "addr", "add", "127.0.0.1/8", "dev", "lo", check=False)


def test_published_ports_are_not_reached_around_the_nat(e2e: Scope) -> None:
    """Engine 28's hardening (issue 12 item 6): on a NAT network a container that publishes a
    port is not reached by routing straight to its address (the remote host routes our
    subnets through the engine host), and a port published on 127.0.0.1 is not reached by a
    neighbour that routes 127.0.0.1 to the engine host; both still work the intended way."""
    eng = e2e.engine
    net = e2e.create_network("hard", subnet="10.74.5.0/24")
    a = e2e.run_container(net, "a", publish=["18095:80", "127.0.0.1:18096:81"])
    ip_a = e2e.container_ip(a, net)
    text = serve_http(e2e, a)
    text81 = serve_http(e2e, a, 81)
    assert_remote_gets(eng, ENGINE_ADDR, 18095, text)
    assert_remote_cannot_get(eng, ip_a, 80)
    with remote_routes_loopback_to_engine(eng):
        assert_remote_cannot_get(eng, "127.0.0.1", 18096)
    r = eng.in_engine_ns(
        "timeout", "3", "busybox", "wget", "-O-", "http://127.0.0.1:18096/", check=False
    )
    assert r.returncode == 0 and text81 in r.stdout, r.stderr
