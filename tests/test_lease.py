"""Lease keys/values in flanneld's exact shape, and the choice of a free subnet."""

import ipaddress
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlane.config import parse_config
from fastlane.lease import (
    LeaseAttrs,
    LeaseValueError,
    choose_subnet,
    free_candidates,
    go_ip6,
    holder,
    parse_key,
    parse_subnet_key,
    subnet_in_use,
    subnet_key,
)

N = ipaddress.IPv4Network
N6 = ipaddress.IPv6Network
A = ipaddress.IPv4Address
A6 = ipaddress.IPv6Address


def test_key_roundtrip_and_dual_stack_form():
    assert subnet_key(N("10.1.18.0/24")) == "10.1.18.0-24"
    assert parse_subnet_key("10.1.18.0-24") == N("10.1.18.0/24")
    assert parse_subnet_key("10.12.13.0-24&fd00:12:13::-56") == N("10.12.13.0/24")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "10.1.18.0",
        "10.1.18.0-33",
        "10.1.18.1-24",
        "x10.1.18.0-24",
        "300.1.1.0-24",
        "10.1.18.0-24junk",
    ],
)
def test_bad_keys_rejected(bad):
    with pytest.raises(LeaseValueError):
        parse_subnet_key(bad)


def test_value_matches_flannel_json_exactly():
    udp = LeaseAttrs(public_ip=ipaddress.IPv4Address("172.31.14.97"))
    assert udp.encode() == b'{"PublicIP":"172.31.14.97","PublicIPv6":null}'
    vx = LeaseAttrs(
        ipaddress.IPv4Address("192.168.64.3"), "vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
    )
    assert vx.encode() == (
        b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
    )
    assert LeaseAttrs.decode(vx.encode()) == vx


def test_decode_is_case_insensitive():
    a = LeaseAttrs.decode(b'{"publicip":"10.0.0.1","backendtype":"udp"}')
    assert str(a.public_ip) == "10.0.0.1" and a.backend_type == "udp"


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"null",
        b"[]",
        b"{}",
        b'{"PublicIP":5}',
        b'{"PublicIP":"1.2.3"}',
        b"\xff\xfe",
        b'{"PublicIP":"10.0.0.1","BackendType":7}',
    ],
)
def test_malformed_values_raise_one_line(bad):
    with pytest.raises(LeaseValueError) as info:
        LeaseAttrs.decode(bad)
    assert "\n" not in str(info.value)


@given(st.binary(max_size=200))
def test_decode_never_crashes(raw):
    try:
        LeaseAttrs.decode(raw)
    except LeaseValueError:
        pass


@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_key_property_roundtrip(addr, plen):
    net = N((addr, plen), strict=False)
    assert parse_subnet_key(subnet_key(net)) == net


configs = st.tuples(st.integers(16, 26), st.integers(0, 6)).map(
    lambda t: parse_config(
        json.dumps({"Network": f"10.0.0.0/{t[0]}", "SubnetLen": min(30, t[0] + 2 + t[1])})
    )
)


@settings(max_examples=200)
@given(
    configs,
    st.lists(st.tuples(st.integers(0, 2**24 - 1), st.integers(14, 30)), max_size=40),
    st.integers(0, 2**32),
)
def test_choice_is_in_bounds_aligned_and_free(config, raw_taken, seed):
    taken = [N((0x0A000000 + a, lease), strict=False) for a, lease in raw_taken]
    got = choose_subnet(config, taken, random.Random(seed))
    candidates = free_candidates(config, taken)
    if got is None:
        assert candidates == []
        # Really full: every subnet in range overlaps something.
        lo, hi = int(config.subnet_min), int(config.subnet_max)
        size = 1 << (32 - config.subnet_len)
        for a in range(lo, min(hi, lo + 5000 * size) + 1, size):
            assert subnet_in_use(N((a, config.subnet_len)), taken)
        return
    assert got.prefixlen == config.subnet_len
    assert config.subnet_min <= got.network_address <= config.subnet_max
    assert int(got.network_address) % (1 << (32 - config.subnet_len)) == 0
    assert not any(got.overlaps(t) for t in taken)
    assert got in candidates and len(candidates) <= 100


def test_full_range_returns_none():
    c = parse_config('{"Network":"10.9.0.0/28"}')  # /30 subnets: 3 usable
    taken = free_candidates(c, [])
    assert len(taken) == 3
    assert choose_subnet(c, taken) is None


# ---------------------------------------------------------------------------------------------
# IPv6 / dual-stack. Fixtures from flannel v0.28 (commit cdf76059): pkg/subnet/subnet_test.go
# (TestSubnetNodev6, TestSubnetNodeInvalid), pkg/subnet/etcd/fuzz_test.go (a dual-stack key and
# value), MakeSubnetKey (pkg/subnet/subnet.go) for the IPv6-only form, and the LeaseAttrs
# struct (pkg/lease/lease.go) for the JSON field order and null/omitempty rules.


