"""Options with Docker's own keys (issue 3, item 2): MTU, inter-container communication, and
the refusal of unknown or malformed options.

(``enable_ip_masquerade`` and ``--internal`` are in test_external.py, ``host_binding_ipv4`` in
test_ports.py, ``--ipv6`` in test_addressing.py.)
"""

from __future__ import annotations

import pytest

from .harness import ENGINE_ADDR, SLEEPER, Scope, check_no_overlap
from .netcheck import (
    BOTH,
    assert_remote_cannot_get,
    assert_remote_gets,
    bridges,
    endpoint_id,
    expect_reach,
    host_veth,
    seen_source,
    serve_http,
    sysfs,
)

pytestmark = pytest.mark.docker

OPT_MTU = "com.docker.network.driver.mtu"
OPT_ICC = "com.docker.network.bridge.enable_icc"
OPT_MASQ = "com.docker.network.bridge.enable_ip_masquerade"
OPT_HOST_IP = "com.docker.network.bridge.host_binding_ipv4"
OPT_GW4 = "com.docker.network.bridge.gateway_mode_ipv4"
OPT_PREFIX = "com.docker.network.container_iface_prefix"


def _mtu(e2e: Scope, ifname: str) -> int:
    link = e2e.engine.link(ifname)
    assert link is not None, f"no link {ifname} in the engine netns"
    return int(link["mtu"])


