"""The status model: what the plugin holds, as ``status``, the metrics and the CLI show it.

Built from the driver's state in one place; the HTTP layer dumps it, the CLI loads it back
from the daemon's answer (or builds it offline), and the metrics render it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ipam import Ipam, PoolState
from .state import State


@dataclass(frozen=True)
class NetworkView:
    network_id: str
    bridge: str
    bridge_owned: bool
    subnets: tuple[str, ...]
    gateways: tuple[str, ...]
    mtu: int | None
    icc: bool
    masquerade: bool
    internal: bool
    endpoints: int


@dataclass(frozen=True)
class EndpointView:
    endpoint_id: str
    network_id: str
    veth: str
    src_name: str
    mac: str
    address: str | None
    address_v6: str | None
    sandbox_key: str | None
    ports: tuple[str, ...]


@dataclass(frozen=True)
class PoolUse:
    pool_id: str
    network: str
    sub_pool: str | None
    address_space: str
    used: int
    reclaimed: int  # parked after their endpoint was dropped; reused once the engine releases
    size: int


@dataclass(frozen=True)
class ClusterNetworkView:
    name: str
    network_id: str
    vni: int | None
    members: tuple[str, ...]  # hosts serving it (their leases live)
    blocks: tuple[str, ...]  # address blocks this host allocates from
    pins: tuple[str, ...]  # addresses this host holds by name outside its blocks
    remote_endpoints: int  # endpoints of other hosts, as etcd has them


@dataclass(frozen=True)
class ClusterView:
    host: str
    store: tuple[str, ...]
    connected: bool
    last_error: str
    hosts: tuple[str, ...]
    networks: tuple[ClusterNetworkView, ...]
    store_p50_ms: float  # etcd round trips of requests (recent ones)
    store_p99_ms: float
    watch_lag_ms: float  # median delay from a remote endpoint's write to its watch event


@dataclass(frozen=True)
class Status:
    networks: tuple[NetworkView, ...]
    endpoints: tuple[EndpointView, ...]
    pools: tuple[PoolUse, ...]
    pending_deletes: int
    cluster: ClusterView | None = None


def _pool_use(state: PoolState) -> PoolUse:
    parked = state.reclaimed
    return PoolUse(
        pool_id=state.pool.pool_id,
        network=str(state.pool.network),
        sub_pool=str(state.pool.sub_pool) if state.pool.sub_pool else None,
        address_space=state.pool.address_space,
        used=len(state.allocated) - parked,
        reclaimed=parked,
        size=state.size,
    )


def status_of(state: State, ipam: Ipam, pending_deletes: int) -> Status:
    counts: dict[str, int] = {}
    for e in state.endpoints.values():
        counts[e.network_id] = counts.get(e.network_id, 0) + 1
    return Status(
        networks=tuple(
            NetworkView(
                network_id=n.network_id,
                bridge=n.bridge,
                bridge_owned=n.bridge_owned,
                subnets=tuple(str(s) for s in n.subnets),
                gateways=tuple(str(g) for g in n.gateways),
                mtu=n.options.mtu,
                icc=n.options.enable_icc,
                masquerade=n.options.enable_masquerade,
                internal=n.options.internal,
                endpoints=counts.get(n.network_id, 0),
            )
            for _, n in sorted(state.networks.items())
        ),
        endpoints=tuple(
            EndpointView(
                endpoint_id=e.endpoint_id,
                network_id=e.network_id,
                veth=e.host_ifname,
                src_name=e.container_ifname,
                mac=e.mac,
                address=str(e.address) if e.address else None,
                address_v6=str(e.address_v6) if e.address_v6 else None,
                sandbox_key=e.sandbox_key,
                ports=tuple(
                    f"{b.host_ip or '*'}:{b.host_port}->{b.port}/{b.proto.name.lower()}"
                    for b in e.port_bindings
                ),
            )
            for e in sorted(state.endpoints.values(), key=lambda e: (e.network_id, e.endpoint_id))
        ),
        pools=tuple(_pool_use(s) for _, s in sorted(ipam.pools.items())),
        pending_deletes=pending_deletes,
    )
