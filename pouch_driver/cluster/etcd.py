"""Adapter (store level): an asyncio client for etcd's v3 JSON gateway, over aiohttp.

Imports ``errors`` only, and only the composition root may build it. It never waits without a
bound: each attempt has a deadline, a failed attempt moves to the next member, and a call that
finds no member in its overall deadline raises ``StoreUnavailable`` naming the endpoints.

Retries and ambiguity. Reads, puts of our own value and deletes are simply repeated. A
put-if-absent (``create``) or ``compare_and_swap`` whose attempt timed out may have landed, so
the retry sends the same transaction with a read in its failure branch: if the key now holds
exactly our value, the earlier attempt won. That is only sound when every such value names its
writer (an owner, a host, a request), which callers must guarantee.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from ..errors import LeaseExpired, StoreError, StoreUnavailable, WatchCompacted
from .kv import EventType, KeyValue, WatchEvent

log = logging.getLogger(__name__)

# One decoded JSON object of the gateway. It never leaves this module: callers get dataclasses.
Json = dict[str, Any]

# gRPC status codes the gateway puts in its error bodies (google.golang.org/grpc/codes).
_CODE_DEADLINE_EXCEEDED = 4
_CODE_NOT_FOUND = 5
_CODE_UNAVAILABLE = 14
# Errors etcd reports with other codes that only mean "this member cannot serve now".
_TRANSIENT_MESSAGES = ("no leader", "leader changed", "request timed out", "not capable")


# --- values ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for etcd over TLS: the CA that signed the members, and our client pair."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


# --- the wire: pure helpers --------------------------------------------------------------------


def encode(data: str | bytes) -> str:
    """Keys and values travel base64-encoded in the gateway's JSON."""
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def decode(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str | bytes) -> bytes:
    """The smallest key above every key starting with ``prefix`` (etcd's range_end).

    Trailing 0xff bytes cannot be incremented and are dropped; an empty result means "to the
    end of the keyspace", which etcd spells as a single zero byte.
    """
    raw = bytearray(prefix.encode() if isinstance(prefix, str) else prefix)
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"
    raw[-1] += 1
    return bytes(raw)


def _int(obj: Mapping[str, Any], name: str) -> int:
    # int64 fields come as JSON strings, and fields equal to zero are left out.
    value = obj.get(name)
    return int(value) if value is not None else 0


def parse_kv(obj: Mapping[str, Any]) -> KeyValue:
    return KeyValue(
        key=decode(obj.get("key")).decode("utf-8", "surrogateescape"),
        value=decode(obj.get("value")),
        create_revision=_int(obj, "create_revision"),
        mod_revision=_int(obj, "mod_revision"),
        version=_int(obj, "version"),
        lease=_int(obj, "lease"),
    )


def parse_event(obj: Mapping[str, Any]) -> WatchEvent:
    kind = EventType.DELETE if obj.get("type") == "DELETE" else EventType.PUT
    return WatchEvent(kind, parse_kv(obj.get("kv") or {}))


def header_revision(response: Mapping[str, Any]) -> int:
    return _int(response.get("header") or {}, "revision")


def txn_range(response: Mapping[str, Any]) -> KeyValue | None:
    """The key read by a transaction's failure branch (its only operation), if it exists."""
    for op in response.get("responses") or []:
        kvs = (op.get("response_range") or {}).get("kvs") or []
        if kvs:
            return parse_kv(kvs[0])
    return None


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _value_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


# --- the transport: the I/O boundary, with a real and a fake implementation --------------------


