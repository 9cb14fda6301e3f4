"""Multi-host harness: several Docker hosts on one machine, an underlay, a three-member etcd.

Layout of one session (``tag`` is 6 random characters)::

    /tmp/pdmh-<tag>/                  base dir
        ns/                           a private bind mount holding the hosts' mount namespaces
            a.mnt b.mnt ...           (files bound to /proc/<pid>/ns/mnt, like ip netns does)
        etcd/m0 m1 m2  m0.log ...     the members' data dirs and logs
        a/ b/ ...                     one e2e-style engine dir per host: data/ exec/ docker.sock
            run-docker/plugins/       bound over /run/docker in the host's mount namespace
            run-containerd/           bound over /run/containerd (the shims' sockets)
    netns pdmh-<tag>-u                the underlay "switch": bridge br0 198.51.100.1/24 and the
                                      etcd members (clients :23810-23812, peers :23820-23822)
    netns pdmh-<tag>-a, -b, ...       the hosts: eth0 198.51.100.11, .12, ... (a veth into br0)
    cgroup /pdmh-<tag>-a, ...         --cgroup-parent of each host's containers

Each host runs its own dockerd (20.10 or 28.5.2, via :class:`tests.e2e.harness.Engine`) and its
own plugin, both entered into the host's netns **and** mount namespace (``nsenter --mount
--net``): each dockerd finds only its own plugin socket in /run/docker/plugins, under the same
driver name everywhere, as on real hosts. Nothing is added to the machine's own network
namespace: the underlay and etcd live in a namespace of their own.

Every name starts with ``pdmh``; :func:`cleanup_leftovers` removes what an interrupted run left.
The oracle reads kernel state with ``ip -json`` / ``bridge -json`` through nsenter, never
through pouch_driver code.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.e2e.harness import (
    CGROUP_ROOT,
    ENGINE_NS_SYSCTLS,
    ENGINES,
    NETNS_DIR,
    PLUGIN_DIR,
    PLUGIN_LOG_NOISE,
    TMP,
    Engine,
    Plugin,
    SessionLock,
    _cgroup_pids,
    _kill_pids,
    _leftover_processes,
    _pids,
    _pids_in_netns,
    _read,
    _remove_cgroup_dirs,
    _wait_gone,
    check_no_overlap,
    delete_namespace,
    nsenter,
    random_tag,
    run,
    stop_pid,
    tail,
    wait_until,
)
from tests.etcd_members import member_argv

T = TypeVar("T")

#: The checkout these tests belong to: the plugins run its pouch_driver, whatever the venv
#: has installed and whatever directory nsenter leaves them in.
REPO_ROOT = Path(__file__).resolve().parents[2]

PREFIX = "pdmh"
LOCK_PATH = TMP / f"{PREFIX}.lock"
#: The driver's name on every host (its socket file, /run/docker/plugins/pdmh.sock, exists
#: once per host thanks to the private mount namespaces).
DRIVER = PREFIX
#: The underlay. Never 192.0.2.0/24 or fd00::/64: that is the machine's own uplink.
UNDERLAY = ipaddress.ip_network("198.51.100.0/24")
SWITCH_ADDR = "198.51.100.1"
HOST_UPLINK = "eth0"  # inside each host netns
ETCD_CLIENT_PORT = 23810  # tests/cluster uses 23790-23802
ETCD_PEER_PORT = 23820
ETCD_TLS_PORT = 23813  # the same members over TLS with client certificates (vary_config)
ETCD_MEMBERS = 3
ETCDCTL = "etcdctl"
#: Lease TTL the tests give the plugins (--cluster-lease-ttl), in seconds.
LEASE_TTL = 3
UNDERLAY_MTU = 1500
VXLAN_OVERHEAD = 50
OVERLAY_MTU = UNDERLAY_MTU - VXLAN_OVERHEAD
#: The suite's hosts: one of each engine the e2e suite runs, in one cluster.
MIXED_ENGINES = ("20.10", "28.5.2")

_BASE_RE = re.compile(rf"^{PREFIX}-[a-z0-9]{{6}}$")
_NETNS_RE = re.compile(rf"^{PREFIX}-[a-z0-9]{{6}}-[a-z]$")
_HOST_LETTERS = "abcdefghijklmnopqrst"  # "u" is the underlay


def host_address(index: int) -> str:
    return str(UNDERLAY.network_address + 11 + index)


def parallel(*calls: Callable[[], T]) -> list[T]:
    """Run ``calls`` on threads; results in order; the first exception is re-raised."""
    if not calls:
        return []
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.result() for f in futures]


def cluster_feature_available() -> bool:
    """True if this checkout's ``pouch_driver serve`` has the cluster flags."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = run(
        [sys.executable, "-m", "pouch_driver", "serve", "--help"], check=False, timeout=30, env=env
    ).stdout
    return "--cluster" in out and "--advertise-address" in out


# --------------------------------------------------------------------------------------------
# Leftovers of interrupted runs
# --------------------------------------------------------------------------------------------


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _cgroup_dirs(name_re: re.Pattern[str] = _NETNS_RE) -> list[Path]:
    """``/sys/fs/cgroup/<controller>/pdmh-<tag>-<h>`` directories (cgroup v1 and v2)."""
    out: list[Path] = []
    if not CGROUP_ROOT.is_dir():
        return out
    for root in [CGROUP_ROOT, *(p for p in CGROUP_ROOT.iterdir() if p.is_dir())]:
        with contextlib.suppress(OSError):
            out.extend(p for p in root.glob(f"{PREFIX}-*") if p.is_dir() and name_re.match(p.name))
    return out


