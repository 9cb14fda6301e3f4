"""Nothing trusted: IDs, names and option values never reach a kernel name, a file path, a
shell or a firewall rule unchecked (issue 7). Over the fakes, with two extra oracles:

* an audit hook records every file, process and exec event while a request runs: no argument
  may carry the hostile value;
* the real ``IptablesFirewall`` renders the plan the request produced: every line of its
  iptables-restore input must be one of ours (no value can smuggle in a line).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pouch_driver.kernel import rule_changes
from pouch_driver.naming import Names

from . import hostile as h
from .conftest import Plugin, PluginFactory

OPT_BRIDGE = "com.docker.network.bridge.name"

# --- oracles -----------------------------------------------------------------------------------
_AUDITED = ("open", "os.", "shutil.", "subprocess.", "pty.", "ctypes.dlopen", "sqlite3.connect")
_events: list[tuple[str, tuple[Any, ...]]] | None = None


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if _events is not None and event.startswith(_AUDITED):
        _events.append((event, args))


sys.addaudithook(_hook)


@contextmanager
def audited() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Every file/process event of this process while the block runs."""
    global _events  # noqa: PLW0603 - audit hooks cannot be removed; this arms the one hook
    events: list[tuple[str, tuple[Any, ...]]] = []
    _events = events
    try:
        yield events
    finally:
        _events = None


def carrying(events: list[tuple[str, tuple[Any, ...]]], value: str) -> list[Any]:
    if not value:
        return []
    needle = value.encode(errors="surrogatepass")
    hits = []
    for event, args in events:
        for arg in args:
            text = arg if isinstance(arg, str | bytes) else repr(arg)
            raw = text.encode(errors="surrogatepass") if isinstance(text, str) else text
            if needle in raw:
                hits.append((event, args))
    return hits


def firewall_lines(plugin: Plugin) -> list[str]:
    """Lines of the iptables-restore input the plugin's current state renders to."""
    return [
        line
        for v in (4, 6)
        for line in rule_changes.restore_input(
            plugin.firewall.plan, v, Names("pu"), docker_isolation=False, present=None
        ).splitlines()
    ]


def foreign_lines(plugin: Plugin) -> list[str]:
    names = Names("pu")

    def ours(line: str) -> bool:
        """A rule in one of our chains (top-level or per-network)."""
        chain = line.split(" ", 2)[1] if line.startswith("-A ") else ""
        return chain in names.all_chains() or names.is_net_chain(chain)

    return [
        line
        for line in firewall_lines(plugin)
        if not (ours(line) or line.startswith((":PU-", "*")) or line == "COMMIT")
    ]


async def refused(
    plugin: Plugin,
    method: str,
    body: dict[str, Any],
    names: str,
    hostile: str,
    *,
    status: int = 400,
) -> dict[str, Any]:
    """The call is refused with ``status`` naming the field, and nothing happened."""
    before, calls = h.snapshot(plugin), list(plugin.links.calls)
    with audited() as events:
        doc = await plugin.call(method, body, status=status)
    assert names in doc["Err"], doc["Err"]
    assert plugin.links.calls == calls, "a refused request reached the kernel"
    assert not h.diff(before, h.snapshot(plugin))
    assert not carrying(events, hostile), carrying(events, hostile)
    return doc


@pytest.fixture
async def populated(plugin: Plugin) -> Plugin:
    await h.baseline(plugin)
    return plugin


def newline_bug(value: Any) -> Any:
    """A trailing newline, which ``$`` used to let through (fixed with fullmatch)."""
    return pytest.param(value, id=repr(value))


# --- bridge names (com.docker.network.bridge.name) -------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "x;reboot",
        "$(reboot)",
        "`reboot`",
        "a|b",
        "a&b",
        "../../etc",
        "..",
        "a/b",
        "br:0",
        "br 0",
        "br\t0",
        "-br0",
        ".br0",
        "_br0",
        "",
        "a" * 16,
        "é" * 8,
        "bré",
        "br\x00",
        "\u202ebr0",
        "\uff42\uff52\uff10",
        "\nbr0",
        newline_bug("br0\n"),
    ],
)
async def test_hostile_bridge_name_is_refused_before_the_kernel(plugin: Plugin, name: str) -> None:
    body = h.mutate_at(
        h.D["CreateNetwork"],
        ("Options", "com.docker.network.generic"),
        lambda generic: {**generic, OPT_BRIDGE: name},
    )
    await refused(plugin, "NetworkDriver.CreateNetwork", body, OPT_BRIDGE, name)


