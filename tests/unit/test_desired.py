"""The firewall plan of a state, built afresh or from the pieces of the last one, and its
rendering with the renderer's memory cold or warm: the same rules either way."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from pouch_driver.kernel import FirewallPlan, rules
from pouch_driver.model import (
    Endpoint,
    IPAMData,
    Network,
    NetworkOptions,
    PortBinding,
    Proto,
)
from pouch_driver.naming import Names
from pouch_driver.service.desired import PlanMemo, firewall_plan

NAMES = Names("pk")


def network(i: int, **options: object) -> Network:
    pool = ipaddress.ip_network(f"10.70.{i}.0/24")
    return Network(
        network_id=f"{i:064x}",
        bridge=f"pkb{i:012x}",
        bridge_owned=True,
        options=NetworkOptions(**options),  # type: ignore[arg-type]
        ipv4=(IPAMData("PouchLocal", pool, ipaddress.ip_interface(f"10.70.{i}.1/24")),),
    )


def endpoint(i: int, net: Network, *ports: int) -> Endpoint:
    return Endpoint(
        endpoint_id=f"e{i:063x}",
        network_id=net.network_id,
        host_ifname=f"pkh{i:012x}",
        container_ifname=f"pkc{i:012x}",
        mac="02:00:00:00:00:01",
        address=ipaddress.IPv4Interface(f"{net.ipv4[0].pool.network_address + 10 + i}/24"),
        port_bindings=tuple(PortBinding(Proto.TCP, 80 + k, p, p) for k, p in enumerate(ports)),
    )


def rendered(plan: FirewallPlan) -> dict[str, list[str]]:
    return rules.render(plan, 4, NAMES, docker_isolation=True, bridged_set=True)


def test_a_remembered_plan_is_the_plan_and_renders_the_same() -> None:
    """A run of changes (a port added, removed, an endpoint gone, a network's options changed,
    a network gone): after each, the plan built from the last one's pieces equals the fresh
    one, and its rules equal those rendered with nothing remembered."""
    nets = {i: network(i) for i in range(4)}
    eps = {i: endpoint(i, nets[i % 4], 8000 + 10 * i, 8001 + 10 * i) for i in range(12)}

    def drop_network(i: int) -> None:
        for k in [k for k, e in eps.items() if e.network_id == nets[i].network_id]:
            del eps[k]
        del nets[i]

    steps = [
        lambda: None,
        lambda: eps.__setitem__(3, replace(eps[3], port_bindings=eps[3].port_bindings[:1])),
        lambda: eps.__setitem__(12, endpoint(12, nets[1], 9000)),
        lambda: eps.pop(5),
        lambda: nets.__setitem__(2, replace(nets[2], options=NetworkOptions(enable_icc=False))),
        lambda: eps.__setitem__(7, replace(eps[7], port_bindings=())),
        lambda: drop_network(0),
        lambda: nets.__setitem__(0, network(0)),
    ]
    memo = PlanMemo()
    for step in steps:
        step()
        fresh = firewall_plan(nets.values(), eps.values())
        remembered = firewall_plan(nets.values(), eps.values(), memo=memo)
        assert remembered == fresh
        warm = rendered(remembered)
        rules._publish.cache_clear()
        rules._forward_rules.cache_clear()
        assert rendered(fresh) == warm
    # The pieces of unchanged records are the very objects of the last plan.
    again = firewall_plan(nets.values(), eps.values(), memo=memo)
    assert all(a is b for a, b in zip(again.forwards, remembered.forwards, strict=True))
    assert all(a is b for a, b in zip(again.networks, remembered.networks, strict=True))
