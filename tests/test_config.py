"""Config validation must accept exactly what flanneld accepts, with the same defaults."""

import ipaddress
import json

import pytest
from hypothesis import given, strategies as st

from fastlane.config import ConfigError, parse_config


def test_reference_example_defaults():
    c = parse_config('{"Network":"10.1.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}')
    assert str(c.network) == "10.1.0.0/16"
    assert c.subnet_len == 24
    assert str(c.subnet_min) == "10.1.1.0"  # the first subnet is skipped
    assert str(c.subnet_max) == "10.1.255.0"  # the last subnet is usable
    assert c.backend_type == "udp"


def test_missing_backend_means_udp_and_type_is_lowercased():
    assert parse_config('{"Network":"10.1.0.0/16"}').backend_type == "udp"
    assert parse_config('{"Network":"10.1.0.0/16","Backend":{"Type":"VXLAN"}}').backend_type == "vxlan"


def test_keys_are_case_insensitive_last_duplicate_wins_null_ignored():
    c = parse_config('{"network":"10.2.0.0/16","SUBNETLEN":26,"subnetlen":25,"SubnetMin":null}')
    assert str(c.network) == "10.2.0.0/16" and c.subnet_len == 25
    assert str(c.subnet_min) == "10.2.0.128"


def test_backend_option_lookup_ignores_case():
    c = parse_config('{"Network":"10.1.0.0/16","Backend":{"Type":"udp","port":9000}}')
    assert c.backend_option("Port") == 9000
    assert c.backend_option("Missing", 8285) == 8285


@pytest.mark.parametrize(
    "network,expected_len",
    [("10.0.0.0/8", 24), ("10.1.0.0/16", 24), ("10.1.0.0/22", 24), ("10.1.0.0/23", 25),
     ("10.1.0.0/26", 28), ("10.1.0.0/28", 30)],
)
def test_default_subnet_len(network, expected_len):
    assert parse_config(json.dumps({"Network": network})).subnet_len == expected_len


@pytest.mark.parametrize(
    "text,needle",
    [
        ("{not json", "not valid JSON"),
        ("[1,2]", "JSON object"),
        ("{}", "Network"),
        ('{"Network":"10.1.0.0/29"}', "Minimum useful network prefix is /28"),
        ('{"Network":"10.1.0.0/16","SubnetLen":31}', "SubnetLen must be less than /31"),
        ('{"Network":"10.1.0.0/16","SubnetLen":17}', "at least four subnets"),
        ('{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0"}', "SubnetMin 10.2.0.0 is not in the range"),
        ('{"Network":"10.1.0.0/16","SubnetMax":"10.1.3.5"}', "SubnetMax is not on a SubnetLen boundary"),
        ('{"Network":"10.1.0.0"}', "Network"),
        ('{"Network":"fd00::/64"}', "IPv4"),
        ('{"Network":"10.1.0.0/16","SubnetLen":"24"}', "SubnetLen"),
        ('{"Network":"10.1.0.0/16","SubnetLen":24.5}', "SubnetLen"),
        ('{"Network":"10.1.0.0/16","Backend":"udp"}', "Backend"),
        ('{"Network":"10.1.0.0/16","EnableIPv4":"yes"}', "EnableIPv4"),
        ('{"EnableIPv6":true,"Network":"10.1.0.0/16"}', "IPv6Network"),
    ],
)
def test_bad_configs_give_one_line_errors(text, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_ipv6_defaults():
    c = parse_config('{"EnableIPv6":true,"IPv6Network":"fd00:1::/56","Network":"10.1.0.0/16"}')
    assert c.ipv6_subnet_len == 64
    assert str(c.ipv6_subnet_min) == "fd00:1:0:1::"


def _flannel_accepts(prefix: int, subnet_len: int) -> bool:
    """Reference: flannel's CheckNetworkConfig rules for Network prefix / SubnetLen only."""
    if prefix == 0:  # 0.0.0.0/0 is flannel's empty IP4Net: "please define a correct Network"
        return False
    if subnet_len == 0:
        return prefix <= 28
    return subnet_len <= 30 and subnet_len >= prefix + 2


@given(st.integers(0, 32), st.integers(0, 32), st.integers(0, 2**32 - 1))
def test_accepts_exactly_what_flannel_accepts(prefix, subnet_len, base):
    net = ipaddress.IPv4Network((base, prefix), strict=False)
    cfg = {"Network": str(net)}
    if subnet_len:
        cfg["SubnetLen"] = subnet_len
    try:
        c = parse_config(json.dumps(cfg))
    except ConfigError:
        assert not _flannel_accepts(prefix, subnet_len)
        return
    assert _flannel_accepts(prefix, subnet_len)
    size = 1 << (32 - c.subnet_len)
    assert int(c.subnet_min) == int(net.network_address) + size
    assert int(c.subnet_max) == int(net.broadcast_address) + 1 - size
    assert c.subnet_min in net and c.subnet_max in net


@given(st.integers(8, 28), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_subnet_min_max_bounds_and_alignment(prefix, a, b):
    net = ipaddress.IPv4Network((0x0A000000, prefix), strict=False)
    sl = 24 if prefix <= 22 else prefix + 2
    smin = ipaddress.IPv4Address(a)
    smax = ipaddress.IPv4Address(b)
    text = json.dumps({"Network": str(net), "SubnetMin": str(smin), "SubnetMax": str(smax)})
    size = 1 << (32 - sl)
    ok = all(
        int(x) == 0 or (x in net and int(x) % size == 0) for x in (smin, smax)
    )
    if ok:
        parse_config(text)
    else:
        with pytest.raises(ConfigError):
            parse_config(text)
