"""The network calls: a network is a Linux bridge with the gateway addresses on it.

The store records the network before the bridge is made and forgets it before the bridge is
deleted, so a crash between the steps leaves either a record whose bridge reconciliation makes,
or a prefixed bridge without a record, which reconciliation removes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from .. import store as st
from ..errors import Conflict, InvalidOption, InvalidRequest
from ..ipam import Ipam
from ..kernel import Links
from ..model import OPT_CLUSTER, IPAMData, Network, NetworkOptions
from ..naming import Names
from ..store import Store
from . import leftovers
from .cluster import Cluster
from .deletions import DeferredDeletes
from .desired import bridge_addresses, bridge_spec
from .durable import compensate, durably
from .firewalling import FirewallSync
from .guards import Guards
from .leftovers import FromBefore
from .state import State, short

log = logging.getLogger(__name__)


class NetworkService:
    def __init__(
        self,
        *,
        names: Names,
        store: Store,
        links: Links,
        state: State,
        before: FromBefore,
        ipam: Ipam,
        deletes: DeferredDeletes,
        guards: Guards,
        firewall: FirewallSync,
        cluster: Cluster | None = None,
    ) -> None:
        self._cluster = cluster
        self._names = names
        self._store = store
        self._links = links
        self._state = state
        self._before = before
        self._ipam = ipam
        self._deletes = deletes
        self._guards = guards
        self._firewall = firewall

    async def create_network(
        self,
        network_id: str,
        options: NetworkOptions,
        ipv4: Sequence[IPAMData],
        ipv6: Sequence[IPAMData],
    ) -> None:
        # Before anything is made or removed: bridged traffic must pass iptables (icc=false; a
        # container reaching its own network's published port through the host). Checked on
        # every create, so fixing the host is enough.
        await self._firewall.ready()
        state = self._state
        bridge = options.bridge_name or self._names.bridge(network_id)
        datas = (*ipv4, *ipv6)
        while (hit := self._clash(network_id, bridge, datas)) and leftovers.network_rolled_back(
            hit[0].network_id, state, self._before, self._ipam
        ):
            log.warning(
                "network %s was rolled back by the engine (its pools are released): deleting it",
                short(hit[0].network_id),
            )
            await self.delete_network(hit[0].network_id)
        async with self._guards.network_change(network_id):
            if options.enable_ipv6 is False and ipv6:
                options = replace(options, enable_ipv6=True)
            if hit := self._clash(network_id, bridge, datas):
                raise Conflict(hit[1])
            vni = None
            if options.cluster is not None:
                if self._cluster is None:
                    raise InvalidOption(
                        f"option {OPT_CLUSTER}: this plugin is not part of a cluster (start it "
                        "with --cluster etcd://HOST:PORT and --advertise-address)"
                    )
                options, vni = await self._cluster.define(network_id, options, ipv4, ipv6)
            existing = state.networks.get(network_id)
            if existing is not None:
                if (existing.bridge, existing.options, existing.ipv4, existing.ipv6) != (
                    bridge,
                    options,
                    tuple(ipv4),
                    tuple(ipv6),
                ):
                    raise Conflict(f"network {short(network_id)} exists with another configuration")
                # A retried create: make sure the kernel matches, answer as before.
                await self._links.ensure_bridge(bridge_spec(existing))
                if self._cluster is not None and existing.options.cluster:
                    await self._cluster.attach(existing)
                await self._firewall.sync()
                return
            link = await self._links.get_link(bridge)
            if link is not None and link.kind != "bridge":
                raise InvalidRequest(
                    f"option com.docker.network.bridge.name: interface {bridge} exists and is "
                    "not a bridge"
                )
            owned = link is None or self._names.owned_kind(bridge) == "bridge"
            net = Network(
                network_id=network_id,
                bridge=bridge,
                bridge_owned=owned,
                options=options,
                ipv4=tuple(ipv4),
                ipv6=tuple(ipv6),
                vni=vni,
            )
            state.networks[network_id] = net
            await durably(
                self._store,
                [st.PutNetwork(net)],
                undo=lambda: state.networks.pop(network_id, None),
            )
            try:
                await self._links.ensure_bridge(bridge_spec(net))
                if self._cluster is not None and net.options.cluster:
                    await self._cluster.attach(net)
                await self._firewall.sync()
            except BaseException:
                await self._undo(net)
                raise
            log.info(
                "created network %s on bridge %s (%s)",
                short(network_id),
                bridge,
                ", ".join(str(s) for s in net.subnets) or "no subnet",
            )

    def _clash(
        self, network_id: str, bridge: str, datas: Sequence[IPAMData]
    ) -> tuple[Network, str] | None:
        """Another network holding this bridge or an overlapping subnet, and why."""
        for other in self._state.networks.values():
            if other.network_id == network_id:
                continue
            if other.bridge == bridge:
                why = f"bridge {bridge} is already used by network {short(other.network_id)}"
                return other, why
            for mine in datas:
                for theirs in other.subnets:
                    if mine.pool.prefixlen and theirs.prefixlen and mine.pool.overlaps(theirs):
                        return other, (
                            f"subnet {mine.pool} overlaps with subnet {theirs} of "
                            f"network {short(other.network_id)}"
                        )
        return None

    async def _undo(self, net: Network) -> None:
        async def forget() -> None:
            await durably(
                self._store,
                [st.DeleteNetwork(net.network_id)],
                after=lambda: self._state.networks.pop(net.network_id, None),
            )

        await compensate(forget, lambda: self._unbridge(net), self._firewall.sync)

    async def _unbridge(self, net: Network) -> None:
        if self._cluster is not None and net.options.cluster:
            await self._cluster.detach(net)
        if net.bridge_owned:
            await self._links.ensure_link_absent(net.bridge)
        else:  # the user's bridge stays, without the gateway addresses we put on it
            await self._links.ensure_addresses_absent(net.bridge, bridge_addresses(net))

    async def delete_network(self, network_id: str) -> None:
        state = self._state
        async with self._guards.network_change(network_id):
            net = state.networks.get(network_id)
            if net is None:
                return  # deletes of unknown IDs succeed (docs/protocol.md §3.3)
            leftover = state.endpoints_of(network_id)
            ops: list[st.Op] = [st.DeleteEndpoint(e.endpoint_id) for e in leftover]
            ops.append(st.DeleteNetwork(network_id))

            def forget() -> None:
                state.networks.pop(network_id, None)
                for e in leftover:
                    state.endpoints.pop(e.endpoint_id, None)

            await durably(self._store, ops, after=forget)
            # The record is gone first: a crash from here on leaves only prefixed orphans,
            # which start-up removes.
            for e in leftover:
                self._deletes.queue(e.host_ifname)
            await self._firewall.sync()
            await self._unbridge(net)
            log.info("deleted network %s", short(network_id))