def test_dual_stack_key_as_flannels_subnet_test():
    key = "10.12.13.0-24&fd00:12:13::-56"  # TestSubnetNodev6
    assert parse_key(key) == (N("10.12.13.0/24"), N6("fd00:12:13::/56"))
    assert subnet_key(N("10.12.13.0/24"), N6("fd00:12:13::/56")) == key
    assert parse_subnet_key(key) == N("10.12.13.0/24")
    assert parse_key("10.5.1.0-24&fc00::-64") == (N("10.5.1.0/24"), N6("fc00::/64"))  # fuzz seed
    assert parse_key("10.12.13.0-24") == (N("10.12.13.0/24"), None)


def test_ipv6_only_key_is_flannels_empty_ip4net_in_front():
    # MakeSubnetKey(ip.IP4Net{}, sn6): IP4Net{}.StringSep(".", "-") is "0.0.0.0-0"
    assert subnet_key(None, N6("fd00:1:0:5::/64")) == "0.0.0.0-0&fd00:1:0:5::-64"
    assert parse_key("0.0.0.0-0&fd00:1:0:5::-64") == (None, N6("fd00:1:0:5::/64"))
    # without an IPv6 part it stays the (unroutable) lease for all of IPv4, as before
    assert parse_key("0.0.0.0-0") == (N("0.0.0.0/0"), None)


@pytest.mark.parametrize(
    "bad",
    [
        # TestSubnetNodeInvalid, every key of it
        "10",
        "10.12.13.0",
        "10.12.13-24",
        "10.12.13.300-24",
        "10.12.13.0-24hi",
        "&2001::-56",
        "10.12.13.0-24&:12:13:-56",
        "10.12.13.0-24&20011::-56",
        "10.12.13.0-24&2001-56",
        "10.12.13.0-24&2001::",
        "10.12.13.0-24&2001::-56hi",
        # flannel's regex takes lower-case hex only and ParseUint(.., 7) lengths up to 127
        "10.12.13.0-24&FD00::-64",
        "10.12.13.0-24&fd00::-128",
        # host bits (flannel never writes them), Unicode digits, a zone, embedded IPv4
        "10.12.13.0-24&fd00::1-64",
        "10.12.13.0-\u0662\u0664",
        "10.12.13.0-24&fe80::%eth0-64",
        "10.12.13.0-24&::ffff:1.2.3.4-128",
    ],
)
def test_bad_dual_stack_keys_rejected(bad):
    with pytest.raises(LeaseValueError) as info:
        parse_key(bad)
    assert "\n" not in str(info.value)


