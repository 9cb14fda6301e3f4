"""The service over fakes: compensation on failure, conflicts, ports, restart and sweeping."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from pouch_driver import store as st
from pouch_driver.config import Settings
from pouch_driver.daemon import build_driver
from pouch_driver.errors import (
    Conflict,
    Exhausted,
    InvalidRequest,
    KernelError,
    NotFound,
    StoreError,
)
from pouch_driver.ipam import ADDRESS, OWED, RECLAIMED
from pouch_driver.kernel import LinkInfo
from pouch_driver.kernel.fake import FakeFirewall, FakeLinks
from pouch_driver.model import IPAMData, IPInterface, NetworkOptions, PortBinding, Proto
from pouch_driver.service.desired import firewall_plan
from pouch_driver.service.driver import Driver as Service
from pouch_driver.service.reconcile import Reconciler, Report, start_up

NID = "1" * 64
NID2 = "2" * 64
EID = "e" * 64
V4 = IPAMData(
    "PouchLocal", ipaddress.ip_network("10.5.0.0/24"), ipaddress.ip_interface("10.5.0.1/24")
)
ADDR = ipaddress.IPv4Interface("10.5.0.2/24")

Factory = Callable[..., Awaitable[Service]]


@pytest.fixture
async def make_service(settings: Settings, tmp_path: Path) -> AsyncIterator[Factory]:
    started: list[Service] = []

    async def factory(
        links: FakeLinks | None = None, fw: FakeFirewall | None = None, reconcile: bool = True
    ) -> Service:
        svc = build_driver(settings, links=links or FakeLinks(), firewall=fw or FakeFirewall())
        if reconcile:
            await start_up(svc)
        else:
            await svc.start()
        started.append(svc)
        return svc

    yield factory
    for svc in started:
        if svc.store._db is not None:
            await svc.stop()


async def sweep(svc: Service) -> Report:
    return await Reconciler(svc, repair=True).run()


async def restart(svc: Service, factory: Factory) -> Service:
    await svc.stop()
    assert isinstance(svc.links, FakeLinks) and isinstance(svc.firewall, FakeFirewall)
    return await factory(svc.links, svc.firewall)


async def test_bridge_failure_leaves_no_network(make_service: Factory) -> None:
    svc = await make_service()
    svc.links.faults.fail.add("ensure_bridge")  # type: ignore[attr-defined]
    with pytest.raises(KernelError):
        await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    assert svc.state.networks == {}
    svc = await restart(svc, make_service)
    assert svc.state.networks == {}, "the record was undone in the store too"


async def test_firewall_failure_undoes_bridge_and_record(make_service: Factory) -> None:
    svc = await make_service()
    svc.firewall.faults.fail.add("firewall_apply")  # type: ignore[attr-defined]
    with pytest.raises(KernelError):
        await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    assert svc.state.networks == {}
    assert svc.names.bridge(NID) not in svc.links.links  # type: ignore[attr-defined]


async def test_veth_failure_leaves_no_endpoint(make_service: Factory) -> None:
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    svc.links.faults.fail.add("ensure_veth")  # type: ignore[attr-defined]
    with pytest.raises(KernelError):
        await svc.endpoints.create_endpoint(NID, EID, ADDR, None, None)
    assert svc.state.endpoints == {}
    assert not any(n.startswith(("puh", "puc")) for n in svc.links.links)  # type: ignore[attr-defined]
    svc = await restart(svc, make_service)
    assert svc.state.endpoints == {}


async def test_store_failure_leaves_no_veth(
    make_service: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record's commit and the veth run together: a failed commit removes the veth."""
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    real = svc.store.commit

    async def failing(ops: Sequence[st.Op]) -> None:
        if any(isinstance(op, st.PutEndpoint) for op in ops):
            raise StoreError("disk full")
        await real(ops)

    monkeypatch.setattr(svc.store, "commit", failing)
    with pytest.raises(StoreError, match="disk full"):
        await svc.endpoints.create_endpoint(NID, EID, ADDR, None, None)
    assert svc.state.endpoints == {}
    await svc.deletes.drain()
    assert not any(n.startswith(("puh", "puc")) for n in svc.links.links)  # type: ignore[attr-defined]
    monkeypatch.undo()
    svc = await restart(svc, make_service)
    assert svc.state.endpoints == {}


