"""The cluster's pure parts: key layout, records, address blocks, and the definition check."""

from __future__ import annotations

import ipaddress

import pytest

from pouch_driver.cluster import layout as lay
from pouch_driver.errors import InvalidOption
from pouch_driver.options import parse_network_options

net = ipaddress.ip_network


@pytest.mark.parametrize(
    ("subnet", "length"),
    [("10.0.0.0/16", 26), ("10.0.0.0/24", 28), ("10.0.0.0/28", 30), ("fd00:1::/64", 122)],
)
def test_blocks_are_64_addresses_or_smaller_in_small_subnets(subnet: str, length: int) -> None:
    assert lay.block_prefixlen(net(subnet)) == length


def test_blocks_cover_a_range_in_order_and_an_address_has_one_block() -> None:
    subnet = net("10.9.0.0/24")
    blocks = list(lay.blocks_in(subnet, int(subnet.network_address), int(subnet.broadcast_address)))
    assert (
        len(blocks) == 16 and blocks[0] == net("10.9.0.0/28") and blocks[-1] == net("10.9.0.240/28")
    )
    assert lay.block_of(subnet, ipaddress.ip_address("10.9.0.77")) == net("10.9.0.64/28")
    # A sub-range (--ip-range) starts at the block holding its first address.
    inner = list(
        lay.blocks_in(
            subnet, int(ipaddress.ip_address("10.9.0.70")), int(ipaddress.ip_address("10.9.0.90"))
        )
    )
    assert inner == [net("10.9.0.64/28"), net("10.9.0.80/28")]


def test_keys_round_trip() -> None:
    block = net("10.9.0.64/28")
    parsed = lay.parse_key(lay.block_key("mesh", block))
    assert parsed == lay.Key("blocks", "mesh", "10.9.0.64-28")
    assert lay.parse_block(parsed.item) == block
    assert lay.parse_key(lay.host_key("198.51.100.1")) == lay.Key("hosts", None, "198.51.100.1")
    assert lay.parse_key("/elsewhere/x") is None
    assert lay.parse_key(lay.ROOT + "endpoints/too/many/parts") is None


def test_definition_differences_name_each_field() -> None:
    first = lay.Definition(
        "mesh",
        (net("10.61.0.0/16"),),
        (ipaddress.ip_interface("10.61.0.1/16"),),
        (("internal", "false"), ("mtu", "default")),
        vni=5000,
        writer="h1/x",
    )
    same = lay.Definition.decode("mesh", first.encode())
    assert same == first and not first.differences(same)
    other = lay.Definition(
        "mesh",
        (net("10.62.0.0/16"),),
        (ipaddress.ip_interface("10.62.0.1/16"),),
        (("internal", "true"), ("mtu", "default")),
    )
    diffs = first.differences(other)
    assert diffs == [
        "subnets: 10.61.0.0/16 in the cluster, 10.62.0.0/16 here",
        "gateways: 10.61.0.1/16 in the cluster, 10.62.0.1/16 here",
        "internal: false in the cluster, true here",
    ]


def test_the_cluster_option_takes_plain_names_only() -> None:
    opts = parse_network_options({"pouch.cluster": "mesh-1"}, enable_ipv6=False, internal=False)
    assert opts.cluster == "mesh-1"
    for bad in ("", "Mesh", "a/b", "-x", "x" * 64):
        with pytest.raises(InvalidOption, match=r"option pouch\.cluster"):
            parse_network_options({"pouch.cluster": bad}, enable_ipv6=False, internal=False)