def test_dual_stack_value_matches_flannel_json_exactly():
    # json.Marshal(LeaseAttrs): PublicIP, PublicIPv6 (*ip.IP6: null or a string), then
    # BackendType, BackendData, BackendV6Data (json.RawMessage, omitempty)
    v = LeaseAttrs(
        A("192.168.0.1"),
        "vxlan",
        {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"},
        A6("fc00::1"),
        {"VNI": 1, "VtepMAC": "0e:aa:bb:cc:dd:ee"},
    )
    assert v.encode() == (
        b'{"PublicIP":"192.168.0.1","PublicIPv6":"fc00::1","BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},'
        b'"BackendV6Data":{"VNI":1,"VtepMAC":"0e:aa:bb:cc:dd:ee"}}'
    )
    assert LeaseAttrs.decode(v.encode()) == v
    # the fuzz seed of pkg/subnet/etcd/fuzz_test.go
    seed = LeaseAttrs.decode(b'{"PublicIP":"192.168.0.1","PublicIPv6":"fc00::1"}')
    assert seed == LeaseAttrs(A("192.168.0.1"), public_ipv6=A6("fc00::1"))
    assert seed.encode() == b'{"PublicIP":"192.168.0.1","PublicIPv6":"fc00::1"}'
    # host-gw dual-stack: no BackendData at all, PublicIPv6 set (hostgw.go: if EnableIPv6)
    hg = LeaseAttrs(A("10.0.0.2"), "host-gw", public_ipv6=A6("2001:db8::2"))
    assert (
        hg.encode() == b'{"PublicIP":"10.0.0.2","PublicIPv6":"2001:db8::2","BackendType":"host-gw"}'
    )
    # an IPv6-only vxlan node: PublicIP is flannel's zero IP4, only BackendV6Data
    v6 = LeaseAttrs(
        A("0.0.0.0"), "vxlan", None, A6("fd00::7"), {"VNI": 1, "VtepMAC": "0e:00:00:00:00:07"}
    )
    assert v6.encode() == (
        b'{"PublicIP":"0.0.0.0","PublicIPv6":"fd00::7","BackendType":"vxlan",'
        b'"BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:00:07"}}'
    )
    assert holder(v6) == A6("fd00::7") and holder(hg) == A("10.0.0.2")
    assert holder(LeaseAttrs(A("0.0.0.0"))) is None


def test_public_ipv6_is_read_as_gos_parseip_reads_it():
    # Go's IP6.UnmarshalJSON uses net.ParseIP: upper case and IPv4 (as IPv4-mapped) pass,
    # and the address is printed back in Go's form
    a = LeaseAttrs.decode(b'{"PublicIP":"10.0.0.1","PublicIPv6":"FD00:0:0::0001"}')
    assert a.public_ipv6 == A6("fd00::1") and b'"PublicIPv6":"fd00::1"' in a.encode()
    m = LeaseAttrs.decode(b'{"PublicIP":"10.0.0.1","PublicIPv6":"10.1.2.3"}')
    assert m.public_ipv6 == A6("::ffff:10.1.2.3") and b'"PublicIPv6":"10.1.2.3"' in m.encode()
    assert LeaseAttrs.decode(b'{"PublicIP":"10.0.0.1","PublicIPv6":null}').public_ipv6 is None
    assert LeaseAttrs.decode(b'{"PublicIP":"10.0.0.1"}').public_ipv6 is None


@pytest.mark.parametrize(
    "bad",
    [
        b'{"PublicIP":"10.0.0.1","PublicIPv6":""}',
        b'{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::g"}',
        b'{"PublicIP":"10.0.0.1","PublicIPv6":5}',
        b'{"PublicIP":"10.0.0.1","PublicIPv6":["fd00::1"]}',
        b'{"PublicIP":"10.0.0.1","PublicIPv6":"fe80::1%eth0"}',
    ],
)
def test_malformed_public_ipv6_makes_the_value_unreadable(bad):
    """flannel's json.Unmarshal fails on these, so the lease is skipped (with a warning here)."""
    with pytest.raises(LeaseValueError) as info:
        LeaseAttrs.decode(bad)
    assert "PublicIPv6" in str(info.value) and "\n" not in str(info.value)


def test_go_ip6_prints_as_go_net_ip_string():
    assert go_ip6(A6("2001:cafe:42::")) == "2001:cafe:42::"
    assert go_ip6(A6("2001:db8:0:0:1:0:0:1")) == "2001:db8::1:0:0:1"  # first longest run
    assert go_ip6(A6("2001:db8:0:1:1:1:1:1")) == "2001:db8:0:1:1:1:1:1"  # no "::" for one group
    assert go_ip6(A6("::ffff:10.1.2.3")) == "10.1.2.3"  # IPv4-mapped
    assert go_ip6(A6("::10.1.2.3")) == "10.1.2.3"  # big.Int.Bytes() of 4 bytes
    assert go_ip6(A6("::1")) == "::1" and go_ip6(A6("::")) == "::"


@given(
    st.integers(0, 2**128 - 1),
    st.integers(0, 127),
    st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    st.integers(0, 32),
)
def test_dual_stack_key_property_roundtrip(addr6, plen6, addr4, plen4):
    net6 = N6((addr6, plen6), strict=False)
    net4 = None if addr4 is None else N((addr4, plen4), strict=False)
    if net4 is not None and plen4 == 0:
        net4 = None  # 0.0.0.0-0 in front of an IPv6 part is the IPv6-only form
    key = subnet_key(net4, net6)
    if "." in key.split("&")[1]:  # Go prints these IPv6 networks dotted: its regex never matches
        with pytest.raises(LeaseValueError):
            parse_key(key)
        return
    assert parse_key(key) == (net4, net6)


@given(st.binary(max_size=200), st.text(max_size=60))
def test_decode_and_parse_never_crash(raw, key):
    for fn, arg in ((LeaseAttrs.decode, raw), (parse_key, key)):
        try:
            fn(arg)
        except LeaseValueError:
            pass


def test_ipv6_candidates_walk_like_flanneld_and_jump_over_big_leases():
    c = parse_config('{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:1::/48"}')
    cands = free_candidates(c, [], family=6)
    assert (
        len(cands) == 100
        and cands[0] == N6("fd00:1:0:1::/64")
        and cands[1] == N6("fd00:1:0:2::/64")
    )
    # one foreign lease over most of the range: still found at once (2**15 subnets skipped)
    big = N6("fd00:1::/49")
    got = free_candidates(c, [big], family=6)
    assert got[0] == N6("fd00:1:0:8000::/64") and len(got) == 100
    assert choose_subnet(c, [N6("fd00:1::/48")], family=6) is None


@settings(max_examples=200)
@given(
    st.integers(100, 120),
    st.integers(2, 6),
    st.lists(st.tuples(st.integers(0, 2**12 - 1), st.integers(100, 126)), max_size=20),
)
def test_candidate_jumps_give_flanneds_one_step_walk(prefix, extra, raw):
    """The jumping walk returns exactly the list of flanneld's one-subnet-at-a-time walk."""
    plen = min(126, prefix + extra)
    base = int(A6("fd00::"))
    c = parse_config(
        json.dumps(
            {
                "EnableIPv4": False,
                "EnableIPv6": True,
                "IPv6Network": f"fd00::/{prefix}",
                "IPv6SubnetLen": plen,
            }
        )
    )
    taken = [N6((base + a, lease), strict=False) for a, lease in raw]
    size = 1 << (128 - plen)
    naive = []
    addr = int(c.ipv6_subnet_min)
    while addr <= int(c.ipv6_subnet_max) and len(naive) < 100:
        net = N6((addr, plen))
        if not any(net.overlaps(t) for t in taken):
            naive.append(net)
        addr += size
    assert free_candidates(c, taken, family=6) == naive
