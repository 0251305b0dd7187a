"""flanneld's command line, parsed the Go way, with FLANNELD_* environment variables."""

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastlane.cli import IGNORED_FLAGS, flagset, ignored_flag_lines
from fastlane.flags import FlagError, HelpRequested, parse_go_bool


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
    env = {
        "FLANNELD_ETCD_PREFIX": "/env",
        "FLANNELD_IP_MASQ": "true",
        "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "30",
    }
    v, _ = parse([], env)
    assert (
        v["etcd-prefix"] == "/env" and v["ip-masq"] is True and v["subnet-lease-renew-margin"] == 30
    )
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
        ([], {"FLANNELD_PUBLIC_IP": "1.2.3"}, "$FLANNELD_PUBLIC_IP"),
        ([], {"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "2000"}, "between 1 and 1439"),
        (["-v=0x2"], {}, "-v"),  # klog's level is decimal only
        (["-vmodule=daemon"], {}, "filename=N"),
        (["-log_backtrace_at=daemon:12"], {}, "file.go:234"),
        (["-log_backtrace_at=x.go:0"], {}, "negative or zero"),
        (["-logtostderr"], {}, "not defined"),  # klog's, but flanneld never parses it either
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
        assert text not in (
            "1",
            "t",
            "T",
            "true",
            "TRUE",
            "True",
            "0",
            "f",
            "F",
            "false",
            "FALSE",
            "False",
        )
    else:
        assert value is (text in ("1", "t", "T", "true", "TRUE", "True"))


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fastlane", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_cli_unknown_flag_exit_2_one_line_plus_usage():
    p = run_cli("-bogus")
    assert p.returncode == 2
    assert p.stderr.splitlines()[0] == "fastlane: flag provided but not defined: -bogus"
    assert "Usage:" in p.stderr and "Traceback" not in p.stderr


def test_cli_bad_endpoint_and_version():
    p = run_cli("-etcd-endpoints=http://:99999")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "endpoint" in p.stderr


def test_cli_unknown_subcommand():
    p = run_cli("frobnicate")
    assert p.returncode == 2 and "unknown subcommand" in p.stderr


# Every flag flanneld v0.28.9 defines on its FlagSet (main.go init(): its own, then klog's
# v, vmodule and log_backtrace_at through copyFlag).
FLANNELD_FLAGS = {
    "etcd-endpoints",
    "etcd-prefix",
    "etcd-keyfile",
    "etcd-certfile",
    "etcd-cafile",
    "etcd-username",
    "etcd-password",
    "iface",
    "iface-regex",
    "iface-can-reach",
    "subnet-file",
    "public-ip",
    "public-ipv6",
    "subnet-lease-renew-margin",
    "ip-masq",
    "ip-masq-fully-random-disable",
    "kube-subnet-mgr",
    "kube-api-url",
    "kube-annotation-prefix",
    "kubeconfig-file",
    "version",
    "healthz-ip",
    "healthz-port",
    "iptables-resync",
    "iptables-forward-rules",
    "ip-blackhole-route",
    "net-config-path",
    "set-node-network-unavailable",
    "v",
    "vmodule",
    "log_backtrace_at",
}


def test_every_flanneld_flag_is_defined_with_its_default():
    fs = flagset()
    assert FLANNELD_FLAGS <= set(fs.flags)
    assert set(fs.flags) - FLANNELD_FLAGS == {"subnet-lease-ttl"}  # the one extension
    v, _ = parse([])
    assert v["kube-annotation-prefix"] == "flannel.alpha.coreos.com"
    assert v["net-config-path"] == "/etc/kube-flannel/net-conf.json"
    assert v["set-node-network-unavailable"] is True
    assert v["vmodule"] == "" and v["log_backtrace_at"] == "" and v["v"] == 0


def test_klog_and_kube_flags_parse():
    v, rest = parse(
        [
            "-v=3",
            "-vmodule=daemon=2,etcd*=4",
            "-log_backtrace_at=main.go:120",
            "-kube-api-url",
            "https://k8s:6443",
            "-set-node-network-unavailable=false",
        ]
    )
    assert (
        v["v"] == 3
        and v["vmodule"] == "daemon=2,etcd*=4"
        and v["log_backtrace_at"] == "main.go:120"
    )
    assert v["kube-api-url"] == "https://k8s:6443" and v["set-node-network-unavailable"] is False
    assert rest == []


def test_empty_env_is_ignored():
    p = flagset().parse_full(
        [], {"FLANNELD_IFACE": "", "FLANNELD_IP_MASQ": "", "FLANNELD_HEALTHZ_PORT": ""}
    )
    assert (
        p.values["iface"] == [] and p.values["ip-masq"] is False and p.values["healthz-port"] == 0
    )
    assert p.env_problems == [] and p.explicit == set()


def test_unparsable_env_keeps_default_and_is_reported():
    env = {
        "FLANNELD_IP_MASQ": "sure",
        "FLANNELD_HEALTHZ_PORT": "80x",
        "FLANNELD_V": "high",
        "FLANNELD_ETCD_PREFIX": "/env",
    }
    p = flagset().parse_full([], env)
    assert p.values["ip-masq"] is False and p.values["healthz-port"] == 0 and p.values["v"] == 0
    assert p.values["etcd-prefix"] == "/env"  # the good ones still apply
    assert sorted(x.key for x in p.env_problems) == [
        "FLANNELD_HEALTHZ_PORT",
        "FLANNELD_IP_MASQ",
        "FLANNELD_V",
    ]
    assert not any(x.fatal for x in p.env_problems)
    assert all("\n" not in x.message and x.key in x.message for x in p.env_problems)
    assert p.explicit == {"etcd-prefix"}
    # parse() keeps flanneld's behaviour too: no exception, default kept.
    assert parse([], env)[0]["ip-masq"] is False


def test_env_value_failing_a_check_is_fatal():
    p = flagset().parse_full([], {"FLANNELD_HEALTHZ_PORT": "70000"})
    assert [x.fatal for x in p.env_problems] == [True]
    assert p.values["healthz-port"] == 0


def test_flanneld_version_env_is_ignored():
    p = flagset().parse_full([], {"FLANNELD_VERSION": "true"})
    assert p.values["version"] is False and p.env_problems == []


def test_env_list_flag_is_one_value():
    # flagutil calls Set once with the whole value: no splitting on commas.
    assert parse([], {"FLANNELD_IFACE": "eth0,eth1"})[0]["iface"] == ["eth0,eth1"]


@pytest.mark.parametrize(
    "argv", [["-h"], ["-help"], ["--help"], ["-h=1"], ["-ip-masq", "-help", "-bogus"]]
)
def test_help_flags(argv):
    with pytest.raises(HelpRequested):
        parse(argv)


def test_help_after_subcommand_belongs_to_it():
    assert parse(["leases", "-h"])[1] == ["leases", "-h"]


def test_ignored_flags_are_named_only_when_given():
    fs = flagset()
    assert ignored_flag_lines(fs.parse_full([], {})) == []
    p = fs.parse_full(["-vmodule=x=1"], {"FLANNELD_KUBECONFIG_FILE": "/etc/k.conf"})
    lines = ignored_flag_lines(p)
    assert lines == [
        "-kubeconfig-file=/etc/k.conf is ignored: only used with -kube-subnet-mgr",
        f"-vmodule=x=1 is ignored: {IGNORED_FLAGS['vmodule']}",
    ]
    # A flag given with its default value is still named: the operator asked for something.
    p = fs.parse_full(["-set-node-network-unavailable=true"], {})
    assert ignored_flag_lines(p) == [
        "-set-node-network-unavailable=true is ignored: only used with -kube-subnet-mgr"
    ]


def test_usage_lists_every_flag():
    text = flagset().usage()
    for name in FLANNELD_FLAGS:
        assert f"\n  -{name}" in text
    assert '(default "/coreos.com/network")' in text and "(default true)" in text


def clean_env(**extra):
    """A controlled environment: nothing from the developer's shell (FLANNELD_* especially)."""
    import os

    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **extra}


@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_cli_help_exits_0(flag):
    p = run_cli(flag, env=clean_env())
    assert p.returncode == 0
    assert (
        p.stderr.startswith("Usage: fastlane [OPTION]...") and "-etcd-endpoints string" in p.stderr
    )
    assert "-vmodule value" in p.stderr and "Traceback" not in p.stderr


def test_cli_version_on_stderr_like_flanneld():
    p = run_cli("-version", env=clean_env(FLANNELD_IP_MASQ="bogus"))
    assert p.returncode == 0 and p.stdout == "" and p.stderr.strip()


@pytest.mark.parametrize(
    "args,env",
    [
        (["-kube-subnet-mgr"], {}),
        (["-kube-subnet-mgr", "-kube-api-url=https://k:6443", "-kubeconfig-file=/k"], {}),
        ([], {"FLANNELD_KUBE_SUBNET_MGR": "true", "FLANNELD_NET_CONFIG_PATH": "/n.json"}),
    ],
)
def test_cli_kube_subnet_mgr_refused_in_one_line(args, env):
    p = run_cli(*args, env=clean_env(**env))
    assert p.returncode == 2
    assert p.stderr.splitlines() == [
        "fastlane: -kube-subnet-mgr is not supported (fastlane uses etcd only)"
    ]


def test_cli_env_value_failing_a_check_exits_2():
    p = run_cli(env=clean_env(FLANNELD_PUBLIC_IP="10.0.0"))
    assert p.returncode == 2
    assert p.stderr.splitlines() == [
        (
            "fastlane: invalid value '10.0.0' for flag -public-ip "
            "(from $FLANNELD_PUBLIC_IP): not an IPv4 address"
        )
    ]


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_daemon_starts_with_a_templated_flanneld_environment(
    store, prefix, etcd_server, tmp_path
):
    """The EnvironmentFile of a flanneld unit, empty and bad values included, starts the node.

    Empty FLANNELD_* are skipped (flanneld: `FLANNELD_IFACE=` is not an interface), an
    unparsable one is logged and its default used, FLANNELD_VERSION does not turn the daemon
    into `-version`, and each accepted-but-unused flag is named once in the log.
    """
    import asyncio
    import signal

    await store.put(f"{prefix}/config", b'{"Network":"10.33.0.0/16","Backend":{"Type":"alloc"}}')
    subnet_file = tmp_path / "subnet.env"
    env = clean_env(
        FLANNELD_IFACE="",
        FLANNELD_IFACE_REGEX="",
        FLANNELD_IP_MASQ="",
        FLANNELD_PUBLIC_IP="",
        FLANNELD_HEALTHZ_PORT="80x",
        FLANNELD_VERSION="true",
        FLANNELD_KUBECONFIG_FILE="/etc/kubernetes/kubeconfig",
        FLANNELD_ETCD_ENDPOINTS=etcd_server.endpoint,
        FLANNELD_ETCD_PREFIX=prefix,
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fastlane",
        f"-subnet-file={subnet_file}",
        "-iptables-forward-rules=false",
        "-vmodule=daemon=2",
        "-log_backtrace_at=main.go:1",
        "-kube-api-url=https://k8s:6443",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(200):
            if subnet_file.exists() or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert subnet_file.exists(), "the daemon never wrote its subnet file"
        assert "FLANNEL_NETWORK=10.33.0.0/16" in subnet_file.read_text()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    log = err.decode()
    assert proc.returncode == 0, log
    warnings = [line.split("] ", 1)[1] for line in log.splitlines() if line.startswith("W")]
    assert (
        "Failed to set flag from env: invalid value '80x' for FLANNELD_HEALTHZ_PORT: parse error; "
        "using the default of -healthz-port" in warnings
    )
    ignored = sorted(w.split("=", 1)[0] for w in warnings if " is ignored: " in w)
    assert ignored == ["-kube-api-url", "-kubeconfig-file", "-log_backtrace_at", "-vmodule"]
    assert "Traceback" not in log
