"""Fuzzed protocol: hostile bodies on every call, through aiohttp's test client and the fakes.

Invariants, whatever is sent (issue 7):
* every answer is a JSON object: 200, or 4xx/5xx with a non-empty ``Err``; 404 only for paths
  that are not protocol calls; never "internal error" (an unhandled exception);
* a failed call changes nothing: service state, fake kernel and firewall, and the store's rows;
* memory stays bounded over a long run of hostile and ordinary requests.

Hypothesis drives one long-lived event loop (``Harness``); the plugin is rebuilt only after a
call changed its state, so most examples cost one request. Examples are derandomized: the suite
is deterministic in CI; ``POUCH_FUZZ_EXAMPLES=<n>`` multiplies the budget (and randomizes) for a
deeper local run.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import logging
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from blockbuster import blockbuster_ctx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pouch_driver.config import Settings
from pouch_driver.daemon import build_app
from pouch_driver.http.handlers import CALLS
from pouch_driver.kernel.fake import FakeFirewall, FakeLinks
from pouch_driver.model import OPT_PORTMAP

from . import hostile as h
from .conftest import Plugin, PluginFactory

SCALE = int(os.environ.get("POUCH_FUZZ_EXAMPLES", "1"))


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        derandomize=SCALE == 1,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


# --- hostile values ------------------------------------------------------------------------------
HOSTILE_STRINGS = [
    "",
    " ",
    "x;reboot",
    "$(reboot)",
    "`reboot`",
    "../../etc",
    "/etc/passwd",
    "a/../../b",
    "\x00",
    "abc\x00def",
    "a" * 12 + "\n",
    "\n",
    "\r\n",
    "é" * 20,
    "\u202e",
    "\ud800",
    "x" * 5000,
    "0" * 64,
    "A" * 64,
    "f" * 65,
    "fd00::%lo/64",
    "fe80::1",
    "::1%lo",
    "10.1.0.0/33",
    "10.1.0.1/24",
    "10.1.0.1",
    "256.1.1.1",
    "0.0.0.0/0",
    "::/0",
    "1e400",
    "NaN",
    "-1",
    "true",
    "null",
    "{}",
    "[]",
    "%s%s%n",
    "${jndi:ldap://x/a}",
    "'; DROP TABLE endpoints; --",
    "PouchLocal",
    "PouchGlobal",
    "com.docker.network.gateway",
    "02:42:ac:11:00:02",
    "01:00:5e:00:00:01",
    "br0",
    "eth0",
    "lo",
]
HOSTILE_NUMBERS: list[Any] = [
    0,
    -1,
    1,
    6,
    17,
    132,
    2**31,
    2**63,
    2**64,
    -(2**63) - 1,
    10**300,
    10**4000,
    1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    0.5,
    -0.0,
    True,
    False,
]
# Every field name any request schema knows, and the option keys the handlers look up.
KEYS = sorted(
    {
        "NetworkID",
        "EndpointID",
        "Options",
        "IPv4Data",
        "IPv6Data",
        "AddressSpace",
        "Pool",
        "Gateway",
        "AuxAddresses",
        "Interface",
        "Address",
        "AddressIPv6",
        "MacAddress",
        "SandboxKey",
        "DiscoveryType",
        "DiscoveryData",
        "SubPool",
        "V6",
        "PoolID",
        "DryRun",
        "ForgetNetworks",
        "ForgetEndpoints",
        "Proto",
        "IP",
        "Port",
        "HostIP",
        "HostPort",
        "HostPortEnd",
        "RequestAddressType",
        "com.docker.network.generic",
        "com.docker.network.enable_ipv6",
        "com.docker.network.internal",
        OPT_PORTMAP,
        "com.docker.network.bridge.name",
        "com.docker.network.driver.mtu",
        "com.docker.network.endpoint.macaddress",
    }
)


def _leaves(doc: Any) -> list[Any]:
    if isinstance(doc, dict):
        return [x for v in doc.values() for x in _leaves(v)]
    if isinstance(doc, list):
        return [x for v in doc for x in _leaves(v)]
    return [doc]


# Real values from elsewhere in the payloads: cross-wired IDs, pools, addresses.
REAL_VALUES = sorted(
    {json.dumps(v) for body in (*h.D.values(), *h.P.values()) for v in _leaves(body)}
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=24)
    | st.sampled_from(HOSTILE_STRINGS)
    | st.sampled_from(HOSTILE_NUMBERS)
    | st.sampled_from(REAL_VALUES).map(json.loads)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=12,
)
objects = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), json_values, max_size=8)


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# --- the harness ---------------------------------------------------------------------------------
class Harness:
    """One event loop for a module's examples; a fresh plugin only after a state change."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runner = asyncio.Runner()
        self.plugin: Plugin | None = None
        self.dirty = True
        self.builds = 0
        self.requests = 0
        self.answers: dict[int, int] = {}

    async def _fresh(self) -> Plugin:
        if self.plugin is not None:
            await self.plugin.client.close()
        self.builds += 1
        cfg = Settings(
            socket=self.root / "p.sock",
            state_dir=self.root / f"s{self.builds}",
            gc_interval=0,
            prefix="pu",
            max_body=64 * 1024,
            request_timeout=3,
        )
        links, firewall = FakeLinks(), FakeFirewall()
        client: TestClient[Any, Any] = TestClient(
            TestServer(build_app(cfg, links=links, firewall=firewall))
        )
        await client.start_server()
        self.plugin = Plugin(client, links, firewall)
        await h.baseline(self.plugin)
        self.dirty = False
        return self.plugin

    async def _exchange(
        self, path: str, raw: bytes
    ) -> tuple[int, str, dict[str, Any], dict[str, Any]]:
        plugin = await self._fresh() if self.dirty or self.plugin is None else self.plugin
        before = h.snapshot(plugin)
        resp = await plugin.client.post(path, data=raw)
        text = await resp.text()
        await h.settle(plugin)
        after = h.snapshot(plugin)
        self.dirty = after != before
        self.requests += 1
        self.answers[resp.status] = self.answers.get(resp.status, 0) + 1
        return resp.status, text, before, after

    def exchange(self, path: str, raw: bytes) -> tuple[int, str, dict[str, Any], dict[str, Any]]:
        return self.runner.run(self._exchange(path, raw))

    def close(self) -> None:
        if self.plugin is not None:
            self.runner.run(self.plugin.client.close())
        self.runner.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    hs = Harness(tmp_path_factory.mktemp("fuzz"))
    # Blocking calls made by pouch_driver on the loop fail the example, as in async tests.
    with blockbuster_ctx(
        scanned_modules=["pouch_driver"], excluded_modules=["pouch_driver.kernel.links"]
    ):
        yield hs
    hs.close()
    print(f"\nfuzz: {hs.requests} requests, {hs.builds} plugin builds, statuses {hs.answers}")


