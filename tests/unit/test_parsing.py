"""Pure parsing: names, options, settings and schemas name what is wrong."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from marshmallow import ValidationError

from pouch_driver.config import Settings, from_environ, parse_pools
from pouch_driver.errors import InvalidOption, InvalidRequest
from pouch_driver.http import schemas
from pouch_driver.model import GatewayMode, NetworkOptions
from pouch_driver.naming import (
    IFNAMSIZ,
    Names,
    endpoint_mac,
    normalize_mac,
    validate_id,
    validate_user_ifname,
)
from pouch_driver.options import (
    check_address_families,
    check_endpoint_options,
    parse_bool,
    parse_network_options,
)


@given(
    st.text(alphabet="0123456789abcdefghijklmnopqrstuvwxyz", min_size=12, max_size=64),
    st.sampled_from(["p", "pd", "pdx"]),
)
def test_generated_names_fit_ifnamsiz_and_are_recognised(ident: str, prefix: str) -> None:
    names = Names(prefix)
    for name, kind in (
        (names.bridge(ident), "bridge"),
        (names.host_veth(ident), "host"),
        (names.container_veth(ident), "container"),
    ):
        assert len(name.encode()) <= IFNAMSIZ
        assert names.owned_kind(name) == kind
    assert Names("zz").owned_kind(names.bridge(ident)) is None or prefix.startswith("zz")


@pytest.mark.parametrize("bad", ["x;reboot", "../etc", "a b", "", "-x", "x" * 16, "é"])
def test_user_interface_names_are_checked(bad: str) -> None:
    with pytest.raises(InvalidOption, match=r"com\.docker\.network\.bridge\.name"):
        validate_user_ifname(bad, "com.docker.network.bridge.name")


@pytest.mark.parametrize("bad", ["../../x", "ABC" * 10, "a" * 11, "a" * 65, "abc def ghi jk"])
def test_ids_are_checked(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="NetworkID"):
        validate_id(bad, "NetworkID")


def test_macs() -> None:
    assert normalize_mac("02-42-AC-11-00-02", "m") == "02:42:ac:11:00:02"
    with pytest.raises(InvalidRequest, match="multicast"):
        normalize_mac("01:00:5e:00:00:01", "m")
    mac = endpoint_mac("a" * 64, ipaddress.IPv4Interface("10.1.2.3/24"))
    assert mac == "02:50:0a:01:02:03"
    assert endpoint_mac("a" * 64, None) == endpoint_mac("a" * 64, None)


def test_network_options() -> None:
    opts = parse_network_options(
        {
            "com.docker.network.bridge.name": "br0",
            "com.docker.network.driver.mtu": "9000",
            "com.docker.network.bridge.enable_icc": "False",
            "com.docker.network.bridge.enable_ip_masquerade": "0",
            "com.docker.network.bridge.host_binding_ipv4": "127.0.0.1",
        },
        enable_ipv6=False,
        internal=True,
    )
    assert (opts.bridge_name, opts.mtu, opts.enable_icc, opts.enable_masquerade) == (
        "br0",
        9000,
        False,
        False,
    )
    assert str(opts.host_binding_ipv4) == "127.0.0.1" and opts.internal
    assert parse_network_options(
        {"com.docker.network.enable_ipv6": "true"}, enable_ipv6=False, internal=False
    ).enable_ipv6


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("com.docker.network.driver.mtu", "12"),
        ("com.docker.network.driver.mtu", "1e3"),
        ("com.docker.network.bridge.host_binding_ipv4", "::1"),
        ("com.docker.network.bridge.enable_icc", "yes"),
    ],
)
def test_bad_network_options_name_the_option(key: str, value: str) -> None:
    with pytest.raises(InvalidOption, match=key):
        parse_network_options({key: value}, enable_ipv6=False, internal=False)


GW4 = "com.docker.network.bridge.gateway_mode_ipv4"
GW6 = "com.docker.network.bridge.gateway_mode_ipv6"
TRUSTED = "com.docker.network.bridge.trusted_host_interfaces"
INHIBIT = "com.docker.network.bridge.inhibit_ipv4"
HOST4, HOST6 = "com.docker.network.host_ipv4", "com.docker.network.host_ipv6"
PREFIX = "com.docker.network.container_iface_prefix"


def _parse(generic: dict[str, str], *, internal: bool = False) -> NetworkOptions:
    return parse_network_options(generic, enable_ipv6=True, internal=internal)


def test_engine_27_to_29_bridge_options_parse() -> None:
    o = _parse(
        {
            GW4: "routed",
            GW6: "nat-unprotected",
            TRUSTED: "eth1::vxlan.1:eth1",
            INHIBIT: "true",
            HOST4: "10.9.8.7",
            HOST6: "2001:db8::7",
            PREFIX: "lan",
        }
    )
    assert (o.gateway_mode_ipv4, o.gateway_mode_ipv6) == (
        GatewayMode.ROUTED,
        GatewayMode.NAT_UNPROTECTED,
    )
    assert o.trusted_host_interfaces == ("eth1", "vxlan.1")  # empty items and repeats dropped
    assert o.inhibit_ipv4
    assert (str(o.host_ipv4), str(o.host_ipv6)) == ("10.9.8.7", "2001:db8::7")
    assert o.container_iface_prefix == "lan"
    isolated = _parse({GW4: "isolated", GW6: "nat"}, internal=True)
    assert (isolated.gateway_mode_ipv4, isolated.gateway_mode_ipv6) == (
        GatewayMode.ISOLATED,
        GatewayMode.NAT,
    )


def test_defaults_are_todays_behaviour() -> None:
    o = _parse({})
    assert (o.gateway_mode_ipv4, o.gateway_mode_ipv6) == (GatewayMode.NAT, GatewayMode.NAT)
    assert o.trusted_host_interfaces == () and not o.inhibit_ipv4 and o.enable_ipv4
    assert o.host_ipv4 is None and o.host_ipv6 is None and o.container_iface_prefix is None
    assert o == NetworkOptions(enable_ipv6=True)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        (GW4, "bridge", "is not a gateway mode (use nat, nat-unprotected, routed, isolated)"),
        (GW6, "NAT", "is not a gateway mode (use nat, nat-unprotected, routed, isolated)"),
        (GW4, "isolated", "isolated is only for an internal network (add --internal)"),
        (GW6, "isolated", "isolated is only for an internal network (add --internal)"),
        (TRUSTED, "eth0:x;reboot", "'x;reboot' is not a valid interface name"),
        (TRUSTED, "a" * 16, "is not a valid interface name (1-15 characters"),
        (INHIBIT, "yes", "is not a boolean (use true or false)"),
        (HOST4, "fd70::1", "'fd70::1' is not an IPv4 address"),
        (HOST4, "0.0.0.0", "0.0.0.0 cannot be a source address"),
        (HOST4, "224.0.0.1", "cannot be a source address"),
        (HOST6, "10.0.0.1", "'10.0.0.1' is not an IPv6 address"),
        (HOST6, "::", ":: cannot be a source address"),
        (PREFIX, "eth 0", "is not a valid interface name prefix (1-12 characters"),
        (PREFIX, "0eth", "starting with a letter"),
        (PREFIX, "abcdefghijklm", "is not a valid interface name prefix"),
        (PREFIX, "", "is not a valid interface name prefix"),
        (PREFIX, "a/b", "is not a valid interface name prefix"),
    ],
)
def test_bad_bridge_options_say_what_is_accepted(key: str, value: str, says: str) -> None:
    with pytest.raises(InvalidOption) as exc:
        _parse({key: value})
    assert str(exc.value).startswith(f"option {key}: "), exc.value
    assert says in str(exc.value), exc.value


@pytest.mark.parametrize(
    "key",
    [
        "com.docker.network.enable_ipv4",
        "com.docker.network.enable_ipv6",
        "com.docker.network.internal",
        "com.docker.network.endpoint.sysctls",
        "com.docker.network.endpoint.ifname",
        "com.docker.network.driver.private.no_proxy_6to4",
    ],
)
def test_engine_keys_in_the_generic_map_are_never_refused(key: str) -> None:
    _parse({key: "true"})


def test_unknown_keys_are_still_refused_listing_what_we_take() -> None:
    with pytest.raises(InvalidOption, match=r"option com\.example\.x is not supported") as exc:
        _parse({"com.example.x": "1"})
    assert GW4 in str(exc.value) and PREFIX in str(exc.value)


def test_ipv6_only_networks() -> None:
    """Engine 28 honours ``-o com.docker.network.enable_ipv4=false`` and sends no IPv4 pool;
    older engines still allocate one, which we cannot keep out of the containers."""
    v6 = [ipaddress.ip_network("fd70:1::/64")]
    v4 = [ipaddress.ip_network("10.70.0.0/24")]
    o = _parse({"com.docker.network.enable_ipv4": "false"})
    assert not o.enable_ipv4
    check_address_families(o, [], v6)
    with pytest.raises(InvalidOption, match=r"does not honour it \(it allocated 10\.70\.0\.0/24"):
        check_address_families(o, v4, v6)
    with pytest.raises(InvalidOption, match=r"needs IPv6 \(add --ipv6"):
        check_address_families(o, [], [])
    # --ipv4=false through the engine's own field (28+), the generic map silent:
    field = parse_network_options({}, enable_ipv6=True, internal=False, enable_ipv4=False)
    assert not field.enable_ipv4
    check_address_families(_parse({}), v4, [])  # the usual case has nothing to say


def test_parse_bool_reads_go_booleans() -> None:
    assert parse_bool("k", "T") and not parse_bool("k", "FALSE")


def test_settings_from_environment_and_flags() -> None:
    s = from_environ(
        {
            "POUCH_DRIVER_SOCKET": "/tmp/x.sock",
            "POUCH_DRIVER_LOG_LEVEL": "DEBUG",
            "POUCH_DRIVER_POOLS_V4": "10.50.0.0/16:26",
        },
        state_dir=Path("/tmp/st"),
    )
    assert s.socket == Path("/tmp/x.sock") and s.driver_name == "x"
    assert s.log_level == "debug" and s.state_dir == Path("/tmp/st")
    assert s.pools_v4[0].size == 26
    with pytest.raises(ValueError, match="POUCH_DRIVER_REQUEST_TIMEOUT"):
        from_environ({"POUCH_DRIVER_REQUEST_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="prefix"):
        Settings(prefix="Bad1")
    with pytest.raises(ValueError, match="longer than 107"):
        Settings(socket=Path("/" + "x" * 120))


@pytest.mark.parametrize(
    "bad", ["10.0.0.0/8", "10.0.0.0/8:7", "10.0.0.1/8:24", "fd00::/48:64", "x:24", "10.0.0.0/8:31"]
)
def test_bad_pool_settings(bad: str) -> None:
    with pytest.raises(ValueError, match=r"pool|IPv|does not appear|has host bits"):
        parse_pools(bad, v6=False)


def test_schema_errors_name_nested_fields() -> None:
    with pytest.raises(ValidationError) as exc:
        schemas.CreateEndpointRequest().load(
            {
                "NetworkID": "a" * 64,
                "EndpointID": "b" * 64,
                "Interface": {"Address": "fd70::1/64", "MacAddress": "nope"},
            }
        )
    flat = schemas.flatten_errors(exc.value.messages)
    assert any(line.startswith("Interface.MacAddress:") for line in flat)
    assert any(line.startswith("Interface.Address:") for line in flat)


def test_responses_go_through_schemas() -> None:
    out = schemas.JoinResponse().dump(
        {
            "interface_name": {"src_name": "pdc1", "dst_prefix": "eth"},
            "gateway": "10.0.0.1",
            "disable_gateway_service": False,
        }
    )
    assert out == {
        "InterfaceName": {"SrcName": "pdc1", "DstPrefix": "eth"},
        "Gateway": "10.0.0.1",
        "DisableGatewayService": False,
    }


def test_endpoint_options_we_do_not_read_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """Per-endpoint ``--driver-opt`` keys meant for other drivers pass, named at debug."""
    with caplog.at_level("DEBUG", logger="pouch_driver.options"):
        check_endpoint_options({"com.example.foo": "bar", "com.docker.network.endpoint.x": "1"})
    messages = [r.getMessage() for r in caplog.records]
    assert any("com.example.foo" in m and "ignored" in m for m in messages), messages
    assert not any("com.docker.network.endpoint.x" in m for m in messages)
