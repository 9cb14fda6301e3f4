"""Hostile values against the real kernel and iptables, in a throwaway namespace (issue 7).

tests/http/test_hostile.py shows over the fakes which values get through validation; here is
what they do to a real kernel and a real firewall. The oracles are ``ip -json`` and
``ip6tables-save`` of the namespace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ..plugin_process import CallError, EngineClient
from .conftest import Netns
from .inproc import run_in_netns, serve_in_netns

OPT_BRIDGE = "com.docker.network.bridge.name"
# A scope ID is anything but '%' and '/': "fd00::%1" is valid to ip6tables, the newline ends
# our rule, and the lines after it are the caller's, up to "-d ::" which our "/64 ! -o <bridge>
# -j MASQUERADE" completes.
INJECTED = (
    "1\nCOMMIT\n*filter\n-I INPUT 1 -j ACCEPT\n-I FORWARD 1 -j ACCEPT\nCOMMIT\n*nat\n"
    "-A PK-POSTROUTING -d ::"
)


async def _create(socket: Path, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with EngineClient(socket) as c:
        try:
            return 200, await c.call("NetworkDriver.CreateNetwork", body)
        except CallError as exc:
            return exc.status, exc.body


def create_network(netns: Netns, root: Path, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async def main() -> tuple[int, dict[str, Any]]:
        async with serve_in_netns(netns.name, root) as p:
            return await _create(p.settings.socket, body)

    return run_in_netns(netns.name, main)


def foreign_builtin_rules(netns: Netns) -> list[str]:
    """Rules in built-in chains that are not our marked jumps."""
    return [
        line
        for v6 in (False, True)
        for line in netns.iptables_save(v6).splitlines()
        if line.startswith(
            ("-A INPUT", "-A FORWARD", "-A OUTPUT", "-A PREROUTING", "-A POSTROUTING")
        )
        and "pk-driver" not in line
    ]


def test_ipv6_scope_id_cannot_inject_ip6tables_rules(netns: Netns, short_tmp: Path) -> None:
    status, doc = create_network(
        netns,
        short_tmp,
        {
            "NetworkID": "b" * 64,
            "Options": {"com.docker.network.enable_ipv6": True},
            "IPv4Data": [{"Pool": "10.7.0.0/24", "Gateway": "10.7.0.1/24"}],
            "IPv6Data": [{"Pool": f"fd00::%{INJECTED}/64"}],
        },
    )
    assert foreign_builtin_rules(netns) == [], f"answered {status} {doc} and injected rules"
    assert status == 400, doc


@pytest.mark.parametrize(
    "name", ["x;reboot", "$(reboot)", "../../etc", "a" * 16, "é" * 8, "br:0", "br 0"]
)
def test_hostile_bridge_name_creates_nothing(netns: Netns, short_tmp: Path, name: str) -> None:
    before = netns.names()
    status, doc = create_network(
        netns,
        short_tmp,
        {
            "NetworkID": "c" * 64,
            "Options": {"com.docker.network.generic": {OPT_BRIDGE: name}},
            "IPv4Data": [{"Pool": "10.8.0.0/24", "Gateway": "10.8.0.1/24"}],
        },
    )
    assert (status, OPT_BRIDGE in doc["Err"]) == (400, True), doc
    assert netns.names() == before
    assert foreign_builtin_rules(netns) == []


def test_bridge_name_with_trailing_newline_is_refused_before_netlink(
    netns: Netns, short_tmp: Path
) -> None:
    status, doc = create_network(
        netns,
        short_tmp,
        {
            "NetworkID": "c" * 64,
            "Options": {"com.docker.network.generic": {OPT_BRIDGE: "br0\n"}},
            "IPv4Data": [{"Pool": "10.8.0.0/24", "Gateway": "10.8.0.1/24"}],
        },
    )
    assert status == 400 and OPT_BRIDGE in doc["Err"], (status, doc)
