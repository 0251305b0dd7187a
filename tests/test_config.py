"""Config validation must accept exactly what flanneld accepts, with the same defaults."""

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    assert (
        parse_config('{"Network":"10.1.0.0/16","Backend":{"Type":"VXLAN"}}').backend_type == "vxlan"
    )


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
    [
        ("10.0.0.0/8", 24),
        ("10.1.0.0/16", 24),
        ("10.1.0.0/22", 24),
        ("10.1.0.0/23", 25),
        ("10.1.0.0/26", 28),
        ("10.1.0.0/28", 30),
    ],
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
        (
            '{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0"}',
            "SubnetMin 10.2.0.0 is not in the range",
        ),
        (
            '{"Network":"10.1.0.0/16","SubnetMax":"10.1.3.5"}',
            "SubnetMax is not on a SubnetLen boundary",
        ),
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
    ok = all(int(x) == 0 or (x in net and int(x) % size == 0) for x in (smin, smax))
    if ok:
        parse_config(text)
    else:
        with pytest.raises(ConfigError):
            parse_config(text)


# ---------------------------------------------------------------------------------------------
# IPv6: flannel v0.28 CheckNetworkConfig (pkg/subnet/config.go, the EnableIPv6 branch)

V6 = '"EnableIPv6":true,"Network":"10.1.0.0/16"'


def test_ipv6_example_from_flannels_configuration_doc():
    c = parse_config(
        '{"EnableIPv6":true,"IPv6Network":"2001:cafe:42::/56","Network":"10.5.0.0/16"}'
    )
    assert c.enable_ipv4 and c.enable_ipv6 and c.ipv6_subnet_len == 64
    assert str(c.ipv6_subnet_min) == "2001:cafe:42:1::"  # the first subnet is skipped
    assert str(c.ipv6_subnet_max) == "2001:cafe:42:ff::"  # the last one is usable


def test_ipv6_only_needs_no_ipv4_network():
    c = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48"}')
    assert not c.enable_ipv4 and c.network is None and c.subnet_len == 0
    assert c.ipv6_subnet_len == 64
    # and flannel checks nothing of the IPv4 side then, even a bad SubnetLen
    parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48","SubnetLen":31}')
    # both off: CheckNetworkConfig accepts it (flanneld stops later: "none defined stack")
    assert not parse_config('{"EnableIPv4":false}').enable_ipv6


@pytest.mark.parametrize(
    "network,expected_len",
    [
        ("fd00::/8", 64),
        ("fd00::/48", 64),
        ("fd00::/62", 64),
        ("fd00::/63", 65),
        ("fd00::/100", 102),
        ("fd00::/124", 126),
    ],
)
def test_default_ipv6_subnet_len(network, expected_len):
    c = parse_config(
        json.dumps({"EnableIPv6": True, "Network": "10.1.0.0/16", "IPv6Network": network})
    )
    assert c.ipv6_subnet_len == expected_len


@pytest.mark.parametrize(
    "fields,needle",
    [
        ("", "please define a correct IPv6Network parameter in the flannel config"),
        (',"IPv6Network":"::/0"', "please define a correct IPv6Network"),  # flannel's Empty()
        (',"IPv6Network":"fd00::/125"', "Minimum useful network prefix is /124"),
        (',"IPv6Network":"fd00::/48","IPv6SubnetLen":127', "must be less than /127"),
        (',"IPv6Network":"fd00::/48","IPv6SubnetLen":49', "at least four subnets"),
        (',"IPv6Network":"fd00::/48","IPv6SubnetMin":"fd01::"', "IPv6SubnetMin"),
        (',"IPv6Network":"fd00::/48","IPv6SubnetMax":"fe00::"', "IPv6SubnetMax"),
        (
            ',"IPv6Network":"fd00::/48","IPv6SubnetMin":"fd00:0:0:1::1"',
            "IPv6SubnetMin is not on a IPv6SubnetLen boundary",
        ),
        (
            ',"IPv6Network":"fd00::/48","IPv6SubnetMax":"fd00:0:0:1:8000::"',
            "IPv6SubnetMax is not on a",
        ),
        (',"IPv6Network":"10.0.0.0/8"', "IPv6"),
        (',"IPv6Network":"fd00::"', "IPv6Network"),
        (',"IPv6Network":"fd00::/48","IPv6SubnetLen":"64"', "IPv6SubnetLen"),
        (',"IPv6Network":"fd00::/48","IPv6SubnetMin":"banana"', "IPv6SubnetMin"),
    ],
)
def test_bad_ipv6_configs_give_one_line_errors(fields, needle):
    with pytest.raises(ConfigError) as info:
        parse_config("{" + V6 + fields + "}")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_ipv6_fields_are_ignored_when_ipv6_is_off():
    """flannel validates the IPv6 fields only under EnableIPv6."""
    c = parse_config('{"Network":"10.1.0.0/16","IPv6Network":"fd00::/125","IPv6SubnetLen":200}')
    assert not c.enable_ipv6


