"""First end-to-end scenarios: networks, containers and isolation through a real dockerd.

Every check reads the truth from outside the plugin: the docker CLI, ``ip`` inside the
containers, and ``ip -json`` in the engine netns.
"""

from __future__ import annotations

import ipaddress

import pytest

from .harness import Scope, addresses, link_kind

pytestmark = pytest.mark.docker


def test_network_create_makes_bridge_and_rm_removes_it(e2e: Scope) -> None:
    eng = e2e.engine
    net = e2e.create_network("net1", subnet="10.31.0.0/24")
    info = e2e.network_inspect(net)
    assert info["Driver"] == e2e.driver
    assert info["IPAM"]["Driver"] == e2e.driver
    assert [c["Subnet"] for c in info["IPAM"]["Config"]] == ["10.31.0.0/24"]
    # (IPAM.Config echoes the user's config: no Gateway key when none was given.)

    bridge = eng.bridge_name(info["Id"])
    assert bridge.startswith("ptb")
    link = eng.link(bridge)
    assert link is not None, (
        f"no bridge {bridge} in the engine netns; plugin links: {eng.plugin_links()}"
    )
    assert link_kind(link) == "bridge"
    assert addresses(link) == ["10.31.0.1/24"]
    assert "UP" in link["flags"]

    e2e.remove_network(net)
    assert eng.link(bridge) is None, f"bridge {bridge} still exists after docker network rm"
    assert eng.plugin_links() == []


def test_containers_on_one_network_talk(e2e: Scope) -> None:
    net = e2e.create_network("net1", subnet="10.31.0.0/24")
    a = e2e.run_container(net, "a")
    b = e2e.run_container(net, "b")
    ip_a = e2e.container_ip(a, net)
    ip_b = e2e.container_ip(b, net)
    subnet = ipaddress.ip_network("10.31.0.0/24")
    assert ipaddress.ip_address(ip_a) in subnet
    assert ipaddress.ip_address(ip_b) in subnet
    assert ip_a != ip_b
    assert ip_a != "10.31.0.1"
    assert ip_b != "10.31.0.1"

    # What the container itself sees: one interface with the address docker reports.
    assert e2e.container_addrs(a).get("eth0") == [f"{ip_a}/24"]
    routes = e2e.exec(a, "ip", "route").stdout
    assert "default via 10.31.0.1" in routes, routes

    e2e.assert_ping(a, ip_b)
    e2e.assert_ping(b, ip_a)
    e2e.assert_ping(a, "10.31.0.1")  # the gateway on the plugin's bridge
    # Docker's embedded DNS resolves container names on user-defined networks.
    e2e.assert_ping(a, b)
    e2e.assert_ping(b, a)
    # TCP too, not only ICMP: b serves HTTP, a fetches it by name.
    e2e.exec(b, "sh", "-c", "echo from-b > /www/index.html && httpd -p 80 -h /www")
    out = e2e.http_get(a, f"http://{b}/").stdout
    assert "from-b" in out


def test_networks_are_isolated(e2e: Scope) -> None:
    net1 = e2e.create_network("net1", subnet="10.31.0.0/24")
    net2 = e2e.create_network("net2", subnet="10.32.0.0/24")
    a = e2e.run_container(net1, "a")
    b = e2e.run_container(net1, "b")
    c = e2e.run_container(net2, "c")
    e2e.connect(net2, b)

    addrs_b = e2e.container_addrs(b)
    assert sorted(addrs_b) == ["eth0", "eth1", "lo"], addrs_b
    ip_a = e2e.container_ip(a, net1)
    ip_b1 = e2e.container_ip(b, net1)
    ip_b2 = e2e.container_ip(b, net2)
    ip_c = e2e.container_ip(c, net2)
    assert addrs_b["eth0"] == [f"{ip_b1}/24"]
    assert addrs_b["eth1"] == [f"{ip_b2}/24"]
    assert ipaddress.ip_address(ip_b2) in ipaddress.ip_network("10.32.0.0/24")

    # B is on both networks and talks to each side.
    e2e.assert_ping(a, ip_b1)
    e2e.assert_ping(b, ip_a)
    e2e.assert_ping(b, ip_c)
    e2e.assert_ping(c, ip_b2)
    # A and C are on different networks: nothing passes, in either direction, even though
    # both bridges live in the same engine netns, which routes between them.
    e2e.assert_no_ping(a, ip_c)
    e2e.assert_no_ping(c, ip_a)
    # (Not checked: A reaching 10.32.0.1. The gateways are addresses of the engine host, so
    # that traffic is INPUT, not FORWARD; Docker's own bridge driver lets it through too.)
    # And not over TCP either.
    e2e.exec(c, "httpd", "-p", "80", "-h", "/www")
    e2e.exec(a, "httpd", "-p", "80", "-h", "/www")
    assert "pouch-e2e-ok" in e2e.http_get(b, f"http://{ip_c}/").stdout  # positive controls
    assert "pouch-e2e-ok" in e2e.http_get(b, f"http://{ip_a}/").stdout
    r = e2e.http_get(a, f"http://{ip_c}/", timeout=3, check=False)
    assert r.returncode != 0, f"A fetched from C across networks:\n{r.stdout}"
    r = e2e.http_get(c, f"http://{ip_a}/", timeout=3, check=False)
    assert r.returncode != 0, f"C fetched from A across networks:\n{r.stdout}"


def test_network_without_subnet_gets_pool_from_plugin_ipam(e2e: Scope) -> None:
    eng = e2e.engine
    net = e2e.create_network("auto1")
    other = e2e.create_network("auto2")
    info = e2e.network_inspect(net)
    assert info["IPAM"]["Driver"] == e2e.driver
    configs = info["IPAM"]["Config"]
    assert len(configs) == 1, configs
    pool = ipaddress.IPv4Network(configs[0]["Subnet"])
    # The plugin's default automatic pools: /24s carved from 10.200.0.0/13.
    assert pool.subnet_of(ipaddress.IPv4Network("10.200.0.0/13")), pool
    assert pool.prefixlen == 24
    gateway = configs[0].get("Gateway")
    assert gateway, configs
    assert ipaddress.ip_address(gateway) in pool

    pool2 = ipaddress.ip_network(e2e.network_inspect(other)["IPAM"]["Config"][0]["Subnet"])
    assert not pool.overlaps(pool2), f"two automatic pools overlap: {pool} {pool2}"

    link = eng.link(eng.bridge_name(info["Id"]))
    assert link is not None
    assert addresses(link) == [f"{gateway}/{pool.prefixlen}"]

    a = e2e.run_container(net, "a")
    ip_a = ipaddress.ip_address(e2e.container_ip(a, net))
    assert ip_a in pool
    assert str(ip_a) != gateway
    assert e2e.container_addrs(a).get("eth0") == [f"{ip_a}/{pool.prefixlen}"]
    e2e.assert_ping(a, gateway)
