"""What the kernel must hold for a given state: the bridge, veth and firewall specifications.

Pure functions of the records, shared by the request path and by reconciliation, so both
build exactly the same kernel objects.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..kernel import BridgeSpec, FirewallPlan, NetworkRules, PortForward, VethSpec, VxlanFilter
from ..model import Endpoint, GatewayMode, IPInterface, Network
from ..naming import bridge_mac


def bridge_addresses(net: Network) -> tuple[IPInterface, ...]:
    """The gateway addresses we put on the bridge: none of a family in gateway mode
    ``isolated``, and no IPv4 one with ``inhibit_ipv4`` (the user routes it)."""
    o = net.options
    return tuple(
        g
        for g in net.gateways
        if o.gateway_mode(g.version) is not GatewayMode.ISOLATED
        and not (g.version == 4 and o.inhibit_ipv4)
    )


def bridge_spec(net: Network) -> BridgeSpec:
    return BridgeSpec(
        name=net.bridge,
        mtu=net.options.mtu,
        addresses=bridge_addresses(net),
        mac=bridge_mac(net.network_id) if net.bridge_owned else None,
    )


def veth_spec(ep: Endpoint, net: Network) -> VethSpec:
    return VethSpec(
        host=ep.host_ifname,
        peer=ep.container_ifname,
        bridge=net.bridge,
        mtu=net.options.mtu,
        peer_mac=ep.mac,
        hairpin=bool(ep.port_bindings),
    )


def network_rules(n: Network) -> NetworkRules:
    """The firewall policy of one network."""
    return NetworkRules(
        bridge=n.bridge,
        subnets=n.subnets,
        icc=n.options.enable_icc,
        masquerade=n.options.enable_masquerade,
        internal=n.options.internal,
        mode_v4=n.options.gateway_mode_ipv4,
        mode_v6=n.options.gateway_mode_ipv6,
        trusted=n.options.trusted_host_interfaces,
        snat_v4=n.options.host_ipv4,
        snat_v6=n.options.host_ipv6,
    )


def port_forwards(ep: Endpoint, bridge: str) -> tuple[PortForward, ...]:
    """The ports an endpoint publishes. A binding on all host addresses is published on both
    families the container has, as Docker's bridge does; one on a host address, in that
    address's family."""
    return tuple(
        PortForward(
            bridge=bridge,
            proto=b.proto.name.lower(),
            host_ip=b.host_ip,
            host_port=b.host_port,
            container_ip=a.ip,
            container_port=b.port,
        )
        for b in ep.port_bindings
        for a in (ep.address, ep.address_v6)
        if a is not None and (b.host_ip is None or b.host_ip.version == a.version)
    )


class PlanMemo:
    """The pieces of the last ``firewall_plan``, by record. Records are immutable (a change
    replaces the object), so an unchanged one is the same object and its pieces are reused:
    a change's plan costs a lookup per record, not a rebuild of every network and port, and
    the rendering (kernel/rules.py) meets the same ``PortForward`` objects again. Used by one
    plan at a time."""

    def __init__(self) -> None:
        self.networks: dict[str, tuple[Network, NetworkRules]] = {}
        self.forwards: dict[str, tuple[Endpoint, str, tuple[PortForward, ...]]] = {}


def firewall_plan(
    networks: Iterable[Network],
    endpoints: Iterable[Endpoint],
    vxlan: VxlanFilter | None = None,
    memo: PlanMemo | None = None,
) -> FirewallPlan:
    """The rules for these networks and the ports their endpoints publish, in a stable order.
    ``memo``: reuse (and remember) the pieces of unchanged records."""
    memo = memo or PlanMemo()
    nets = {n.network_id: n for n in networks}
    seen_nets: dict[str, tuple[Network, NetworkRules]] = {}
    rules: list[NetworkRules] = []
    for nid, n in sorted(nets.items()):
        known = memo.networks.get(nid)
        piece = known if known is not None and known[0] is n else (n, network_rules(n))
        seen_nets[nid] = piece
        rules.append(piece[1])
    seen_eps: dict[str, tuple[Endpoint, str, tuple[PortForward, ...]]] = {}
    forwards: list[PortForward] = []
    for ep in sorted(endpoints, key=lambda e: e.endpoint_id):
        net = nets.get(ep.network_id)
        if net is None or not ep.port_bindings:
            continue
        done = memo.forwards.get(ep.endpoint_id)
        if done is None or done[0] is not ep or done[1] != net.bridge:
            done = (ep, net.bridge, port_forwards(ep, net.bridge))
        seen_eps[ep.endpoint_id] = done
        forwards.extend(done[2])
    memo.networks, memo.forwards = seen_nets, seen_eps
    return FirewallPlan(networks=tuple(rules), forwards=tuple(forwards), vxlan=vxlan)
