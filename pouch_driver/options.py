"""Parse and validate the options users pass (``-o``, ``--ipam-opt``, ``--driver-opt``).

Pure: strings in, typed values or ``InvalidOption`` naming the option out. We accept Docker's
own bridge keys so switching drivers means changing only ``-d``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Collection, Mapping
from typing import TypeVar

from .errors import InvalidOption
from .model import (
    OPT_BRIDGE_NAME,
    OPT_CLUSTER,
    OPT_ENABLE_ICC,
    OPT_ENABLE_IPV4,
    OPT_ENABLE_IPV6,
    OPT_ENABLE_MASQ,
    OPT_GATEWAY_MODE_IPV4,
    OPT_GATEWAY_MODE_IPV6,
    OPT_HOST_BINDING_IPV4,
    OPT_HOST_IPV4,
    OPT_HOST_IPV6,
    OPT_IFACE_PREFIX,
    OPT_INHIBIT_IPV4,
    OPT_INTERNAL,
    OPT_MTU,
    OPT_TRUSTED_INTERFACES,
    GatewayMode,
    IPNetwork,
    NetworkOptions,
)
from .naming import validate_user_ifname

log = logging.getLogger(__name__)

MIN_MTU, MAX_MTU = 68, 65535
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}
# The engine names the container's interface DstPrefix + a counter (eth0, eth1): the prefix
# leaves room for three digits within the kernel's 15 bytes.
_CLUSTER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_IFACE_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,11}$")

#: The bridge options users pass with ``-o``, as Docker's bridge driver names them.
NETWORK_OPTIONS = (
    OPT_BRIDGE_NAME,
    OPT_MTU,
    OPT_ENABLE_ICC,
    OPT_ENABLE_MASQ,
    OPT_HOST_BINDING_IPV4,
    OPT_GATEWAY_MODE_IPV4,
    OPT_GATEWAY_MODE_IPV6,
    OPT_TRUSTED_INTERFACES,
    OPT_INHIBIT_IPV4,
    OPT_HOST_IPV4,
    OPT_HOST_IPV6,
    OPT_IFACE_PREFIX,
    OPT_CLUSTER,
)
#: Keys of the engine's own that may sit in the generic map (docs/protocol.md §3.2, §3.4): the
#: engine acts on them itself, so they are never refused.
ENGINE_OPTIONS = (OPT_ENABLE_IPV6, OPT_ENABLE_IPV4, OPT_INTERNAL)
ENGINE_PREFIXES = ("com.docker.network.endpoint.", "com.docker.network.driver.private.")


def _is_engine_key(key: str) -> bool:
    return key in ENGINE_OPTIONS or key.startswith(ENGINE_PREFIXES)


def parse_bool(key: str, value: str) -> bool:
    """Booleans as Go's strconv.ParseBool reads them, which is what Docker users type."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidOption(f"option {key}: {value!r} is not a boolean (use true or false)")


def parse_gateway_mode(key: str, value: str, *, internal: bool) -> GatewayMode:
    try:
        mode = GatewayMode(value)
    except ValueError:
        raise InvalidOption(
            f"option {key}: {value!r} is not a gateway mode (use "
            + ", ".join(m.value for m in GatewayMode)
            + ")"
        ) from None
    if mode is GatewayMode.ISOLATED and not internal:
        # Docker's bridge driver refuses it too: "isolated" is an internal network whose
        # bridge has no address of that family.
        raise InvalidOption(
            f"option {key}: isolated is only for an internal network (add --internal)"
        )
    return mode


def parse_interfaces(key: str, value: str) -> tuple[str, ...]:
    """Colon-separated interface names, empty items skipped (as Docker splits them)."""
    names: list[str] = []
    for name in value.split(":"):
        if name and name not in names:
            names.append(validate_user_ifname(name, key))
    return tuple(names)


_Addr = TypeVar("_Addr", ipaddress.IPv4Address, ipaddress.IPv6Address)


def parse_source_address(key: str, value: str, kind: type[_Addr]) -> _Addr:
    """An address masqueraded traffic leaves with (SNAT --to-source)."""
    try:
        ip = kind(value)
    except ValueError:
        raise InvalidOption(
            f"option {key}: {value!r} is not an IPv{4 if kind is ipaddress.IPv4Address else 6} "
            "address"
        ) from None
    if ip.is_unspecified or ip.is_multicast:
        raise InvalidOption(
            f"option {key}: {value} cannot be a source address (use an address of this host)"
        )
    return ip


def parse_iface_prefix(value: str) -> str:
    if not _IFACE_PREFIX_RE.fullmatch(value):
        raise InvalidOption(
            f"option {OPT_IFACE_PREFIX}: {value!r} is not a valid interface name prefix "
            "(1-12 characters from A-Z a-z 0-9 _, starting with a letter)"
        )
    return value


