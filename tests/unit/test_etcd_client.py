"""The etcd client's pure parts and its retry rules, over a scripted transport (no etcd)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import pytest

from pouch_driver.cluster.etcd import (
    EndpointFailed,
    EndpointRing,
    EtcdClient,
    EventType,
    GatewayError,
    Json,
    KeyValue,
    WatchCursor,
    decode,
    encode,
    parse_kv,
    prefix_end,
    txn_range,
)
from pouch_driver.errors import LeaseExpired, StoreError, StoreUnavailable, WatchCompacted

EPS = ["http://m0", "http://m1", "http://m2"]

# --- pure parts --------------------------------------------------------------------------------


def test_base64_round_trip() -> None:
    assert encode("a/b") == "YS9i"
    assert decode(encode(b"\x00\xff")) == b"\x00\xff"
    assert decode(None) == b""


@pytest.mark.parametrize(
    ("prefix", "end"),
    [("a/", b"a0"), (b"a\xff", b"b"), (b"a\xff\xff", b"b"), (b"\xff", b"\0"), ("", b"\0")],
)
def test_prefix_end(prefix: str | bytes, end: bytes) -> None:
    assert prefix_end(prefix) == end


def test_parse_kv_reads_string_integers_and_absent_zeros() -> None:
    kv = parse_kv({"key": encode("k"), "create_revision": "7", "mod_revision": "9"})
    assert kv == KeyValue("k", b"", 7, 9, 0, 0)


def test_txn_range_finds_the_failure_branch_read() -> None:
    kv = {"key": encode("k"), "value": encode("v"), "mod_revision": "3"}
    assert txn_range({"responses": [{"response_range": {"kvs": [kv]}}]}) == parse_kv(kv)
    assert txn_range({"responses": [{"response_range": {}}]}) is None
    assert txn_range({}) is None


def _event(rev: int, key: str = "p/k", kind: str = "PUT") -> Json:
    return {"type": kind, "kv": {"key": encode(key), "mod_revision": str(rev)}}


def test_watch_cursor_from_now_starts_after_the_creation_revision() -> None:
    cursor = WatchCursor("p/", 0)
    assert cursor.absorb({"result": {"created": True, "header": {"revision": "41"}}}) == []
    assert cursor.next_revision == 42


def test_watch_cursor_drops_what_was_delivered_and_keeps_one_revisions_events() -> None:
    cursor = WatchCursor("p/", 5)
    assert [e.revision for e in cursor.absorb({"result": {"events": [_event(5)]}})] == [5]
    replay = {"result": {"events": [_event(5), _event(6, "p/a"), _event(6, "p/b", "DELETE")]}}
    fresh = cursor.absorb(replay)
    assert [(e.revision, e.type) for e in fresh] == [(6, EventType.PUT), (6, EventType.DELETE)]
    assert cursor.next_revision == 7
    assert cursor.create_request()["create_request"]["start_revision"] == "7"


def test_watch_cursor_progress_and_cancellation() -> None:
    cursor = WatchCursor("p/", 5)
    assert cursor.absorb({"result": {"header": {"revision": "9"}}}) == []
    assert cursor.next_revision == 10
    with pytest.raises(WatchCompacted):
        cursor.absorb({"result": {"canceled": True, "compact_revision": "12"}})
    with pytest.raises(EndpointFailed):
        cursor.absorb({"result": {"canceled": True}})


def test_ring_moves_once_for_concurrent_failures_of_one_member() -> None:
    ring = EndpointRing(EPS)
    ring.failed(0)
    ring.failed(0)  # a second call that also failed on m0 must not skip m1
    assert ring.current == 1
    ring.failed(1)
    ring.failed(2)
    assert ring.current == 0


# --- the client over a scripted transport ------------------------------------------------------

Handler = Callable[[str, str, Json], Json]


class ScriptedTransport:
    """Each endpoint is "ok" (handler answers), "hang" (never answers: a SIGSTOPped member),
    or "refuse" (connection refused)."""

    def __init__(self, handler: Handler, modes: dict[str, str] | None = None) -> None:
        self.handler = handler
        self.modes = modes or {}
        self.calls: list[tuple[str, str]] = []
        self.streams: dict[str, list[Json | None]] = {}
        self.watch_starts: list[tuple[str, str]] = []

    async def _gate(self, endpoint: str, path: str) -> None:
        self.calls.append((endpoint, path))
        mode = self.modes.get(endpoint, "ok")
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "refuse":
            raise EndpointFailed("cannot connect", sent=False)

    async def call(self, endpoint: str, path: str, body: Json) -> Json:
        await self._gate(endpoint, path)
        return self.handler(endpoint, path, body)

    async def open_stream(self, endpoint: str, path: str, body: Json) -> ScriptedStream:
        await self._gate(endpoint, path)
        self.watch_starts.append((endpoint, body["create_request"]["start_revision"]))
        return ScriptedStream(self.streams.get(endpoint, []), body)

    async def close(self) -> None:
        pass


class ScriptedStream:
    def __init__(self, answers: list[Json | None], request: Json) -> None:
        self.answers = list(answers)
        self.request = request

    async def next(self) -> Json | None:
        if not self.answers:
            await asyncio.sleep(3600)  # silent, like a stopped member
        return self.answers.pop(0)

    async def close(self) -> None:
        pass


def _client(transport: ScriptedTransport, **kwargs: Any) -> EtcdClient:
    opts = {"timeout": 0.05, "deadline": 1.0, "heartbeat": 0.05} | kwargs
    return EtcdClient(EPS, transport=transport, **opts)


def _answer_get(_ep: str, _path: str, _body: Json) -> Json:
    return {"kvs": [{"key": encode("k"), "value": encode("v"), "mod_revision": "2"}]}


async def test_a_silent_then_refusing_member_is_passed_and_the_ring_stays_moved() -> None:
    transport = ScriptedTransport(_answer_get, {"http://m0": "hang", "http://m1": "refuse"})
    client = _client(transport)
    kv = await client.get("k")
    assert kv is not None
    assert kv.value == b"v"
    assert [ep for ep, _ in transport.calls] == EPS
    assert client.current_endpoint == "http://m2"
    await client.get("k")
    assert transport.calls[-1][0] == "http://m2"


async def test_no_member_answering_raises_store_unavailable_naming_them() -> None:
    transport = ScriptedTransport(_answer_get, dict.fromkeys(EPS, "hang"))
    client = _client(transport, deadline=0.3)
    async with asyncio.timeout(2):
        with pytest.raises(StoreUnavailable) as caught:
            await client.put("k", "v")
    assert "etcd" in str(caught.value)
    assert all(ep in str(caught.value) for ep in EPS)


def _txn_failed_holding(value: str, lease: int = 0) -> Handler:
    def handler(_ep: str, _path: str, _body: Json) -> Json:
        kv = {"key": encode("k"), "value": encode(value), "lease": str(lease) if lease else None}
        return {"succeeded": False, "responses": [{"response_range": {"kvs": [kv]}}]}

    return handler


async def test_create_after_an_attempt_that_may_have_landed_recognises_its_own_value() -> None:
    mine = ScriptedTransport(_txn_failed_holding("host-a"), {"http://m0": "hang"})
    assert await _client(mine).create("k", "host-a")
    theirs = ScriptedTransport(_txn_failed_holding("host-b"), {"http://m0": "hang"})
    assert not await _client(theirs).create("k", "host-a")
    other_lease = ScriptedTransport(_txn_failed_holding("host-a", 7), {"http://m0": "hang"})
    assert not await _client(other_lease).create("k", "host-a", lease=8)


async def test_create_without_ambiguity_never_claims_an_equal_value() -> None:
    """A refused connection surely sent nothing: an equal value there is someone else's write."""
    transport = ScriptedTransport(_txn_failed_holding("host-a"), {"http://m0": "refuse"})
    assert not await _client(transport).create("k", "host-a")


