"""Lease keys/values in flanneld's exact shape, and the choice of a free subnet."""

import ipaddress
import json
import random

import pytest
from hypothesis import given, settings, strategies as st

from fastlane.config import parse_config
from fastlane.lease import (
    LeaseAttrs,
    LeaseValueError,
    choose_subnet,
    free_candidates,
    parse_subnet_key,
    subnet_in_use,
    subnet_key,
)

N = ipaddress.IPv4Network


def test_key_roundtrip_and_dual_stack_form():
    assert subnet_key(N("10.1.18.0/24")) == "10.1.18.0-24"
    assert parse_subnet_key("10.1.18.0-24") == N("10.1.18.0/24")
    assert parse_subnet_key("10.12.13.0-24&fd00:12:13::-56") == N("10.12.13.0/24")


@pytest.mark.parametrize("bad", ["", "10.1.18.0", "10.1.18.0-33", "10.1.18.1-24", "x10.1.18.0-24",
                                 "300.1.1.0-24", "10.1.18.0-24junk"])
def test_bad_keys_rejected(bad):
    with pytest.raises(LeaseValueError):
        parse_subnet_key(bad)


def test_value_matches_flannel_json_exactly():
    udp = LeaseAttrs(public_ip=ipaddress.IPv4Address("172.31.14.97"))
    assert udp.encode() == b'{"PublicIP":"172.31.14.97","PublicIPv6":null}'
    vx = LeaseAttrs(ipaddress.IPv4Address("192.168.64.3"), "vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"})
    assert vx.encode() == (b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
                           b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')
    assert LeaseAttrs.decode(vx.encode()) == vx


def test_decode_is_case_insensitive():
    a = LeaseAttrs.decode(b'{"publicip":"10.0.0.1","backendtype":"udp"}')
    assert str(a.public_ip) == "10.0.0.1" and a.backend_type == "udp"


@pytest.mark.parametrize("bad", [b"", b"null", b"[]", b"{}", b'{"PublicIP":5}', b'{"PublicIP":"1.2.3"}',
                                 b"\xff\xfe", b'{"PublicIP":"10.0.0.1","BackendType":7}'])
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
    lambda t: parse_config(json.dumps({"Network": f"10.0.0.0/{t[0]}", "SubnetLen": min(30, t[0] + 2 + t[1])}))
)


@settings(max_examples=200)
@given(configs, st.lists(st.tuples(st.integers(0, 2**24 - 1), st.integers(14, 30)), max_size=40),
       st.integers(0, 2**32))
def test_choice_is_in_bounds_aligned_and_free(config, raw_taken, seed):
    taken = [N((0x0A000000 + a, l), strict=False) for a, l in raw_taken]
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
