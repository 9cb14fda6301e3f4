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
from pouch_driver.naming import (
    IFNAMSIZ,
    Names,
    endpoint_mac,
    normalize_mac,
    validate_id,
    validate_user_ifname,
)
from pouch_driver.options import check_endpoint_options, parse_bool, parse_network_options


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
        ("com.docker.network.enable_ipv4", "false"),
        ("com.docker.network.bridge.gateway_mode_ipv4", "routed"),
    ],
)
def test_bad_network_options_name_the_option(key: str, value: str) -> None:
    with pytest.raises(InvalidOption, match=key):
        parse_network_options({key: value}, enable_ipv6=False, internal=False)


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
