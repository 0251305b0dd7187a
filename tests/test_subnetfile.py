"""subnet.env: flanneld's lines and order, atomic writes, and reading the previous subnet."""

import ipaddress
import os

from hypothesis import given
from hypothesis import strategies as st

from fastlane import subnetfile
from fastlane.config import parse_config


def test_render_matches_flanneld(tmp_path):
    c = parse_config('{"Network":"10.5.0.0/16"}')
    text = subnetfile.render(c, ipaddress.IPv4Network("10.5.72.0/24"), 1472, False)
    assert text == (
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n"
        "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
    )
    path = tmp_path / "run" / "flannel" / "subnet.env"
    subnetfile.write(path, text)
    assert path.read_text() == text
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    assert os.listdir(path.parent) == ["subnet.env"]  # no temp file left behind
    assert subnetfile.previous_subnet(path) == ipaddress.IPv4Network("10.5.72.0/24")


def test_previous_subnet_tolerates_garbage(tmp_path):
    p = tmp_path / "subnet.env"
    assert subnetfile.previous_subnet(p) is None
    for junk in [
        "",
        "FLANNEL_SUBNET=",
        "FLANNEL_SUBNET=banana",
        "FLANNEL_SUBNET=10.1.2.3",
        "FLANNEL_SUBNET=fd00::1/64",
        "\x00\x01",
    ]:
        p.write_text(junk)
        assert subnetfile.previous_subnet(p) is None


@given(st.integers(0, 2**32 - 1), st.integers(8, 30), st.booleans())
def test_previous_subnet_roundtrip(addr, plen, masq):
    import tempfile

    net = ipaddress.IPv4Network((addr, plen), strict=False)
    c = parse_config('{"Network":"10.0.0.0/8"}')
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "subnet.env")
        subnetfile.write(path, subnetfile.render(c, net, 1450, masq))
        assert subnetfile.previous_subnet(path) == net
        assert subnetfile.read_vars(path)["FLANNEL_IPMASQ"] == ("true" if masq else "false")


# ---------------------------------------------------------------------------------------------
# IPv6: flannel v0.28 WriteSubnetFile (pkg/subnet/subnet.go) writes, in this order,
#   FLANNEL_NETWORK, FLANNEL_SUBNET            if EnableIPv4 (first address: sn.IncrementIP())
#   FLANNEL_IPV6_NETWORK, FLANNEL_IPV6_SUBNET  if EnableIPv6 (ipv6sn.IncrementIP(), IP6Net.String)
#   FLANNEL_MTU, FLANNEL_IPMASQ (%t)
# The dual-stack example is the one of flannel's Documentation/configuration.md ("Dual-stack").

N6 = ipaddress.IPv6Network


def test_dual_stack_file_is_flannels_byte_for_byte(tmp_path):
    c = parse_config(
        '{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"2001:cafe:42::/56"}'
    )
    text = subnetfile.render(
        c, ipaddress.IPv4Network("10.5.72.0/24"), 1450, True, N6("2001:cafe:42::/64")
    )
    assert text == (
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n"
        "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    )
    path = tmp_path / "subnet.env"
    subnetfile.write(path, text)
    assert subnetfile.previous_subnet(path) == ipaddress.IPv4Network("10.5.72.0/24")
    assert subnetfile.previous_ipv6_subnet(path) == N6("2001:cafe:42::/64")


def test_ipv6_only_file_has_no_ipv4_lines():
    c = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}')
    text = subnetfile.render(c, None, 1280, False, N6("fd00:10:244:7::/64"))
    assert text == (
        "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n"
        "FLANNEL_MTU=1280\nFLANNEL_IPMASQ=false\n"
    )


def test_ipv6_lines_only_when_the_config_enables_ipv6():
    c = parse_config('{"Network":"10.5.0.0/16","IPv6Network":"fd00::/48"}')  # EnableIPv6 false
    text = subnetfile.render(
        c, ipaddress.IPv4Network("10.5.72.0/24"), 1450, False, N6("fd00:0:0:1::/64")
    )
    assert "IPV6" not in text


def test_previous_ipv6_subnet_as_flanneld_reads_it(tmp_path):
    p = tmp_path / "subnet.env"
    assert subnetfile.previous_ipv6_subnet(p) is None
    cases = {
        "FLANNEL_IPV6_SUBNET=fd00:0:0:5::1/64": N6("fd00:0:0:5::/64"),
        'FLANNEL_IPV6_SUBNET="fd00:0:0:5::1/64"': N6("fd00:0:0:5::/64"),
        # main_test.go: invalid parts skipped; more than one left is no previous subnet
        "FLANNEL_IPV6_SUBNET=fd00::/64,not-a-cidr,fd01::/64": None,
        "FLANNEL_IPV6_SUBNET=fd00::1/64,not-a-cidr": N6("fd00::/64"),
        "FLANNEL_IPV6_SUBNET=not-a-cidr": None,
        "FLANNEL_IPV6_SUBNET=": None,
        "FLANNEL_IPV6_SUBNET=fd00::1": None,
        "FLANNEL_IPV6_SUBNET=10.1.2.1/24": None,
        "FLANNEL_IPV6_SUBNET=fe80::1%eth0/64": None,
        "FLANNEL_SUBNET=10.1.2.1/24": None,
    }
    for text, want in cases.items():
        p.write_text(text + "\n")
        assert subnetfile.previous_ipv6_subnet(p) == want, text


@given(st.integers(0, 2**128 - 1), st.integers(1, 126), st.integers(0, 2**32 - 1), st.booleans())
def test_dual_stack_previous_subnets_roundtrip(addr6, plen6, addr4, masq):
    import tempfile

    net6 = N6((addr6, plen6), strict=False)
    net4 = ipaddress.IPv4Network((addr4, 24), strict=False)
    c = parse_config('{"Network":"10.0.0.0/8","EnableIPv6":true,"IPv6Network":"fd00::/8"}')
    text = subnetfile.render(c, net4, 1450, masq, net6)
    first = text.splitlines()[3].split("=", 1)[1]
    if "." in first:  # Go prints IPv4-mapped / tiny addresses dotted: not an IPv6 CIDR any more
        return
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "subnet.env")
        subnetfile.write(path, text)
        assert subnetfile.previous_ipv6_subnet(path) == net6
        assert subnetfile.previous_subnet(path) == net4
