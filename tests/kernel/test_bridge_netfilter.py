"""The daemon turns on bridge netfilter at start (dockerd 27.4+ may never do it for us), in
the namespace it serves; checked with sysctl(8) there, not with our code."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pouch_driver.config import Settings
from pouch_driver.daemon import build_driver
from pouch_driver.service.reconcile import start_up

from .conftest import Netns

KEYS = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")


def values(netns: Netns) -> list[str]:
    return [netns.sh("sysctl", "-n", key).stdout.strip() for key in KEYS]


async def test_start_up_lets_bridged_traffic_pass_iptables(netns: Netns, short_tmp: Path) -> None:
    """The switches are per namespace (Linux 5.3+): only the test's own one is changed."""
    for key in KEYS:
        netns.sh("sysctl", "-qw", f"{key}=0")
    assert values(netns) == ["0", "0"]
    settings = Settings(
        socket=short_tmp / "p.sock", state_dir=short_tmp / "state", prefix="pk", gc_interval=0
    )
    # Built off the loop, as the daemon does before serving (it looks up ip6tables on PATH).
    driver = await asyncio.to_thread(build_driver, settings, netns=netns.name)
    try:
        await start_up(driver)
    finally:
        await driver.stop()
    assert values(netns) == ["1", "1"]
