"""Self-checks of the multihost harness (no cluster network involved).

If these fail, the multihost results mean nothing: fix the harness first.
"""

from __future__ import annotations

import os

from tests.e2e.harness import PLUGIN_DIR

from .conftest import Pair
from .harness import DRIVER, HOST_UPLINK, SWITCH_ADDR


def test_each_host_has_its_own_netns_mount_ns_dockerd_and_plugin(pair: Pair) -> None:
    """Each dockerd and plugin runs in its host's netns and mount namespace, not the
    machine's; the hosts look like Docker hosts; each /run/docker/plugins holds one socket."""
    seen_net, seen_mnt = set(), set()
    for h in pair.hosts.hosts:
        assert h.proc is not None and h.plugin.pid is not None
        net = os.stat(f"/run/netns/{h.netns}").st_ino
        mnt = os.stat(h.mount_ns).st_ino
        for pid in (h.proc.pid, h.plugin.pid):
            # nsenter execs the daemon: the pid is the daemon's own.
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == net
            assert os.stat(f"/proc/{pid}/ns/mnt").st_ino == mnt
        seen_net.add(net)
        seen_mnt.add(mnt)
        assert h.forward_policy() == "DROP"
        assert h.sysctl("net/ipv4/ip_forward") == "1"
        assert h.server_version.startswith("20.10"), h.server_version
        names = {lk["ifname"] for lk in h.links()}
        assert {"lo", "docker0", HOST_UPLINK} <= names, names
        # The host's /run/docker/plugins is its own: only its plugin's socket.
        listing = h.in_mount_ns("ls", str(PLUGIN_DIR)).stdout.split()
        assert listing == [f"{DRIVER}.sock"], listing
        assert h.plugin.answers()
    assert len(seen_net) == len(seen_mnt) == len(pair.hosts.hosts)
    assert os.stat("/proc/self/ns/mnt").st_ino not in seen_mnt
    assert not (PLUGIN_DIR / f"{DRIVER}.sock").exists()


def test_underlay_joins_the_hosts_and_reaches_etcd(pair: Pair) -> None:
    a, b = pair.ha, pair.hb
    r = a.in_engine_ns("busybox", "ping", "-c", "1", "-W", "2", b.address, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    r = b.in_engine_ns("busybox", "ping", "-c", "1", "-W", "2", a.address, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    for h in pair.hosts.hosts:
        for m in pair.hosts.etcd.members:
            url = f"{m.client_url}/health"
            out = h.in_engine_ns("busybox", "wget", "-O-", url, check=False)
            assert '"health":"true"' in out.stdout.replace(" ", ""), (url, out.stdout, out.stderr)
    assert sorted(pair.hosts.etcd.healthy()) == [0, 1, 2]
    assert SWITCH_ADDR not in {a.address, b.address}


def test_a_local_network_works_on_each_host(pair: Pair) -> None:
    """The plugin answers each dockerd: a local pouch network, two containers that talk."""
    for i, s in enumerate(pair.scopes):
        net = s.create_network("loc", subnet=f"10.58.{i}.0/24")
        c1 = s.run_container(net, "c1")
        c2 = s.run_container(net, "c2")
        s.assert_ping(c1, s.container_ip(c2, net))
