"""Pure naming rules: interface names, chain names and MACs derived from engine IDs.

Everything that becomes a kernel name passes through here, so nothing unchecked reaches
netlink or iptables. No I/O.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

from .errors import InvalidOption, InvalidRequest

IFNAMSIZ = 15  # usable bytes of a Linux interface name (IFNAMSIZ - 1 for the NUL)

_PREFIX_RE = re.compile(r"^[a-z]{1,3}$")
# The engine's IDs are 64 lowercase hex; swarm uses 25-char base36. Anything else is refused
# before it can reach a name, a path or a log line unescaped.
_ID_RE = re.compile(r"^[0-9a-z]{12,64}$")
# Interface names the user may choose: what iproute2 accepts, minus shell and path specials.
_USER_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def validate_prefix(prefix: str) -> str:
    """The instance prefix marks every object we create; 1-3 lowercase letters."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"prefix {prefix!r} must be 1-3 lowercase letters")
    return prefix


def validate_id(value: str, field_name: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise InvalidRequest(
            f"{field_name} must be 12-64 lowercase letters or digits, got {value!r}"
        )
    return value


def validate_user_ifname(value: str, option: str) -> str:
    if not _USER_IFNAME_RE.fullmatch(value) or len(value.encode()) > IFNAMSIZ:
        raise InvalidOption(
            f"option {option}: {value!r} is not a valid interface name "
            "(1-15 characters from A-Z a-z 0-9 _ . -, not starting with . - or _)"
        )
    return value


def normalize_mac(value: str, field_name: str) -> str:
    mac = value.strip().lower().replace("-", ":")
    if not _MAC_RE.fullmatch(mac):
        raise InvalidRequest(f"{field_name}: {value!r} is not a MAC address like 02:42:ac:11:00:02")
    if int(mac[:2], 16) & 1:
        raise InvalidRequest(f"{field_name}: {value!r} is a multicast MAC address")
    return mac


class Names:
    """Names of the kernel objects of one plugin instance, all carrying its prefix.

    Bridge ``<p>b<id>``, host-side veth ``<p>h<id>``, container-side veth ``<p>c<id>``: the
    ID part fills the name up to 15 bytes, so objects stay recognisable as ours (and whose)
    from ``ip link`` alone, which is what lets start-up remove orphans safely.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = validate_prefix(prefix)
        self._id_len = IFNAMSIZ - len(prefix) - 1
        self._owned_re = re.compile(
            # IDs have at least 12 characters: a shorter tail is someone else's name.
            rf"^{re.escape(prefix)}([bhcx])([0-9a-z]{{{min(12, self._id_len)},{self._id_len}}})$"
        )
        chain = prefix.upper()
        self.chain_forward = f"{chain}-FORWARD"
        self.chain_isolation = f"{chain}-ISOLATION"
        self.chain_isolation2 = f"{chain}-ISOLATION-2"
        self.chain_postrouting = f"{chain}-POSTROUTING"
        self.chain_dnat = f"{chain}-DNAT"
        self.chain_raw = f"{chain}-RAW"
        self.comment = f"{prefix}-driver"

    def bridge(self, network_id: str) -> str:
        return f"{self.prefix}b{network_id[: self._id_len]}"

    def host_veth(self, endpoint_id: str) -> str:
        return f"{self.prefix}h{endpoint_id[: self._id_len]}"

    def container_veth(self, endpoint_id: str) -> str:
        return f"{self.prefix}c{endpoint_id[: self._id_len]}"

    def vxlan(self, network_id: str) -> str:
        """The VXLAN port of a cluster network's bridge."""
        return f"{self.prefix}x{network_id[: self._id_len]}"

    def owned_kind(self, ifname: str) -> str | None:
        """``"bridge"``, ``"host"``, ``"container"`` or ``"vxlan"`` if the name is one we
        generate."""
        m = self._owned_re.fullmatch(ifname)
        if not m:
            return None
        return {"b": "bridge", "h": "host", "c": "container", "x": "vxlan"}[m.group(1)]

    def net_chain(self, part: str, bridge: str) -> str:
        """The chain holding one network's rules of one part of the firewall (``NET_CHAINS``):
        a change to that network rewrites this chain, not every network's."""
        return f"{self.prefix.upper()}-{part}-{bridge}"

    def port_chain(self, part: str, bridge: str, bucket: int) -> str:
        """One of the chains (``PORT_BUCKETS`` per part) sharing a network's published-port
        rules of one part, jumped to from ``net_chain``: removing a port is an edit by
        position, and ``iptables-restore`` (nf_tables) reads the rules of the chain it edits,
        so a port's cost follows the size of its bucket, not the number of ports."""
        return f"{self.net_chain(part, bridge)}-{bucket:x}"

    def dispatch_chain(self, part: str, key: str) -> str:
        """One of the chains the top-level chain of a part spreads its jumps over (a bridge
        name's first letter after ours, or a hash of it): adding or removing a network edits
        a chain of a few rules, not one of a rule per network. ``=`` is in no interface name,
        so this never names a network's own chain."""
        return f"{self.prefix.upper()}-{part}-={key}"

    def bridged_set(self, version: int) -> str:
        """The ipset of our bridges whose containers talk to each other (icc), per family."""
        return f"{self.prefix.upper()}-ICC{version}"

    def is_net_chain(self, chain: str) -> bool:
        head = f"{self.prefix.upper()}-"
        return (
            chain.startswith(head)
            and len(chain) > len(head) + 2
            and chain[len(head)] in NET_CHAINS
            and chain[len(head) + 1] == "-"
        )

    def all_chains(self) -> tuple[str, ...]:
        return (
            self.chain_forward,
            self.chain_isolation,
            self.chain_isolation2,
            self.chain_postrouting,
            self.chain_dnat,
            self.chain_raw,
        )


#: How many chains a network's published-port rules of one part are spread over.
PORT_BUCKETS = 16
#: How many chains the top-level NAT chains spread their jumps over (by a hash of the bridge).
DISPATCH_BUCKETS = 16

#: Per-network chains, by the letter after the prefix: the table each lives in.
NET_CHAINS = {"I": "mangle", "F": "filter", "N": "nat", "D": "nat", "R": "raw"}


def endpoint_mac(endpoint_id: str, address: ipaddress.IPv4Interface | None) -> str:
    """A stable, locally administered unicast MAC for an endpoint.

    Derived from the IPv4 address when there is one (as Docker's bridge does), so a reused
    address keeps its MAC and neighbours' ARP caches stay right; else from the endpoint ID.
    """
    if address is not None:
        tail = address.ip.packed
    else:
        tail = hashlib.sha256(endpoint_id.encode()).digest()[:4]
    return ":".join(f"{b:02x}" for b in (0x02, 0x50, *tail))


def bridge_mac(network_id: str) -> str:
    """A fixed bridge MAC: otherwise a bridge takes its lowest port's MAC, which changes."""
    digest = hashlib.sha256(network_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, 0x51, *digest[:4]))