async def test_sandbox_keys_are_written_behind_in_order(make_service: Factory) -> None:
    """Join and Leave answer before their record is fsynced; the records land in order with
    the commits queued after them, so the store ends where memory does."""
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    await svc.endpoints.create_endpoint(NID, EID, ADDR, None, None)
    await svc.endpoints.create_endpoint(
        NID, "f" * 64, ipaddress.ip_interface("10.5.0.3/24"), None, None
    )  # type: ignore[arg-type]
    await svc.endpoints.join(NID, EID, "/var/run/docker/netns/one")
    assert svc.state.endpoints[EID].sandbox_key == "/var/run/docker/netns/one"
    await svc.endpoints.join(NID, "f" * 64, "/var/run/docker/netns/two")
    await svc.endpoints.leave(NID, "f" * 64)
    await svc.endpoints.delete_endpoint(NID, "f" * 64)  # fsynced, queued after the leave
    await svc.store.flushed()
    svc = await restart(svc, make_service)
    assert svc.state.endpoints[EID].sandbox_key == "/var/run/docker/netns/one"
    assert "f" * 64 not in svc.state.endpoints


async def test_program_failure_reverts_bindings(make_service: Factory) -> None:
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    await svc.endpoints.create_endpoint(NID, EID, ADDR, None, None)
    svc.firewall.faults.fail.add("firewall_apply")  # type: ignore[attr-defined]
    with pytest.raises(KernelError):
        await svc.ports.program_external_connectivity(
            NID, EID, [PortBinding(Proto.TCP, 80, 18081, 18081)]
        )
    assert svc.state.endpoints[EID].port_bindings == ()


async def test_conflicts_are_refused_before_any_kernel_work(make_service: Factory) -> None:
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(bridge_name="mybr0"), [V4], [])
    calls = len(svc.links.calls)  # type: ignore[attr-defined]
    with pytest.raises(Conflict, match="bridge mybr0 is already used"):
        await svc.networks.create_network(NID2, NetworkOptions(bridge_name="mybr0"), [], [])
    other = IPAMData("PouchLocal", ipaddress.ip_network("10.5.0.128/25"))
    with pytest.raises(Conflict, match="overlaps"):
        await svc.networks.create_network(NID2, NetworkOptions(), [other], [])
    with pytest.raises(Conflict, match="another configuration"):
        await svc.networks.create_network(
            NID, NetworkOptions(mtu=1400, bridge_name="mybr0"), [V4], []
        )
    assert len(svc.links.calls) == calls  # type: ignore[attr-defined]


async def test_retried_create_network_is_idempotent(make_service: Factory) -> None:
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    assert list(svc.state.networks) == [NID]


async def test_existing_non_bridge_interface_is_refused(make_service: Factory) -> None:
    links = FakeLinks()
    links.links["eth9"] = LinkInfo("eth9", 9, "veth", None, True, 1500, "02:00:00:00:00:09")
    svc = await make_service(links)
    with pytest.raises(InvalidRequest, match="eth9 exists and is not a bridge"):
        await svc.networks.create_network(NID, NetworkOptions(bridge_name="eth9"), [V4], [])


async def test_a_users_bridge_is_used_and_left_in_place(make_service: Factory) -> None:
    links = FakeLinks()
    links.links["br-user"] = LinkInfo("br-user", 9, "bridge", None, True, 1500, "02:00:00:00:00:09")
    svc = await make_service(links)
    await svc.networks.create_network(NID, NetworkOptions(bridge_name="br-user"), [V4], [])
    assert links.links["br-user"].addresses == (V4.gateway,)
    await svc.networks.delete_network(NID)
    assert "br-user" in links.links
    assert links.links["br-user"].addresses == ()