@pytest.mark.parametrize("name", ["br-pouch_1.x", "a" * 15, "B0"])
async def test_valid_bridge_names_reach_the_kernel_verbatim(plugin: Plugin, name: str) -> None:
    body = h.mutate_at(
        h.D["CreateNetwork"],
        ("Options", "com.docker.network.generic"),
        lambda generic: {**generic, OPT_BRIDGE: name},
    )
    await plugin.call("NetworkDriver.CreateNetwork", body)
    assert plugin.links.calls == [f"ensure_bridge {name}"]
    assert foreign_lines(plugin) == []


# --- IDs ------------------------------------------------------------------------------------
HOSTILE_IDS = [
    "../../../../etc/passwd",
    "a" * 30 + "/" + "b" * 30,
    "..",
    "a" * 12 + "/..",
    "a" * 20 + "\x00" + "b" * 20,
    "A" * 64,
    "a" * 65,
    "a" * 11,
    "a" * 12 + " ",
    " " + "a" * 12,
    "\uff11" * 12,
    "\u0660" * 12,
    "\uff41" * 12,
    "a" * 12 + "\r",
    "$(reboot)" + "a" * 12,
    newline_bug("a" * 12 + "\n"),
    newline_bug("f" * 64 + "\n"),
]


def _with(body: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return h.mutate_at(body, (key,), lambda _old: value)


ID_CALLS = [
    ("NetworkDriver.CreateNetwork", "CreateNetwork", "NetworkID"),
    ("NetworkDriver.DeleteNetwork", "DeleteNetwork", "NetworkID"),
    ("NetworkDriver.CreateEndpoint", "CreateEndpoint", "EndpointID"),
    ("NetworkDriver.CreateEndpoint", "CreateEndpoint", "NetworkID"),
    ("NetworkDriver.Join", "Join", "EndpointID"),
    ("NetworkDriver.DeleteEndpoint", "DeleteEndpoint", "EndpointID"),
    ("NetworkDriver.ProgramExternalConnectivity", "ProgramExternalConnectivity", "NetworkID"),
]


@pytest.mark.parametrize(
    ("method", "seed", "field"), ID_CALLS, ids=[f"{c[0].split('.')[1]}.{c[2]}" for c in ID_CALLS]
)
@pytest.mark.parametrize("value", HOSTILE_IDS)
async def test_hostile_id_is_refused(
    populated: Plugin, method: str, seed: str, field: str, value: str
) -> None:
    body = _with(h.D[seed], field, value)
    if method == "NetworkDriver.CreateEndpoint":
        body = {**body, "Options": {}, "Interface": {"Address": "10.1.0.77/24"}}
    await refused(populated, method, body, field, value)


@pytest.mark.parametrize("value", HOSTILE_IDS)
async def test_hostile_id_in_admin_calls_is_refused(populated: Plugin, value: str) -> None:
    await refused(
        populated,
        "Pouch.Reconcile",
        {"DryRun": False, "ForgetEndpoints": [value]},
        "ForgetEndpoints.0",
        value,
    )


# --- SandboxKey -----------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["", "\x00", "/var/run/docker/netns/\x00x", "x" * 4097])
async def test_impossible_sandbox_keys_are_refused(populated: Plugin, key: str) -> None:
    await refused(
        populated,
        "NetworkDriver.Join",
        {**h.D["Join"], "SandboxKey": key},
        "SandboxKey",
        key or "\x01never",
    )


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/shadow",
        "relative/netns",
        "x;reboot",
        "$(reboot)",
        "/proc/1/ns/net",
        "/var/run/docker/netns/é",
        "\n",
        "\ud800",
        "x" * 4096,
    ],
)
async def test_odd_sandbox_keys_are_only_stored(
    populated: Plugin, key: str, short_tmp: Path
) -> None:
    """The key is the engine's to use: we store it, never open, create or exec with it."""
    calls = list(populated.links.calls)
    with audited() as events:
        joined = await populated.call("NetworkDriver.Join", {**h.D["Join"], "SandboxKey": key})
    assert joined["InterfaceName"]["SrcName"] == "puc" + h.EID[:12]
    assert populated.service.state.endpoints[h.EID].sandbox_key == key
    assert populated.links.calls == calls
    assert not carrying(events, key), carrying(events, key)
    await populated.call("NetworkDriver.Leave", h.D["Leave"])
    assert populated.service.state.endpoints[h.EID].sandbox_key is None


# --- IPv6 scope IDs: a free-form string inside an address -----------------------------------
INJECTION = "lo\n-I POSTROUTING 1 -d ::"  # renders as a second rule line, in a built-in chain