def _pids_in_mount_ns(files: Iterable[Path]) -> set[int]:
    wanted = {i for f in files if (i := _ns_id(str(f))) is not None}
    if not wanted:
        return set()
    me = os.getpid()
    return {p for p in _pids() if p != me and _ns_id(f"/proc/{p}/ns/mnt") in wanted}


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


def cleanup_leftovers(log: Callable[[str], None] = lambda _m: None) -> None:
    """Remove what an interrupted multihost run left behind. Call only holding the lock.

    By name only: dockerd whose pidfile is under /tmp/pdmh-*; every process in a pdmh-* netns,
    mount namespace or cgroup, or of ours naming a /tmp/pdmh-* dir; then the mounts, the
    namespaces, the cgroups and the dirs.
    """
    bases = [p for p in TMP.glob(f"{PREFIX}-*") if p.is_dir() and _BASE_RE.match(p.name)]
    netns = [p for p in NETNS_DIR.glob(f"{PREFIX}-*") if _NETNS_RE.match(p.name)]
    cgroups = _cgroup_dirs()
    for base in bases:
        for pidfile in base.glob("*/docker.pid"):
            pid_text = _read(str(pidfile)).strip()
            if pid_text.isdigit() and str(base) in _read(f"/proc/{pid_text}/cmdline"):
                log(f"stopping leftover dockerd {pid_text} of {pidfile.parent}")
                stop_pid(int(pid_text), timeout=20)
    mount_files = [f for base in bases for f in (base / "ns").glob("*.mnt")]
    base_strs = [str(b) for b in bases]
    victims = _leftover_processes(netns, cgroups, base_strs) | _pids_in_mount_ns(mount_files)
    for pid in _pids():  # etcd members: not in e2e's list of daemons
        if _read(f"/proc/{pid}/comm").strip() == "etcd" and any(
            b in _read(f"/proc/{pid}/cmdline") for b in base_strs
        ):
            victims.add(pid)
    if victims:
        log(f"killing leftover processes {sorted(victims)}")
        _kill_pids(victims)
        _wait_gone(victims, 10)
    for f in mount_files:
        _umount(f)
    for base in bases:
        _umount(base / "ns")
    for ns in netns:
        log(f"deleting leftover netns {ns.name}")
        delete_namespace(ns.name)
    _remove_cgroup_dirs(cgroups)
    for base in bases:
        log(f"removing leftover dir {base}")
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# etcd, in the underlay namespace
# --------------------------------------------------------------------------------------------


@dataclass
class EtcdMember:
    index: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.index}"

    @property
    def client_url(self) -> str:
        return f"http://{SWITCH_ADDR}:{ETCD_CLIENT_PORT + self.index}"

    @property
    def tls_url(self) -> str:
        return f"https://{SWITCH_ADDR}:{ETCD_TLS_PORT + self.index}"

    @property
    def peer_url(self) -> str:
        return f"http://{SWITCH_ADDR}:{ETCD_PEER_PORT + self.index}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Etcd:
    """Three etcd members in netns ``netns``, listening on the underlay switch's address;
    with ``pki`` (see :func:`make_pki`) each also listens over TLS, requiring a client
    certificate there."""

    def __init__(
        self, netns: str, root: Path, members: int = ETCD_MEMBERS, pki: Path | None = None
    ) -> None:
        self.netns = netns
        self.root = root
        self.pki = pki
        self.token = f"{PREFIX}-{os.getpid()}-{time.time_ns()}"
        self.members = [EtcdMember(i, root / f"m{i}", root / f"m{i}.log") for i in range(members)]

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def cluster_url(self) -> str:
        """The plugin's ``--cluster`` value: ``etcd://H:P,H:P,H:P``."""
        return "etcd://" + ",".join(m.client_url.removeprefix("http://") for m in self.members)

    @property
    def cluster_tls_url(self) -> str:
        """The same over TLS: ``etcds://H:P,H:P,H:P``."""
        return "etcds://" + ",".join(m.tls_url.removeprefix("https://") for m in self.members)

    def _argv(self, m: EtcdMember) -> list[str]:
        return nsenter(
            self.netns,
            member_argv(
                m.name,
                m.data_dir,
                clients=[m.client_url, *([m.tls_url] if self.pki is not None else [])],
                peer=m.peer_url,
                cluster=[(x.name, x.peer_url) for x in self.members],
                token=self.token,
                pki=self.pki,
            ),
        )

    def start(self, index: int) -> None:
        m = self.members[index]
        if m.running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with m.log_path.open("ab") as log:
            m.proc = subprocess.Popen(
                self._argv(m),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self, index: int) -> None:
        """SIGKILL one member (its data dir stays: :meth:`start` brings it back)."""
        m = self.members[index]
        if m.proc is None:
            return
        if m.proc.poll() is None:
            m.proc.kill()
        m.proc.wait(timeout=10)
        m.proc = None

    def kill_all(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)

    def ctl(self, *args: str, endpoints: Sequence[str] | None = None, check: bool = False) -> Any:
        """``etcdctl -w json`` from inside the underlay netns; parsed output or None."""
        eps = ",".join(endpoints or self.endpoints)
        r = run(
            nsenter(
                self.netns,
                [
                    ETCDCTL,
                    f"--endpoints={eps}",
                    "--dial-timeout=1s",
                    "--command-timeout=2s",
                    "-w",
                    "json",
                    *args,
                ],
            ),
            check=check,
            timeout=15,
        )
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def healthy(self) -> list[int]:
        """Indexes of the members that answer ``endpoint health``."""
        out = self.ctl("endpoint", "health") or []
        ok = {e.get("endpoint") for e in out if e.get("health")}
        return [m.index for m in self.members if m.client_url in ok]

    def leader(self) -> int:
        """Index of the current leader."""
        out = self.ctl("endpoint", "status") or []
        for e in out:
            st = e.get("Status", {})
            if st.get("leader") and st.get("leader") == st.get("header", {}).get("member_id"):
                for m in self.members:
                    if m.client_url == e.get("Endpoint"):
                        return m.index
        raise AssertionError(f"no etcd leader in {out}")

    def wait_healthy(self, indexes: Sequence[int] | None = None, timeout: float = 30.0) -> None:
        wanted = set(range(len(self.members)) if indexes is None else indexes)

        def ok() -> bool:
            for i in wanted:
                m = self.members[i]
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited:\n{tail(m.log_path, 20)}")
            return wanted <= set(self.healthy())

        try:
            wait_until(ok, timeout=timeout, interval=0.2, message="etcd members healthy")
        except AssertionError as exc:
            logs = "\n".join(f"--- {m.name} ---\n{tail(m.log_path, 15)}" for m in self.members)
            raise RuntimeError(f"{exc}\n{logs}") from None

    def heal(self) -> None:
        """Every member running, the cluster healthy."""
        for i in range(len(self.members)):
            self.start(i)
        self.wait_healthy()

    def close(self) -> None:
        self.kill_all()