async def test_delete_network_removes_endpoints_the_engine_forgot(make_service: Factory) -> None:
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    await svc.endpoints.create_endpoint(NID, EID, ADDR, None, None)
    await svc.networks.delete_network(NID)
    assert svc.state.endpoints == {}
    assert svc.links.links == {}  # type: ignore[attr-defined]


async def test_duplicate_address_on_a_network_is_refused(make_service: Factory) -> None:
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    await svc.endpoints.create_endpoint(NID, EID, ADDR, None, None)
    with pytest.raises(Conflict, match="already used by endpoint"):
        await svc.endpoints.create_endpoint(NID, "f" * 64, ADDR, None, None)
    with pytest.raises(InvalidRequest, match="outside the network's subnets"):
        await svc.endpoints.create_endpoint(
            NID, "f" * 64, ipaddress.IPv4Interface("10.9.0.2/24"), None, None
        )
    with pytest.raises(NotFound):
        await svc.endpoints.create_endpoint(NID2, "f" * 64, ADDR, None, None)


async def test_only_endpoints_with_published_ports_get_hairpin_mode(
    make_service: Factory,
) -> None:
    """Set when ports are published (a container reaching its own published port), never on
    a plain connect."""
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    await svc.endpoints.create_endpoint(NID, EID, ADDR, None, None)
    plain = ipaddress.ip_interface("10.5.0.3/24")
    await svc.endpoints.create_endpoint(NID, "f" * 64, plain, None, None)  # type: ignore[arg-type]
    links: FakeLinks = svc.links  # type: ignore[assignment]
    assert links.hairpin == set()
    await svc.ports.program_external_connectivity(
        NID, EID, [PortBinding(Proto.TCP, 80, 18111, 18111)]
    )
    assert links.hairpin == {svc.state.endpoints[EID].host_ifname}


async def test_bridge_port_limit_is_a_clear_error(make_service: Factory) -> None:
    svc = await make_service()
    big = IPAMData("PouchLocal", ipaddress.ip_network("10.6.0.0/16"))
    await svc.networks.create_network(NID, NetworkOptions(), [big], [])
    for i in range(1023):
        eid = f"{i:012x}" + "0" * 52
        await svc.endpoints.create_endpoint(NID, eid, None, None, None)
    with pytest.raises(Exhausted, match="limit of 1023 ports per bridge"):
        await svc.endpoints.create_endpoint(NID, "f" * 64, None, None, None)


async def test_port_ranges_and_ephemeral_ports_resolve_to_free_ports(
    make_service: Factory,
) -> None:
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    await svc.endpoints.create_endpoint(NID, EID, ADDR, None, None)
    other = "f" * 64
    await svc.endpoints.create_endpoint(
        NID, other, ipaddress.IPv4Interface("10.5.0.3/24"), None, None
    )
    await svc.ports.program_external_connectivity(
        NID, EID, [PortBinding(Proto.TCP, 80, 18090, 18092), PortBinding(Proto.UDP, 53, 0, 0)]
    )
    first = svc.state.endpoints[EID].port_bindings
    assert first[0].host_port == 18090
    assert 49153 <= first[1].host_port <= 60999
    await svc.ports.program_external_connectivity(
        NID, other, [PortBinding(Proto.TCP, 80, 18090, 18092)]
    )
    assert svc.state.endpoints[other].port_bindings[0].host_port == 18091
    with pytest.raises(Conflict, match="18090/tcp"):
        await svc.ports.program_external_connectivity(
            NID, other, [PortBinding(Proto.TCP, 81, 18090, 18090)]
        )
    await svc.ports.revoke_external_connectivity(NID, EID)
    assert svc.state.endpoints[EID].port_bindings == ()
    assert len(svc.firewall.plan.forwards) == 1  # type: ignore[attr-defined]


