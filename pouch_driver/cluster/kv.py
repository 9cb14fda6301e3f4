"""The port the cluster backend needs from a distributed key-value store, and its values.

``etcd.EtcdClient`` implements it; the service layer sees only this protocol, so tests may
hand it any object with these methods (the real etcd is what the cluster tests use).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int = 0
    lease: int = 0


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    kv: KeyValue  # for DELETE: the key and the deleting revision, value empty

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


class KeyValueStore(Protocol):
    """Every call is bounded in time and raises ``errors.StoreUnavailable`` when no member
    answers; values written by ``create``/``create_all`` must name their writer."""

    @property
    def endpoints(self) -> list[str]: ...
    async def get(self, key: str) -> KeyValue | None: ...
    async def range_prefix(self, prefix: str) -> tuple[list[KeyValue], int]: ...
    async def put(self, key: str, value: str | bytes, lease: int | None = None) -> int: ...
    async def create(self, key: str, value: str | bytes, lease: int | None = None) -> bool: ...
    async def create_all(
        self,
        puts: Mapping[str, str | bytes],
        *,
        absent: Sequence[str] = (),
        lease: int | None = None,
    ) -> bool: ...
    async def delete(self, key: str, *, mod_revision: int | None = None) -> bool: ...
    async def grant(self, ttl: int) -> int: ...
    async def keepalive(self, lease: int) -> int: ...
    async def revoke(self, lease: int) -> None: ...
    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]: ...
    async def close(self) -> None: ...
