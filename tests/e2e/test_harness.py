"""Self-checks of the e2e harness itself (no plugin network involved).

If these fail, the e2e results of the plugin mean nothing: fix the harness first.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from .harness import ENGINE_ADDR, ENGINE_UPLINK, REMOTE_ADDR, Engine, Scope

pytestmark = pytest.mark.docker


def test_engine_is_isolated_in_its_own_netns(e2e: Scope) -> None:
    eng = e2e.engine
    names = {lk["ifname"] for lk in eng.links()}
    # dockerd made docker0 in the engine netns, next to the uplink to the remote host.
    assert {"lo", "docker0", ENGINE_UPLINK} <= names, names
    # dockerd and the plugin run in the engine netns, which is not the host's.
    engine_ns = os.stat(f"/run/netns/{eng.netns}").st_ino
    assert eng.proc is not None
    assert eng.plugin.pid is not None
    assert os.stat(f"/proc/{eng.proc.pid}/ns/net").st_ino == engine_ns
    assert os.stat(f"/proc/{eng.plugin.pid}/ns/net").st_ino == engine_ns
    assert os.stat("/proc/self/ns/net").st_ino != engine_ns
    # It looks like a Docker host: forwarding on, FORWARD policy DROP, br_netfilter on.
    assert eng.forward_policy() == "DROP"
    assert eng.sysctl("net/ipv4/ip_forward") == "1"
    assert eng.sysctl("net/bridge/bridge-nf-call-iptables") == "1"
    # The engine is the one this run of the suite is for.
    assert eng.server_version.startswith(eng.kind.name), eng.server_version
    # The driver socket answers, and dockerd knows the image.
    assert eng.plugin.accepts()
    assert eng.docker("image", "inspect", eng.image).returncode == 0


def test_remote_host_sees_engine_address(e2e: Scope) -> None:
    eng = e2e.engine
    with eng.remote_http_server(8000) as url:
        out = eng.in_engine_ns("timeout", "5", "busybox", "wget", "-O-", f"{url}/cgi-bin/ip")
        assert out.stdout.strip() == ENGINE_ADDR
    eng.in_remote("busybox", "ping", "-c", "1", "-W", "2", ENGINE_ADDR)
    eng.in_engine_ns("busybox", "ping", "-c", "1", "-W", "2", REMOTE_ADDR)


def test_default_container_stops_fast(e2e: Scope) -> None:
    a = e2e.run_container("none", "a")
    t0 = time.monotonic()
    e2e.docker("stop", a)
    assert time.monotonic() - t0 < 5


def test_a_fresh_engine_is_a_docker_host_where_forwarding_is_already_on(e2e: Scope) -> None:
    """Every Docker host forwards, and a new namespace copies the host's IPv4 forwarding: the
    harness must still give dockerd a namespace with forwarding off, or dockerd leaves the
    FORWARD policy at ACCEPT and the engine is no Docker host (check_docker_host refuses)."""
    host_forwarding = Path("/proc/sys/net/ipv4/ip_forward")
    before = host_forwarding.read_text().strip()
    other = Engine(kind=e2e.engine.kind)
    try:
        host_forwarding.write_text("1\n")
        other.start()  # runs check_docker_host: forwarding 1, FORWARD policy DROP
        assert other.forward_policy() == "DROP"
    finally:
        host_forwarding.write_text(before + "\n")
        other.close()
    assert host_forwarding.read_text().strip() == before