V6 = IPAMData(
    "PouchLocal", ipaddress.ip_network("fd70:5::/64"), ipaddress.ip_interface("fd70:5::1/64")
)
ADDR6 = ipaddress.IPv6Interface("fd70:5::2/64")
ip = ipaddress.ip_address


@pytest.mark.parametrize(
    ("host_ip", "families"),
    [
        (None, {4, 6}),  # -p 18100:80: every host address the container can be reached on
        (ip("0.0.0.0"), {4}),
        (ip("::"), {6}),
        (ip("2001:db8::1"), {6}),
    ],
)
async def test_published_ports_follow_the_host_ips_family(
    make_service: Factory,
    host_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    families: set[int],
) -> None:
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [V6])
    await svc.endpoints.create_endpoint(NID, EID, ADDR, ADDR6, None)
    with pytest.MonkeyPatch.context() as mp:  # 2001:db8::1 is no address of this machine
        mp.setattr("pouch_driver.ports.port_free", lambda *_a, **_k: True)
        await svc.ports.program_external_connectivity(
            NID, EID, [PortBinding(Proto.TCP, 80, 18100, 18100, host_ip)]
        )
    forwards = svc.firewall.plan.forwards  # type: ignore[attr-defined]
    assert {f.container_ip for f in forwards} == {
        a.ip for a in (ADDR, ADDR6) if a.version in families
    }
    assert all(f.host_ip == host_ip and f.host_port == 18100 for f in forwards)


@pytest.mark.parametrize(
    ("host_ip", "v6", "error"),
    [
        ("2001:db8::1", False, "has no IPv6 address on this network"),
        ("::", False, "has no IPv6 address on this network"),
        ("::1", True, "IPv6 loopback cannot be forwarded"),
    ],
)
async def test_unusable_ipv6_host_ips_are_refused(
    make_service: Factory,
    host_ip: str,
    v6: bool,
    error: str,
) -> None:
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [V6] if v6 else [])
    await svc.endpoints.create_endpoint(NID, EID, ADDR, ADDR6 if v6 else None, None)
    with pytest.raises(InvalidRequest, match=error) as err:
        await svc.ports.program_external_connectivity(
            NID, EID, [PortBinding(Proto.TCP, 80, 18101, 18101, ip(host_ip))]
        )
    assert f"[{host_ip}]:18101->80" in str(err.value)
    assert svc.state.endpoints[EID].port_bindings == ()
    assert svc.firewall.plan.forwards == ()  # type: ignore[attr-defined]


async def test_host_port_clashes_count_each_family_apart(make_service: Factory) -> None:
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [V6])
    await svc.endpoints.create_endpoint(NID, EID, ADDR, ADDR6, None)
    other = "f" * 64
    await svc.endpoints.create_endpoint(
        NID,
        other,
        ipaddress.IPv4Interface("10.5.0.3/24"),
        ipaddress.IPv6Interface("fd70:5::3/64"),
        None,
    )
    await svc.ports.program_external_connectivity(
        NID, EID, [PortBinding(Proto.TCP, 80, 18102, 18102, ip("0.0.0.0"))]
    )
    for taken in (None, ip("0.0.0.0"), ip("127.0.0.1")):  # they all share an IPv4 address
        with pytest.raises(Conflict, match="18102/tcp"):
            await svc.ports.program_external_connectivity(
                NID, other, [PortBinding(Proto.TCP, 80, 18102, 18102, taken)]
            )
    await svc.ports.program_external_connectivity(  # IPv6 only: free
        NID, other, [PortBinding(Proto.TCP, 80, 18102, 18102, ip("::"))]
    )
    assert len(svc.firewall.plan.forwards) == 2  # type: ignore[attr-defined]