Exchange = tuple[int, str, dict[str, Any], dict[str, Any]]


def send(harness: Harness, path: str, raw: bytes) -> Exchange:
    return harness.exchange(path, raw)


def verify(path: str, raw: bytes, exchange: Exchange) -> None:
    """The invariants of the module docstring, for one exchange."""
    status, text, before, after = exchange
    assert status != 504, f"{path} hung until the request deadline: {raw[:300]!r}"
    doc = h.check_answer(path, status, text)
    if path not in CALLS:
        assert status == 404, f"{path}: {status} {doc}"
    if status != 200:
        changed = h.diff(before, after)
        assert not changed, (
            f"{path} failed ({status} {doc.get('Err')!r}) but changed {changed}; body {raw[:300]!r}"
        )


# --- the fuzz tests ------------------------------------------------------------------------------
def test_every_protocol_call_is_fuzzed() -> None:
    """A new call added to CALLS is fuzzed automatically; one with a body needs a seed."""
    for path, call in CALLS.items():
        assert call.request is None or h.SEEDS[path], f"{path}: add a payload to tests/http"


@pytest.mark.parametrize("path", sorted(CALLS))
@fuzz(8)
@given(data=st.data())
def test_garbage_on_every_call(harness: Harness, path: str, data: st.DataObject) -> None:
    """Wrong types, unicode, huge numbers and nesting, shaped like this call's fields."""
    doc = data.draw(objects | json_values, label="body")
    raw = encode(doc)
    verify(path, raw, send(harness, path, raw))


