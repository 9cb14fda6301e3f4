"""The durable store: SQLite (WAL, synchronous=FULL) in the state directory, behind ``Store``.

A request's changes are one list of ops committed in one transaction, fsynced before the
request is answered. SQLite runs on one dedicated thread, never on the event loop; commits
that arrive while a write is in flight are grouped into the next transaction (group commit),
each in its own savepoint so one bad op fails only its own request. Imports ``model`` and
``errors`` only.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import StoreError
from .model import (
    Endpoint,
    GatewayMode,
    IPAMData,
    Network,
    NetworkOptions,
    Pool,
    PortBinding,
    Proto,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE networks (network_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE endpoints (
    endpoint_id TEXT PRIMARY KEY, network_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE pools (pool_id TEXT PRIMARY KEY, doc TEXT NOT NULL, cursor TEXT NOT NULL);
CREATE TABLE addresses (
    pool_id TEXT NOT NULL, address TEXT NOT NULL, kind TEXT NOT NULL,
    PRIMARY KEY (pool_id, address));
"""

T = TypeVar("T")


# --- ops: what a request changes ---------------------------------------------------------------
@dataclass(frozen=True)
class PutNetwork:
    network: Network


@dataclass(frozen=True)
class DeleteNetwork:
    network_id: str


@dataclass(frozen=True)
class PutEndpoint:
    endpoint: Endpoint


@dataclass(frozen=True)
class DeleteEndpoint:
    endpoint_id: str


@dataclass(frozen=True)
class PutPool:
    pool: Pool


@dataclass(frozen=True)
class DeletePool:
    pool_id: str


@dataclass(frozen=True)
class PutAddress:
    pool_id: str
    address: int
    version: int
    kind: str
    cursor: int


@dataclass(frozen=True)
class DeleteAddress:
    pool_id: str
    address: int
    version: int


Op = (
    PutNetwork
    | DeleteNetwork
    | PutEndpoint
    | DeleteEndpoint
    | PutPool
    | DeletePool
    | PutAddress
    | DeleteAddress
)