def parse_network_options(
    generic: Mapping[str, str], *, enable_ipv6: bool, internal: bool, enable_ipv4: bool = True
) -> NetworkOptions:
    unknown = sorted(k for k in generic if k not in NETWORK_OPTIONS and not _is_engine_key(k))
    if unknown:
        raise InvalidOption(
            f"option {unknown[0]} is not supported by pouch-driver; supported options: "
            + ", ".join(NETWORK_OPTIONS)
        )
    bridge_name = generic.get(OPT_BRIDGE_NAME)
    if bridge_name is not None:
        validate_user_ifname(bridge_name, OPT_BRIDGE_NAME)
    mtu: int | None = None
    if (raw_mtu := generic.get(OPT_MTU)) is not None:
        if not raw_mtu.isascii() or not raw_mtu.isdigit() or len(raw_mtu) > 5:
            raise InvalidOption(f"option {OPT_MTU}: {raw_mtu!r} is not a number")
        mtu = int(raw_mtu, 10)
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise InvalidOption(f"option {OPT_MTU}: {mtu} is outside {MIN_MTU}-{MAX_MTU}")
    host_ip: ipaddress.IPv4Address | None = None
    if (raw_ip := generic.get(OPT_HOST_BINDING_IPV4)) is not None:
        try:
            host_ip = ipaddress.IPv4Address(raw_ip)
        except ValueError:
            raise InvalidOption(
                f"option {OPT_HOST_BINDING_IPV4}: {raw_ip!r} is not an IPv4 address"
            ) from None
    # Engines 27+ may leave enable_ipv6 inside the generic map too (docs/protocol.md §3.2).
    if OPT_ENABLE_IPV6 in generic:
        enable_ipv6 = parse_bool(OPT_ENABLE_IPV6, generic[OPT_ENABLE_IPV6]) or enable_ipv6
    # ...and enable_ipv4 on 28+ (an IPv6-only network); the engine's own field counts too.
    if OPT_ENABLE_IPV4 in generic:
        enable_ipv4 = parse_bool(OPT_ENABLE_IPV4, generic[OPT_ENABLE_IPV4]) and enable_ipv4
    modes = {
        key: parse_gateway_mode(key, generic[key], internal=internal)
        for key in (OPT_GATEWAY_MODE_IPV4, OPT_GATEWAY_MODE_IPV6)
        if key in generic
    }
    raw_v4, raw_v6 = generic.get(OPT_HOST_IPV4), generic.get(OPT_HOST_IPV6)
    raw_prefix = generic.get(OPT_IFACE_PREFIX)
    return NetworkOptions(
        bridge_name=bridge_name,
        mtu=mtu,
        enable_icc=parse_bool(OPT_ENABLE_ICC, generic.get(OPT_ENABLE_ICC, "true")),
        enable_masquerade=parse_bool(OPT_ENABLE_MASQ, generic.get(OPT_ENABLE_MASQ, "true")),
        host_binding_ipv4=host_ip,
        internal=internal,
        enable_ipv6=enable_ipv6,
        enable_ipv4=enable_ipv4,
        gateway_mode_ipv4=modes.get(OPT_GATEWAY_MODE_IPV4, GatewayMode.NAT),
        gateway_mode_ipv6=modes.get(OPT_GATEWAY_MODE_IPV6, GatewayMode.NAT),
        trusted_host_interfaces=parse_interfaces(
            OPT_TRUSTED_INTERFACES, generic.get(OPT_TRUSTED_INTERFACES, "")
        ),
        inhibit_ipv4=parse_bool(OPT_INHIBIT_IPV4, generic.get(OPT_INHIBIT_IPV4, "false")),
        host_ipv4=(
            parse_source_address(OPT_HOST_IPV4, raw_v4, ipaddress.IPv4Address)
            if raw_v4 is not None
            else None
        ),
        host_ipv6=(
            parse_source_address(OPT_HOST_IPV6, raw_v6, ipaddress.IPv6Address)
            if raw_v6 is not None
            else None
        ),
        container_iface_prefix=parse_iface_prefix(raw_prefix) if raw_prefix is not None else None,
        cluster=parse_cluster(generic[OPT_CLUSTER]) if OPT_CLUSTER in generic else None,
    )


def parse_cluster(value: str) -> str:
    """A cluster network name: it becomes part of etcd keys, so it is kept plain."""
    if not _CLUSTER_NAME_RE.fullmatch(value):
        raise InvalidOption(
            f"option {OPT_CLUSTER}: {value!r} is not a cluster network name (1-63 of a-z, 0-9, "
            "'.', '_', '-', starting with a letter or digit)"
        )
    return value


def check_address_families(
    options: NetworkOptions, ipv4: Collection[IPNetwork], ipv6: Collection[IPNetwork]
) -> None:
    """An IPv6-only network has IPv6 pools and no IPv4 ones.

    Engines before 28 do not read ``enable_ipv4``: they still allocate IPv4 pools and put
    IPv4 addresses into the containers, which no remote driver can prevent.
    """
    if options.enable_ipv4:
        return
    if ipv4:
        raise InvalidOption(
            f"option {OPT_ENABLE_IPV4}=false: this engine does not honour it (it allocated "
            + ", ".join(str(p) for p in ipv4)
            + " and would give containers IPv4 addresses anyway); IPv6-only networks need "
            "Docker Engine 28 or later"
        )
    if not ipv6:
        raise InvalidOption(
            f"option {OPT_ENABLE_IPV4}=false: an IPv6-only network needs IPv6 (add --ipv6 and "
            "an IPv6 subnet)"
        )


def parse_ipam_options(options: Mapping[str, str]) -> None:
    """Our IPAM takes no ``--ipam-opt``; refuse them rather than silently ignoring."""
    if options:
        key = sorted(options)[0]
        raise InvalidOption(f"IPAM option {key} is not supported by pouch-driver")


def check_endpoint_options(options: Mapping[str, object]) -> None:
    """Per-endpoint ``--driver-opt`` arrive as top-level keys; we read none of them.

    Like Docker's bridge driver, unknown keys are accepted and ignored, so a ``network
    connect --driver-opt`` meant for another driver (or for the engine) does not fail. Keys in
    the engine's own namespace (``com.docker.``: port maps, DNS, the MAC, sysctls) are the
    engine's business; the MAC is read from ``Interface.MacAddress`` instead.
    """
    for key in sorted(options):
        if not key.startswith("com.docker."):
            log.debug("endpoint option %s is not one pouch-driver reads: ignored", key)
