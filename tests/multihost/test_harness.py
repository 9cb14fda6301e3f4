"""Self-checks of the multihost harness (no cluster network involved).

If these fail, the multihost results mean nothing: fix the harness first.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.e2e.harness import PLUGIN_DIR

from .conftest import Pair
from .harness import DRIVER, HOST_UPLINK, OVERLAY_MTU, SWITCH_ADDR, df_ping_in


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
        assert h.server_version.startswith(h.kind.name), (h.server_version, h.kind.name)
        names = {lk["ifname"] for lk in h.links()}
        assert {"lo", "docker0", HOST_UPLINK} <= names, names
        # The host's /run/docker/plugins is its own: only its plugin's socket.
        listing = h.in_mount_ns("ls", str(PLUGIN_DIR)).stdout.split()
        assert listing == [f"{DRIVER}.sock"], listing
        assert h.plugin.answers()
    assert len(seen_net) == len(seen_mnt) == len(pair.hosts.hosts)
    if pair.hosts.cluster:
        # a joins by flags over etcd://, b by environment over etcds:// (vary_config).
        a_pid, b_pid = pair.ha.plugin.pid, pair.hb.plugin.pid
        a_argv = Path(f"/proc/{a_pid}/cmdline").read_bytes().split(b"\0")
        b_argv = Path(f"/proc/{b_pid}/cmdline").read_bytes().split(b"\0")
        b_env = Path(f"/proc/{b_pid}/environ").read_bytes().split(b"\0")
        assert b"--cluster" in a_argv and b"--cluster" not in b_argv
        assert any(v.startswith(b"POUCH_DRIVER_CLUSTER=etcds://") for v in b_env), b_env
        assert any(v.startswith(b"POUCH_DRIVER_CLUSTER_CERT=") for v in b_env), b_env
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


def test_oracle_reads_a_hand_made_vxlan_overlay(pair: Pair) -> None:
    """The oracle (``entries_towards``, ``forget_remote``, ``df_ping_in``) on a VXLAN
    overlay built by hand with ``ip``/``bridge``, the way the plugin builds it: a bridge and a
    VXLAN port per host, static forwarding and permanent neighbour entries, no learning.
    The bridges' own addresses play the containers."""
    a, b = pair.ha, pair.hb
    vni = "4242"
    addr = {a.letter: "10.56.0.1", b.letter: "10.56.0.2"}
    names = {h.letter: (f"{h.plugin.prefix}bzz", f"{h.plugin.prefix}xzz") for h in (a, b)}
    try:
        for h in (a, b):
            br, vx = names[h.letter]
            for cmd in (
                ["ip", "link", "add", br, "type", "bridge"],
                ["ip", "link", "add", vx, "mtu", str(OVERLAY_MTU), "type", "vxlan", "id", vni,
                 "local", h.address, "dstport", "4789", "nolearning", "dev", HOST_UPLINK],
                ["ip", "link", "set", vx, "master", br, "up"],
                # As the plugin does: the overlay MTU given explicitly, not left to the
                # bridge's auto-adjustment.
                ["ip", "link", "set", br, "mtu", str(OVERLAY_MTU)],
                ["bridge", "link", "set", "dev", vx, "learning", "off", "neigh_suppress", "on"],
                ["ip", "addr", "add", f"{addr[h.letter]}/24", "dev", br],
                ["ip", "link", "set", br, "up"],
            ):  # fmt: skip
                h.in_engine_ns(*cmd)
        macs = {}
        for h in (a, b):
            link = h.link(names[h.letter][0])
            assert link is not None
            macs[h.letter] = str(link["address"])
        for h, other in ((a, b), (b, a)):
            br, vx = names[h.letter]
            mac = macs[other.letter]
            h.in_engine_ns("bridge", "fdb", "add", mac, "dev", vx, "self", "dst", other.address)
            h.in_engine_ns("bridge", "fdb", "add", mac, "dev", vx, "master", "static")
            h.in_engine_ns(
                "ip", "neigh", "replace", addr[other.letter], "lladdr", mac, "dev", br,
                "nud", "permanent",
            )  # fmt: skip
        assert a.entries_towards(b) == ({macs[b.letter]}, {addr[b.letter]})
        assert b.entries_towards(a) == ({macs[a.letter]}, {addr[a.letter]})
        (device,) = [d for d in a.vxlans() if d["ifname"] == names[a.letter][1]]
        assert (device["vni"], device["local"], device["port"], device["mtu"]) == (
            int(vni),
            a.address,
            4789,
            OVERLAY_MTU,
        ), device
        assert device["master"] == names[a.letter][0]
        enter_a = ["nsenter", f"--net=/run/netns/{a.netns}", "--"]
        assert df_ping_in(enter_a, addr[b.letter], OVERLAY_MTU - 28) == "reply"
        assert df_ping_in(enter_a, addr[b.letter], OVERLAY_MTU - 27) == "error 90"
        a.forget_remote()
        assert a.entries_towards(b) == (set(), set())
        assert not a.remote_fdb() and not a.remote_neighbours()
        assert df_ping_in(enter_a, addr[b.letter], 56) != "reply"
    finally:
        for h in (a, b):
            for name in names[h.letter]:
                h.in_engine_ns("ip", "link", "del", name, check=False)