def test_zero_ipv6_subnet_min_max_mean_the_defaults():
    # ip.IsEmpty(IPv6SubnetMin): "::" is the same as unset
    c = parse_config(
        "{" + V6 + ',"IPv6Network":"fd00::/48","IPv6SubnetMin":"::","IPv6SubnetMax":"::"}'
    )
    assert str(c.ipv6_subnet_min) == "fd00:0:0:1::" and str(c.ipv6_subnet_max) == "fd00:0:0:ffff::"


def _flannel_accepts6(prefix: int, subnet_len: int) -> bool:
    """Reference: the IPv6 branch of CheckNetworkConfig, prefix / IPv6SubnetLen only."""
    if prefix == 0:  # ::/0 is the empty IP6Net
        return False
    if subnet_len == 0:
        return prefix <= 124
    return subnet_len <= 126 and subnet_len >= prefix + 2


@given(st.integers(0, 128), st.integers(0, 128), st.integers(0, 2**128 - 1))
def test_ipv6_accepts_exactly_what_flannel_accepts(prefix, subnet_len, base):
    net = ipaddress.IPv6Network((base, prefix), strict=False)
    cfg = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": str(net)}
    if subnet_len:
        cfg["IPv6SubnetLen"] = subnet_len
    try:
        c = parse_config(json.dumps(cfg))
    except ConfigError as exc:
        assert not _flannel_accepts6(prefix, subnet_len), str(exc)
        return
    assert _flannel_accepts6(prefix, subnet_len)
    size = 1 << (128 - c.ipv6_subnet_len)
    # GetIPv6SubnetMin = IP + size, GetIPv6SubnetMax = Network.Next().IP - size
    assert int(c.ipv6_subnet_min) == int(net.network_address) + size
    assert int(c.ipv6_subnet_max) == int(net.network_address) + net.num_addresses - size
    lo, hi = c.subnet_bounds6()
    assert c.fits6(lo) and c.fits6(hi) and lo.subnet_of(net) and hi.subnet_of(net)


@given(st.integers(16, 120), st.integers(0, 2**128 - 1), st.integers(0, 2**128 - 1))
def test_ipv6_subnet_min_max_bounds_and_alignment(prefix, a, b):
    net = ipaddress.IPv6Network((int(ipaddress.IPv6Address("fd00::")), prefix), strict=False)
    sl = 64 if prefix <= 62 else prefix + 2
    size = 1 << (128 - sl)
    # half of the draws land inside the network, to exercise the alignment check
    smin = ipaddress.IPv6Address(a if a % 2 else int(net.network_address) + a % net.num_addresses)
    smax = ipaddress.IPv6Address(b if b % 2 else int(net.network_address) + b % net.num_addresses)
    text = json.dumps(
        {
            "EnableIPv6": True,
            "Network": "10.1.0.0/16",
            "IPv6Network": str(net),
            "IPv6SubnetMin": str(smin),
            "IPv6SubnetMax": str(smax),
        }
    )
    ok = all(int(x) == 0 or (x in net and int(x) % size == 0) for x in (smin, smax))
    if ok:
        parse_config(text)
    else:
        with pytest.raises(ConfigError):
            parse_config(text)


def test_fits_lease_needs_each_enabled_family_and_no_disabled_one():
    """flannel's isSubnetConfigCompat + isIPv6SubnetConfigCompat."""
    N, N6 = ipaddress.IPv4Network, ipaddress.IPv6Network
    dual = parse_config("{" + V6 + ',"IPv6Network":"fd00::/48"}')
    only4 = parse_config('{"Network":"10.1.0.0/16"}')
    only6 = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48"}')
    v4, v6 = N("10.1.5.0/24"), N6("fd00:0:0:5::/64")
    assert (
        dual.fits_lease(v4, v6) and not dual.fits_lease(v4, None) and not dual.fits_lease(None, v6)
    )
    assert not dual.fits_lease(v4, N6("fd00::/64"))  # the first subnet: below IPv6SubnetMin
    assert not dual.fits_lease(v4, N6("fd00:0:0:5::/65"))
    assert only4.fits_lease(v4, None) and not only4.fits_lease(v4, v6)  # v6 off: a v6 part misfits
    assert only6.fits_lease(None, v6) and not only6.fits_lease(v4, v6)