class EndpointFailed(Exception):
    """One attempt at one member did not complete (no connection, no answer, a member that
    cannot serve now). ``sent`` is False only when the request surely never reached it."""

    def __init__(self, reason: str, *, sent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent


class GatewayError(Exception):
    """The member answered with an error of etcd's own (a gRPC status)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message

    @property
    def transient(self) -> bool:
        return self.code in (_CODE_UNAVAILABLE, _CODE_DEADLINE_EXCEEDED) or any(
            m in self.message for m in _TRANSIENT_MESSAGES
        )


class JsonStream(Protocol):
    async def next(self) -> Json | None:
        """The next object of the stream; None once the member closed it."""

    async def close(self) -> None: ...


class Transport(Protocol):
    """One request to one member. No deadline of its own: the client bounds each attempt with
    ``asyncio.timeout`` and treats a timeout as an attempt that may have been applied."""

    async def call(self, endpoint: str, path: str, body: Json) -> Json: ...

    async def open_stream(self, endpoint: str, path: str, body: Json) -> JsonStream: ...

    async def close(self) -> None: ...


def _ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None
    )
    if tls.cert is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
    return ctx


def _gateway_error(status: int, data: bytes) -> GatewayError:
    try:
        obj = json.loads(data)
        return GatewayError(int(obj.get("code", 2)), str(obj.get("message") or obj.get("error")))
    except (ValueError, AttributeError, TypeError):
        return GatewayError(2, f"HTTP {status}: {data[:200]!r}")


class AiohttpTransport:
    """HTTP/1.1 to the gateway. The session is opened on first use, inside the event loop,
    and the TLS files are read on a worker thread (never blocking the loop)."""

    def __init__(self, tls: TlsFiles | None = None) -> None:
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None
        self._opening = asyncio.Lock()

    async def _get_session(self) -> aiohttp.ClientSession:
        async with self._opening:
            if self._session is None:
                ctx: ssl.SSLContext | bool = True
                if self._tls is not None:
                    ctx = await asyncio.to_thread(_ssl_context, self._tls)
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=ctx, limit=128),
                    timeout=aiohttp.ClientTimeout(total=None),
                )
            return self._session

    async def call(self, endpoint: str, path: str, body: Json) -> Json:
        session = await self._get_session()
        try:
            async with session.post(endpoint + path, json=body) as resp:
                status, data = resp.status, await resp.read()
        except aiohttp.ClientConnectorError as exc:
            raise EndpointFailed(f"cannot connect: {exc.os_error}", sent=False) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise EndpointFailed(f"{type(exc).__name__}: {exc}", sent=True) from exc
        if status != 200:
            raise _gateway_error(status, data)
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise GatewayError(2, f"not a JSON object: {data[:200]!r}")
        if "error" in obj:
            raise _gateway_error(status, data)
        return obj

    async def open_stream(self, endpoint: str, path: str, body: Json) -> JsonStream:
        session = await self._get_session()
        try:
            resp = await session.post(endpoint + path, json=body)
        except aiohttp.ClientConnectorError as exc:
            raise EndpointFailed(f"cannot connect: {exc.os_error}", sent=False) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise EndpointFailed(f"{type(exc).__name__}: {exc}", sent=True) from exc
        if resp.status != 200:
            data = await resp.read()
            resp.release()
            raise _gateway_error(resp.status, data)
        return _AiohttpStream(resp)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _AiohttpStream:
    """Newline-delimited JSON objects. Read in chunks rather than by line: aiohttp bounds a
    line's length, and one watch response may carry many large events."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._buf = bytearray()

    async def next(self) -> Json | None:
        while True:
            line, sep, rest = self._buf.partition(b"\n")
            if sep:
                self._buf = bytearray(rest)
                if not line.strip():
                    continue
                obj = json.loads(line)
                return obj if isinstance(obj, dict) else {}
            try:
                chunk = await self._resp.content.readany()
            except (aiohttp.ClientError, OSError) as exc:
                raise EndpointFailed(f"stream broke: {exc}", sent=True) from exc
            if not chunk:
                return None
            self._buf += chunk

    async def close(self) -> None:
        self._resp.close()


class WatchCursor:
    """Where a watch stands: the next revision it must deliver, kept across members.

    Pure: it turns the gateway's watch answers into the events not yet delivered.
    """

    def __init__(self, prefix: str, start_revision: int) -> None:
        self.prefix = prefix
        self.next_revision = start_revision

    def create_request(self) -> Json:
        return {
            "create_request": {
                "key": encode(_key_bytes(self.prefix)),
                "range_end": encode(prefix_end(self.prefix)),
                "start_revision": str(self.next_revision),
                # Members started with --experimental-watch-progress-notify-interval then tell
                # an idle watch how far it is; without it the heartbeat probe still applies.
                "progress_notify": True,
            }
        }

    def absorb(self, answer: Mapping[str, Any]) -> list[WatchEvent]:
        if "error" in answer:
            raise _gateway_error(200, json.dumps(answer["error"]).encode())
        result = answer.get("result") or {}
        if result.get("canceled"):
            compacted = _int(result, "compact_revision")
            if compacted:
                raise WatchCompacted(
                    f"cluster store etcd: watch of {self.prefix!r} from revision "
                    f"{self.next_revision} is compacted (oldest kept: {compacted})",
                    compacted,
                )
            raise EndpointFailed(f"watch canceled: {result.get('cancel_reason', '')}", sent=True)
        if result.get("created"):
            if self.next_revision == 0:
                self.next_revision = header_revision(result) + 1
            return []
        events = [parse_event(e) for e in result.get("events") or []]
        if not events:
            # A progress notification: everything up to its revision has been sent.
            self.next_revision = max(self.next_revision, header_revision(result) + 1)
            return []
        # Events below the cursor came through the member we left; one revision may carry
        # several events, so the cursor moves only after the whole answer.
        fresh = [e for e in events if e.revision >= self.next_revision]
        if fresh:
            self.next_revision = max(e.revision for e in fresh) + 1
        return fresh


# --- endpoint choice ---------------------------------------------------------------------------


class EndpointRing:
    """Which member to ask: the current one until it fails, then the next in the given order.

    Many calls fail on the same member at once; only the first of them moves the ring, so
    concurrent failures do not skip healthy members.
    """

    def __init__(self, endpoints: Sequence[str]) -> None:
        if not endpoints:
            raise ValueError("etcd: at least one endpoint is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._current = 0

    @property
    def current(self) -> int:
        return self._current

    def failed(self, index: int) -> None:
        if index == self._current:
            self._current = (index + 1) % len(self.endpoints)


# --- the client --------------------------------------------------------------------------------


@dataclass
class _Attempts:
    """What one call met on its way: for the error message and for ambiguity."""

    tried: list[str] = field(default_factory=list)
    last_reason: str = ""
    ambiguous: bool = False  # an attempt may have been applied without our seeing the answer


class EtcdClient:
    """etcd v3 over its JSON gateway, with deadlines and fail-over on every call.

    ``timeout`` bounds one attempt at one member; ``deadline`` (default: one attempt per
    member plus one) bounds a whole call. ``heartbeat`` is how long a watch may stay silent
    before the member it listens to is probed, and abandoned if it does not answer.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 1.0,
        deadline: float | None = None,
        heartbeat: float | None = None,
        tls: TlsFiles | None = None,
        transport: Transport | None = None,
    ) -> None:
        self._ring = EndpointRing(endpoints)
        self.timeout = timeout
        self.deadline = deadline if deadline is not None else timeout * (len(endpoints) + 1)
        self.heartbeat = heartbeat if heartbeat is not None else max(1.0, 2 * timeout)
        self._transport: Transport = transport or AiohttpTransport(tls)
        self._closed = False

    @property
    def endpoints(self) -> list[str]:
        return list(self._ring.endpoints)

    @property
    def current_endpoint(self) -> str:
        return self._ring.endpoints[self._ring.current]

    async def close(self) -> None:
        self._closed = True
        await self._transport.close()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the retry loop --

    async def _request(self, path: str, body: Json) -> tuple[Json, bool]:
        """One call, retried on the next member until the deadline. Returns the answer and
        whether an earlier attempt may have been applied (see the module docstring)."""
        if self._closed:
            raise StoreError("etcd client is closed")
        attempts = _Attempts()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.deadline
        failures_in_row = 0
        while True:
            remaining = give_up - loop.time()
            if remaining <= 0:
                raise self._unavailable(path, attempts)
            index = self._ring.current
            endpoint = self._ring.endpoints[index]
            attempts.tried.append(endpoint)
            try:
                answer = await self._attempt(endpoint, path, body, min(self.timeout, remaining))
            except EndpointFailed as exc:
                attempts.last_reason = f"{endpoint}: {exc.reason}"
                attempts.ambiguous |= exc.sent
            except GatewayError as exc:
                if not exc.transient:
                    raise
                attempts.last_reason = f"{endpoint}: {exc.message}"
                attempts.ambiguous = True
            else:
                return answer, attempts.ambiguous
            log.warning("etcd %s failed at %s; trying the next member", path, attempts.last_reason)
            self._ring.failed(index)
            failures_in_row += 1
            if failures_in_row % len(self._ring.endpoints) == 0:
                # Every member failed once: pause before the next round instead of spinning.
                pause = min(0.05 * 2 ** (failures_in_row // len(self._ring.endpoints)), 0.5)
                await asyncio.sleep(max(0.0, min(pause, give_up - loop.time())))

    async def _attempt(self, endpoint: str, path: str, body: Json, limit: float) -> Json:
        try:
            async with asyncio.timeout(limit):
                return await self._transport.call(endpoint, path, body)
        except TimeoutError as exc:
            raise EndpointFailed(f"no answer within {limit:.2f}s", sent=True) from exc

    def _unavailable(self, path: str, attempts: _Attempts) -> StoreUnavailable:
        tried = ", ".join(dict.fromkeys(attempts.tried)) or "none"
        return StoreUnavailable(
            f"cluster store etcd ({', '.join(self._ring.endpoints)}) unavailable: {path} got no "
            f"answer within {self.deadline:.1f}s; tried {tried}; last: {attempts.last_reason}"
        )

    async def _call(self, path: str, body: Json) -> tuple[Json, bool]:
        try:
            return await self._request(path, body)
        except GatewayError as exc:
            raise StoreError(f"cluster store etcd refused {path}: {exc.message}") from exc

    # -- keys --

    async def get(self, key: str) -> KeyValue | None:
        answer, _ = await self._call("/v3/kv/range", {"key": encode(_key_bytes(key))})
        kvs = answer.get("kvs") or []
        return parse_kv(kvs[0]) if kvs else None

    async def range_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the store revision they were read at (a watch from
        revision + 1 then misses nothing)."""
        body = {"key": encode(_key_bytes(prefix)), "range_end": encode(prefix_end(prefix))}
        answer, _ = await self._call("/v3/kv/range", body)
        return [parse_kv(kv) for kv in answer.get("kvs") or []], header_revision(answer)

    async def put(self, key: str, value: str | bytes, lease: int | None = None) -> int:
        """Store ``value``; returns the revision of the write."""
        answer, _ = await self._call("/v3/kv/put", self._put_op(key, value, lease))
        return header_revision(answer)

    async def create(self, key: str, value: str | bytes, lease: int | None = None) -> bool:
        """Put ``value`` only if ``key`` does not exist. True when this call wrote it.

        ``value`` must name its writer: after an attempt that may have landed, the key holding
        exactly ``value`` (and ``lease``) is taken as our own success.
        """
        k = encode(_key_bytes(key))
        body = {
            "compare": [{"result": "EQUAL", "target": "CREATE", "key": k, "create_revision": "0"}],
            "success": [{"request_put": self._put_op(key, value, lease)}],
            "failure": [{"request_range": {"key": k}}],
        }
        answer, ambiguous = await self._call("/v3/kv/txn", body)
        if answer.get("succeeded"):
            return True
        return ambiguous and self._is_ours(txn_range(answer), value, lease)

    async def create_all(
        self,
        puts: Mapping[str, str | bytes],
        *,
        absent: Sequence[str] = (),
        lease: int | None = None,
    ) -> bool:
        """Put every key of ``puts`` only if none of them, nor any key in ``absent``, exists:
        one transaction. True when this call wrote them; the first key of ``puts`` holding
        exactly its value after an ambiguous attempt counts as ours (same rule as ``create``).
        """
        if not puts:
            raise ValueError("create_all needs at least one key to put")
        keys = [*puts, *absent]
        first = next(iter(puts))
        body = {
            "compare": [
                {
                    "result": "EQUAL",
                    "target": "CREATE",
                    "key": encode(_key_bytes(k)),
                    "create_revision": "0",
                }
                for k in keys
            ],
            "success": [{"request_put": self._put_op(k, v, lease)} for k, v in puts.items()],
            "failure": [{"request_range": {"key": encode(_key_bytes(first))}}],
        }
        answer, ambiguous = await self._call("/v3/kv/txn", body)
        if answer.get("succeeded"):
            return True
        return ambiguous and self._is_ours(txn_range(answer), puts[first], lease)

    async def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: str | bytes, lease: int | None = None
    ) -> bool:
        """Put ``value`` only if ``key`` was last modified at ``expected_mod_revision`` (0: the
        key must not exist). True when this call wrote it; same ownership rule as ``create``."""
        k = encode(_key_bytes(key))
        target, field_name = (
            ("CREATE", "create_revision") if expected_mod_revision == 0 else ("MOD", "mod_revision")
        )
        compare = {"result": "EQUAL", "target": target, "key": k}
        compare[field_name] = str(expected_mod_revision)
        body = {
            "compare": [compare],
            "success": [{"request_put": self._put_op(key, value, lease)}],
            "failure": [{"request_range": {"key": k}}],
        }
        answer, ambiguous = await self._call("/v3/kv/txn", body)
        if answer.get("succeeded"):
            return True
        current = txn_range(answer)
        return (
            ambiguous
            and current is not None
            and current.mod_revision > expected_mod_revision
            and self._is_ours(current, value, lease)
        )

    async def delete(self, key: str, *, mod_revision: int | None = None) -> bool:
        """Delete ``key`` (only at ``mod_revision`` when given). True when the key was there
        and is gone; after an attempt that may have landed, "gone now" counts as ours."""
        k = encode(_key_bytes(key))
        if mod_revision is None:
            answer, ambiguous = await self._call("/v3/kv/deleterange", {"key": k})
            return _int(answer, "deleted") > 0 or ambiguous
        body = {
            "compare": [
                {"result": "EQUAL", "target": "MOD", "key": k, "mod_revision": str(mod_revision)}
            ],
            "success": [{"request_delete_range": {"key": k}}],
            "failure": [{"request_range": {"key": k}}],
        }
        answer, ambiguous = await self._call("/v3/kv/txn", body)
        if answer.get("succeeded"):
            return True
        return ambiguous and txn_range(answer) is None

    @staticmethod
    def _put_op(key: str, value: str | bytes, lease: int | None) -> Json:
        op: Json = {"key": encode(_key_bytes(key)), "value": encode(_value_bytes(value))}
        if lease:
            op["lease"] = str(lease)
        return op

    @staticmethod
    def _is_ours(current: KeyValue | None, value: str | bytes, lease: int | None) -> bool:
        return (
            current is not None
            and current.value == _value_bytes(value)
            and current.lease == (lease or 0)
        )

    # -- leases --

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds. A retried grant may leave an unused lease behind;
        it expires by itself."""
        answer, _ = await self._call("/v3/lease/grant", {"TTL": str(ttl)})
        return _int(answer, "ID")

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; returns its TTL. Raises LeaseExpired when it is already gone (its
        keys with it): the caller must re-create what it held."""
        answer, _ = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        ttl = _int(answer.get("result") or answer, "TTL")
        if ttl <= 0:
            raise LeaseExpired(f"cluster store etcd: lease {lease:x} has expired", lease)
        return ttl

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now, deleting its keys. A lease already gone is not an error."""
        try:
            await self._request("/v3/lease/revoke", {"ID": str(lease)})
        except GatewayError as exc:
            if exc.code != _CODE_NOT_FOUND:
                raise StoreError(f"cluster store etcd refused lease revoke: {exc.message}") from exc

    # -- watch --

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Every change under ``prefix`` from ``start_revision`` (0: from now), in revision
        order, each once.

        When the stream breaks, ends, or stays silent past ``heartbeat`` while its member no
        longer answers, the watch resumes on the next member from the revision after the last
        one delivered. Raises WatchCompacted when that revision is no longer kept: re-read
        with ``range_prefix`` and watch again. Ends when the client is closed.
        """
        cursor = WatchCursor(prefix, start_revision)
        failures_in_row = 0
        while not self._closed:
            index = self._ring.current
            endpoint = self._ring.endpoints[index]
            stream: JsonStream | None = None
            try:
                async with asyncio.timeout(self.timeout):
                    stream = await self._transport.open_stream(
                        endpoint, "/v3/watch", cursor.create_request()
                    )
                while True:
                    events = cursor.absorb(await self._next_or_probe(endpoint, stream))
                    failures_in_row = 0
                    for event in events:
                        yield event
            except TimeoutError:
                reason = f"no answer within {self.timeout:.2f}s"
            except EndpointFailed as exc:
                reason = exc.reason
            except GatewayError as exc:
                if not exc.transient:
                    raise StoreError(
                        f"cluster store etcd refused the watch of {prefix!r}: {exc.message}"
                    ) from exc
                reason = exc.message
            finally:
                if stream is not None:
                    await stream.close()
            if self._closed:
                return
            log.warning(
                "etcd watch of %r through %s stopped (%s); resuming from revision %d on the next"
                " member",
                prefix,
                endpoint,
                reason,
                cursor.next_revision,
            )
            self._ring.failed(index)
            failures_in_row += 1
            if failures_in_row % len(self._ring.endpoints) == 0:
                rounds = failures_in_row // len(self._ring.endpoints)
                await asyncio.sleep(min(0.05 * 2**rounds, 1.0))

    async def _next_or_probe(self, endpoint: str, stream: JsonStream) -> Json:
        """The stream's next answer; after ``heartbeat`` of silence, probe its member and give
        up on it if it does not answer (a stopped member keeps the socket open, silent)."""
        while True:
            try:
                async with asyncio.timeout(self.heartbeat):
                    answer = await stream.next()
            except TimeoutError:
                if not await self._alive(endpoint):
                    raise EndpointFailed(
                        f"watch silent for {self.heartbeat:.1f}s and member not answering",
                        sent=True,
                    ) from None
                continue
            if answer is None:
                raise EndpointFailed("watch stream ended", sent=True)
            return answer

    async def _alive(self, endpoint: str) -> bool:
        try:
            status = await self._attempt(endpoint, "/v3/maintenance/status", {}, self.timeout)
        except (EndpointFailed, GatewayError):
            return False
        return _int(status, "leader") != 0
