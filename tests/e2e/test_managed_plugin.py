"""The managed (v2) plugin, built and run the way a user would, against the test engine.

``scripts/build-base`` makes a Debian base image without a registry (debootstrap, cached in
/var/cache/pouch-driver), ``scripts/build-plugin`` turns it plus this checkout into a plugin
named ``pouchtest`` in the engine (DOCKER_HOST), and the tests then enable it, build networks
with it, and disable and remove it. The plugin runs under containerd with network ``host``,
which here is the engine's netns; it names its interfaces ``pm*`` so they are told apart from
the session plugin's (``pt*``).

Slow the first time on a machine (debootstrap: about a minute, more on a slow mirror; the
image build: about a minute on the vfs storage driver), hence the generous timeout.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import PLUGIN_DIR, Engine, Scope, addresses, link_kind, run, tail, wait_until

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "pouchtest"
DRIVER = f"{PLUGIN}:latest"  # managed plugin drivers need the tag (PROTOCOL §6.2)
PREFIX = "pm"
BASE_IMAGE = "pouch-base:bookworm"
#: Per script (build-base, build-plugin); cold, each takes about a minute here.
BUILD_TIMEOUT = 600.0
#: Capability bits (linux/capability.h).
CAP_NET_ADMIN, CAP_SYS_MODULE, CAP_SYS_ADMIN = 12, 16, 21

# Whichever test runs first builds the plugin (module fixture) within its own time limit.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(BUILD_TIMEOUT * 2 + 300)]


@dataclass
class Managed:
    engine: Engine
    id: str
    state_dir: Path

    def pid(self) -> int | None:
        """The plugin's process: ``pouch-driver serve`` in the engine netns, found by its
        command line (containerd runs it, not us)."""
        want = "/usr/local/bin/pouch-driver\0serve\0--socket\0/run/docker/plugins/pouch.sock"
        for pid in self.engine.pids_in_netns():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_text()
            except OSError:
                continue
            if want in cmdline:
                return pid
        return None


def _docker_tools_needed() -> None:
    missing = [t for t in ("debootstrap", "tar", "flock") if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"the managed-plugin test needs {', '.join(missing)} "
            "(scripts/setup --test installs them)"
        )


@pytest.fixture(scope="module")
def managed(engine: Engine) -> Iterator[Managed]:
    """``pouchtest`` built from this checkout, created and enabled in the engine."""
    _docker_tools_needed()
    env = dict(engine.env, PYTHON=sys.executable)
    t0 = time.monotonic()
    run([str(REPO / "scripts" / "build-base"), "--tag", BASE_IMAGE], env=env, timeout=BUILD_TIMEOUT)
    engine.timings["build-base"] = time.monotonic() - t0  # shown in the session summary
    t0 = time.monotonic()
    run(
        [
            str(REPO / "scripts" / "build-plugin"),
            "--name",
            PLUGIN,
            "--base",
            BASE_IMAGE,
            "--workdir",
            str(engine.base / "plugin-build"),
            "--replace",
        ],
        env=env,
        timeout=BUILD_TIMEOUT,
    )
    engine.timings["build-plugin"] = time.monotonic() - t0
    shutil.rmtree(engine.base / "plugin-build", ignore_errors=True)
    plugin_id = engine.docker("plugin", "inspect", "--format", "{{.Id}}", PLUGIN).stdout.strip()
    engine.note_managed_plugin(plugin_id)
    state = engine.base / "managed-state"
    state.mkdir()  # a bind mount's source must exist
    engine.docker(
        "plugin",
        "set",
        PLUGIN,
        f"state.source={state}",
        f"POUCH_DRIVER_PREFIX={PREFIX}",
        "POUCH_DRIVER_LOG_LEVEL=debug",
    )
    engine.docker("plugin", "enable", PLUGIN, timeout=60)
    try:
        yield Managed(engine, plugin_id, state)
    finally:
        engine.docker("plugin", "disable", "--force", PLUGIN, check=False, timeout=60)
        engine.docker("plugin", "rm", "--force", PLUGIN, check=False, timeout=60)


def _caps(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no CapEff in /proc/{pid}/status")


def test_managed_plugin_networks_and_containers(managed: Managed, e2e: Scope) -> None:
    eng = e2e.engine
    info = eng.docker_json("plugin", "inspect", PLUGIN)[0]
    assert info["Name"] == DRIVER
    assert info["Enabled"] is True
    assert sorted(info["Config"]["Interface"]["Types"]) == [
        "docker.ipamdriver/1.0",
        "docker.networkdriver/1.0",
    ]
    assert f"POUCH_DRIVER_PREFIX={PREFIX}" in info["Settings"]["Env"]

    # What the engine made of config.json: the socket in the plugin's own dir, a process in
    # the engine's netns (network "host" = dockerd's), CAP_NET_ADMIN and nothing broader.
    assert (PLUGIN_DIR / managed.id / "pouch.sock").is_socket()
    pid = managed.pid()
    assert pid is not None, "no pouch-driver process of the managed plugin in the engine netns"
    engine_ns = os.stat(f"/run/netns/{eng.netns}").st_ino
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == engine_ns
    caps = _caps(pid)
    assert caps & (1 << CAP_NET_ADMIN)
    assert not caps & (1 << CAP_SYS_ADMIN)
    assert not caps & (1 << CAP_SYS_MODULE)

    net = e2e.create_network("mnet", subnet="10.35.0.0/24", driver=DRIVER)
    net_info = e2e.network_inspect(net)
    assert net_info["Driver"] == DRIVER
    assert net_info["IPAM"]["Driver"] == DRIVER
    bridge = eng.bridge_name(net_info["Id"], PREFIX)
    link = eng.link(bridge)
    assert link is not None, f"no bridge {bridge}: {eng.prefixed_links(PREFIX)}"
    assert link_kind(link) == "bridge"
    assert addresses(link) == ["10.35.0.1/24"]

    a = e2e.run_container(net, "a")
    b = e2e.run_container(net, "b")
    ip_a, ip_b = e2e.container_ip(a, net), e2e.container_ip(b, net)
    assert e2e.container_addrs(a).get("eth0") == [f"{ip_a}/24"]
    e2e.assert_ping(a, ip_b)
    e2e.assert_ping(b, ip_a)
    e2e.assert_ping(a, "10.35.0.1")
    assert f"-j {PREFIX.upper()}-FORWARD" in eng.iptables_save("filter")
    # The image carries ipset: traffic inside the bridge is one set lookup, not a rule per
    # network (kernel/iptables.py falls back to rules without it).
    icc = eng.in_engine_ns("ipset", "list", f"{PREFIX.upper()}-ICC4", check=False)
    assert icc.returncode == 0 and bridge in icc.stdout, icc.stdout + icc.stderr
    e2e.exec(b, "httpd", "-p", "80", "-h", "/www")
    assert "pouch-e2e-ok" in e2e.http_get(a, f"http://{ip_b}/").stdout
    # The store lives in the host directory mounted from config.json's "state" mount.
    assert (managed.state_dir / "state.db").is_file()

    e2e.remove_container(a)
    e2e.remove_container(b)
    e2e.remove_network(net)
    assert eng.prefixed_links(PREFIX) == []
    # Its last network gone, the plugin leaves no chain or jump (so `plugin rm` leaves none).
    for cmd in ("iptables-save", "ip6tables-save"):
        save = eng.in_engine_ns(cmd).stdout
        assert f"{PREFIX.upper()}-" not in save and f"{PREFIX}-driver" not in save, save


def test_managed_plugin_sets_net_sysctls(managed: Managed, e2e: Scope) -> None:
    """An IPv6 network needs net.ipv6.conf.all.forwarding=1, which dockerd does not set
    (ip_forward it does): the plugin must be able to write it from inside its container."""
    eng = e2e.engine
    key = "net/ipv6/conf/all/forwarding"
    before = eng.sysctl(key)
    eng.in_engine_ns("sh", "-c", f"echo 0 > /proc/sys/{key}")
    try:
        net = e2e.create_network(
            "mnet6",
            subnet="10.36.0.0/24",
            driver=DRIVER,
            check=False,
            extra=["--ipv6", "--subnet", "fd71:6d::/64"],
        )
        created = eng.docker("network", "inspect", net, check=False).returncode == 0
        assert created, f"IPv6 network on the managed plugin failed:\n{tail(eng.log_path, 15)}"
        assert eng.sysctl(key) == "1"
        a = e2e.run_container(net, "a6")
        b = e2e.run_container(net, "b6")
        ip6_b = e2e.container_inspect(b)["NetworkSettings"]["Networks"][net]["GlobalIPv6Address"]
        assert ip6_b, "b6 has no IPv6 address"
        e2e.assert_ping(a, ip6_b)
    finally:
        eng.in_engine_ns("sh", "-c", f"echo {before} > /proc/sys/{key}")


def test_managed_plugin_disable_and_remove(managed: Managed, e2e: Scope) -> None:
    eng = e2e.engine
    assert managed.pid() is not None
    eng.docker("plugin", "disable", PLUGIN, timeout=60)
    assert eng.docker_json("plugin", "inspect", PLUGIN)[0]["Enabled"] is False
    wait_until(lambda: managed.pid() is None, timeout=15, message="the plugin process to exit")
    eng.docker("plugin", "rm", PLUGIN, timeout=60)
    assert DRIVER not in eng.docker("plugin", "ls", "--format", "{{.Name}}").stdout.split()
    assert not (PLUGIN_DIR / managed.id).exists()
