"""Parse and validate the options users pass (``-o``, ``--ipam-opt``, ``--driver-opt``).

Pure: strings in, typed values or ``InvalidOption`` naming the option out. We accept Docker's
own bridge keys so switching drivers means changing only ``-d``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping

from .errors import InvalidOption
from .model import (
    OPT_BRIDGE_NAME,
    OPT_ENABLE_ICC,
    OPT_ENABLE_IPV4,
    OPT_ENABLE_IPV6,
    OPT_ENABLE_MASQ,
    OPT_HOST_BINDING_IPV4,
    OPT_MTU,
    NetworkOptions,
)
from .naming import validate_user_ifname

log = logging.getLogger(__name__)

MIN_MTU, MAX_MTU = 68, 65535
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}

NETWORK_OPTIONS = (
    OPT_BRIDGE_NAME,
    OPT_MTU,
    OPT_ENABLE_ICC,
    OPT_ENABLE_MASQ,
    OPT_HOST_BINDING_IPV4,
    OPT_ENABLE_IPV6,
    OPT_ENABLE_IPV4,
)


def parse_bool(key: str, value: str) -> bool:
    """Booleans as Go's strconv.ParseBool reads them, which is what Docker users type."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidOption(f"option {key}: {value!r} is not a boolean (use true or false)")


def parse_network_options(
    generic: Mapping[str, str], *, enable_ipv6: bool, internal: bool
) -> NetworkOptions:
    unknown = sorted(k for k in generic if k not in NETWORK_OPTIONS)
    if unknown:
        raise InvalidOption(
            f"option {unknown[0]} is not supported by pouch-driver; supported options: "
            + ", ".join(NETWORK_OPTIONS[:5])
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
    if OPT_ENABLE_IPV4 in generic and not parse_bool(OPT_ENABLE_IPV4, generic[OPT_ENABLE_IPV4]):
        raise InvalidOption(f"option {OPT_ENABLE_IPV4}: IPv6-only networks are not supported")
    return NetworkOptions(
        bridge_name=bridge_name,
        mtu=mtu,
        enable_icc=parse_bool(OPT_ENABLE_ICC, generic.get(OPT_ENABLE_ICC, "true")),
        enable_masquerade=parse_bool(OPT_ENABLE_MASQ, generic.get(OPT_ENABLE_MASQ, "true")),
        host_binding_ipv4=host_ip,
        internal=internal,
        enable_ipv6=enable_ipv6,
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