@st.composite
def mutated_seed(draw: st.DrawFn) -> tuple[str, bytes]:
    """A real payload with 1-3 fields dropped, replaced, retyped, wrapped or cross-wired."""
    path = draw(st.sampled_from(sorted(p for p, s in h.SEEDS.items() if s)))
    _, body = draw(st.sampled_from(h.SEEDS[path]))
    for _ in range(draw(st.integers(1, 3))):
        locs = h.locations(body)
        if not locs:
            break
        loc = draw(st.sampled_from(locs))
        op = draw(st.sampled_from(["drop", "replace", "retype", "hostile", "wrap", "real"]))
        if op == "drop":
            body = h.mutate_at(body, loc, lambda _old: h.DROP)
        elif op == "replace":
            value = draw(json_values)
            body = h.mutate_at(body, loc, lambda _old, v=value: v)
        elif op == "retype":
            body = h.mutate_at(body, loc, _retype)
        elif op == "hostile":
            value = draw(st.sampled_from(HOSTILE_STRINGS) | st.sampled_from(HOSTILE_NUMBERS))
            body = h.mutate_at(body, loc, lambda _old, v=value: v)
        elif op == "wrap":
            wrapper = draw(st.sampled_from(["list", "dict"]))
            body = h.mutate_at(
                body, loc, lambda old, w=wrapper: [old] if w == "list" else {"x": old}
            )
        else:
            value = json.loads(draw(st.sampled_from(REAL_VALUES)))
            body = h.mutate_at(body, loc, lambda _old, v=value: v)
    return path, encode(body)


def _retype(old: Any) -> Any:
    if isinstance(old, bool):
        return str(old).lower()
    if isinstance(old, int | float):
        return str(old)
    if isinstance(old, str):
        return int(old) if old.isdigit() else [old]
    if isinstance(old, list):
        return {str(i): v for i, v in enumerate(old)}
    if isinstance(old, dict):
        return list(old.values())
    return 0


@fuzz(200)
@given(case=mutated_seed())
def test_mutated_engine_payloads(harness: Harness, case: tuple[str, bytes]) -> None:
    path, raw = case
    verify(path, raw, send(harness, path, raw))


def _seed_bytes() -> list[bytes]:
    return [encode(body) for seeds in h.SEEDS.values() for _, body in seeds]


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    """Not JSON objects at all: truncated, binary, deep, oversized, odd encodings."""
    kind = draw(
        st.sampled_from(
            [
                "binary",
                "truncated",
                "deep-list",
                "deep-dict",
                "deep-inside",
                "oversized",
                "utf16",
                "bom",
                "nan",
                "long-number",
                "duplicate-keys",
                "trailing",
                "text",
            ]
        )
    )
    seed = draw(st.sampled_from(_seed_bytes()))
    if kind == "binary":
        return draw(st.binary(max_size=200))
    if kind == "truncated":
        return seed[: draw(st.integers(0, max(0, len(seed) - 1)))]
    if kind == "deep-list":
        n = draw(st.sampled_from([500, 990, 5000, 30000]))
        return b"[" * n + b"]" * n
    if kind == "deep-dict":
        n = draw(st.sampled_from([500, 990, 5000]))
        return b'{"a":' * n + b"1" + b"}" * n
    if kind == "deep-inside":
        n = draw(st.sampled_from([200, 900, 3000]))
        key = draw(st.sampled_from(["Options", "Interface", "DiscoveryData", "IPv4Data"]))
        inner = b"[" * n + b"]" * n
        return b'{"' + key.encode() + b'": ' + inner + b", " + seed[1:]
    if kind == "oversized":
        pad = draw(st.sampled_from([64 * 1024 - len(seed) - 2, 64 * 1024 + 1, 200_000]))
        return seed[:-1] + b" " * max(0, pad) + b"}"
    if kind == "utf16":
        return seed.decode().encode(draw(st.sampled_from(["utf-16", "utf-32", "utf-16-be"])))
    if kind == "bom":
        return b"\xef\xbb\xbf" + seed
    if kind == "nan":
        return seed[:-1] + b', "X": NaN, "Y": -Infinity}'
    if kind == "long-number":
        digits = draw(st.sampled_from([4300, 4301, 20000]))
        return b'{"DiscoveryType": 1' + b"0" * digits + b', "NetworkID": 1' + b"0" * digits + b"}"
    if kind == "duplicate-keys":
        return seed[:-1] + b", " + seed[1:]
    if kind == "trailing":
        return seed + draw(st.sampled_from([b" garbage", b"{}", b"\x00", b"\n\n"]))
    return draw(st.text(max_size=100)).encode("utf-8", "surrogatepass")