def make_pki(d: Path) -> None:
    """A CA, a server certificate for the etcd members (IP SAN: the switch's address) and a
    client certificate, in ``d``: ca.pem, server.pem/.key, client.pem/.key."""
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    rsa = ("-newkey", "rsa:2048", "-nodes")
    openssl("req", "-x509", *rsa, "-days", "1", "-subj", f"/CN={PREFIX}-ca",
            "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    (d / "san.cnf").write_text(
        f"subjectAltName=IP:{SWITCH_ADDR}\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    for name in ("server", "client"):
        openssl("req", *rsa, "-subj", f"/CN={PREFIX}-{name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-extfile", "san.cnf",
                "-out", f"{name}.pem")  # fmt: skip


# --------------------------------------------------------------------------------------------
# One host: dockerd + plugin in a netns and a mount namespace of its own
# --------------------------------------------------------------------------------------------


@dataclass
class HostPlugin(Plugin):
    """The e2e :class:`Plugin`, entered into the host's mount namespace too.

    It listens on /run/docker/plugins/<name>.sock as dockerd sees it; the harness reaches the
    same socket through ``socket_dir``, the directory bound there.
    """

    mount_ns: Path = field(default_factory=Path)
    socket_dir: Path = field(default_factory=Path)

    @property
    def socket(self) -> Path:
        return self.socket_dir / f"{self.name}.sock"

    def command(self) -> list[str]:
        return [
            "nsenter",
            f"--mount={self.mount_ns}",
            f"--net={NETNS_DIR / self.netns}",
            "--",
            sys.executable,
            "-m",
            "pouch_driver",
            "serve",
            "--socket",
            str(PLUGIN_DIR / f"{self.name}.sock"),
            "--state-dir",
            str(self.state_dir),
            "--prefix",
            self.prefix,
            "--log-level",
            "debug",
            *self.extra_args,
        ]


class Host(Engine):
    """One Docker host: :class:`Engine` minus its remote netns, plus a mount namespace, an
    underlay address and a plugin that joins the cluster."""

    def __init__(self, session: str, index: int, base: Path, engine: str = "20.10") -> None:
        super().__init__(tag=session, plugin_name=DRIVER, kind=ENGINES[engine])
        self.index = index
        self.letter = _HOST_LETTERS[index]
        self.base = base / self.letter
        self.netns = f"{PREFIX}-{session}-{self.letter}"
        self.remote_netns = self.netns  # no remote host of its own: the others are
        self.cgroup_parent = f"/{self.netns}"
        self.sock = self.base / "docker.sock"
        self.pidfile = self.base / "docker.pid"
        self.log_path = self.base / "dockerd.log"
        self.env.update(DOCKER_HOST=f"unix://{self.sock}", DOCKER_CONFIG=str(self.base / "cli"))
        self.mount_ns = base / "ns" / f"{self.letter}.mnt"
        self.address = host_address(index)
        #: docker0 of this host's dockerd, in a test range (it lives in the host netns only).
        self.bip = f"10.59.{index}.1/24"
        #: More dockerd flags (benchmarks: e.g. ``--bridge none`` for a Swarm reference,
        #: which also drops ``--bip`` and the Docker-host check).
        self.dockerd_args: tuple[str, ...] = ()
        self.plugin: HostPlugin = HostPlugin(
            name=DRIVER,
            netns=self.netns,
            state_dir=self.base / "plugin-state",
            log_path=self.base / "plugin.log",
            prefix=f"m{self.letter}",
            mount_ns=self.mount_ns,
            socket_dir=self.base / "run-docker" / "plugins",
        )

    def __repr__(self) -> str:
        return f"Host({self.letter}, {self.address})"

    # ---- namespaces -----------------------------------------------------------------------

    def make_namespaces(self, switch_ns: str) -> None:
        """The netns with its underlay veth into the switch, then the mount namespace."""
        port = f"h-{self.letter}"
        steps = [
            ["ip", "netns", "add", self.netns],
            ["ip", "-n", self.netns, "link", "set", "lo", "up"],
            [
                "ip",
                "-n",
                switch_ns,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                HOST_UPLINK,
                "netns",
                self.netns,
            ],
            ["ip", "-n", switch_ns, "link", "set", port, "master", "br0", "up"],
            ["ip", "-n", self.netns, "addr", "add", f"{self.address}/24", "dev", HOST_UPLINK],
            ["ip", "-n", self.netns, "link", "set", HOST_UPLINK, "up"],
            # As in the e2e harness: forwarding off, so dockerd turns it on itself and sets
            # the FORWARD policy to DROP, as on a fresh Docker host.
            nsenter(self.netns, ["sysctl", "-qw", *ENGINE_NS_SYSCTLS]),
        ]
        for cmd in steps:
            run(cmd, timeout=30)
        run_docker = self.base / "run-docker"
        run_containerd = self.base / "run-containerd"
        (run_docker / "plugins").mkdir(parents=True, exist_ok=True)
        run_containerd.mkdir(parents=True, exist_ok=True)
        for target in ("/run/docker", "/run/containerd"):
            Path(target).mkdir(parents=True, exist_ok=True)  # mount points; usually there
        self.mount_ns.touch()
        # The new namespace drops its copies of the other hosts' namespace files and of
        # /run/netns (they would pin those namespaces), then gets its own /run/docker (the
        # plugin socket directory) and /run/containerd.
        script = (
            f"umount -l {self.mount_ns.parent} 2>/dev/null; "
            f"for f in {NETNS_DIR}/*; do umount -l $f 2>/dev/null; done; "
            f"umount -l {NETNS_DIR} 2>/dev/null; "
            f"mount --bind {run_docker} /run/docker && "
            f"mount --bind {run_containerd} /run/containerd"
        )
        run(
            [
                "unshare",
                f"--mount={self.mount_ns}",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
            ],
            timeout=30,
        )

    def in_mount_ns(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in the host's mount namespace and netns."""
        return run(
            ["nsenter", f"--mount={self.mount_ns}", f"--net={NETNS_DIR / self.netns}", "--", *cmd],
            check=check,
            timeout=30,
        )

    # ---- lifecycle -----------------------------------------------------------------------

    def dockerd_command(self) -> list[str]:
        cmd = super().dockerd_command()  # nsenter --net=... -- dockerd ...
        assert cmd[0] == "nsenter"
        bridge = () if self._own_bridge() else ("--bip", self.bip)
        return [cmd[0], f"--mount={self.mount_ns}", *cmd[1:], *bridge, *self.dockerd_args]

    def containerd_command(self, config: Path) -> list[str]:
        # Engine 28's own containerd, in the host's mount namespace too: runc's hooks reach
        # this host's dockerd through sockets under its /run/docker.
        cmd = super().containerd_command(config)
        assert cmd[0] == "nsenter"
        return [cmd[0], f"--mount={self.mount_ns}", *cmd[1:]]

    def _own_bridge(self) -> bool:
        return any(a == "--bridge" or a.startswith(("--bridge=", "-b")) for a in self.dockerd_args)

    def start(self) -> None:
        """dockerd, the plugin and the image; the namespaces exist already."""
        (self.base / "cli").mkdir(parents=True, exist_ok=True)
        (self.base / "daemon.json").write_text("{}\n")
        t0 = time.monotonic()
        self.start_dockerd()
        self.timings["dockerd start"] = time.monotonic() - t0
        if not self._own_bridge():
            self.check_docker_host()
        t0 = time.monotonic()
        self.plugin.start()
        self.timings["plugin start"] = time.monotonic() - t0
        t0 = time.monotonic()
        self.build_image()
        self.timings["image build"] = time.monotonic() - t0

    def crash(self) -> None:
        """kill -9 of the plugin, dockerd and its containerd (containers' shims live on)."""
        self.plugin.kill()
        self.kill_dockerd(containerd=True)

    def revive(self) -> None:
        """Plugin then dockerd back, whatever of them is down (the plugin first: the new
        dockerd cleans up the dead containers' endpoints through it)."""
        if not self.plugin.running:
            self.plugin.start()
        if self.proc is None or self.proc.poll() is not None:
            self.start_dockerd()

    def close(self) -> None:
        """Stop everything of this host and remove every trace; safe on a half-started one."""
        t0 = time.monotonic()
        errors = self.stop_daemons()
        cgroups = _cgroup_dirs(re.compile(rf"^{re.escape(self.netns)}$"))
        pids = (
            _pids_in_netns(self.netns) | _pids_in_mount_ns([self.mount_ns]) | _cgroup_pids(cgroups)
        )
        if pids:
            _kill_pids(pids)
            _wait_gone(pids, 10)
        _umount(self.mount_ns)
        delete_namespace(self.netns)
        _remove_cgroup_dirs(cgroups)
        self._keep_logs()
        self.timings["teardown"] = time.monotonic() - t0
        if errors:
            raise RuntimeError(f"host {self.letter} teardown: " + "; ".join(errors))

    # ---- the oracle: this host's kernel --------------------------------------------------

    def ip_json(self, *args: str) -> list[dict[str, Any]]:
        out = self.in_engine_ns("ip", "-json", *args).stdout
        data: list[dict[str, Any]] = json.loads(out or "[]")
        return data

    def vxlans(self) -> list[dict[str, Any]]:
        """The plugin's VXLAN devices: ``{"ifname", "vni", "local", "port", "mtu", "master"}``."""
        out = []
        for lk in self.ip_json("-details", "link", "show", "type", "vxlan"):
            if not str(lk.get("ifname", "")).startswith(self.plugin.prefix):
                continue
            data = lk.get("linkinfo", {}).get("info_data", {})
            out.append(
                {
                    "ifname": lk["ifname"],
                    "vni": data.get("id"),
                    "local": data.get("local"),
                    "port": data.get("port"),
                    "mtu": lk.get("mtu"),
                    "master": lk.get("master"),
                }
            )
        return out

    def vxlan_of(self, network: str) -> dict[str, Any]:
        """The VXLAN device of docker network ``network`` (name or ID): the one whose master
        is the network's bridge (``<prefix>b<id>``, README "Names")."""
        network_id = str(self.docker_json("network", "inspect", network)[0]["Id"])
        bridge = self.bridge_name(network_id)
        found = [vx for vx in self.vxlans() if vx["master"] == bridge]
        if len(found) != 1:
            raise AssertionError(
                f"host {self.letter}: want one VXLAN device on bridge {bridge} of {network}, "
                f"found {found} among {self.vxlans()}"
            )
        return found[0]

    def remote_fdb(self) -> set[tuple[str, str, str]]:
        """``(vxlan device, mac, vtep)`` of every unicast forwarding entry to another host."""
        entries: set[tuple[str, str, str]] = set()
        for vx in self.vxlans():
            out = self.in_engine_ns("bridge", "-json", "fdb", "show", "dev", vx["ifname"]).stdout
            for e in json.loads(out or "[]"):
                mac, dst = e.get("mac", ""), e.get("dst")
                if dst and mac != "00:00:00:00:00:00":
                    entries.add((vx["ifname"], mac, dst))
        return entries

    def remote_neighbours(self) -> set[tuple[str, str, str]]:
        """``(bridge, address, mac)`` of every permanent neighbour entry on the bridges of
        the plugin's VXLAN devices (the bridge answers ARP/ND for them)."""
        bridges = {vx["master"] for vx in self.vxlans() if vx["master"]}
        entries: set[tuple[str, str, str]] = set()
        for n in self.ip_json("neigh", "show", "nud", "permanent"):
            if n.get("dev") in bridges and n.get("lladdr"):
                entries.add((n["dev"], str(ipaddress.ip_address(n["dst"])), n["lladdr"]))
        return entries

    def entries_towards(self, other: Host) -> tuple[set[str], set[str]]:
        """MACs this host forwards to ``other``'s VTEP, and the addresses neighboured to them."""
        macs = {mac for _dev, mac, dst in self.remote_fdb() if dst == other.address}
        addrs = {addr for _br, addr, mac in self.remote_neighbours() if mac in macs}
        return macs, addrs

    def forget_remote(self) -> None:
        """Delete every remote forwarding and neighbour entry from this host's kernel (what a
        plugin must rebuild from the cluster store)."""
        for dev, mac, dst in self.remote_fdb():
            self.in_engine_ns("bridge", "fdb", "del", mac, "dev", dev, "self", "dst", dst)
            self.in_engine_ns("bridge", "fdb", "del", mac, "dev", dev, "master", check=False)
        for br, addr, _mac in self.remote_neighbours():
            self.in_engine_ns("ip", "neigh", "del", addr, "dev", br)

    def host_veths(self) -> list[str]:
        """The plugin's host-side veth ends (``<prefix>h<id>``)."""
        return [n for n in self.plugin_links() if n.startswith(self.plugin.prefix + "h")]


# --------------------------------------------------------------------------------------------
# N hosts
# --------------------------------------------------------------------------------------------


class MultiHost:
    """The underlay switch, etcd and ``n`` hosts. Use :func:`bring_up`."""

    def __init__(
        self,
        n: int,
        *,
        cluster: bool = True,
        lease_ttl: int = LEASE_TTL,
        vary_config: bool = False,
        dockerd_args: Sequence[str] = (),
        engines: Sequence[str] = ("20.10",),
    ) -> None:
        if not 1 <= n <= len(_HOST_LETTERS):
            raise ValueError(f"1..{len(_HOST_LETTERS)} hosts, not {n}")
        self.tag = random_tag()
        self.base = TMP / f"{PREFIX}-{self.tag}"
        self.switch_ns = f"{PREFIX}-{self.tag}-u"
        self.pki = self.base / "pki" if vary_config else None
        self.etcd = Etcd(self.switch_ns, self.base / "etcd", pki=self.pki)
        self.cluster = cluster
        self.lease_ttl = lease_ttl
        # Host i runs engines[i % len(engines)]: a cluster can mix engine versions.
        self.hosts = [Host(self.tag, i, self.base, engines[i % len(engines)]) for i in range(n)]
        for h in self.hosts:
            h.dockerd_args = tuple(dockerd_args)
            h.plugin.env["PYTHONPATH"] = str(REPO_ROOT)
            if not cluster:
                continue
            if self.pki is not None and h.index % 2:
                h.plugin.env.update(self.cluster_env(h, self.pki))
            else:
                h.plugin.extra_args = self.cluster_args(h)
        self.timings: dict[str, float] = {}

    def cluster_args(self, host: Host) -> tuple[str, ...]:
        """Plain etcd://, by flags."""
        return (
            "--cluster",
            self.etcd.cluster_url,
            "--advertise-address",
            host.address,
            "--cluster-lease-ttl",
            str(self.lease_ttl),
        )

    def cluster_env(self, host: Host, pki: Path) -> dict[str, str]:
        """etcds:// with a client certificate, by environment variables."""
        return {
            "POUCH_DRIVER_CLUSTER": self.etcd.cluster_tls_url,
            "POUCH_DRIVER_ADVERTISE_ADDRESS": host.address,
            "POUCH_DRIVER_CLUSTER_LEASE_TTL": str(self.lease_ttl),
            "POUCH_DRIVER_CLUSTER_CA": str(pki / "ca.pem"),
            "POUCH_DRIVER_CLUSTER_CERT": str(pki / "client.pem"),
            "POUCH_DRIVER_CLUSTER_KEY": str(pki / "client.key"),
        }

    def start(self) -> None:
        check_no_overlap(str(UNDERLAY))
        t0 = time.monotonic()
        self.base.mkdir(mode=0o700)
        ns_dir = self.base / "ns"
        ns_dir.mkdir()
        # unshare --mount=FILE needs FILE on a mount that does not propagate.
        run(["mount", "--bind", str(ns_dir), str(ns_dir)])
        run(["mount", "--make-private", str(ns_dir)])
        if self.pki is not None:
            make_pki(self.pki)
        for cmd in (
            ["ip", "netns", "add", self.switch_ns],
            ["ip", "-n", self.switch_ns, "link", "set", "lo", "up"],
            ["ip", "-n", self.switch_ns, "link", "add", "br0", "type", "bridge"],
            ["ip", "-n", self.switch_ns, "addr", "add", f"{SWITCH_ADDR}/24", "dev", "br0"],
            ["ip", "-n", self.switch_ns, "link", "set", "br0", "up"],
        ):
            run(cmd, timeout=30)
        for i in range(len(self.etcd.members)):
            self.etcd.start(i)
        for h in self.hosts:
            h.base.mkdir()
            h.make_namespaces(self.switch_ns)
        self.timings["namespaces"] = time.monotonic() - t0
        t0 = time.monotonic()
        self.etcd.wait_healthy()
        self.timings["etcd healthy"] = time.monotonic() - t0
        t0 = time.monotonic()
        parallel(*(h.start for h in self.hosts))
        self.timings["hosts start"] = time.monotonic() - t0

    def close(self) -> None:
        t0 = time.monotonic()
        errors: list[str] = []
        # Containers go while etcd and the plugins answer, so the plugins can withdraw them.
        with contextlib.suppress(Exception):
            self.heal()
        for h, outcome in zip(self.hosts, _settle(h.close for h in self.hosts), strict=True):
            if outcome is not None:
                errors.append(f"{h.letter}: {outcome}")
        self.etcd.close()
        pids = _pids_in_netns(self.switch_ns)
        if pids:
            _kill_pids(pids)
            _wait_gone(pids, 10)
        delete_namespace(self.switch_ns)
        _umount(self.base / "ns")
        keep = os.environ.get("PDE2E_LOG_DIR")
        if keep:
            for m in self.etcd.members:
                if m.log_path.exists():
                    Path(keep).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(m.log_path, Path(keep) / f"{PREFIX}-{m.log_path.name}")
        shutil.rmtree(self.base, ignore_errors=True)
        self.timings["teardown"] = time.monotonic() - t0
        if errors:
            raise RuntimeError("multihost teardown: " + "; ".join(errors))

    def heal(self) -> None:
        """etcd healthy, every host's plugin and dockerd running."""
        self.etcd.heal()
        parallel(*(h.revive for h in self.hosts))


def _settle(calls: Iterable[Callable[[], None]]) -> list[BaseException | None]:
    """Run ``calls`` on threads; for each, the exception it raised or None."""

    def guarded(c: Callable[[], None]) -> Callable[[], BaseException | None]:
        def inner() -> BaseException | None:
            try:
                c()
            except Exception as exc:  # noqa: BLE001 - reported by the caller
                return exc
            return None

        return inner

    return parallel(*(guarded(c) for c in calls))


@contextlib.contextmanager
def bring_up(
    n: int = 2,
    *,
    cluster: bool = True,
    lease_ttl: int = LEASE_TTL,
    vary_config: bool = False,
    dockerd_args: Sequence[str] = (),
    engines: Sequence[str] = ("20.10",),
    lock_wait: float = 1800.0,
    log: Callable[[str], None] = lambda msg: print(f"[pdmh] {msg}"),
) -> Iterator[MultiHost]:
    """``n`` hosts joined by an underlay and a three-member etcd, torn down on exit.

    For tests and benchmarks alike. Holds /tmp/pdmh.lock and the e2e suite's lock (only one
    set of dockerds at a time on this machine), cleans leftovers of interrupted runs first.
    ``cluster=False`` starts the plugins without cluster flags (local networks only).
    ``vary_config=True``: the etcd members also serve TLS with client certificates, and every
    second host (b, d, ...) joins through it, configured by ``POUCH_DRIVER_*`` environment
    variables instead of flags, so each scenario covers both ways. ``dockerd_args``: more
    flags for every dockerd. ``engines``: host i runs ``engines[i % len(engines)]`` (names of
    ``tests.e2e.harness.ENGINES``).

    A benchmark::

        with bring_up(3, lease_ttl=10) as mh:
            scopes = [Scope(h, 1) for h in mh.hosts]   # tests.e2e.harness.Scope, one per host
            for s in scopes:
                s.create_network("mesh", subnet="10.61.0.0/16",
                                 options={"pouch.cluster": "mesh"})
            ...                                        # docker run on each, time it
            for s in scopes:
                s.cleanup()
    Every host, its plugin and etcd are up when it yields; see :meth:`MultiHost.heal`.
    """
    own, e2e = SessionLock(LOCK_PATH), SessionLock()
    waited = time.monotonic()
    own.acquire(timeout=lock_wait)
    try:
        # In one pytest run with tests/e2e, its session (and lock) lives on until the end:
        # its dockerd is idle by then, and in namespaces of its own, so ours may run beside.
        if not SessionLock.held_here():
            e2e.acquire(timeout=lock_wait)
        try:
            t0 = time.monotonic()
            waited = t0 - waited
            cleanup_leftovers(log)
            mh = MultiHost(
                n,
                cluster=cluster,
                lease_ttl=lease_ttl,
                vary_config=vary_config,
                dockerd_args=dockerd_args,
                engines=engines,
            )
            mh.timings["lock wait"] = waited
            mh.timings["leftover cleanup"] = time.monotonic() - t0
            try:
                mh.start()
            except Exception as exc:  # noqa: BLE001 - any start-up failure: logs, clean up
                report = startup_report(mh)
                try:
                    mh.close()
                finally:
                    raise RuntimeError(f"multihost start failed: {exc}\n{report}") from exc
            except BaseException:
                mh.close()
                raise
            try:
                yield mh
            finally:
                mh.close()
        finally:
            e2e.release()
    finally:
        own.release()


def startup_report(mh: MultiHost) -> str:
    parts = []
    for h in mh.hosts:
        parts.append(f"--- host {h.letter} dockerd log ---\n{tail(h.log_path, 30)}")
        plugin_log = tail(h.plugin.log_path, 30, drop=PLUGIN_LOG_NOISE)
        parts.append(f"--- host {h.letter} plugin log ---\n{plugin_log}")
    for m in mh.etcd.members:
        parts.append(f"--- {m.name} log ---\n{tail(m.log_path, 10)}")
    return "\n".join(parts)


def wait_announced(
    seer: Host, owner: Host, addresses: Iterable[str], *, timeout: float = 15.0
) -> None:
    """Until ``seer``'s kernel forwards each of ``addresses`` to ``owner``'s VTEP."""
    wanted = {str(ipaddress.ip_address(a)) for a in addresses}

    def ok() -> bool:
        return wanted <= seer.entries_towards(owner)[1]

    try:
        wait_until(ok, timeout=timeout, interval=0.2, message="entries")
    except AssertionError:
        raise AssertionError(
            f"host {seer.letter} does not forward {sorted(wanted)} to host {owner.letter} "
            f"({owner.address}) after {timeout:g}s: fdb {sorted(seer.remote_fdb())}, "
            f"neighbours {sorted(seer.remote_neighbours())}"
        ) from None


def wait_withdrawn(
    seer: Host, owner: Host, addresses: Iterable[str] | None = None, *, timeout: float = 15.0
) -> None:
    """Until ``seer``'s kernel holds no entry towards ``owner`` (or none for ``addresses``)."""
    wanted = None if addresses is None else {str(ipaddress.ip_address(a)) for a in addresses}

    def ok() -> bool:
        macs, have = seer.entries_towards(owner)
        return not (macs or have) if wanted is None else not (wanted & have)

    try:
        wait_until(ok, timeout=timeout, interval=0.2, message="withdrawal")
    except AssertionError:
        raise AssertionError(
            f"host {seer.letter} still forwards to host {owner.letter} after {timeout:g}s: "
            f"fdb {sorted(seer.remote_fdb())}, neighbours {sorted(seer.remote_neighbours())}"
        ) from None


# --------------------------------------------------------------------------------------------
# Containers, seen from outside
# --------------------------------------------------------------------------------------------

#: One ICMP echo of N payload bytes with don't-fragment set, from the netns it runs in:
#: prints "reply", "timeout" or "error <errno>".
DF_PING = r"""
import os, socket, struct, sys, time
dst, size = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack(f"!{len(b) // 2}H", b))
    t = (t >> 16) + (t & 0xFFFF)
    t += t >> 16
    return ~t & 0xFFFF
ident, payload = os.getpid() & 0xFFFF, bytes(i & 0xFF for i in range(size))
c = csum(struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload)
try:
    s.sendto(struct.pack("!BBHHH", 8, 0, c, ident, 1) + payload, (dst, 0))
except OSError as e:
    print(f"error {e.errno}")
    sys.exit()
s.settimeout(0.2)
end = time.monotonic() + 3
while time.monotonic() < end:
    try:
        data, (src, _) = s.recvfrom(65535)
    except socket.timeout:
        continue
    ihl = (data[0] & 15) * 4
    kind, _, _, i, _ = struct.unpack("!BBHHH", data[ihl : ihl + 8])
    if kind == 0 and i == ident and src == dst and data[ihl + 8 :] == payload:
        print("reply")
        sys.exit()
print("timeout")
"""


#: busybox httpd serving /www/index.html ("pouch-e2e-ok") on port 80, IPv4 and IPv6.
HTTPD = ("httpd", "-f", "-p", "80", "-h", "/www")
PAGE = "pouch-e2e-ok"


def container_pid(host: Host, container: str) -> int:
    pid = int(host.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip())
    if pid <= 0:
        raise AssertionError(f"{container} on host {host.letter} is not running")
    return pid


def df_ping(host: Host, container: str, target: str, size: int) -> str:
    """A don't-fragment ICMP echo of ``size`` payload bytes from ``container``'s netns:
    "reply", "timeout" or "error <errno>" (90, EMSGSIZE: larger than the link's MTU)."""
    pid = container_pid(host, container)
    return df_ping_in(["nsenter", "-t", str(pid), "-n", "--"], target, size)


def df_ping_in(enter: Sequence[str], target: str, size: int) -> str:
    """:func:`df_ping` from the netns ``enter`` (an nsenter prefix) runs in."""
    r = run([*enter, sys.executable, "-c", DF_PING, target, str(size)], check=False, timeout=20)
    return r.stdout.strip() or f"no output: {r.stderr.strip()}"


def container_net(host: Host, container: str, network: str) -> dict[str, Any]:
    """The container's entry of ``NetworkSettings.Networks[network]``."""
    data = host.docker_json("container", "inspect", container)
    nets: dict[str, Any] = data[0]["NetworkSettings"]["Networks"]
    if network not in nets:
        raise AssertionError(f"{container} is not on {network}: {sorted(nets)}")
    entry: dict[str, Any] = nets[network]
    return entry


def containers_on(host: Host, network: str) -> dict[str, tuple[str, str, str]]:
    """Every container ``docker network inspect`` lists on ``network``: name -> (IPv4, IPv6,
    MAC), addresses without their prefix length."""
    data = host.docker_json("network", "inspect", network)
    out: dict[str, tuple[str, str, str]] = {}
    for c in data[0].get("Containers", {}).values():
        v4 = str(c.get("IPv4Address", "")).split("/")[0]
        v6 = str(c.get("IPv6Address", "")).split("/")[0]
        out[str(c["Name"])] = (v4, v6, str(c.get("MacAddress", "")).lower())
    return out


# --------------------------------------------------------------------------------------------
# Hand-made VXLAN packets (what a stranger on the underlay could send)
# --------------------------------------------------------------------------------------------

#: Send argv[3] (hex) to argv[1]:argv[2] over UDP three times.
_UDP_SEND = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):
    s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.1)
