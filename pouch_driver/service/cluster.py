"""Cluster networks: one L2 segment over several hosts, coordinated through etcd.

Each host runs its own bridge per cluster network with a VXLAN port on it. What the hosts
share lives in etcd (``cluster.layout``): the network's first definition and VNI, the hosts and
their VTEPs, the members of each network, every endpoint's MAC and addresses, and the address
blocks each host allocates from (``blocks``). This module keeps a mirror of those keys, fed by
one watch, and makes the kernel's forwarding and neighbour entries follow it, so a container is
reachable from the other hosts as soon as its record lands, and ARP for it is answered locally.

A session holds one lease. Everything a host says about itself that must vanish with it
(host, members, endpoints) is written under that lease; when the session breaks (etcd away,
lease gone) it is re-opened and everything is written again from the local store, which stays
the truth about this host. The kernel needs no etcd: while it is away, traffic between existing
containers flows on the entries already programmed; only changes wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from ..cluster import layout as lay
from ..cluster.kv import EventType, KeyValue, KeyValueStore
from ..errors import Conflict, DriverError, InvalidOption, StoreError, StoreUnavailable
from ..ipam import GATEWAY, Ipam
from ..kernel import VXLAN_OVERHEAD, VXLAN_PORT, Links, VxlanFilter, VxlanSpec
from ..model import OPT_CLUSTER, Endpoint, IPAddress, IPAMData, IPNetwork, Network, NetworkOptions
from ..naming import Names
from .state import State, short
from .status import ClusterNetworkView, ClusterView

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Mirror:
    """The cluster keys as last read or watched."""

    definitions: dict[str, lay.Definition] = field(default_factory=dict)
    vnis: dict[int, str] = field(default_factory=dict)
    hosts: dict[str, lay.HostRecord] = field(default_factory=dict)
    members: dict[str, dict[str, lay.HostRecord]] = field(default_factory=dict)
    endpoints: dict[str, dict[str, lay.EndpointRecord]] = field(default_factory=dict)
    blocks: dict[str, dict[IPNetwork, str]] = field(default_factory=dict)
    pins: dict[str, dict[IPAddress, str]] = field(default_factory=dict)
    revision: int = 0

    def load(self, kvs: Sequence[KeyValue], revision: int) -> None:
        for attr in ("definitions", "vnis", "hosts", "members", "endpoints", "blocks", "pins"):
            getattr(self, attr).clear()
        for kv in kvs:
            self.apply(EventType.PUT, kv)
        self.revision = revision

    def apply(self, kind: EventType, kv: KeyValue) -> tuple[lay.Key, object] | None:
        """Fold one change in; returns the parsed key and the record it replaced or removed."""
        key = lay.parse_key(kv.key)
        if key is None:
            return None
        put = kind is EventType.PUT
        try:
            return key, self._apply(key, put, kv.value)
        except (ValueError, KeyError, TypeError):
            log.warning("cluster: ignoring malformed record %s", kv.key)
            return None

    def _apply(self, key: lay.Key, put: bool, raw: bytes) -> object:
        name, item = key.network or "", key.item
        table: dict[object, object]
        value: object
        match key.kind:
            case "networks":
                table, k = self.definitions, item  # type: ignore[assignment]
                value = lay.Definition.decode(item, raw) if put else None
            case "vnis":
                table, k = self.vnis, int(item)  # type: ignore[assignment]
                value = raw.decode() if put else None
            case "hosts":
                table, k = self.hosts, item  # type: ignore[assignment]
                value = lay.HostRecord.decode(item, raw) if put else None
            case "members":
                table, k = self.members.setdefault(name, {}), item  # type: ignore[assignment]
                value = lay.HostRecord.decode(item, raw) if put else None
            case "endpoints":
                table, k = self.endpoints.setdefault(name, {}), item  # type: ignore[assignment]
                value = lay.EndpointRecord.decode(item, raw) if put else None
            case "blocks":
                table, k = self.blocks.setdefault(name, {}), lay.parse_block(item)  # type: ignore[assignment]
                value = lay.owner_of(raw) if put else None
            case _:  # pins
                table, k = self.pins.setdefault(name, {}), ipaddress.ip_address(item)  # type: ignore[assignment]
                value = lay.owner_of(raw) if put else None
        old = table.get(k)
        if value is None:
            table.pop(k, None)
        else:
            table[k] = value
        return old


class Cluster:
    """This host's part in the cluster: definitions, membership, endpoints and the data plane.
    Address blocks are ``blocks.BlockAllocator``'s, over the same mirror."""

    def __init__(
        self,
        kv: KeyValueStore,
        *,
        address: ipaddress.IPv4Address,
        lease_ttl: int,
        names: Names,
        links: Links,
        state: State,
        ipam: Ipam,
        resync_interval: float = 30.0,
    ) -> None:
        self.kv = kv
        self.address = address
        self.host = str(address)
        self.lease_ttl = lease_ttl
        self._names = names
        self._links = links
        self._state = state
        self._ipam = ipam
        self._resync_interval = resync_interval
        self.mirror = Mirror()
        self.lease: int | None = None
        self._up = asyncio.Event()  # set while the session is open and its lease renewed
        self.last_error = "not connected yet"
        self._loaded = False  # the mirror was read at least once
        self._seed_peers: tuple[IPAddress, ...] = ()
        self._task: asyncio.Task[None] | None = None
        self._underlay: tuple[str, int] | None = None
        self._kernel_lock = asyncio.Lock()
        #: Called when the set of peer VTEPs changes (the firewall's VXLAN filter).
        self.on_peers: Callable[[], Awaitable[None]] | None = None
        # Measurements for metrics: store round trips and how late watch events arrive.
        self.store_latency: list[float] = []
        self.watch_lag: list[float] = []

    # --- lifetime ------------------------------------------------------------------------------
    async def load(self) -> None:
        """Before the first firewall apply: the peers the kernel already sends to, so that a
        restart never drops the VXLAN traffic of existing containers while etcd is read (or
        away)."""
        peers: set[IPAddress] = set()
        for net in self.local_networks():
            with contextlib.suppress(DriverError):
                remote = await self._links.list_remote_endpoints(
                    self._names.vxlan(net.network_id), net.bridge
                )
                peers.update(r.vtep for r in remote if r.vtep is not None)
        self._seed_peers = tuple(sorted(peers, key=str))

    async def start(self) -> None:
        """Keep a session open in the background: the daemon serves local networks even
        while etcd is away."""
        for net in self.local_networks():
            try:  # after a reboot: the device (its VNI is in the record) before etcd answers
                await self.ensure_device(net)
            except DriverError as exc:
                log.warning("cluster network %s: %s", cluster_name(net), exc.message)
        self._task = asyncio.create_task(self._run(), name="cluster")

    async def stop(self) -> None:
        # The lease is left to expire rather than revoked: a restarting plugin re-opens its
        # session well within the TTL, and the other hosts keep reaching its containers.
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.kv.close()

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    @connected.setter
    def connected(self, value: bool) -> None:
        if value:
            self._up.set()
        else:
            self._up.clear()

    async def wait_connected(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._up.wait()
        return self.connected

    def ready(self) -> int:
        """The session's lease, or StoreUnavailable naming the store and why."""
        if not self.connected or self.lease is None:
            raise StoreUnavailable(
                f"cluster store etcd ({', '.join(self.kv.endpoints)}) unavailable: "
                f"{self.last_error}; cluster networks cannot change until it is back"
            )
        return self.lease

    async def _run(self) -> None:
        pause = 0.2
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except StoreError as exc:
                self.last_error = exc.message
            except Exception as exc:
                log.exception("cluster session failed")
                self.last_error = f"session failed: {exc}"
            self.connected = False
            log.warning("cluster: session lost (%s); retrying in %.1fs", self.last_error, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def _session(self) -> None:
        lease = await self.kv.grant(self.lease_ttl)
        await self.kv.put(lay.host_key(self.host), self._host_record(), lease)
        kvs, revision = await self.kv.range_prefix(lay.ROOT)
        self.mirror.load(kvs, revision)
        self._loaded = True
        self.lease = lease
        await self._republish(lease)
        self.connected = True
        self.last_error = ""
        log.info("cluster: session open (lease %x) with %d host(s)", lease, len(self.mirror.hosts))
        if self.on_peers is not None:  # accept the peers' VXLAN before sending them any
            await self.on_peers()
        await self.converge()
        tasks = [
            asyncio.create_task(self._keepalive(lease), name="cluster-keepalive"),
            asyncio.create_task(self._watch(revision + 1), name="cluster-watch"),
            asyncio.create_task(self._resync_forever(), name="cluster-resync"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _host_record(self) -> str:
        return lay.HostRecord(self.host, self.address).encode()

    async def _republish(self, lease: int) -> None:
        """Write again what this host says about itself; remove what it no longer has."""
        local = {cluster_name(n): n for n in self.local_networks()}
        for name, net in local.items():
            await self.kv.put(lay.member_key(name, self.host), self._host_record(), lease)
            for ep in self._state.endpoints_of(net.network_id):
                await self._put_endpoint(name, ep, lease)
        for key in self._stale_keys(set(local)):
            await self.kv.delete(key)
        for name, net in local.items():
            await self._reclaim_own_blocks(name, net)

    async def _reclaim_own_blocks(self, name: str, net: Network) -> None:
        """Blocks holding addresses this host handed out must be this host's. One that
        ``gc`` returned while this host was away (its lease gone) is claimed back; one that
        another host claimed since is reported loudly: its addresses may be given twice."""
        me = self.host
        blocks = self.mirror.blocks.setdefault(name, {})
        pins = self.mirror.pins.get(name, {})
        needed: set[IPNetwork] = set()
        for d in (*net.ipv4, *net.ipv6):
            for pool in self._ipam.pools.values():
                if pool.pool.network != d.pool:
                    continue
                for addr, kind in pool.allocated.items():
                    address: IPAddress = (
                        ipaddress.IPv6Address(addr)
                        if d.pool.version == 6
                        else ipaddress.IPv4Address(addr)
                    )
                    if kind != GATEWAY and pins.get(address) != me:
                        needed.add(lay.block_of(d.pool, address))
        for block in sorted(needed, key=lambda b: int(b.network_address)):
            holder = blocks.get(block)
            if holder == me:
                continue
            if holder is None and await self.kv.create(
                lay.block_key(name, block), lay.owner_record(me, secrets.token_hex(6))
            ):
                blocks[block] = me
                log.warning("cluster network %s: claimed back block %s", name, block)
                continue
            log.error(
                "cluster network %s: block %s holds addresses of this host but host %s "
                "claimed it meanwhile: those addresses may be used twice",
                name,
                block,
                holder,
            )

    def _stale_keys(self, local: set[str]) -> list[str]:
        """Keys of this host for networks it left or endpoints and pins it no longer has."""
        m, me = self.mirror, self.host
        keys = [
            lay.endpoint_key(name, eid)
            for name, records in m.endpoints.items()
            for eid, rec in records.items()
            if rec.host == me and (name not in local or eid not in self._state.endpoints)
        ]
        keys += [
            lay.member_key(name, me)
            for name, hosts in m.members.items()
            if me in hosts and name not in local
        ]
        keys += [
            lay.block_key(name, block)
            for name, blocks in m.blocks.items()
            if name not in local
            for block, host in blocks.items()
            if host == me
        ]
        keys += [
            lay.pin_key(name, address)
            for name, pins in m.pins.items()
            for address, host in pins.items()
            if host == me and not self._holds(name, address)
        ]
        return keys

    def _holds(self, name: str, address: IPAddress) -> bool:
        net = self.local_network(name)
        if net is None:
            return False
        state = self._ipam.pool_of(address)
        return state is not None and int(address) in state.allocated

    async def _keepalive(self, lease: int) -> None:
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                await self.kv.keepalive(lease)
                last_ok = time.monotonic()
                self.connected = True
            except StoreUnavailable as exc:
                # Keep trying while the lease may live; past its TTL it is gone for sure.
                self.connected = False
                self.last_error = exc.message
                if time.monotonic() - last_ok > self.lease_ttl:
                    raise

    async def _watch(self, start: int) -> None:
        async for event in self.kv.watch(lay.ROOT, start):
            changed = self.mirror.apply(event.type, event.kv)
            self.mirror.revision = event.revision
            if changed is None:
                continue
            key, old = changed
            if key.kind == "endpoints" and event.type is EventType.PUT:
                record = self.mirror.endpoints.get(key.network or "", {}).get(key.item)
                if record is not None and record.host != self.host and record.at:
                    self.watch_lag.append(max(0.0, time.time() - record.at))
                    del self.watch_lag[:-1000]
            try:
                await self._on_change(key, old)
            except DriverError as exc:
                log.warning("cluster: applying %s failed: %s", event.kv.key, exc.message)

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self._resync_interval)
            await self.converge()

    async def _on_change(self, key: lay.Key, old: object) -> None:
        if key.kind == "hosts":
            if self.on_peers is not None:
                await self.on_peers()
            return
        if key.network is None:
            return
        net = self.local_network(key.network)
        if net is None:
            return
        if key.kind == "endpoints":
            await self._endpoint_changed(
                key.network, net, key.item, old if isinstance(old, lay.EndpointRecord) else None
            )

    # --- the data plane ------------------------------------------------------------------------
    async def _endpoint_changed(
        self, name: str, net: Network, endpoint_id: str, old: lay.EndpointRecord | None
    ) -> None:
        new = self.mirror.endpoints.get(name, {}).get(endpoint_id)
        vxlan = self._names.vxlan(net.network_id)
        async with self._kernel_lock:
            if old is not None and old.host != self.host and (new is None or new.mac != old.mac):
                await self._links.ensure_remote_endpoint_absent(
                    vxlan, net.bridge, old.mac, old.addresses
                )
            if new is not None and new.host != self.host:
                await self._links.ensure_remote_endpoint(
                    vxlan, net.bridge, new.mac, new.addresses, new.vtep
                )

    async def _no_flood(self, net: Network) -> None:
        """Broadcasts stay on their host (docs/architecture.md, "Flooding"): nothing a
        container needs to reach another by IP is broadcast across."""
        async with self._kernel_lock:
            await self._links.ensure_flood(self._names.vxlan(net.network_id), ())

    async def converge(self) -> list[str]:
        """Make every cluster network's VXLAN device and entries match the mirror; returns
        what was changed."""
        changes: list[str] = []
        if not self._loaded:
            return changes
        for net in self.local_networks():
            name = cluster_name(net)
            try:
                changes.extend(await self._converge(name, net))
            except DriverError as exc:
                log.warning("cluster: network %s: %s", name, exc.message)
        return changes

    async def _converge(self, name: str, net: Network) -> list[str]:
        vxlan = self._names.vxlan(net.network_id)
        await self.ensure_device(net)
        desired = {
            r.mac: r for r in self.mirror.endpoints.get(name, {}).values() if r.host != self.host
        }
        changes = []
        async with self._kernel_lock:
            present = await self._links.list_remote_endpoints(vxlan, net.bridge)
            have = {p.mac: p for p in present}
            for p in present:
                want = desired.get(p.mac)
                if want is None or want.vtep != p.vtep or set(want.addresses) != set(p.addresses):
                    await self._links.ensure_remote_endpoint_absent(
                        vxlan, net.bridge, p.mac, p.addresses
                    )
                    if want is None:
                        changes.append(f"{name}: withdrew {p.mac}")
                        have.pop(p.mac)
            for mac, rec in desired.items():
                seen = have.get(mac)
                if (
                    seen is None
                    or seen.vtep != rec.vtep
                    or set(seen.addresses) != set(rec.addresses)
                ):
                    await self._links.ensure_remote_endpoint(
                        vxlan, net.bridge, mac, rec.addresses, rec.vtep
                    )
                    changes.append(f"{name}: programmed {mac} via {rec.vtep}")
        await self._no_flood(net)
        return changes

    async def ensure_device(self, net: Network) -> None:
        if net.vni is None:
            raise DriverError(f"cluster network {cluster_name(net)} has no VNI")
        underlay, mtu = await self.underlay()
        await self._links.ensure_vxlan(
            VxlanSpec(
                name=self._names.vxlan(net.network_id),
                vni=net.vni,
                local=self.address,
                bridge=net.bridge,
                underlay=underlay,
                mtu=net.options.mtu or mtu - VXLAN_OVERHEAD,
            )
        )

    async def underlay(self) -> tuple[str, int]:
        """The device holding the advertise address, and its MTU."""
        if self._underlay is None:
            for link in await self._links.list_links():
                info = await self._links.get_link(link.name)
                if info is not None and any(a.ip == self.address for a in info.addresses):
                    self._underlay = (info.name, info.mtu)
                    break
            else:
                raise InvalidOption(
                    f"--advertise-address {self.address} is on no interface of this host"
                )
        return self._underlay

    def vxlan_filter(self) -> VxlanFilter:
        if self._loaded:
            peers = {r.vtep for h, r in self.mirror.hosts.items() if h != self.host}
        else:  # etcd not read yet: the hosts the kernel already sends to
            peers = set(self._seed_peers)
        return VxlanFilter(self.address, VXLAN_PORT, tuple(sorted(peers, key=str)))

    # --- operators --------------------------------------------------------------------------------
    def view(self) -> ClusterView:
        m, me = self.mirror, self.host
        nets = []
        for net in self.local_networks():
            name = cluster_name(net)
            nets.append(
                ClusterNetworkView(
                    name=name,
                    network_id=net.network_id,
                    vni=net.vni,
                    members=tuple(sorted(m.members.get(name, {}))),
                    blocks=tuple(
                        str(b)
                        for b, h in sorted(
                            m.blocks.get(name, {}).items(), key=lambda x: int(x[0].network_address)
                        )
                        if h == me
                    ),
                    pins=tuple(sorted(str(a) for a, h in m.pins.get(name, {}).items() if h == me)),
                    remote_endpoints=sum(
                        1 for r in m.endpoints.get(name, {}).values() if r.host != me
                    ),
                )
            )
        return ClusterView(
            host=me,
            store=tuple(self.kv.endpoints),
            connected=self.connected,
            last_error=self.last_error,
            hosts=tuple(sorted(m.hosts)),
            networks=tuple(nets),
            store_p50_ms=_quantile(self.store_latency, 0.5) * 1000,
            store_p99_ms=_quantile(self.store_latency, 0.99) * 1000,
            watch_lag_ms=_quantile(self.watch_lag, 0.5) * 1000,
        )

    async def refresh(self) -> None:
        """Read etcd once without a session (the offline commands)."""
        kvs, revision = await self.timed(self.kv.range_prefix(lay.ROOT))
        self.mirror.load(kvs, revision)
        self._loaded = True

    async def audit(self, *, repair: bool) -> tuple[list[str], list[str]]:
        """What ``check`` reports and ``gc`` repairs for cluster networks: kernel entries
        against etcd, this host's own stale records, and the blocks and pins of hosts whose
        lease is gone (their addresses come back to the cluster only here)."""
        problems: list[str] = []
        repaired: list[str] = []
        if not self.connected:
            try:
                await self.refresh()
            except StoreError as exc:
                return [f"cluster: {exc.message}"], []
        m = self.mirror
        for net in self.local_networks():
            name = cluster_name(net)
            vxlan = self._names.vxlan(net.network_id)
            if await self._links.get_link(vxlan) is None:
                problems.append(f"cluster network {name}: VXLAN device {vxlan} is missing")
                continue
            want = {r.mac: r for r in m.endpoints.get(name, {}).values() if r.host != self.host}
            have = {p.mac: p for p in await self._links.list_remote_endpoints(vxlan, net.bridge)}
            for mac in sorted(set(want) - set(have)):
                problems.append(f"cluster network {name}: kernel lacks remote endpoint {mac}")
            for mac in sorted(set(have) - set(want)):
                problems.append(f"cluster network {name}: kernel holds unknown endpoint {mac}")
            for mac in sorted(set(want) & set(have)):
                if want[mac].vtep != have[mac].vtep or set(want[mac].addresses) != set(
                    have[mac].addresses
                ):
                    problems.append(f"cluster network {name}: endpoint {mac} is out of date")
        local = {cluster_name(n) for n in self.local_networks()}
        stale = self._stale_keys(local) if self.connected else []
        problems += [f"etcd holds {key} for this host, which no longer has it" for key in stale]
        dead = self._dead_keys()
        problems += [f"etcd holds {key} of host {host}, whose lease is gone" for key, host in dead]
        unused = self._unused_definitions()
        problems += [
            f"cluster network {name} is defined in etcd but nobody uses it" for name in unused
        ]
        if not repair or not problems:
            return problems, repaired
        if self.connected:
            changes = await self.converge()
            repaired += changes
        for key in stale + [key for key, _ in dead]:
            await self.timed(self.kv.delete(key))
            repaired.append(f"deleted {key}")
        for name in unused:
            d = m.definitions[name]
            await self.timed(self.kv.delete(lay.network_key(name)))
            await self.timed(self.kv.delete(lay.vni_key(d.vni)))
            repaired.append(f"deleted the definition of cluster network {name}")
        return problems, repaired

    def _dead_keys(self) -> list[tuple[str, str]]:
        alive = set(self.mirror.hosts)
        out = [
            (lay.block_key(name, block), host)
            for name, blocks in self.mirror.blocks.items()
            for block, host in blocks.items()
            if host not in alive
        ]
        out += [
            (lay.pin_key(name, address), host)
            for name, pins in self.mirror.pins.items()
            for address, host in pins.items()
            if host not in alive
        ]
        return out

    def _unused_definitions(self) -> list[str]:
        m = self.mirror
        return sorted(
            name
            for name in m.definitions
            if not m.members.get(name)
            and not any(h in m.hosts for h in m.blocks.get(name, {}).values())
            and not any(h in m.hosts for h in m.pins.get(name, {}).values())
            and self.local_network(name) is None
        )

    # --- networks -------------------------------------------------------------------------------
    def local_networks(self) -> list[Network]:
        return [n for n in self._state.networks.values() if n.options.cluster]

    def local_network(self, name: str) -> Network | None:
        return next((n for n in self.local_networks() if n.options.cluster == name), None)

    def vxlan_names(self) -> set[str]:
        return {self._names.vxlan(n.network_id) for n in self.local_networks()}

    async def define(
        self,
        network_id: str,
        options: NetworkOptions,
        ipv4: Sequence[IPAMData],
        ipv6: Sequence[IPAMData],
    ) -> tuple[NetworkOptions, int]:
        """The cluster's definition of this network, written if it is the first: the options
        as this host must apply them (the MTU) and the VNI. A different definition fails."""
        name = options.cluster
        if name is None:
            raise DriverError("not a cluster network")
        other = self.local_network(name)
        if other is not None and other.network_id != network_id:
            raise Conflict(
                f"option {OPT_CLUSTER}: cluster network {name} is already served here by "
                f"network {short(other.network_id)}"
            )
        for d in (*ipv4, *ipv6):
            if not self._ours(d):
                raise InvalidOption(
                    f"option {OPT_CLUSTER}: pool {d.pool} is not one of pouch-driver's: "
                    "cluster networks need --ipam-driver pouch (addresses must be unique "
                    "across hosts)"
                )
        if not ipv4 and not ipv6:
            raise InvalidOption(f"option {OPT_CLUSTER}: a cluster network needs a subnet")
        self.ready()
        mine = lay.Definition(
            name=name,
            subnets=tuple(d.pool for d in (*ipv4, *ipv6)),
            gateways=tuple(d.gateway for d in (*ipv4, *ipv6) if d.gateway is not None),
            settings=_shared_settings(options),
            writer=f"{self.host}/{secrets.token_hex(6)}",
        )
        vni = await self._define(mine)
        _, underlay_mtu = await self.underlay()
        mtu = options.mtu or underlay_mtu - VXLAN_OVERHEAD
        return replace(options, mtu=mtu), vni

    def _ours(self, data: IPAMData) -> bool:
        return any(
            s.pool.network == data.pool and s.pool.address_space == data.address_space
            for s in self._ipam.pools.values()
        )

    async def _define(self, mine: lay.Definition) -> int:
        key = lay.network_key(mine.name)
        vni = lay.VNI_FIRST + int.from_bytes(mine.name.encode()[:8].ljust(8, b"\0"), "big") % (
            lay.VNI_LAST - lay.VNI_FIRST
        )
        for _ in range(64):
            current = await self.timed(self.kv.get(key))
            if current is not None:
                theirs = lay.Definition.decode(mine.name, current.value)
                if diffs := theirs.differences(mine):
                    raise Conflict(
                        f"cluster network {mine.name} is defined differently in etcd: "
                        + "; ".join(diffs)
                    )
                return theirs.vni
            while vni in self.mirror.vnis:
                vni = vni + 1 if vni < lay.VNI_LAST else lay.VNI_FIRST
            record = replace(mine, vni=vni)
            if await self.timed(
                self.kv.create_all(
                    {key: record.encode(), lay.vni_key(vni): f"{mine.name} {mine.writer}"}
                )
            ):
                log.info("cluster network %s defined with VNI %d", mine.name, vni)
                return vni
            self.mirror.vnis.setdefault(vni, "?")  # taken, or the definition came first
        raise Conflict(f"cluster network {mine.name}: no free VNI found")

    async def attach(self, net: Network) -> None:
        """The VXLAN port on the network's bridge, this host a member, entries programmed."""
        name = cluster_name(net)
        lease = self.ready()
        await self.ensure_device(net)
        await self.timed(self.kv.put(lay.member_key(name, self.host), self._host_record(), lease))
        await self._converge(name, net)

    async def detach(self, net: Network) -> None:
        """Leave the network: the device goes; this host's keys for it go (best effort: a
        later session removes what etcd's absence kept here)."""
        name = cluster_name(net)
        await self._links.ensure_link_absent(self._names.vxlan(net.network_id))
        keys = [lay.member_key(name, self.host)]
        keys += [
            lay.endpoint_key(name, eid)
            for eid, r in self.mirror.endpoints.get(name, {}).items()
            if r.host == self.host
        ]
        keys += [
            lay.block_key(name, b)
            for b, h in self.mirror.blocks.get(name, {}).items()
            if h == self.host
        ]
        keys += [
            lay.pin_key(name, a)
            for a, h in self.mirror.pins.get(name, {}).items()
            if h == self.host
        ]
        if not self.connected:
            return  # the next session removes this host's records of networks it left
        try:
            for key in keys:
                await self.timed(self.kv.delete(key))
        except StoreError as exc:
            log.warning("cluster network %s: left etcd records behind (%s)", name, exc.message)

    # --- endpoints ------------------------------------------------------------------------------
    async def publish(self, net: Network, ep: Endpoint) -> None:
        name = cluster_name(net)
        await self._put_endpoint(name, ep, self.ready())

    async def _put_endpoint(self, name: str, ep: Endpoint, lease: int) -> None:
        record = lay.EndpointRecord(
            endpoint_id=ep.endpoint_id,
            host=self.host,
            vtep=self.address,
            mac=ep.mac,
            addresses=tuple(a.ip for a in (ep.address, ep.address_v6) if a is not None),
            at=time.time(),
        )
        await self.timed(
            self.kv.put(lay.endpoint_key(name, ep.endpoint_id), record.encode(), lease)
        )

    async def withdraw(self, net: Network, endpoint_id: str) -> None:
        """Best effort: a session re-opened later deletes records of endpoints we forgot."""
        name = cluster_name(net)
        if not self.connected:
            return  # no wait for a store that is away: the next session removes the record
        try:
            await self.timed(self.kv.delete(lay.endpoint_key(name, endpoint_id)))
        except StoreError as exc:
            log.warning("endpoint %s: record left in etcd (%s)", short(endpoint_id), exc.message)

    async def timed(self, call: Awaitable[T]) -> T:
        started = time.monotonic()
        try:
            return await call
        finally:
            self.store_latency.append(time.monotonic() - started)
            del self.store_latency[:-1000]


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cluster_name(net: Network) -> str:
    if net.options.cluster is None:
        raise DriverError(f"network {short(net.network_id)} is not a cluster network")
    return net.options.cluster


def _shared_settings(options: NetworkOptions) -> tuple[tuple[str, str], ...]:
    """The options every host of a cluster network must agree on."""
    return (
        ("enable_icc", str(options.enable_icc).lower()),
        ("enable_ipv4", str(options.enable_ipv4).lower()),
        ("enable_ipv6", str(options.enable_ipv6).lower()),
        ("internal", str(options.internal).lower()),
        ("mtu", str(options.mtu) if options.mtu else "default"),
    )