@fuzz(80)
@given(path=st.sampled_from(sorted(CALLS)), raw=raw_bodies())
def test_raw_bodies(harness: Harness, path: str, raw: bytes) -> None:
    exchange = send(harness, path, raw)
    verify(path, raw, exchange)
    status = exchange[0]
    if len(raw) > 64 * 1024:
        assert status == 413, f"{path}: {len(raw)} bytes over max_body answered {status}"
    elif CALLS[path].request is not None and status == 200:
        # Accepted: then it was a JSON object (possibly UTF-16/32, which json.loads detects).
        assert isinstance(json.loads(raw), dict)


@fuzz(25)
@given(method=st.from_regex(r"\A[A-Za-z0-9._-]{0,40}\Z"))
def test_unknown_paths_are_404_and_only_they(harness: Harness, method: str) -> None:
    path = f"/{method}"
    exchange = harness.exchange(path, b"{}")
    verify(path, b"{}", exchange)
    assert (exchange[0] == 404) == (path not in CALLS)


# --- bodies at and over the size limit, and bodies that never finish --------------------------
async def test_body_size_limit_boundary(make_plugin: PluginFactory) -> None:
    limit = 4096
    plugin = await make_plugin(max_body=limit)
    body = encode(h.D["RequestPool"])
    exact = body[:-1] + b" " * (limit - len(body)) + b"}"
    assert len(exact) == limit
    assert (await plugin.call("IpamDriver.RequestPool", raw=exact))["Pool"] == "10.1.0.0/24"
    over = body[:-1] + b" " * (limit + 1 - len(body)) + b"}"
    doc = await plugin.call("IpamDriver.ReleasePool", raw=over, status=413)
    assert "ReleasePool" in doc["Err"]
    # Body-less calls read (and bound) the body too; chunked bodies have no Content-Length.
    await plugin.call("Plugin.Activate", raw=b" " * (limit + 1), status=413)

    async def chunks() -> Any:
        for _ in range(10):
            yield b" " * 1024

    resp = await plugin.client.post("/IpamDriver.RequestPool", data=chunks())
    assert resp.status == 413
    assert (await resp.json())["Err"]
    assert await plugin.call("Plugin.Activate")


