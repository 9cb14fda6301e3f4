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


def firewall_plan(
    networks: Iterable[Network],
    endpoints: Iterable[Endpoint],
    vxlan: VxlanFilter | None = None,
) -> FirewallPlan:
    """The rules for these networks and the ports their endpoints publish, in a stable order."""
    nets = {n.network_id: n for n in networks}
    rules = tuple(
        NetworkRules(
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
        for _, n in sorted(nets.items())
    )
    forwards: list[PortForward] = []
    for ep in sorted(endpoints, key=lambda e: e.endpoint_id):
        net = nets.get(ep.network_id)
        if net is None:
            continue
        # A binding on all host addresses is published on both families the container has, as
        # Docker's bridge does; one on a host address, in that address's family.
        for b in ep.port_bindings:
            forwards.extend(
                PortForward(
                    bridge=net.bridge,
                    proto=b.proto.name.lower(),
                    host_ip=b.host_ip,
                    host_port=b.host_port,
                    container_ip=a.ip,
                    container_port=b.port,
                )
                for a in (ep.address, ep.address_v6)
                if a is not None and (b.host_ip is None or b.host_ip.version == a.version)
            )
    return FirewallPlan(networks=rules, forwards=tuple(forwards), vxlan=vxlan)
