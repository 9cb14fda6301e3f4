"""The real kernel in a throwaway network namespace, checked with ``ip -json`` (not our code)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pouch_driver.kernel.iptables import IptablesFirewall
from pouch_driver.kernel.links import NetlinkLinks
from pouch_driver.naming import Names

from ..conftest import is_root
from ..plugin_process import PluginProcess

NETNS_PREFIX = "pdk-"
# Namespaces carry the creating process's pid, so a concurrent test session's are left alone.
SESSION = f"{NETNS_PREFIX}{os.getpid():x}-"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def _remove_stale_namespaces() -> None:
    """Tolerate leftovers of an interrupted run: our namespaces whose creator is gone."""
    for line in _run("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(NETNS_PREFIX):
            continue
        owner = name[len(NETNS_PREFIX) :].split("-")[0]
        try:
            alive = Path(f"/proc/{int(owner, 16)}").exists()
        except ValueError:
            alive = False
        if not alive:
            _run("ip", "netns", "del", name, check=False)


@dataclass
class Netns:
    name: str

    def ip_json(self, *args: str) -> Any:
        return json.loads(_run("ip", "-n", self.name, "-json", *args).stdout or "[]")

    def link(self, ifname: str) -> dict[str, Any] | None:
        out = _run(
            "ip", "-n", self.name, "-json", "-details", "link", "show", "dev", ifname, check=False
        )
        if out.returncode != 0:
            return None
        (link,) = json.loads(out.stdout)
        return link  # type: ignore[no-any-return]

    def addresses(self, ifname: str) -> set[str]:
        (entry,) = self.ip_json("addr", "show", "dev", ifname)
        return {
            f"{a['local']}/{a['prefixlen']}"
            for a in entry.get("addr_info", [])
            if a.get("scope") != "link"
        }

    def names(self) -> set[str]:
        return {link["ifname"] for link in self.ip_json("link", "show")}

    def sh(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("nsenter", f"--net=/run/netns/{self.name}", *argv, check=check)

    def iptables_save(self, v6: bool = False) -> str:
        return self.sh("ip6tables-save" if v6 else "iptables-save").stdout


@pytest.fixture(scope="session", autouse=True)
def _need_root() -> None:
    if not is_root():
        pytest.skip("kernel tests need root (run scripts/test as root)")
    _remove_stale_namespaces()


@contextmanager
def new_netns() -> Iterator[Netns]:
    name = SESSION + secrets.token_hex(3)
    _run("ip", "netns", "add", name)
    _run("ip", "-n", name, "link", "set", "lo", "up")
    try:
        yield Netns(name)
    finally:
        _run("ip", "netns", "del", name, check=False)


@pytest.fixture
def netns() -> Iterator[Netns]:
    with new_netns() as ns:
        yield ns


@pytest.fixture
async def links(netns: Netns) -> AsyncIterator[NetlinkLinks]:
    nl = NetlinkLinks(workers=2, netns=netns.name)
    yield nl
    await nl.close()


@pytest.fixture
def names() -> Names:
    return Names("pk")


@pytest.fixture
async def firewall(netns: Netns, names: Names) -> AsyncIterator[IptablesFirewall]:
    fw = IptablesFirewall(names, netns=netns.name)
    yield fw
    await fw.close()


@pytest.fixture
def plugin(netns: Netns, short_tmp: Path) -> Iterator[PluginProcess]:
    """The real daemon as its own process in the test's namespace, prefix ``pk``."""
    p = PluginProcess(
        socket_path=short_tmp / "pd.sock",
        state_dir=short_tmp / "state",
        netns=netns.name,
        prefix="pk",
    )
    p.start()
    yield p
    p.stop()