async def test_state_survives_restart(make_service: Factory) -> None:
    svc = await make_service()
    pool_id, got = await network_with_endpoint(svc)
    await svc.endpoints.join(NID, EID, "/var/run/docker/netns/abc")
    svc = await restart(svc, make_service)
    assert svc.state.endpoints[EID].sandbox_key == "/var/run/docker/netns/abc"
    nxt = await svc.addresses.request_address(pool_id, None, gateway=False)
    assert nxt.ip != got.ip and str(nxt.ip) == "10.5.0.3"
    with pytest.raises(Conflict):
        await svc.addresses.request_address(pool_id, got.ip, gateway=False)


async def test_start_up_repairs_kernel_and_removes_orphans(make_service: Factory) -> None:
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    await svc.endpoints.create_endpoint(NID, EID, ADDR, None, None)
    links: FakeLinks = svc.links  # type: ignore[assignment]
    await svc.stop()
    bridge = svc.names.bridge(NID)
    links.links.pop(bridge)  # host reboot: the bridge is gone (its ports stay detached)
    links.links["puhdeadbeef0000"] = LinkInfo(
        "puhdeadbeef0000", 99, "veth", None, True, 1500, "02:00:00:00:00:99"
    )
    links.links["eth7"] = LinkInfo("eth7", 98, "veth", None, True, 1500, "02:00:00:00:00:98")
    svc = await make_service(links, svc.firewall)
    assert bridge in links.links
    assert links.links[svc.state.endpoints[EID].host_ifname].master == links.links[bridge].index
    assert "puhdeadbeef0000" not in links.links
    assert "eth7" in links.links, "never touch what is not ours"


async def network_with_endpoint(svc: Service, data: IPAMData = V4) -> tuple[str, IPInterface]:
    """A network whose pool, gateway and one endpoint (EID) come from our IPAM."""
    pool = await svc.addresses.request_pool("PouchLocal", data.pool, None, False)
    await svc.addresses.request_address(pool.pool_id, None, gateway=True)
    await svc.networks.create_network(NID, NetworkOptions(), [data], [])
    got = await svc.addresses.request_address(pool.pool_id, None, gateway=False)
    await svc.endpoints.create_endpoint(NID, EID, got, None, None)  # type: ignore[arg-type]
    return pool.pool_id, got


async def test_sweep_forgets_endpoints_whose_veth_vanished(make_service: Factory) -> None:
    svc = await make_service()
    pool_id, got = await network_with_endpoint(svc)
    assert (await sweep(svc)).repaired == ()
    await svc.links.ensure_link_absent(svc.state.endpoints[EID].host_ifname)  # the sandbox died
    (line,) = (await sweep(svc)).repaired
    assert "reclaimed 10.5.0.2" in line
    assert svc.state.endpoints == {}
    assert svc.ipam.pools[pool_id].allocated[int(got.ip)] == RECLAIMED
    svc = await restart(svc, make_service)
    assert svc.state.endpoints == {}
    assert svc.ipam.pools[pool_id].allocated[int(got.ip)] == RECLAIMED  # durably parked


async def test_a_late_release_for_a_forgotten_endpoint_spares_the_next_owner(
    make_service: Factory,
) -> None:
    """The sweep drops an endpoint whose veth died; the engine's ReleaseAddress for it may
    still come. Until then its address goes to nobody, so that release cannot free the
    address of a new endpoint."""
    svc = await make_service()
    small = IPAMData(
        "PouchLocal", ipaddress.ip_network("10.5.0.0/29"), ipaddress.ip_interface("10.5.0.1/29")
    )
    pool_id, dead = await network_with_endpoint(svc, small)  # .1 and .2; .3-.6 are left
    await svc.links.ensure_link_absent(svc.state.endpoints[EID].host_ifname)
    await sweep(svc)
    # Round-robin would hand out .2 again after .6; parked, it is skipped.
    fresh = [await svc.addresses.request_address(pool_id, None, gateway=False) for _ in range(4)]
    assert dead.ip not in {a.ip for a in fresh}
    allocated = svc.ipam.pools[pool_id].allocated
    await svc.addresses.release_address(pool_id, dead.ip)  # the engine's late release lands here
    assert int(dead.ip) not in allocated
    assert all(allocated[int(a.ip)] == "address" for a in fresh)
    svc = await restart(svc, make_service)  # and it was durable
    assert int(dead.ip) not in svc.ipam.pools[pool_id].allocated


