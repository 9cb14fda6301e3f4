"""Settings: one frozen dataclass, read from flags and ``POUCH_DRIVER_*`` environment variables.

The environment names are the ones ``plugin/config.json`` exposes. No I/O beyond ``os.environ``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .model import PoolCandidate
from .naming import validate_prefix

ENV_PREFIX = "POUCH_DRIVER_"
_POOL_RE = re.compile(r"^(?P<base>[0-9a-fA-F.:]+/\d{1,3}):(?P<size>\d{1,3})$")
LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_pools(text: str, *, v6: bool) -> tuple[PoolCandidate, ...]:
    """Parse ``CIDR:SIZE[,CIDR:SIZE...]``, e.g. ``10.200.0.0/13:24``."""
    out: list[PoolCandidate] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        m = _POOL_RE.fullmatch(item)
        if not m:
            raise ValueError(f"pool {item!r} is not CIDR:SIZE (e.g. 10.200.0.0/13:24)")
        base = ipaddress.ip_network(m["base"], strict=True)
        size = int(m["size"])
        if (base.version == 6) != v6:
            raise ValueError(f"pool {item!r} is not IPv{6 if v6 else 4}")
        if not base.prefixlen <= size <= base.max_prefixlen - 2:
            raise ValueError(
                f"pool {item!r}: size must be between /{base.prefixlen} and "
                f"/{base.max_prefixlen - 2}"
            )
        out.append(PoolCandidate(base=base, size=size))
    if not out:
        raise ValueError("at least one pool is needed")
    return tuple(out)


@dataclass(frozen=True)
class Settings:
    #: Unix socket the engine dials. The file name (without .sock) is the driver's name.
    socket: Path = Path("/run/docker/plugins/pouch.sock")
    #: Directory of the durable store (``state.db``) and its lock file.
    state_dir: Path = Path("/var/lib/pouch-driver")
    #: debug, info, warning or error.
    log_level: str = "info"
    #: ``text`` or ``json`` (one object per line).
    log_format: str = "text"
    #: 1-3 lowercase letters that start every interface and chain we create. Two instances on
    #: one host must use different prefixes: each removes orphans carrying its own prefix.
    prefix: str = "pd"
    #: Candidate ranges for automatic IPv4 pools, ``CIDR:SIZE`` comma-separated.
    pools_v4: tuple[PoolCandidate, ...] = field(
        default_factory=lambda: parse_pools("10.200.0.0/13:24", v6=False)
    )
    #: Candidate ranges for automatic IPv6 pools (a ULA range), ``CIDR:SIZE``.
    pools_v6: tuple[PoolCandidate, ...] = field(
        default_factory=lambda: parse_pools("fd70:6f75:6368::/48:64", v6=True)
    )
    #: Group owning the socket (mode 0660); empty keeps root's group.
    socket_group: str = ""
    #: Seconds a request may run before it is abandoned with an error (the engine waits forever).
    request_timeout: float = 60.0
    #: Seconds between sweeps for endpoints whose veth vanished (0 disables the sweep).
    gc_interval: float = 30.0
    #: Seconds after start-up before the sweep takes records from before it for leftovers of
    #: answers a crash lost: the engine retries an interrupted request for about 15 s.
    leftover_grace: float = 30.0
    #: Prometheus metrics: ``unix:/path`` or ``127.0.0.1:PORT``; empty disables them.
    metrics: str = ""
    #: Largest request body accepted, in bytes.
    max_body: int = 1 << 20
    #: Threads doing netlink work, so slow kernel calls never stall the event loop. More
    #: threads than spare cores only compete with the loop for the GIL.
    netlink_workers: int = field(default_factory=lambda: max(1, min(4, (os.cpu_count() or 2) - 1)))
    #: Apply firewall rules (iptables); off only for tests that check links alone.
    firewall: bool = True
    #: Where the ``net.*`` sysctls are written (``<dir>/net/ipv4/ip_forward``). A managed plugin
    #: sees a read-only /proc/sys: plugin/config.json mounts the host's /proc/sys/net at
    #: /host/proc/sys/net and sets this to /host/proc/sys.
    sysctl_dir: Path = Path("/proc/sys")
    #: etcd members for cluster networks, ``etcd://host:port[,host:port...]`` (``etcds://``:
    #: TLS). Empty: this host only, no external service.
    cluster: str = ""
    #: This host's IPv4 address on the network between the hosts: its VTEP, and its name in
    #: the cluster. Needed with ``cluster``.
    advertise_address: str = ""
    #: Seconds a host's lease lives without renewal: how soon the others forget a dead host.
    cluster_lease_ttl: int = 10
    #: PEM files for etcd over TLS: the CA that signed the members, and our client pair.
    cluster_ca: Path | None = None
    cluster_cert: Path | None = None
    cluster_key: Path | None = None

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in ("text", "json"):
            raise ValueError("log format must be text or json")
        if len(str(self.socket).encode()) > 107:
            raise ValueError(f"socket path {self.socket} is longer than 107 bytes")
        if self.request_timeout <= 0:
            raise ValueError("request timeout must be positive")
        if self.netlink_workers < 1:
            raise ValueError("netlink workers must be at least 1")

        if self.metrics:
            parse_listen(self.metrics)
        if self.cluster:
            parse_cluster_url(self.cluster)
            if not self.advertise_address:
                raise ValueError("--cluster needs --advertise-address (this host's underlay IPv4)")
            parse_advertise(self.advertise_address)
        elif self.advertise_address:
            raise ValueError("--advertise-address is only used with --cluster")
        if self.cluster_lease_ttl < 2:
            raise ValueError("cluster lease TTL must be at least 2 seconds")
        if (self.cluster_cert is None) != (self.cluster_key is None):
            raise ValueError("--cluster-cert and --cluster-key go together")

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def driver_name(self) -> str:
        return self.socket.name.removesuffix(".sock")

    def with_overrides(self, **values: Any) -> Settings:
        return replace(self, **{k: v for k, v in values.items() if v is not None})


def _convert(name: str, raw: str) -> Any:
    if name in ("socket", "state_dir", "sysctl_dir", "cluster_ca", "cluster_cert", "cluster_key"):
        return Path(raw)
    if name == "pools_v4":
        return parse_pools(raw, v6=False)
    if name == "pools_v6":
        return parse_pools(raw, v6=True)
    if name in ("request_timeout", "gc_interval", "leftover_grace"):
        return float(raw)
    if name in ("max_body", "netlink_workers", "cluster_lease_ttl"):
        return int(raw)
    if name == "firewall":
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{raw!r} is not a boolean")
        return raw.lower() in ("1", "true", "yes")
    return raw.lower() if name in ("log_level", "log_format") else raw


def from_environ(environ: Mapping[str, str], **overrides: Any) -> Settings:
    """Settings from ``POUCH_DRIVER_<FIELD>`` variables; explicit overrides (flags) win."""
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is None or raw == "":
            continue
        try:
            values[f.name] = _convert(f.name, raw)
        except ValueError as exc:
            raise ValueError(f"{ENV_PREFIX}{f.name.upper()}: {exc}") from exc
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def default_environ() -> Mapping[str, str]:
    return os.environ


def parse_listen(value: str) -> tuple[str, str | int]:
    """``unix:/path`` or ``127.0.0.1:PORT`` / ``[::1]:PORT``; anything else is refused."""
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"metrics socket {path!r} must be an absolute path")
        return "unix", path
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics address {value!r}: use unix:/path or 127.0.0.1:PORT")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"metrics address {value!r} is not loopback; metrics stay on the host")
    return host, int(port)


def parse_cluster_url(value: str) -> tuple[list[str], bool]:
    """``etcd://h:p[,h:p]`` (or ``etcds://`` for TLS) into client URLs, and whether TLS."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("etcd", "etcds"):
        raise ValueError(
            f"cluster {value!r}: use etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS)"
        )
    tls = scheme == "etcds"
    urls = []
    for item in (x.strip() for x in rest.split(",")):
        host, colon, port = item.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"cluster {value!r}: member {item!r} is not HOST:PORT")
        urls.append(f"{'https' if tls else 'http'}://{host}:{port}")
    return urls, tls


def parse_advertise(value: str) -> ipaddress.IPv4Address:
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"advertise address {value!r} is not an IPv4 address") from None
    if address.is_loopback or address.is_unspecified or address.is_multicast:
        raise ValueError(f"advertise address {value} cannot carry VXLAN between hosts")
    return address
