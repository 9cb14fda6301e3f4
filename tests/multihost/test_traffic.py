"""Cross-host traffic on a cluster network, and isolation from every other network.

A cluster network is created on each host with the same definition
(``-o pouch.cluster=NAME --subnet ...``); containers on it reach each other across hosts
by IP over VXLAN. Checked by packets (ping, wget, a don't-fragment ICMP echo) and by each
host's kernel (``ip -json`` / ``bridge -json``).
"""

from __future__ import annotations

import ipaddress

from tests.e2e.harness import Scope

from .conftest import Pair
from .harness import (
    HTTPD,
    OVERLAY_MTU,
    PAGE,
    container_net,
    containers_on,
    df_ping,
    parallel,
    send_udp,
    udp_listener,
    vxlan_udp_frame,
    wait_announced,
)

VXLAN_PORT = 4789


def _same_vni_everywhere(mh: Pair, *networks: str) -> list[int]:
    """Each host has one VXLAN device per network, on its own VTEP, port 4789, MTU underlay
    - 50, a port of the network's bridge; the hosts agree on each network's VNI, and the
    networks' VNIs differ. Returns them."""
    vnis = []
    for net in networks:
        per_host = []
        for h in mh.hosts.hosts:
            vx = h.vxlan_of(net)
            assert vx["local"] == h.address, (h.letter, vx)
            assert vx["port"] == VXLAN_PORT, (h.letter, vx)
            assert vx["mtu"] == OVERLAY_MTU, (h.letter, vx)
            per_host.append(int(vx["vni"]))
        assert len(set(per_host)) == 1, (net, per_host)
        vnis.append(per_host[0])
    assert len(set(vnis)) == len(vnis), vnis
    return vnis


def test_cross_host_tcp_ping_and_mtu_ipv4(mh: Pair) -> None:
    """httpd on each host, fetched and pinged from the other; the overlay MTU is the
    underlay's less 50 in the containers, and a 1422-byte DF ping crosses both ways."""
    net = mh.mesh("mesh", "10.61.0.0/16")
    wa = mh.a.run_container(net, "wa", *HTTPD)
    wb = mh.b.run_container(net, "wb", *HTTPD)
    ipa, ipb = mh.a.container_ip(wa, net), mh.b.container_ip(wb, net)
    assert ipa != ipb
    for ip in (ipa, ipb):
        assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.61.0.0/16")
    _same_vni_everywhere(mh, net)
    wait_announced(mh.ha, mh.hb, [ipb])
    wait_announced(mh.hb, mh.ha, [ipa])

    mh.a.assert_ping(wa, ipb)
    mh.b.assert_ping(wb, ipa)
    assert PAGE in mh.a.http_get(wa, f"http://{ipb}/").stdout
    assert PAGE in mh.b.http_get(wb, f"http://{ipa}/").stdout

    for s, c in ((mh.a, wa), (mh.b, wb)):
        assert s.exec(c, "cat", "/sys/class/net/eth0/mtu").stdout.strip() == str(OVERLAY_MTU)
    payload = OVERLAY_MTU - 28  # 1422: IPv4 20 + ICMP 8
    assert df_ping(mh.ha, wa, ipb, payload) == "reply"
    assert df_ping(mh.hb, wb, ipa, payload) == "reply"
    # One byte more does not fit the container's link: refused at the source (EMSGSIZE),
    # never silently lost on the way.
    assert df_ping(mh.ha, wa, ipb, payload + 1) == "error 90"


def test_cross_host_tcp_and_ping_dual_stack(mh: Pair) -> None:
    """The same over IPv6 on a dual-stack cluster network."""
    net = mh.mesh("dual", "10.62.0.0/16", subnet6="fd61:1::/64")
    wa = mh.a.run_container(net, "wa", *HTTPD)
    wb = mh.b.run_container(net, "wb", *HTTPD)
    a_net, b_net = container_net(mh.ha, wa, net), container_net(mh.hb, wb, net)
    a6, b6 = a_net["GlobalIPv6Address"], b_net["GlobalIPv6Address"]
    assert a6 and b6 and a6 != b6, (a_net, b_net)
    for ip in (a6, b6):
        assert ipaddress.ip_address(ip) in ipaddress.ip_network("fd61:1::/64")
    wait_announced(mh.ha, mh.hb, [b_net["IPAddress"], b6])
    wait_announced(mh.hb, mh.ha, [a_net["IPAddress"], a6])

    mh.a.assert_ping(wa, b6)
    mh.b.assert_ping(wb, a6)
    mh.a.assert_ping(wa, b_net["IPAddress"])
    assert PAGE in mh.a.http_get(wa, f"http://[{b6}]/").stdout
    assert PAGE in mh.b.http_get(wb, f"http://[{a6}]/").stdout