def test_mtu_option_sets_bridge_veths_and_container(e2e: Scope) -> None:
    eng = e2e.engine
    net = e2e.create_network("mtu", subnet="10.63.0.0/24", options={OPT_MTU: "1400"})
    ctl = e2e.create_network("ctl", subnet="10.63.1.0/24")
    assert _mtu(e2e, eng.bridge_name(e2e.network_id(net))) == 1400
    assert _mtu(e2e, eng.bridge_name(e2e.network_id(ctl))) == 1500

    a = e2e.run_container(net, "a")
    b = e2e.run_container(net, "b")
    for c in (a, b):
        assert _mtu(e2e, host_veth(eng, endpoint_id(e2e, c, net))) == 1400
        assert sysfs(e2e, c, "eth0", "mtu") == "1400", f"{c}'s eth0"
    # A connected second interface gets its own network's MTU, next to a default one.
    c = e2e.run_container(ctl, "c")
    e2e.connect(net, c)
    assert sysfs(e2e, c, "eth0", "mtu") == "1500"
    assert sysfs(e2e, c, "eth1", "mtu") == "1400"
    assert _mtu(e2e, host_veth(eng, endpoint_id(e2e, c, net))) == 1400
    # Full-size frames pass (1372 + 8 ICMP + 20 IP = 1400).
    r = e2e.exec(
        a, "ping", "-c", "2", "-W", "2", "-s", "1372", e2e.container_ip(b, net), check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_icc_false_isolates_containers_but_not_gateway_or_outside(e2e: Scope) -> None:
    eng = e2e.engine
    net = e2e.create_network("noicc", subnet="10.63.2.0/24", options={OPT_ICC: "false"})
    a = e2e.run_container(net, "a")
    b = e2e.run_container(net, "b")
    ip_a, ip_b = e2e.container_ip(a, net), e2e.container_ip(b, net)
    serve_http(e2e, a)
    text_b = serve_http(e2e, b)
    # Control: b's server answers the engine host itself (INPUT/OUTPUT, not FORWARD).
    r = eng.in_engine_ns("timeout", "3", "busybox", "wget", "-O-", f"http://{ip_b}/")
    assert text_b in r.stdout

    expect_reach(e2e, a, {ip_b: False}, kind=BOTH, ping_only={"10.63.2.1": True}, what="icc=false")
    expect_reach(e2e, b, {ip_a: False}, kind=BOTH, ping_only={"10.63.2.1": True}, what="icc=false")
    # ...and by name through the embedded DNS: resolved, but not reached.
    r = e2e.exec(a, "nslookup", b, check=False)
    assert ip_b in r.stdout, f"embedded DNS does not resolve {b}: {r.stdout}{r.stderr}"
    with eng.remote_http_server(8000) as url:
        assert seen_source(e2e, a, url) == ENGINE_ADDR
        assert seen_source(e2e, b, url) == ENGINE_ADDR


def test_routed_gateway_mode_publishes_the_container_port_itself(e2e: Scope) -> None:
    """gateway_mode_ipv4=routed: the remote host (which routes our subnets through the engine
    host) reaches the published container port at the container's address, and nothing else;
    the host port is not used; traffic leaves with the container's own address."""
    eng = e2e.engine
    net = e2e.create_network("routed", subnet="10.63.4.0/24", options={OPT_GW4: "routed"})
    c = e2e.run_container(net, "c", publish=["8088:80"])
    ip = e2e.container_ip(c, net)
    text = serve_http(e2e, c)
    serve_http(e2e, c, 81)
    assert_remote_gets(eng, ip, 80, text)
    assert_remote_cannot_get(eng, ip, 81)
    assert_remote_cannot_get(eng, ENGINE_ADDR, 8088)
    with eng.remote_http_server(8000) as url:
        assert seen_source(e2e, c, url) == ip


def test_container_iface_prefix_names_the_container_interface(e2e: Scope) -> None:
    net = e2e.create_network("pfx", subnet="10.63.5.0/24", options={OPT_PREFIX: "lan"})
    c = e2e.run_container(net, "c")
    assert sysfs(e2e, c, "lan0", "operstate") in ("up", "unknown")
    assert "eth0" not in e2e.exec(c, "ls", "/sys/class/net").stdout.split()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("foo", "bar"),
        (OPT_MTU, "abc"),
        (OPT_MTU, "10"),
        (OPT_ICC, "maybe"),
        (OPT_MASQ, "yes please"),
        (OPT_HOST_IP, "not-an-ip"),
    ],
)
def test_bad_option_fails_naming_it_and_leaves_nothing(
    e2e: Scope,
    key: str,
    value: str,
) -> None:
    eng = e2e.engine
    subnet = "10.63.3.0/24"
    bridges_before = bridges(eng)
    links_before = eng.plugin_links()
    name = e2e.name("bad")
    e2e.networks.append(name)  # removed at teardown should the create wrongly succeed
    r = e2e.docker(
        "network",
        "create",
        "-d",
        e2e.driver,
        "--ipam-driver",
        e2e.driver,
        "--subnet",
        subnet,
        "-o",
        f"{key}={value}",
        name,
        check=False,
    )
    assert r.returncode != 0, f"-o {key}={value} was accepted"
    assert key in r.stderr, f"the error does not name the option {key}: {r.stderr}"
    assert name not in e2e.docker("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert bridges(eng) == bridges_before, "a refused create left a bridge behind"
    assert eng.plugin_links() == links_before
    # The refused create released its pool: the same subnet is free for a good network.
    good = e2e.create_network("good", subnet=subnet)
    e2e.remove_network(good)


def test_unknown_endpoint_driver_options_are_accepted(e2e: Scope) -> None:
    """Per-endpoint ``--driver-opt`` keys we do not read are ignored, as the bridge driver
    does (issue 12 item 2): on ``network connect`` and on ``docker run --network``."""
    net = e2e.create_network("epopt", subnet="10.63.6.0/24")
    other = e2e.create_network("epopt2", subnet="10.63.7.0/24")
    a = e2e.run_container(other, "a")
    e2e.docker("network", "connect", "--driver-opt", "com.example.foo=bar", net, a)
    ip_a = e2e.container_ip(a, net)
    b = e2e.name("b")
    e2e.containers.append(b)
    e2e.docker(
        "run", "-d", "--name", b,
        "--network", f"name={net},driver-opt=com.example.foo=bar,driver-opt=team=blue",
        e2e.engine.image, *SLEEPER,
    )  # fmt: skip
    e2e.assert_ping(b, ip_a)


def test_ipv6_only_network(e2e: Scope) -> None:
    """``-o com.docker.network.enable_ipv4=false`` (issue 12 item 3). Engine 28 makes the
    network IPv6-only and the containers get only IPv6 addresses; older engines ignore the
    key and would hand out IPv4 addresses anyway, so the plugin refuses it there, naming the
    engine version it needs, and nothing is left."""
    eng = e2e.engine
    subnet = "fd70:e30::/64"
    check_no_overlap(subnet)
    options = {"com.docker.network.enable_ipv4": "false"}
    if not eng.server_version.startswith("28."):
        before = set(eng.plugin_links())
        name = e2e.name("v6only")
        e2e.networks.append(name)
        r = e2e.docker(
            "network", "create", "-d", e2e.driver, "--ipam-driver", e2e.driver,
            "-o", "com.docker.network.enable_ipv4=false", "--ipv6", "--subnet", subnet, name,
            check=False,
        )  # fmt: skip
        assert r.returncode != 0
        assert "com.docker.network.enable_ipv4" in r.stderr and "28" in r.stderr, r.stderr
        assert set(eng.plugin_links()) == before
        return
    net = e2e.create_network("v6only", options=options, extra=["--ipv6", "--subnet", subnet])
    a, b = e2e.run_container(net, "a"), e2e.run_container(net, "b")
    info = e2e.container_inspect(b)["NetworkSettings"]["Networks"][net]
    assert info["IPAddress"] == "" and info["GlobalIPv6Address"], info
    assert e2e.container_addrs(a).get("eth0") in (None, []), e2e.container_addrs(a)
    e2e.assert_ping(a, str(info["GlobalIPv6Address"]))
