"""Endpoints (issue 3, item 3): one veth pair per endpoint, host end up on the bridge, the other
end inside the container; the pair goes with the endpoint; the container's MAC.

The pair is proven a pair by the kernel's own bookkeeping: the container's ``eth0`` names the
host end's ifindex as its peer (``iflink``), and the host end names ``eth0``'s (``link_index``).
"""

from __future__ import annotations

import pytest

from .harness import Scope, link_kind
from .netcheck import (
    bridge_ports,
    container_ifaces,
    container_veth,
    create_container_api,
    endpoint_id,
    host_veth,
    sysfs,
    wait_links_gone,
)

pytestmark = pytest.mark.docker


def _check_pair(e2e: Scope, container: str, network: str, bridge: str) -> tuple[str, str]:
    """Assert the endpoint's veth pair is wired as documented; returns (host, peer) names."""
    eng = e2e.engine
    eid = endpoint_id(e2e, container, network)
    host, peer = host_veth(eng, eid), container_veth(eng, eid)
    link = eng.link(host)
    assert link is not None, f"no host veth {host} for {container}: {eng.plugin_links()}"
    assert link_kind(link) == "veth"
    assert link.get("master") == bridge, f"{host} is on {link.get('master')}, not {bridge}"
    assert "UP" in link["flags"] and link.get("operstate") == "UP", link
    assert eng.link(peer) is None, f"{peer} is still in the engine netns, not in {container}"
    # The container's interface for this endpoint: the one carrying its address (the engine
    # names it eth<N> with a per-container counter that a reconnect does not reset).
    ip = e2e.container_ip(container, network)
    addrs = e2e.container_addrs(container)
    dev = next((d for d, a in addrs.items() if any(x.split("/")[0] == ip for x in a)), None)
    assert dev is not None, f"no interface of {container} carries {ip}: {addrs}"
    assert int(sysfs(e2e, container, dev, "iflink")) == link["ifindex"], (
        f"{container}'s {dev} is not the peer of {host}"
    )
    assert link.get("link_index") == int(sysfs(e2e, container, dev, "ifindex"))
    return host, peer


def test_one_veth_pair_per_endpoint_removed_with_it(e2e: Scope) -> None:
    eng = e2e.engine
    baseline = set(eng.plugin_links())
    net = e2e.create_network("eps", subnet="10.62.0.0/24")
    bridge = eng.bridge_name(e2e.network_id(net))
    a = e2e.run_container(net, "a")
    b = e2e.run_container(net, "b")
    pair_a = _check_pair(e2e, a, net, bridge)
    pair_b = _check_pair(e2e, b, net, bridge)
    assert pair_a[0] != pair_b[0]
    assert bridge_ports(eng, bridge) == sorted([pair_a[0], pair_b[0]])
    # Nothing else of ours: one bridge and one host end per endpoint.
    assert set(eng.plugin_links()) - baseline == {bridge, pair_a[0], pair_b[0]}

    # docker rm -f: DeleteEndpoint removes the pair (in the background: poll).
    e2e.remove_container(a)
    wait_links_gone(eng, pair_a)
    assert bridge_ports(eng, bridge) == [pair_b[0]]

    # disconnect: the same, and the container keeps only lo.
    e2e.disconnect(net, b)
    wait_links_gone(eng, pair_b)
    assert bridge_ports(eng, bridge) == []
    assert container_ifaces(e2e, b) == ["lo"]

    # connect again: a new endpoint, a new pair; stop: gone; start: yet another.
    e2e.connect(net, b)
    pair_c = _check_pair(e2e, b, net, bridge)
    assert pair_c[0] != pair_b[0]
    e2e.docker("stop", b)
    wait_links_gone(eng, pair_c)
    assert bridge_ports(eng, bridge) == []
    e2e.docker("start", b)
    pair_d = _check_pair(e2e, b, net, bridge)
    assert pair_d[0] not in (pair_b[0], pair_c[0])
    assert bridge_ports(eng, bridge) == [pair_d[0]]


def test_container_mac_generated_or_exactly_as_given(e2e: Scope) -> None:
    eng = e2e.engine
    net = e2e.create_network("macs", subnet="10.62.1.0/24")
    a = e2e.run_container(net, "a")
    b = e2e.run_container(net, "b")
    macs = {}
    for c in (a, b):
        mac = sysfs(e2e, c, "eth0", "address")
        assert mac.startswith("02:50:"), f"{c}'s MAC {mac} is not one of the plugin's (02:50:..)"
        reported = e2e.container_inspect(c)["NetworkSettings"]["Networks"][net]["MacAddress"]
        assert reported == mac, f"docker reports {reported}, the kernel has {mac}"
        macs[c] = mac
    assert macs[a] != macs[b]

    given = "02:42:e2:e0:00:01"
    m = create_container_api(e2e, net, "m", {"MacAddress": given})
    assert sysfs(e2e, m, "eth0", "address") == given
    assert e2e.container_inspect(m)["NetworkSettings"]["Networks"][net]["MacAddress"] == given
    _check_pair(e2e, m, net, eng.bridge_name(e2e.network_id(net)))
    # ARP resolves to the given MAC: traffic flows both ways.
    e2e.assert_ping(a, e2e.container_ip(m, net))
    e2e.assert_ping(m, e2e.container_ip(b, net))
    neigh = e2e.exec(a, "ip", "neigh", "show", e2e.container_ip(m, net)).stdout
    assert given in neigh, neigh
