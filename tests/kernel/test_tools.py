"""pouch-driver status/check/gc against a live daemon and offline, on the real kernel."""

from __future__ import annotations

import json
import subprocess
import sys

from ..plugin_process import EngineClient, PluginProcess
from .conftest import Netns
from .test_durability import NID, eid, make_network, start_endpoint


def cli(plugin: PluginProcess, *args: str) -> subprocess.CompletedProcess[str]:
    assert plugin.netns is not None
    return subprocess.run(
        [
            "nsenter",
            f"--net=/run/netns/{plugin.netns}",
            sys.executable,
            "-m",
            "pouch_driver",
            args[0],
            "--socket",
            str(plugin.socket_path),
            "--state-dir",
            str(plugin.state_dir),
            "--prefix",
            plugin.prefix,
            *args[1:],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_status_check_gc_live_and_offline(plugin: PluginProcess, netns: Netns) -> None:
    async with EngineClient(plugin.socket_path) as c:
        await make_network(c)
        addr = await start_endpoint(c, 1)
        await start_endpoint(c, 2)
    out = cli(plugin, "status", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [n["NetworkID"] for n in doc["Networks"]] == [NID]
    assert {e["EndpointID"] for e in doc["Endpoints"]} == {eid(1), eid(2)}
    assert doc["Pools"][0]["Used"] == 3  # gateway + two endpoints
    table = cli(plugin, "status")
    assert NID[:12] in table.stdout and addr in table.stdout

    assert cli(plugin, "check").returncode == 0
    # Drift: a veth vanished (its sandbox died unannounced), an orphan and a lost rule appear.
    netns.sh("ip", "link", "del", "pkh" + eid(1)[:12])
    netns.sh(
        "ip", "link", "add", "pkhfeed00000000", "type", "veth", "peer", "name", "pkcfeed00000000"
    )
    netns.sh("iptables", "-F", "PK-FORWARD")
    check = cli(plugin, "check")
    assert check.returncode == 1
    assert "veth pkh" + eid(1)[:12] + " is gone" in check.stdout
    assert "orphan interface pkhfeed00000000" in check.stdout
    assert "missing rule" in check.stdout
    dry = cli(plugin, "gc", "--dry-run")
    assert dry.returncode == 0 and "repaired:" not in dry.stdout
    assert "pkhfeed00000000" in netns.names()
    gc = cli(plugin, "gc")
    assert gc.returncode == 0, gc.stdout + gc.stderr
    assert "forgot endpoint " + eid(1)[:12] in gc.stdout
    after = cli(plugin, "check")
    assert after.returncode == 0, after.stdout
    assert "pkhfeed00000000" not in netns.names()

    plugin.stop()  # offline: the CLI works on the store and the kernel itself
    netns.sh("ip", "link", "del", "pkb" + NID[:12])
    offline = cli(plugin, "check")
    assert offline.returncode == 1 and "bridge pkb" in offline.stdout
    assert cli(plugin, "gc").returncode == 0
    assert cli(plugin, "check").returncode == 0
    assert netns.link("pkb" + NID[:12]) is not None
    status = json.loads(cli(plugin, "status", "--json").stdout)
    assert {e["EndpointID"] for e in status["Endpoints"]} == {eid(2)}