async def test_a_full_pool_never_hands_out_a_parked_address(make_service: Factory) -> None:
    """Issue 12 item 7. With only a parked address free, handing it to a new endpoint let the
    engine's late ReleaseAddress for the dead one free it under the new holder, and the next
    request got it a third time: two live holders. A full pool refuses instead, naming the
    pool, across a restart; the late release then frees the address for exactly one holder."""
    svc = await make_service()
    small = IPAMData(
        "PouchLocal", ipaddress.ip_network("10.5.0.0/29"), ipaddress.ip_interface("10.5.0.1/29")
    )
    pool_id, dead = await network_with_endpoint(svc, small)  # .1 gateway, .2 the endpoint
    live = [await svc.addresses.request_address(pool_id, None, gateway=False) for _ in range(4)]
    await svc.links.ensure_link_absent(svc.state.endpoints[EID].host_ifname)
    await sweep(svc)  # .2 is parked; .3-.6 are held
    svc = await restart(svc, make_service)
    for _ in range(2):
        with pytest.raises(
            Exhausted, match=r"no free address left in pool 10\.5\.0\.0/29.*1 parked"
        ):
            await svc.addresses.request_address(pool_id, None, gateway=False)
    await svc.addresses.release_address(pool_id, dead.ip)  # the engine's late release
    again = await svc.addresses.request_address(pool_id, None, gateway=False)
    assert again.ip == dead.ip
    with pytest.raises(Exhausted):
        await svc.addresses.request_address(pool_id, None, gateway=False)
    holders = [a.ip for a in (*live, again)]
    assert len(holders) == len(set(holders)) == 5


async def test_a_reclaimed_address_asked_for_by_name_is_given_back_owing_a_release(
    make_service: Factory,
) -> None:
    """``docker run --ip`` of a parked address (a container restarted after a crash): granted
    at once, with the dead endpoint's late release owed, across a restart. That release keeps
    the address held; only the next one frees it."""
    svc = await make_service()
    pool_id, dead = await network_with_endpoint(svc)
    await svc.links.ensure_link_absent(svc.state.endpoints[EID].host_ifname)
    await sweep(svc)
    svc = await restart(svc, make_service)
    assert svc.ipam.pools[pool_id].allocated[int(dead.ip)] == RECLAIMED
    again = await svc.addresses.request_address(pool_id, dead.ip, gateway=False)
    assert again == dead
    svc = await restart(svc, make_service)
    assert svc.ipam.pools[pool_id].allocated[int(dead.ip)] == OWED
    await svc.addresses.release_address(pool_id, dead.ip)  # the late one, or the new holder's
    with pytest.raises(Conflict, match="already in use"):
        await svc.addresses.request_address(pool_id, dead.ip, gateway=False)
    svc = await restart(svc, make_service)
    assert svc.ipam.pools[pool_id].allocated[int(dead.ip)] == ADDRESS
    await svc.addresses.release_address(pool_id, dead.ip)
    assert int(dead.ip) not in svc.ipam.pools[pool_id].allocated