def test_a_conflicting_definition_is_refused_naming_the_difference(mh: Pair) -> None:
    """Host b asks for the same cluster network with another subnet: refused, and the error
    says which setting differs; with the same subnet it joins."""
    mh.create_cluster_network(mh.a, "conf", "10.63.0.0/16")
    r = mh.b.docker(
        "network",
        "create",
        "-d",
        mh.b.driver,
        "--ipam-driver",
        mh.b.driver,
        "--subnet",
        "10.64.0.0/16",
        "-o",
        f"pouch.cluster={mh.cluster_name('conf')}",
        mh.b.name("conf-other"),
        check=False,
    )
    mh.b.networks.append(mh.b.name("conf-other"))
    assert r.returncode != 0, r.stdout
    assert "subnet" in r.stderr.lower(), r.stderr
    assert "10.63.0.0/16" in r.stderr or "10.64.0.0/16" in r.stderr, r.stderr
    mh.create_cluster_network(mh.b, "conf", "10.63.0.0/16")


def test_cluster_networks_and_a_local_network_are_isolated(mh: Pair) -> None:
    """Two cluster networks and a local one per host: each cluster network connects its own
    containers across hosts, and nothing crosses from one network to another, on one host or
    across."""
    x = mh.mesh("x", "10.65.0.0/16")
    y = mh.mesh("y", "10.66.0.0/16")
    loc_a = mh.a.create_network("loc", subnet="10.57.0.0/24")
    loc_b = mh.b.create_network("loc", subnet="10.57.1.0/24")
    ax, ay, al = (mh.a.run_container(n, b) for n, b in ((x, "ax"), (y, "ay"), (loc_a, "al")))
    bx, by, bl = (mh.b.run_container(n, b) for n, b in ((x, "bx"), (y, "by"), (loc_b, "bl")))
    ip = {
        "ax": mh.a.container_ip(ax, x),
        "ay": mh.a.container_ip(ay, y),
        "al": mh.a.container_ip(al, loc_a),
        "bx": mh.b.container_ip(bx, x),
        "by": mh.b.container_ip(by, y),
        "bl": mh.b.container_ip(bl, loc_b),
    }
    _same_vni_everywhere(mh, x, y)
    wait_announced(mh.ha, mh.hb, [ip["bx"], ip["by"]])
    wait_announced(mh.hb, mh.ha, [ip["ax"], ip["ay"]])
    # No local network is announced: its addresses are nowhere in the other host's kernel.
    assert ip["al"] not in mh.hb.entries_towards(mh.ha)[1]
    assert ip["bl"] not in mh.ha.entries_towards(mh.hb)[1]

    # Positive controls: each cluster network works across hosts.
    mh.a.assert_ping(ax, ip["bx"])
    mh.b.assert_ping(by, ip["ay"])

    negatives = [
        (mh.a, ax, "by"),
        (mh.a, ay, "bx"),
        (mh.b, bx, "ay"),
        (mh.b, by, "ax"),
        (mh.a, al, "bx"),
        (mh.a, al, "by"),
        (mh.b, bl, "ax"),
        (mh.a, ax, "ay"),
        (mh.a, ax, "al"),
        (mh.b, bx, "bl"),
    ]

    def attempt(scope: Scope, c: str, target: str) -> tuple[str, str, int]:
        r = scope.ping(c, ip[target], count=2, wait=1)
        return c, target, r.returncode

    results = parallel(*(lambda s=s, c=c, t=t: attempt(s, c, t) for s, c, t in negatives))
    reached = [(c, t) for c, t, rc in results if rc == 0]
    assert not reached, f"reachable across networks: {reached}"


def test_vxlan_from_a_stranger_on_the_underlay_is_dropped(mh: Pair) -> None:
    """A VXLAN packet with the network's VNI and a container's MAC reaches the container when
    a cluster host sends it, and is dropped when the underlay's switch (no cluster host)
    does: the kernel would decapsulate it from anyone."""
    net = mh.mesh("guard", "10.77.0.0/16")
    a1 = mh.a.run_container(net, "a1")
    b1 = mh.b.run_container(net, "b1")
    ip_a1, ip_b1 = mh.a.container_ip(a1, net), mh.b.container_ip(b1, net)
    wait_announced(mh.ha, mh.hb, [ip_b1])
    vni = int(mh.ha.vxlan_of(net)["vni"])
    mac_a1 = containers_on(mh.ha, net)[a1][2]
    port = 9999

    def frame(text: str) -> bytes:
        return vxlan_udp_frame(
            vni,
            dst_mac=mac_a1,
            src_mac="02:00:5e:10:00:99",
            src=ip_b1,
            dst=ip_a1,
            port=port,
            payload=text.encode(),
        )

    with udp_listener(mh.ha, a1, port, seconds=4) as received:
        send_udp(mh.hosts.switch_ns, mh.ha.address, VXLAN_PORT, frame("from-stranger"))
        send_udp(mh.hb.netns, mh.ha.address, VXLAN_PORT, frame("from-member"))
    assert "from-member" in received, f"positive control failed: {received}"
    assert "from-stranger" not in received, received
    # And what dropped it is the firewall's rule for VXLAN from anyone else (counted).
    dropped = [
        line
        for line in mh.ha.in_engine_ns("iptables-save", "-c", "-t", "raw").stdout.splitlines()
        if "--dport 4789" in line and line.endswith("-j DROP") and not line.startswith("[0:")
    ]
    assert dropped, mh.ha.in_engine_ns("iptables-save", "-c", "-t", "raw").stdout
