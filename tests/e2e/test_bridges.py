"""Bridges (issue 3, item 1): ``com.docker.network.bridge.name`` names the bridge, else it is
``<prefix>b<id>``; a bridge the user made beforehand is used and left in place.

Every interface a test makes itself (named ``e2e*``, never with the plugin's prefix) is removed
in a ``finally``, whatever the plugin did.
"""

from __future__ import annotations

import pytest

from .harness import ENGINE_ADDR, Scope, addresses, link_kind
from .netcheck import (
    bridge_ports,
    endpoint_id,
    host_veth,
    mentions,
    seen_source,
    wait_links_gone,
)

pytestmark = pytest.mark.docker

OPT_NAME = "com.docker.network.bridge.name"


def test_bridge_named_by_option_is_created_and_removed(e2e: Scope) -> None:
    eng = e2e.engine
    name = "e2ebr1"
    eng.in_engine_ns("ip", "link", "del", name, check=False)  # an interrupted run's leftover
    try:
        net = e2e.create_network("named", subnet="10.61.0.0/24", options={OPT_NAME: name})
        nid = e2e.network_id(net)
        link = eng.link(name)
        assert link is not None, f"no bridge {name}; links: {[lk['ifname'] for lk in eng.links()]}"
        assert link_kind(link) == "bridge"
        assert addresses(link) == ["10.61.0.1/24"]
        assert "UP" in link["flags"]
        assert eng.link(eng.bridge_name(nid)) is None, "a ptb<id> bridge was made as well"

        a = e2e.run_container(net, "a")
        assert bridge_ports(eng, name) == [host_veth(eng, endpoint_id(e2e, a, net))]
        e2e.assert_ping(a, "10.61.0.1")

        e2e.remove_container(a)
        e2e.remove_network(net)
        # The plugin made this bridge, so it removes it (as Docker's bridge driver does).
        assert eng.link(name) is None, f"bridge {name} made for the network outlived it"
    finally:
        eng.in_engine_ns("ip", "link", "del", name, check=False)


def test_existing_bridge_is_used_and_left_in_place(e2e: Scope) -> None:
    eng = e2e.engine
    name = "e2ebr0"
    eng.in_engine_ns("ip", "link", "del", name, check=False)
    eng.in_engine_ns("ip", "link", "add", name, "type", "bridge")
    try:
        before = eng.link(name)
        assert before is not None
        net = e2e.create_network("mine", subnet="10.61.1.0/24", options={OPT_NAME: name})
        nid = e2e.network_id(net)
        link = eng.link(name)
        assert link is not None and link["ifindex"] == before["ifindex"], (
            "the user's bridge was replaced instead of used"
        )
        assert addresses(link) == ["10.61.1.1/24"]
        assert "UP" in link["flags"]
        assert eng.link(eng.bridge_name(nid)) is None

        a = e2e.run_container(net, "a")
        b = e2e.run_container(net, "b")
        veths = [host_veth(eng, endpoint_id(e2e, c, net)) for c in (a, b)]
        assert bridge_ports(eng, name) == sorted(veths)
        # Real traffic over the user's bridge: inside, to the gateway, and out (masqueraded:
        # the firewall rules follow the bridge's name, not only ptb<id>).
        e2e.assert_ping(a, e2e.container_ip(b, net))
        e2e.assert_ping(b, "10.61.1.1")
        with eng.remote_http_server(8000) as url:
            assert seen_source(e2e, a, url) == ENGINE_ADDR

        e2e.remove_container(a)
        e2e.remove_container(b)
        wait_links_gone(eng, veths)
        e2e.remove_network(net)
        after = eng.link(name)
        assert after is not None, f"docker network rm deleted the user's bridge {name}"
        assert after["ifindex"] == before["ifindex"]
        assert addresses(after) == [], f"gateway address left on {name}: {addresses(after)}"
        assert mentions(eng, name) == [], "firewall rules for the bridge outlived the network"
    finally:
        eng.in_engine_ns("ip", "link", "del", name, check=False)


def test_existing_non_bridge_name_is_refused(e2e: Scope) -> None:
    eng = e2e.engine
    name, peer = "e2eve0", "e2eve1"
    eng.in_engine_ns("ip", "link", "del", name, check=False)
    eng.in_engine_ns("ip", "link", "add", name, "type", "veth", "peer", "name", peer)
    try:
        net = e2e.name("notbr")
        e2e.networks.append(net)
        r = e2e.docker(
            "network",
            "create",
            "-d",
            e2e.driver,
            "--ipam-driver",
            e2e.driver,
            "--subnet",
            "10.61.2.0/24",
            "-o",
            f"{OPT_NAME}={name}",
            net,
            check=False,
        )
        assert r.returncode != 0, "a network was made on a veth named as its bridge"
        assert OPT_NAME in r.stderr and name in r.stderr, r.stderr
        assert e2e.docker("network", "inspect", net, check=False).returncode != 0
        link = eng.link(name)
        assert link is not None and link_kind(link) == "veth"
        assert addresses(link) == [], f"the refused create left addresses on {name}"
    finally:
        eng.in_engine_ns("ip", "link", "del", name, check=False)
