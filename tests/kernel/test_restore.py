"""The long-lived iptables-restore (kernel/restore.py) against the real iptables, in a namespace.

What matters: a change is in the kernel when ``run`` returns (never a moment later), one process
serves many changes, a failing line is an error naming iptables' reason and the next change
still works, and a host where the process cannot be watched gets a process per change.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time

import pytest

from pouch_driver.errors import KernelError
from pouch_driver.kernel import process, restore
from pouch_driver.kernel.restore import RestoreSession

from .conftest import Netns


def _session(netns: Netns) -> RestoreSession:
    argv = process.in_netns(netns.name, ["iptables-restore", "--noflush"])
    return RestoreSession(argv, "iptables-restore")


def _rules(netns: Netns, chain: str) -> list[str]:
    out = netns.sh("iptables", "-S", chain).stdout
    return [line for line in out.splitlines() if line.startswith("-A ")]


async def test_each_change_is_in_the_kernel_when_run_returns(netns: Netns) -> None:
    s = _session(netns)
    try:
        await s.run("*filter\n:PKT - [0:0]\nCOMMIT\n*nat\n:PKN - [0:0]\nCOMMIT\n")
        pid = s._proc.pid if s._proc else None
        assert s.persistent and pid is not None
        for i in range(30):
            # Deletions are what a process of its own paid for at exit (bench/README.md).
            await s.run(
                f"*filter\n-A PKT -d 10.9.0.{i}/32 -j ACCEPT\nCOMMIT\n"
                f"*nat\n-A PKN -d 10.9.0.{i}/32 -j RETURN\nCOMMIT\n"
            )
            assert _rules(netns, "PKT") == [f"-A PKT -d 10.9.0.{i}/32 -j ACCEPT"]
            await s.run("*filter\n-D PKT 1\nCOMMIT\n*nat\n-D PKN 1\nCOMMIT\n")
            assert _rules(netns, "PKT") == []
            assert "-A PKN" not in netns.sh("iptables", "-t", "nat", "-S", "PKN").stdout
        assert s._proc is not None and s._proc.pid == pid, "one process for every change"
    finally:
        await s.close()
    assert s._proc is None


async def test_a_failing_line_is_an_error_and_the_next_change_works(netns: Netns) -> None:
    s = _session(netns)
    try:
        await s.run("*filter\n:PKT - [0:0]\n-A PKT -j ACCEPT\nCOMMIT\n")
        with pytest.raises(KernelError, match=r"iptables-restore failed: .*[Ii]ndex of deletion"):
            await s.run("*filter\n-D PKT 5\nCOMMIT\n")
        with pytest.raises(KernelError, match="iptables-restore failed"):
            await s.run("*filter\n-A PKT -j NO-SUCH-CHAIN\nCOMMIT\n")
        await s.run("*filter\n-A PKT -j RETURN\nCOMMIT\n")
        assert _rules(netns, "PKT") == ["-A PKT -j ACCEPT", "-A PKT -j RETURN"]
    finally:
        await s.close()


async def test_a_process_that_died_between_changes_is_replaced(netns: Netns) -> None:
    s = _session(netns)
    try:
        await s.run("*filter\n:PKT - [0:0]\nCOMMIT\n")
        assert s._proc is not None
        s._proc.kill()
        await asyncio.to_thread(s._proc.wait)
        await s.run("*filter\n-A PKT -j ACCEPT\nCOMMIT\n")
        assert _rules(netns, "PKT") == ["-A PKT -j ACCEPT"]
    finally:
        await s.close()


async def test_the_ruleset_changed_by_others_is_seen(netns: Netns) -> None:
    """Docker changes the tables between our changes: positions are those of the kernel's
    rules now, as for a process started now."""
    s = _session(netns)
    try:
        await s.run("*filter\n:PKT - [0:0]\n-A PKT -j ACCEPT\nCOMMIT\n")
        netns.sh("iptables", "-I", "PKT", "1", "-j", "DROP")
        await s.run("*filter\n-D PKT 1\nCOMMIT\n")
        assert _rules(netns, "PKT") == ["-A PKT -j ACCEPT"]
    finally:
        await s.close()


async def test_where_it_cannot_be_watched_each_change_is_a_process(
    netns: Netns, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(restore, "_READ", None)
    s = _session(netns)
    assert not s.persistent
    await s.run("*filter\n:PKT - [0:0]\n-A PKT -j ACCEPT\nCOMMIT\n")
    assert s._proc is None and _rules(netns, "PKT") == ["-A PKT -j ACCEPT"]
    with pytest.raises(KernelError, match="iptables-restore failed"):
        await s.run("*filter\n-D PKT 5\nCOMMIT\n")


async def test_a_forgotten_session_ends_its_process(netns: Netns) -> None:
    s = _session(netns)
    await s.run("*filter\n:PKT - [0:0]\nCOMMIT\n")
    assert s._proc is not None
    pid = s._proc.pid
    del s
    gc.collect()
    deadline = time.monotonic() + 10
    while await asyncio.to_thread(os.path.exists, f"/proc/{pid}"):
        assert time.monotonic() < deadline, "the process outlived its session"
        await asyncio.sleep(0.05)
