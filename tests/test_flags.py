"""flanneld's command line, parsed the Go way, with FLANNELD_* environment variables."""

import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from fastlane.cli import flagset
from fastlane.flags import FlagError, parse_go_bool


def parse(argv, env=None):
    return flagset().parse(argv, environ=env or {})


def test_defaults_are_flanneld_defaults():
    v, rest = parse([])
    assert v["etcd-endpoints"] == "http://127.0.0.1:4001,http://127.0.0.1:2379"
    assert v["etcd-prefix"] == "/coreos.com/network"
    assert v["subnet-file"] == "/run/flannel/subnet.env"
    assert v["subnet-lease-renew-margin"] == 60
    assert v["ip-masq"] is False and v["healthz-port"] == 0 and v["healthz-ip"] == "0.0.0.0"
    assert v["iface"] == [] and rest == []


@pytest.mark.parametrize(
    "argv",
    [["-etcd-prefix=/x"], ["-etcd-prefix", "/x"], ["--etcd-prefix=/x"], ["--etcd-prefix", "/x"]],
)
def test_go_flag_forms(argv):
    assert parse(argv)[0]["etcd-prefix"] == "/x"


def test_booleans_and_repeatable_and_subcommand():
    v, rest = parse(["-ip-masq", "-iface", "eth0", "-iface=10.0.0.1", "bench", "--quick"])
    assert v["ip-masq"] is True and v["iface"] == ["eth0", "10.0.0.1"]
    assert rest == ["bench", "--quick"]
    assert parse(["-ip-masq=false"])[0]["ip-masq"] is False
    # A bool flag never eats the next word, as in Go.
    v, rest = parse(["-ip-masq", "false"])
    assert v["ip-masq"] is True and rest == ["false"]


def test_env_vars_and_command_line_wins():
    env = {"FLANNELD_ETCD_PREFIX": "/env", "FLANNELD_IP_MASQ": "true", "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "30"}
    v, _ = parse([], env)
    assert v["etcd-prefix"] == "/env" and v["ip-masq"] is True and v["subnet-lease-renew-margin"] == 30
    v, _ = parse(["-etcd-prefix=/cli"], env)
    assert v["etcd-prefix"] == "/cli"


@pytest.mark.parametrize(
    "argv,env,needle",
    [
        (["-nope"], {}, "flag provided but not defined: -nope"),
        (["-subnet-lease-renew-margin=0"], {}, "between 1 and 1439"),
        (["-subnet-lease-renew-margin=abc"], {}, "invalid value"),
        (["-healthz-port=70000"], {}, "not a port"),
        (["-public-ip=1.2.3"], {}, "not an IPv4 address"),
        (["-ip-masq=maybe"], {}, "-ip-masq"),
        (["-etcd-prefix"], {}, "flag needs an argument"),
        ([], {"FLANNELD_IP_MASQ": "sure"}, "$FLANNELD_IP_MASQ"),
    ],
)
def test_bad_flags(argv, env, needle):
    with pytest.raises(FlagError) as info:
        parse(argv, env)
    assert needle in str(info.value)


@given(st.text(max_size=8))
def test_go_bool_parse_total(text):
    try:
        value = parse_go_bool(text)
    except ValueError:
        assert text not in ("1", "t", "T", "true", "TRUE", "True", "0", "f", "F", "false", "FALSE", "False")
    else:
        assert value is (text in ("1", "t", "T", "true", "TRUE", "True"))


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastlane", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_cli_unknown_flag_exit_2_one_line_plus_usage():
    p = run_cli("-bogus")
    assert p.returncode == 2
    assert p.stderr.splitlines()[0] == "fastlane: flag provided but not defined: -bogus"
    assert "Usage:" in p.stderr and "Traceback" not in p.stderr


def test_cli_bad_endpoint_and_version():
    p = run_cli("-etcd-endpoints=http://:99999")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "endpoint" in p.stderr
    p = run_cli("-version")
    assert p.returncode == 0 and p.stdout.strip()


def test_cli_unknown_subcommand():
    p = run_cli("frobnicate")
    assert p.returncode == 2 and "unknown subcommand" in p.stderr