async def test_sweep_removes_orphan_links_and_restores_firewall(make_service: Factory) -> None:
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    links: FakeLinks = svc.links  # type: ignore[assignment]
    links.links["puhfeedfeedfeed"] = LinkInfo(
        "puhfeedfeedfeed", 77, "veth", None, True, 1500, "02:00:00:00:00:77"
    )
    links.links["vethuser"] = LinkInfo(
        "vethuser", 78, "veth", None, True, 1500, "02:00:00:00:00:78"
    )
    svc.firewall.plan = type(svc.firewall.plan)()  # type: ignore[attr-defined]
    report = (await sweep(svc)).repaired
    await svc.deletes.drain()
    assert "removing orphan interface puhfeedfeedfeed" in report
    assert "rewrote our firewall chains" in report
    assert "puhfeedfeedfeed" not in links.links and "vethuser" in links.links
    assert svc.firewall.plan == firewall_plan(
        svc.state.networks.values(), svc.state.endpoints.values()
    )  # type: ignore[attr-defined]


async def test_delete_endpoint_answers_before_the_veth_is_gone(make_service: Factory) -> None:
    """The ~16 ms kernel delete runs after the answer; shutdown drains it."""
    links = FakeLinks()
    links.faults.delay["ensure_link_absent"] = 0.2
    svc = await make_service(links)
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    await svc.endpoints.create_endpoint(NID, EID, ADDR, None, None)
    host = svc.state.endpoints[EID].host_ifname
    await svc.endpoints.delete_endpoint(NID, EID)
    assert host in links.links and host in svc.deletes.pending()
    await svc.stop()
    assert host not in links.links


# --- leftovers of answers lost in a crash (the engine retries with an empty body, fails, and
#     rolls back only its own side) ------------------------------------------------------------
POOL = ipaddress.ip_network("10.5.0.0/24")
GW = V4.gateway


async def net_with_pool(svc: Service) -> str:
    pool = await svc.addresses.request_pool("PouchLocal", POOL, None, False)
    await svc.addresses.request_address(pool.pool_id, GW.ip if GW else None, gateway=True)
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    return pool.pool_id


async def test_identical_pool_request_adopts_a_lost_reservation(make_service: Factory) -> None:
    svc = await make_service()
    lost = await svc.addresses.request_pool(
        "PouchLocal", POOL, None, False
    )  # answer lost in the crash
    svc = await restart(svc, make_service)
    again = await svc.addresses.request_pool("PouchLocal", POOL, None, False)
    assert again == lost
    with pytest.raises(Conflict, match="overlaps"):  # adopted once; now it is in use
        await svc.addresses.request_pool("PouchLocal", POOL, None, False)


async def test_a_pool_made_in_this_run_is_never_adopted(make_service: Factory) -> None:
    svc = await make_service()
    await svc.addresses.request_pool("PouchLocal", POOL, None, False)
    with pytest.raises(Conflict, match="overlaps"):
        await svc.addresses.request_pool("PouchLocal", POOL, None, False)


async def test_explicit_address_request_adopts_a_lost_reservation(make_service: Factory) -> None:
    svc = await make_service()
    pool_id = await net_with_pool(svc)
    wanted = ipaddress.ip_address("10.5.0.50")
    await svc.addresses.request_address(pool_id, wanted, gateway=False)  # answer lost in the crash
    held = ipaddress.ip_address("10.5.0.60")
    got = await svc.addresses.request_address(pool_id, held, gateway=False)
    await svc.endpoints.create_endpoint(NID, EID, got, None, None)  # type: ignore[arg-type]
    svc = await restart(svc, make_service)
    assert (
        str(await svc.addresses.request_address(pool_id, wanted, gateway=False)) == "10.5.0.50/24"
    )
    with pytest.raises(Conflict, match="already in use"):  # an endpoint holds this one
        await svc.addresses.request_address(pool_id, held, gateway=False)
    with pytest.raises(Conflict, match="already in use"):  # and the gateway is claimed
        await svc.addresses.request_address(pool_id, GW.ip if GW else None, gateway=False)


