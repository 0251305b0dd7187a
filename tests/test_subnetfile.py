"""subnet.env: flanneld's lines and order, atomic writes, and reading the previous subnet."""

import ipaddress
import os

from hypothesis import given, strategies as st

from fastlane import subnetfile
from fastlane.config import parse_config


def test_render_matches_flanneld(tmp_path):
    c = parse_config('{"Network":"10.5.0.0/16"}')
    text = subnetfile.render(c, ipaddress.IPv4Network("10.5.72.0/24"), 1472, False)
    assert text == ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n"
                    "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")
    path = tmp_path / "run" / "flannel" / "subnet.env"
    subnetfile.write(path, text)
    assert path.read_text() == text
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    assert os.listdir(path.parent) == ["subnet.env"]  # no temp file left behind
    assert subnetfile.previous_subnet(path) == ipaddress.IPv4Network("10.5.72.0/24")


def test_previous_subnet_tolerates_garbage(tmp_path):
    p = tmp_path / "subnet.env"
    assert subnetfile.previous_subnet(p) is None
    for junk in ["", "FLANNEL_SUBNET=", "FLANNEL_SUBNET=banana", "FLANNEL_SUBNET=10.1.2.3",
                 "FLANNEL_SUBNET=fd00::1/64", "\x00\x01"]:
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