async def test_etcd_errors_are_retried_only_when_transient() -> None:
    def invalid(_ep: str, _path: str, _body: Json) -> Json:
        raise GatewayError(3, "etcdserver: key is not provided")

    transport = ScriptedTransport(invalid)
    with pytest.raises(StoreError, match="key is not provided"):
        await _client(transport).get("")
    assert len(transport.calls) == 1

    def no_leader(ep: str, _path: str, _body: Json) -> Json:
        if ep == "http://m0":
            raise GatewayError(14, "etcdserver: no leader")
        return {"header": {"revision": "5"}}

    transport = ScriptedTransport(no_leader)
    assert await _client(transport).put("k", "v") == 5


async def test_lease_calls() -> None:
    def handler(_ep: str, path: str, body: Json) -> Json:
        if path == "/v3/lease/keepalive":
            ttl = {"TTL": "4"} if body["ID"] == "1" else {}
            return {"result": {"ID": body["ID"], **ttl}}
        if path == "/v3/lease/revoke":
            raise GatewayError(5, "etcdserver: requested lease not found")
        return {"ID": "1", "TTL": "4"}

    client = _client(ScriptedTransport(handler))
    assert await client.grant(4) == 1
    assert await client.keepalive(1) == 4
    with pytest.raises(LeaseExpired):
        await client.keepalive(2)
    await client.revoke(2)


async def test_watch_resumes_on_the_next_member_without_loss_or_repeat() -> None:
    def dead_status(ep: str, _path: str, _body: Json) -> Json:
        return {"leader": "0"} if ep == "http://m0" else {"leader": "1"}

    transport = ScriptedTransport(dead_status)
    created: Json = {"result": {"created": True, "header": {"revision": "4"}}}
    transport.streams["http://m0"] = [created, {"result": {"events": [_event(5), _event(6)]}}]
    transport.streams["http://m1"] = [created, {"result": {"events": [_event(6), _event(7)]}}]
    client = _client(transport)
    seen = []
    async with asyncio.timeout(2), aclosing(client.watch("p/", 5)) as events:
        async for event in events:
            seen.append(event.revision)
            if len(seen) == 3:
                break
    assert seen == [5, 6, 7]
    assert transport.watch_starts == [("http://m0", "5"), ("http://m1", "7")]
    assert client.current_endpoint == "http://m1"