async def test_scope_id_in_a_network_pool_cannot_inject_firewall_rules(plugin: Plugin) -> None:
    body = {
        "NetworkID": "b" * 64,
        "Options": {"com.docker.network.enable_ipv6": True},
        "IPv4Data": [{"Pool": "10.7.0.0/24", "Gateway": "10.7.0.1/24"}],
        "IPv6Data": [{"Pool": f"fd00::%{INJECTION}/64"}],
    }
    before = h.snapshot(plugin)
    status = (await plugin.client.post("/NetworkDriver.CreateNetwork", json=body)).status
    assert foreign_lines(plugin) == [], "a request value became its own iptables line"
    assert status == 400
    assert not h.diff(before, h.snapshot(plugin))


@pytest.mark.parametrize(
    ("method", "body", "names"),
    [
        (
            "IpamDriver.RequestPool",
            {"AddressSpace": "PouchLocal", "Pool": "fd00::%x y/64", "V6": True},
            "Pool",
        ),
        (
            "NetworkDriver.CreateNetwork",
            {
                "NetworkID": "c" * 64,
                "IPv6Data": [{"Pool": "fd00::/64", "Gateway": "fd00::1%eth0/64"}],
                "Options": {"com.docker.network.enable_ipv6": True},
            },
            "Gateway",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            {
                "NetworkID": h.D["CreateNetworkInternalDualStack"]["NetworkID"],
                "EndpointID": "e" * 64,
                "Interface": {"AddressIPv6": "fd70:6f75:6368:3::9%evil/64"},
            },
            "Interface.AddressIPv6",
        ),
    ],
    ids=["RequestPool", "CreateNetwork-Gateway", "CreateEndpoint"],
)
async def test_scope_ids_are_refused(
    plugin: Plugin, method: str, body: dict[str, Any], names: str
) -> None:
    await plugin.call("NetworkDriver.CreateNetwork", h.D["CreateNetworkInternalDualStack"])
    await refused(plugin, method, body, names, "%")


async def test_one_unstorable_request_does_not_fail_its_group_commit(plugin: Plugin) -> None:
    await plugin.call("IpamDriver.RequestPool", h.D["RequestPool"])

    async def innocent() -> int:
        resp = await plugin.client.post(
            "/IpamDriver.RequestAddress", json=h.D["RequestAddressEndpoint"]
        )
        return resp.status

    evil = plugin.client.post(
        "/IpamDriver.RequestPool",
        data=json.dumps({"AddressSpace": "PouchLocal", "Pool": "fd00::%\ud800/64", "V6": True}),
    )
    results = await asyncio.gather(
        *[innocent() for _ in range(10)], evil, *[innocent() for _ in range(10)]
    )
    statuses = [r if isinstance(r, int) else r.status for r in results]
    innocents = statuses[:10] + statuses[11:]
    assert innocents == [200] * 20, f"innocent requests failed with the hostile one: {statuses}"


# --- published ports on host addresses the kernel cannot bind -----------------------------
@pytest.mark.parametrize("host_ip", ["fe80::1", "ff02::1", "::1%lo", "::1%nosuchif"])
async def test_unbindable_host_ip_is_a_clear_400(populated: Plugin, host_ip: str) -> None:
    body = h.mutate_at(
        h.D["ProgramExternalConnectivity"],
        ("Options", "com.docker.network.portmap", 0, "HostIP"),
        lambda _old: host_ip,
    )
    body = h.mutate_at(
        body, ("Options", "com.docker.network.portmap", 0, "HostPort"), lambda _old: 0
    )
    doc = await refused(
        populated, "NetworkDriver.ProgramExternalConnectivity", body, "", "\x01never"
    )
    assert "HostIP" in doc["Err"] or host_ip in doc["Err"], doc["Err"]


# --- IDs used as lock keys ------------------------------------------------------------------
async def test_endpoint_id_equal_to_network_id_does_not_deadlock(
    make_plugin: PluginFactory,
) -> None:
    plugin = await make_plugin(request_timeout=2)
    await h.baseline(plugin)

    async def timed(method: str, body: dict[str, Any]) -> tuple[int, float]:
        t0 = time.perf_counter()
        resp = await plugin.client.post(f"/{method}", json=body)
        await resp.read()
        return resp.status, time.perf_counter() - t0

    hostile, innocent = await asyncio.gather(
        timed("NetworkDriver.CreateEndpoint", {"NetworkID": h.NID, "EndpointID": h.NID}),
        timed("NetworkDriver.Join", {**h.D["Join"], "SandboxKey": "/var/run/docker/netns/y"}),
    )
    assert innocent[0] == 200 and innocent[1] < 0.5, f"innocent Join on the network: {innocent}"
    # Odd but harmless (the names derived from it differ): answered, never a self-deadlock.
    assert hostile[0] in (200, 400, 409) and hostile[1] < 0.5, f"hostile call: {hostile}"