"""

#: Print each datagram received on UDP port argv[1] for argv[2] seconds, one a line.
_UDP_LISTEN = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.2)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        data, _ = s.recvfrom(4096)
    except socket.timeout:
        continue
    print(data.decode(errors="replace"), flush=True)
"""


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def vxlan_udp_frame(
    vni: int, *, dst_mac: str, src_mac: str, src: str, dst: str, port: int, payload: bytes
) -> bytes:
    """A VXLAN payload (header + inner Ethernet/IPv4/UDP frame) carrying ``payload`` to
    ``dst``:``port``; the UDP checksum is left out (0), as IPv4 allows."""
    udp = (
        (40000).to_bytes(2, "big") + port.to_bytes(2, "big")
        + (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    )  # fmt: skip
    header = bytearray(
        b"\x45\x00" + (20 + len(udp)).to_bytes(2, "big") + b"\0\0\x40\x00\x40\x11\0\0"
        + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    )  # fmt: skip
    header[10:12] = _checksum(bytes(header)).to_bytes(2, "big")
    ether = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
    inner = ether + b"\x08\x00" + bytes(header) + udp
    return b"\x08\0\0\0" + vni.to_bytes(3, "big") + b"\0" + inner


def send_udp(netns: str, dst: str, port: int, data: bytes) -> None:
    """Three UDP datagrams ``data`` to ``dst``:``port`` from netns ``netns``."""
    run(nsenter(netns, [sys.executable, "-c", _UDP_SEND, dst, str(port), data.hex()]), timeout=20)


@contextlib.contextmanager
def udp_listener(host: Host, container: str, port: int, seconds: float) -> Iterator[list[str]]:
    """Listen on UDP ``port`` in ``container``'s netns for up to ``seconds``; the list it
    yields holds the datagrams received, filled when the block ends."""
    pid = container_pid(host, container)
    proc = subprocess.Popen(
        ["nsenter", "-t", str(pid), "-n", "--", sys.executable, "-c", _UDP_LISTEN,
         str(port), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    received: list[str] = []
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        if first != "ready":
            raise AssertionError(f"UDP listener did not start: {first!r} {proc.stderr}")
        yield received
    finally:
        try:
            out, _err = proc.communicate(timeout=seconds + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _err = proc.communicate()
        received.extend(line for line in out.splitlines() if line)