async def _raw_http(plugin: Plugin, request: bytes, *, wait: float) -> bytes:
    server = plugin.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request)
        await writer.drain()
        if wait <= 0:
            return b""
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        return head + await asyncio.wait_for(reader.readexactly(length), wait)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_truncated_and_stalled_bodies(make_plugin: PluginFactory) -> None:
    """A client that hangs up mid-body changes nothing; one that stalls gets a 504 at the
    deadline instead of holding a request slot forever."""
    plugin = await make_plugin(request_timeout=0.5)
    await h.baseline(plugin)
    before = h.snapshot(plugin)
    body = encode({**h.D["CreateEndpoint"], "EndpointID": "ab" * 32})
    head = (
        b"POST /NetworkDriver.CreateEndpoint HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    for cut in (0, 1, len(body) // 2, len(body) - 1):
        await _raw_http(plugin, head + body[:cut], wait=0)  # hang up mid-body
    await asyncio.sleep(0.1)
    answer = await _raw_http(plugin, head + body[: len(body) // 2], wait=5)  # stall
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 504 " in status_line, answer[:300]
    doc = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert "did not finish within 0.5s" in doc["Err"]
    await h.settle(plugin)
    assert not h.diff(before, h.snapshot(plugin))
    assert await plugin.call("Plugin.Activate")


# --- memory ---------------------------------------------------------------------------------------
async def test_memory_stays_bounded_over_a_long_hostile_run(make_plugin: PluginFactory) -> None:
    """Rounds of garbage, refused payloads, unknown paths, oversized bodies and one full
    endpoint lifecycle each. What the server keeps must not grow with the number of requests.

    The requests go through a plain ClientSession that releases every response (aiohttp's
    TestClient keeps them all until it closes, which would be the test's memory, not ours).
    """
    plugin = await make_plugin(max_body=16 * 1024)
    await h.baseline(plugin)
    server = plugin.client.server
    bad = [
        ("/NetworkDriver.CreateNetwork", b"{not json"),
        ("/NetworkDriver.CreateNetwork", encode({**h.D["CreateNetwork"], "NetworkID": "../x"})),
        ("/NetworkDriver.Join", encode({**h.D["Join"], "EndpointID": "f" * 64})),
        ("/IpamDriver.RequestAddress", encode({"PoolID": "PouchLocal/9.9.9.0/24"})),
        ("/IpamDriver.RequestPool", encode({**h.D["RequestPool"], "Options": {"x": "1"}})),
        ("/NetworkDriver.Nope", b"{}"),
        ("/NetworkDriver.DeleteEndpoint", b"[" * 900 + b"]" * 900),
        ("/NetworkDriver.CreateEndpoint", b"{" + b" " * 20000 + b"}"),
    ]
    pool_id = "PouchLocal/10.1.0.0/24"

    async with aiohttp.ClientSession(f"http://{server.host}:{server.port}") as session:

        async def call(path: str, body: Any = None, raw: bytes | None = None) -> Any:
            data = raw if raw is not None else encode(body)
            async with session.post(path, data=data) as resp:
                doc = json.loads(await resp.read())
                return resp.status, doc

        async def round_(i: int) -> None:
            for path, raw in bad:
                status, _ = await call(path, raw=raw)
                assert status >= 400
            eid = f"{i:064x}"
            _, got = await call("/IpamDriver.RequestAddress", h.D["RequestAddressEndpoint"])
            addr = got["Address"]
            for path, body in (
                (
                    "CreateEndpoint",
                    {
                        **h.D["CreateEndpoint"],
                        "EndpointID": eid,
                        "Options": {},
                        "Interface": {"Address": addr},
                    },
                ),
                ("Join", {**h.D["Join"], "EndpointID": eid}),
                ("Leave", {**h.D["Leave"], "EndpointID": eid}),
                ("DeleteEndpoint", {**h.D["Leave"], "EndpointID": eid}),
            ):
                status, doc = await call(f"/NetworkDriver.{path}", body)
                assert status == 200, doc
            status, _ = await call(
                "/IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": addr.split("/")[0]}
            )
            assert status == 200

        logging.disable(logging.CRITICAL)  # pytest keeps every log record: not our memory
        try:
            for i in range(20):  # warm-up: caches, lazy imports, the connection pool
                await round_(i)
            await h.settle(plugin)
            gc.collect()
            tracemalloc.start()
            first = tracemalloc.take_snapshot()
            for i in range(20, 120):
                await round_(i)
            await h.settle(plugin)
            gc.collect()
            last = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
            logging.disable(logging.NOTSET)
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "*/kernel/fake.py"),  # the fake records every call
        tracemalloc.Filter(False, "*/blockbuster/*"),
    ]  # the test guard itself
    stats = last.filter_traces(ignore).compare_to(first.filter_traces(ignore), "filename")
    growth = sum(s.size_diff for s in stats)
    top = "\n".join(str(s) for s in stats[:6])
    print(f"\nmemory over 100 rounds (1300 requests): {growth / 1024:+.1f} KiB\n{top}")
    assert growth < 128 * 1024, f"grew {growth} bytes over 1300 requests:\n{top}"
    assert plugin.service.state.endpoints.keys() == {h.EID, h.POUCH_EID}
    assert set(plugin.service.ipam.pools[pool_id].allocated) == {
        int(ipaddress.ip_address(a)) for a in ("10.1.0.1", "10.1.0.2", "10.1.0.254")
    }