@dataclass(frozen=True)
class PoolRecord:
    pool: Pool
    cursor: int
    allocations: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class Snapshot:
    networks: tuple[Network, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    pools: tuple[PoolRecord, ...] = ()


# --- documents: the on-disk format is owned here --------------------------------------------
def _ip(version: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


def encode_network(n: Network) -> str:
    o = n.options

    def data(d: IPAMData) -> dict[str, Any]:
        return {
            "space": d.address_space,
            "pool": str(d.pool),
            "gateway": str(d.gateway) if d.gateway else None,
            "aux": [[k, str(v)] for k, v in d.aux_addresses],
        }

    return json.dumps(
        {
            "bridge": n.bridge,
            "bridge_owned": n.bridge_owned,
            "options": {
                "bridge_name": o.bridge_name,
                "mtu": o.mtu,
                "icc": o.enable_icc,
                "masquerade": o.enable_masquerade,
                "host_binding_ipv4": str(o.host_binding_ipv4) if o.host_binding_ipv4 else None,
                "internal": o.internal,
                "ipv6": o.enable_ipv6,
                "ipv4": o.enable_ipv4,
                "gateway_mode_ipv4": o.gateway_mode_ipv4.value,
                "gateway_mode_ipv6": o.gateway_mode_ipv6.value,
                "trusted_host_interfaces": list(o.trusted_host_interfaces),
                "inhibit_ipv4": o.inhibit_ipv4,
                "host_ipv4": str(o.host_ipv4) if o.host_ipv4 else None,
                "host_ipv6": str(o.host_ipv6) if o.host_ipv6 else None,
                "container_iface_prefix": o.container_iface_prefix,
                "cluster": o.cluster,
            },
            "vni": n.vni,
            "ipv4": [data(d) for d in n.ipv4],
            "ipv6": [data(d) for d in n.ipv6],
        },
        sort_keys=True,
    )


def decode_network(network_id: str, doc: str) -> Network:
    d = json.loads(doc)
    o = d["options"]

    def data(x: dict[str, Any]) -> IPAMData:
        return IPAMData(
            address_space=x["space"],
            pool=ipaddress.ip_network(x["pool"]),
            gateway=ipaddress.ip_interface(x["gateway"]) if x["gateway"] else None,
            aux_addresses=tuple((k, ipaddress.ip_interface(v)) for k, v in x["aux"]),
        )

    return Network(
        network_id=network_id,
        bridge=d["bridge"],
        bridge_owned=bool(d["bridge_owned"]),
        options=NetworkOptions(
            bridge_name=o["bridge_name"],
            mtu=o["mtu"],
            enable_icc=bool(o["icc"]),
            enable_masquerade=bool(o["masquerade"]),
            host_binding_ipv4=(
                ipaddress.IPv4Address(o["host_binding_ipv4"]) if o["host_binding_ipv4"] else None
            ),
            internal=bool(o["internal"]),
            enable_ipv6=bool(o["ipv6"]),
            # Keys added later: a record written before them has the defaults' meaning.
            enable_ipv4=bool(o.get("ipv4", True)),
            gateway_mode_ipv4=GatewayMode(o.get("gateway_mode_ipv4", "nat")),
            gateway_mode_ipv6=GatewayMode(o.get("gateway_mode_ipv6", "nat")),
            trusted_host_interfaces=tuple(o.get("trusted_host_interfaces", ())),
            inhibit_ipv4=bool(o.get("inhibit_ipv4", False)),
            host_ipv4=ipaddress.IPv4Address(o["host_ipv4"]) if o.get("host_ipv4") else None,
            host_ipv6=ipaddress.IPv6Address(o["host_ipv6"]) if o.get("host_ipv6") else None,
            container_iface_prefix=o.get("container_iface_prefix"),
            cluster=o.get("cluster"),
        ),
        vni=d.get("vni"),
        ipv4=tuple(data(x) for x in d["ipv4"]),
        ipv6=tuple(data(x) for x in d["ipv6"]),
    )


def encode_endpoint(e: Endpoint) -> str:
    return json.dumps(
        {
            "host_ifname": e.host_ifname,
            "container_ifname": e.container_ifname,
            "mac": e.mac,
            "address": str(e.address) if e.address else None,
            "address_v6": str(e.address_v6) if e.address_v6 else None,
            "sandbox_key": e.sandbox_key,
            "ports": [
                [
                    int(b.proto),
                    b.port,
                    b.host_port,
                    b.host_port_end,
                    str(b.host_ip) if b.host_ip else None,
                ]
                for b in e.port_bindings
            ],
        },
        sort_keys=True,
    )


def decode_endpoint(endpoint_id: str, network_id: str, doc: str) -> Endpoint:
    d = json.loads(doc)
    return Endpoint(
        endpoint_id=endpoint_id,
        network_id=network_id,
        host_ifname=d["host_ifname"],
        container_ifname=d["container_ifname"],
        mac=d["mac"],
        address=ipaddress.IPv4Interface(d["address"]) if d["address"] else None,
        address_v6=ipaddress.IPv6Interface(d["address_v6"]) if d["address_v6"] else None,
        sandbox_key=d["sandbox_key"],
        port_bindings=tuple(
            PortBinding(
                proto=Proto(p[0]),
                port=p[1],
                host_port=p[2],
                host_port_end=p[3],
                host_ip=ipaddress.ip_address(p[4]) if p[4] else None,
            )
            for p in d["ports"]
        ),
    )


def encode_pool(p: Pool) -> str:
    return json.dumps(
        {
            "space": p.address_space,
            "network": str(p.network),
            "sub_pool": str(p.sub_pool) if p.sub_pool else None,
        },
        sort_keys=True,
    )


def decode_pool(pool_id: str, doc: str) -> Pool:
    d = json.loads(doc)
    return Pool(
        pool_id=pool_id,
        address_space=d["space"],
        network=ipaddress.ip_network(d["network"]),
        sub_pool=ipaddress.ip_network(d["sub_pool"]) if d["sub_pool"] else None,
    )


# --- the SQLite store -------------------------------------------------------------------------
def _apply(db: sqlite3.Connection, op: Op) -> None:
    match op:
        case PutNetwork(network=n):
            db.execute(
                "INSERT OR REPLACE INTO networks VALUES (?, ?)", (n.network_id, encode_network(n))
            )
        case DeleteNetwork(network_id=nid):
            db.execute("DELETE FROM networks WHERE network_id = ?", (nid,))
        case PutEndpoint(endpoint=e):
            db.execute(
                "INSERT OR REPLACE INTO endpoints VALUES (?, ?, ?)",
                (e.endpoint_id, e.network_id, encode_endpoint(e)),
            )
        case DeleteEndpoint(endpoint_id=eid):
            db.execute("DELETE FROM endpoints WHERE endpoint_id = ?", (eid,))
        case PutPool(pool=p):
            db.execute(
                "INSERT OR REPLACE INTO pools VALUES (?, ?, ?)",
                (p.pool_id, encode_pool(p), "0"),
            )
        case DeletePool(pool_id=pid):
            db.execute("DELETE FROM addresses WHERE pool_id = ?", (pid,))
            db.execute("DELETE FROM pools WHERE pool_id = ?", (pid,))
        case PutAddress(pool_id=pid, address=a, version=v, kind=k, cursor=c):
            db.execute("INSERT OR REPLACE INTO addresses VALUES (?, ?, ?)", (pid, _ip(v, a), k))
            db.execute("UPDATE pools SET cursor = ? WHERE pool_id = ?", (str(c), pid))
        case DeleteAddress(pool_id=pid, address=a, version=v):
            db.execute("DELETE FROM addresses WHERE pool_id = ? AND address = ?", (pid, _ip(v, a)))


@dataclass
class _Pending:
    ops: Sequence[Op]
    future: asyncio.Future[None]
    error: BaseException | None = field(default=None)


class Store:
    """SQLite in ``path``; ``open`` takes an exclusive lock on the state directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self.commits = 0  # transactions written, for metrics and tests of group commit

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # --- lifecycle ----------------------------------------------------------------------------
    async def open(self) -> Snapshot:
        return await self._call(self._open_sync)

    def _open_sync(self) -> Snapshot:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = os.open(self.path.parent / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StoreError(
                f"state directory {self.path.parent} is in use by another pouch-driver"
            ) from exc
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db = db
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsynced at every commit, so an answered request survives kill -9
            # and power loss alike.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=OFF")
            if fresh:
                db.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)  # the new file's directory entry must survive a crash too
                finally:
                    os.close(dir_fd)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise StoreError(
                    f"state store {self.path} has schema version {version}; this pouch-driver "
                    f"reads version {SCHEMA_VERSION}. It was left untouched."
                )
            return self._load(db)
        except (sqlite3.DatabaseError, json.JSONDecodeError, KeyError, ValueError) as exc:
            self._close_sync()
            raise StoreError(
                f"state store {self.path} is damaged ({exc}); it was left untouched. Restore it "
                "from a backup, or move it away to start with an empty state."
            ) from exc

    @staticmethod
    def _load(db: sqlite3.Connection) -> Snapshot:
        networks = tuple(
            decode_network(nid, doc) for nid, doc in db.execute("SELECT * FROM networks")
        )
        endpoints = tuple(
            decode_endpoint(eid, nid, doc)
            for eid, nid, doc in db.execute("SELECT * FROM endpoints")
        )
        allocations: dict[str, list[tuple[int, str]]] = {}
        for pid, addr, kind in db.execute("SELECT * FROM addresses"):
            allocations.setdefault(pid, []).append((int(ipaddress.ip_address(addr)), kind))
        pools = tuple(
            PoolRecord(decode_pool(pid, doc), int(cursor), tuple(allocations.get(pid, ())))
            for pid, doc, cursor in db.execute("SELECT * FROM pools")
        )
        return Snapshot(networks=networks, endpoints=endpoints, pools=pools)

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        await self._call(self._close_sync)
        self._executor.shutdown(wait=False)  # idle now; joining it would block the loop

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- writes -------------------------------------------------------------------------------
    async def commit(self, ops: Sequence[Op]) -> None:
        """Durably apply ``ops`` as one unit; returns once they are fsynced."""
        if not ops:
            return
        # Shielded: a cancelled request must not leave its ops half-known to the caller;
        # once queued they are written, and the caller's compensation sees a consistent store.
        await asyncio.shield(self.submit(ops))

    async def flushed(self) -> None:
        """Wait until everything queued so far is written (tests compare the file)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    def submit(self, ops: Sequence[Op]) -> asyncio.Future[None]:
        """Queue ``ops`` now, in order with every other commit; the future is done once they
        are fsynced. For writes nobody waits for, see ``service.durable.write_behind``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(ops, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return fut

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._call(lambda b=batch: self._write_sync(b))  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request below
                for p in batch:
                    p.error = p.error or exc
            for p in batch:
                if p.future.done():
                    continue
                if p.error is None:
                    p.future.set_result(None)
                else:
                    p.future.set_exception(
                        p.error
                        if isinstance(p.error, StoreError)
                        else StoreError(f"state store write failed: {p.error}")
                    )

    def _write_sync(self, batch: list[_Pending]) -> None:
        db = self._db
        if db is None:
            raise StoreError("state store is closed")
        db.execute("BEGIN IMMEDIATE")
        try:
            for i, p in enumerate(batch):
                db.execute(f"SAVEPOINT s{i}")
                try:
                    for op in p.ops:
                        _apply(db, op)
                except Exception as exc:  # noqa: BLE001 - fails this request only
                    db.execute(f"ROLLBACK TO s{i}")
                    p.error = exc
                db.execute(f"RELEASE s{i}")
            db.execute("COMMIT")
            self.commits += 1
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
