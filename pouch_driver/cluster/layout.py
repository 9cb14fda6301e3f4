"""What the cluster keeps in etcd: the key layout, the records as JSON, and address blocks.

Pure: no I/O. Everything lives under ``/pouch/v1/``::

    networks/<name>              the first definition of a cluster network (subnets, VNI, ...)
    vnis/<vni>                   which network holds a VXLAN network identifier
    hosts/<host>                 a live host and its VTEP address            (host's lease)
    members/<name>/<host>        a host serving the network                  (host's lease)
    endpoints/<name>/<id>        a container's MAC, addresses and host       (host's lease)
    blocks/<name>/<block>        the host that allocates inside an address block
    pins/<name>/<address>        an address asked for by name outside the asker's blocks

Leased keys vanish with their host; blocks and pins hold addresses, so they never do: they go
back only through the host itself or ``gc`` once the host's lease is gone (README, "Across
hosts").
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..model import IPAddress, IPInterface, IPNetwork

ROOT = "/pouch/v1/"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
#: VNIs we hand out: above the range people pick by hand, below the 24-bit limit.
VNI_FIRST, VNI_LAST = 4096, (1 << 24) - 1
#: Addresses per block, as a prefix length: 64 (IPv4 /26, IPv6 /122), as Calico does, or
#: less in small subnets so that at least 16 hosts get a block.
BLOCK_BITS = 6
MIN_BLOCKS_BITS = 4


def network_key(name: str) -> str:
    return f"{ROOT}networks/{name}"


def vni_key(vni: int) -> str:
    return f"{ROOT}vnis/{vni}"


def host_key(host: str) -> str:
    return f"{ROOT}hosts/{host}"


def member_key(name: str, host: str) -> str:
    return f"{ROOT}members/{name}/{host}"


def endpoint_key(name: str, endpoint_id: str) -> str:
    return f"{ROOT}endpoints/{name}/{endpoint_id}"


def block_key(name: str, block: IPNetwork) -> str:
    return f"{ROOT}blocks/{name}/{block.network_address}-{block.prefixlen}"


def pin_key(name: str, address: IPAddress) -> str:
    return f"{ROOT}pins/{name}/{address}"


def prefix(kind: str, name: str | None = None) -> str:
    return f"{ROOT}{kind}/" + (f"{name}/" if name is not None else "")


@dataclass(frozen=True)
class Key:
    """A parsed key: its kind, the network it belongs to (None for hosts, vnis) and the rest."""

    kind: str
    network: str | None
    item: str


def parse_key(key: str) -> Key | None:
    if not key.startswith(ROOT):
        return None
    parts = key[len(ROOT) :].split("/")
    if len(parts) == 2 and parts[0] in ("networks", "vnis", "hosts"):
        return Key(parts[0], parts[1] if parts[0] == "networks" else None, parts[1])
    if len(parts) == 3 and parts[0] in ("members", "endpoints", "blocks", "pins"):
        return Key(parts[0], parts[1], parts[2])
    return None


def parse_block(item: str) -> IPNetwork:
    address, _, length = item.rpartition("-")
    return ipaddress.ip_network(f"{address}/{length}")


# --- records ---------------------------------------------------------------------------------
def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Definition:
    """A cluster network as its first creator defined it. ``settings`` are the options every
    host must agree on; host-local ones (bridge name, SNAT source, trusted interfaces) stay
    out. ``writer`` names the host and request that wrote it (etcd.create's rule)."""

    name: str
    subnets: tuple[IPNetwork, ...]
    gateways: tuple[IPInterface, ...]
    settings: tuple[tuple[str, str], ...]
    vni: int = 0
    writer: str = ""

    def encode(self) -> str:
        return _dump(
            {
                "subnets": [str(s) for s in self.subnets],
                "gateways": [str(g) for g in self.gateways],
                "settings": dict(self.settings),
                "vni": self.vni,
                "writer": self.writer,
            }
        )

    @classmethod
    def decode(cls, name: str, raw: bytes) -> Definition:
        d = json.loads(raw)
        return cls(
            name=name,
            subnets=tuple(ipaddress.ip_network(s) for s in d["subnets"]),
            gateways=tuple(ipaddress.ip_interface(g) for g in d["gateways"]),
            settings=tuple(sorted((str(k), str(v)) for k, v in d["settings"].items())),
            vni=int(d["vni"]),
            writer=str(d.get("writer", "")),
        )

    def differences(self, mine: Definition) -> list[str]:
        """How ``mine`` (this host's request) differs from this stored definition."""
        out = []
        if sorted(map(str, self.subnets)) != sorted(map(str, mine.subnets)):
            out.append(f"subnets: {_list(self.subnets)} in the cluster, {_list(mine.subnets)} here")
        if sorted(map(str, self.gateways)) != sorted(map(str, mine.gateways)):
            out.append(
                f"gateways: {_list(self.gateways)} in the cluster, {_list(mine.gateways)} here"
            )
        theirs, ours = dict(self.settings), dict(mine.settings)
        for key in sorted(set(theirs) | set(ours)):
            if theirs.get(key) != ours.get(key):
                out.append(
                    f"{key}: {theirs.get(key, 'unset')} in the cluster, {ours.get(key, 'unset')}"
                    " here"
                )
        return out


def _list(items: tuple[Any, ...]) -> str:
    return ", ".join(sorted(map(str, items))) or "none"


@dataclass(frozen=True)
class HostRecord:
    host: str
    vtep: IPAddress

    def encode(self) -> str:
        return _dump({"vtep": str(self.vtep)})

    @classmethod
    def decode(cls, host: str, raw: bytes) -> HostRecord:
        return cls(host, ipaddress.ip_address(json.loads(raw)["vtep"]))


@dataclass(frozen=True)
class EndpointRecord:
    """A container as the other hosts program it: its MAC through ``vtep``."""

    endpoint_id: str
    host: str
    vtep: IPAddress
    mac: str
    addresses: tuple[IPAddress, ...]
    #: The writer's clock when it wrote the record: the other hosts measure their watch lag
    #: with it (as good as the hosts' clocks agree).
    at: float = 0.0

    def encode(self) -> str:
        return _dump(
            {
                "host": self.host,
                "vtep": str(self.vtep),
                "mac": self.mac,
                "addresses": [str(a) for a in self.addresses],
                "at": self.at,
            }
        )

    @classmethod
    def decode(cls, endpoint_id: str, raw: bytes) -> EndpointRecord:
        d = json.loads(raw)
        return cls(
            endpoint_id=endpoint_id,
            host=str(d["host"]),
            vtep=ipaddress.ip_address(d["vtep"]),
            mac=str(d["mac"]),
            addresses=tuple(ipaddress.ip_address(a) for a in d["addresses"]),
            at=float(d.get("at", 0.0)),
        )


def owner_of(raw: bytes) -> str:
    """The host a block or pin record names."""
    return str(json.loads(raw)["host"])


def owner_record(host: str, nonce: str) -> str:
    """A block or pin value: the host, and a nonce so that a retried create recognises its
    own write and no other (etcd.create's rule)."""
    return _dump({"host": host, "nonce": nonce})


# --- blocks ------------------------------------------------------------------------------------
def block_prefixlen(subnet: IPNetwork) -> int:
    """The prefix length of the blocks a subnet is cut into."""
    bits = subnet.max_prefixlen
    # At least 2**MIN_BLOCKS_BITS blocks when the subnet is small; never below 4 addresses.
    return min(max(bits - BLOCK_BITS, subnet.prefixlen + MIN_BLOCKS_BITS), bits - 2)


def block_of(subnet: IPNetwork, address: IPAddress) -> IPNetwork:
    length = block_prefixlen(subnet)
    return ipaddress.ip_network(f"{address}/{length}", strict=False)


def blocks_in(subnet: IPNetwork, lo: int, hi: int) -> Iterator[IPNetwork]:
    """The blocks of ``subnet`` that overlap the address range [lo, hi], in order."""
    length = block_prefixlen(subnet)
    size = 1 << (subnet.max_prefixlen - length)
    start = lo - (lo - int(subnet.network_address)) % size
    for first in range(start, hi + 1, size):
        if subnet.version == 4:
            yield ipaddress.IPv4Network((first, length))
        else:
            yield ipaddress.IPv6Network((first, length))


def span(block: IPNetwork) -> tuple[int, int]:
    first = int(block.network_address)
    return first, first + block.num_addresses - 1