async def test_a_network_the_engine_rolled_back_makes_way(make_service: Factory) -> None:
    svc = await make_service()
    pool_id = await net_with_pool(svc)  # the CreateNetwork answer was lost in the crash
    svc = await restart(svc, make_service)
    await svc.addresses.release_address(pool_id, GW.ip)  # the engine's rollback: pool and gateway
    await svc.addresses.release_pool(pool_id)
    again = await svc.addresses.request_pool(
        "PouchLocal", POOL, None, False
    )  # the user tries again
    await svc.addresses.request_address(again.pool_id, GW.ip, gateway=True)
    await svc.networks.create_network(NID2, NetworkOptions(), [V4], [])
    assert list(svc.state.networks) == [NID2]
    assert svc.names.bridge(NID) not in svc.links.links  # type: ignore[attr-defined]


async def test_a_stale_endpoint_gives_way_to_the_engines_new_owner(
    make_service: Factory,
) -> None:
    """Never joined and from before the start: its CreateEndpoint answer was lost."""
    svc = await make_service()
    pool_id = await net_with_pool(svc)
    got = await svc.addresses.request_address(pool_id, None, gateway=False)
    await svc.endpoints.create_endpoint(NID, EID, got, None, None)  # type: ignore[arg-type]
    svc = await restart(svc, make_service)
    await svc.addresses.release_address(pool_id, got.ip)  # the engine's rollback
    again = await svc.addresses.request_address(pool_id, got.ip, gateway=False)
    await svc.endpoints.create_endpoint(NID, "f" * 64, again, None, None)  # type: ignore[arg-type]
    assert set(svc.state.endpoints) == {"f" * 64}
    assert int(got.ip) in svc.ipam.pools[pool_id].allocated, "the new owner keeps it"


async def test_a_joined_endpoint_whose_veth_died_gives_way(make_service: Factory) -> None:
    """The engine skipped DeleteEndpoint after an unclean exit and reuses the address."""
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    await svc.endpoints.create_endpoint(NID, EID, ADDR, None, None)
    await svc.endpoints.join(NID, EID, "/var/run/docker/netns/old")
    await svc.links.ensure_link_absent(svc.state.endpoints[EID].host_ifname)
    await svc.endpoints.create_endpoint(NID, "f" * 64, ADDR, None, None)
    assert set(svc.state.endpoints) == {"f" * 64}


async def test_a_live_endpoint_keeps_its_address(make_service: Factory) -> None:
    svc = await make_service()
    await svc.networks.create_network(NID, NetworkOptions(), [V4], [])
    await svc.endpoints.create_endpoint(NID, EID, ADDR, None, None)
    svc = await restart(svc, make_service)
    await svc.endpoints.join(NID, EID, "/var/run/docker/netns/x")
    with pytest.raises(Conflict, match="already used by endpoint"):
        await svc.endpoints.create_endpoint(NID, "f" * 64, ADDR, None, None)


async def test_sweep_cleans_leftovers_only_after_the_engines_retry_window(
    make_service: Factory,
) -> None:
    svc = await make_service()
    pool_id = await net_with_pool(svc)
    lost_addr = await svc.addresses.request_address(pool_id, None, gateway=False)
    got = await svc.addresses.request_address(pool_id, None, gateway=False)
    await svc.endpoints.create_endpoint(NID, EID, got, None, None)  # type: ignore[arg-type]
    svc = await restart(svc, make_service)
    await svc.addresses.release_address(pool_id, got.ip)  # the engine rolled the endpoint back
    assert (await sweep(svc)).repaired == (), "inside the grace period nothing is touched"
    svc.before.started -= 60
    repaired = (await sweep(svc)).repaired
    assert any("forgot endpoint" in r and "rolled back" in r for r in repaired)
    assert f"released address {lost_addr.ip} (held by nothing)" in repaired
    assert svc.state.endpoints == {}
    assert set(svc.ipam.pools[pool_id].allocated) == {int(GW.ip)}
