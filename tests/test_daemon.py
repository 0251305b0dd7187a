"""The daemon as operators run it: real processes in network namespaces, real etcd.

Backend `alloc` (lease only) so these tests are about the control plane; the udp data
plane has its own tests.
"""

from __future__ import annotations

import json
import signal
import sys

import pytest

from tests.daemon_helpers import (
    Node,
    NotifySocket,
    lease_ids,
    leases,
    topology_with_etcd,
    unleased,
    wait_until,
)

ALLOC = '{"Network":"10.1.0.0/16","SubnetLen":24,"Backend":{"Type":"alloc"}}'


@pytest.fixture(scope="module")
def cluster(net_capable):
    """Two hosts on an underlay, etcd listening on the underlay bridge (switch netns)."""
    yield from topology_with_etcd("fastlane-daemon-tests")


@pytest.fixture
def nodes(cluster, prefix, tmp_path):
    """Factory for daemons under this test's prefix; all are stopped at the end."""
    topo, etcd = cluster
    made: list[Node] = []

    def make(i: int, *extra: str, config: str | None = ALLOC, env=None) -> Node:
        if config is not None:
            etcd.etcdctl("put", f"{prefix}/config", config)
        node = Node(topo, topo.hosts[i], etcd, prefix, tmp_path, *extra, env=env)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop(signal.SIGKILL)


def test_two_daemons_hold_flannel_shaped_leases(cluster, nodes, prefix, tmp_path):
    topo, etcd = cluster
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        a = nodes(0, env={"NOTIFY_SOCKET": notify.path}).start()
        env_a = a.wait_subnet_file()
        assert notify.messages() == ["READY=1"]
    finally:
        notify.close()
    b = nodes(1).start()
    env_b = b.wait_subnet_file()
    held = leases(etcd, prefix)
    assert len(held) == 2
    for node, env in ((a, env_a), (b, env_b)):
        assert list(env) == ["FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ"]
        assert env["FLANNEL_NETWORK"] == "10.1.0.0/16"
        assert env["FLANNEL_MTU"] == "1500" and env["FLANNEL_IPMASQ"] == "false"
        first_ip, plen = env["FLANNEL_SUBNET"].split("/")
        assert plen == "24" and first_ip.endswith(".1")
        key = f"{prefix}/subnets/{first_ip[:-2]}.0-24"
        assert held[key] == json.dumps(
            {"PublicIP": str(node.host.ip), "PublicIPv6": None}, separators=(",", ":")
        )
    assert env_a["FLANNEL_SUBNET"] != env_b["FLANNEL_SUBNET"]
    assert "Traceback" not in a.log() + b.log()


def test_restart_keeps_subnet_after_sigterm_and_kill9(nodes, cluster, prefix):
    _, etcd = cluster
    a = nodes(0).start()
    subnet = a.wait_subnet_file()["FLANNEL_SUBNET"]
    assert a.stop(signal.SIGTERM) == 0
    assert len(leases(etcd, prefix)) == 1  # the lease is kept on shutdown
    a.subnet_file.unlink()
    a.start()
    assert a.wait_subnet_file()["FLANNEL_SUBNET"] == subnet
    a.stop(signal.SIGKILL)
    a.subnet_file.unlink()
    a.start()
    assert a.wait_subnet_file()["FLANNEL_SUBNET"] == subnet
    assert "Traceback" not in a.log()


def test_restart_reuses_subnet_file_when_lease_is_gone(nodes, cluster, prefix):
    _, etcd = cluster
    a = nodes(0).start()
    subnet = a.wait_subnet_file()["FLANNEL_SUBNET"]
    a.stop()
    etcd.etcdctl("del", "--prefix", f"{prefix}/subnets/")
    a.start()
    assert wait_until(lambda: "reusing subnet" in a.log(), 20), a.log()
    assert a.wait_subnet_file()["FLANNEL_SUBNET"] == subnet


def test_deleted_lease_is_retaken_and_stolen_lease_exits(nodes, cluster, prefix):
    _, etcd = cluster
    a = nodes(0).start()
    first = a.wait_subnet_file()["FLANNEL_SUBNET"]
    key = f"{prefix}/subnets/{first[:-5]}.0-24"
    value = leases(etcd, prefix)[key]
    etcd.etcdctl("del", key)
    assert wait_until(lambda: leases(etcd, prefix).get(key) == value, 10), a.log()
    assert a.proc.poll() is None
    # Now someone else takes our subnet in one transaction: we must give up loudly.
    stolen = json.dumps({"PublicIP": "192.168.100.250", "PublicIPv6": None})
    etcd.etcdctl("put", key, stolen)
    assert a.wait_exit(15) == 1, a.log()
    last = [line for line in a.log().splitlines() if line.strip()][-1]
    assert "192.168.100.250" in last and "Traceback" not in a.log()


def test_short_ttl_lease_is_renewed_and_reservation_stays(nodes, cluster, prefix):
    _, etcd = cluster
    a = nodes(0, "-subnet-lease-ttl=6").start()
    env = a.wait_subnet_file()
    key = f"{prefix}/subnets/{env['FLANNEL_SUBNET'][:-5]}.0-24"
    first_id = lease_ids(etcd, prefix)[key]
    assert first_id != 0
    assert wait_until(lambda: lease_ids(etcd, prefix).get(key, first_id) != first_id, 15), a.log()
    assert wait_until(lambda: False, 7) is False  # past the first TTL: still there
    assert key in leases(etcd, prefix)
    a.stop()
    # Turn it into a reservation (no etcd lease); the daemon must keep it so.
    value = leases(etcd, prefix)[key]
    etcd.etcdctl("put", key, value)
    a.start()
    assert wait_until(lambda: "reservation" in a.log(), 20), a.log()
    wait_until(lambda: False, 7)
    assert lease_ids(etcd, prefix)[key] == 0
    assert a.proc.poll() is None


def test_invalid_config_is_logged_and_reread_until_fixed(nodes, cluster, prefix):
    """flanneld's getConfig: an invalid config is logged and re-read every second; the node
    starts as soon as someone fixes it (no exit, no restart needed)."""
    _, etcd = cluster
    a = nodes(0, config='{"Network":"10.1.0.0/30"}').start()
    assert wait_until(lambda: "Minimum useful network prefix is /28" in a.log(), 20), a.log()
    assert a.proc.poll() is None
    etcd.etcdctl("put", f"{prefix}/config", '{"Network": oops')
    assert wait_until(lambda: "not valid JSON" in a.log(), 20), a.log()
    assert a.proc.poll() is None
    etcd.etcdctl("put", f"{prefix}/config", ALLOC)
    a.wait_subnet_file()
    assert a.log().count("Minimum useful network prefix") == 1  # once per distinct error
    assert "Traceback" not in a.log()


def test_missing_config_waits_then_starts(nodes, cluster, prefix):
    _, etcd = cluster
    a = nodes(0, config=None).start()
    assert wait_until(lambda: "config not found" in a.log(), 15), a.log()
    assert wait_until(lambda: False, 2.5) is False
    assert a.log().count("config not found") == 1  # said once, not every second
    etcd.etcdctl("put", f"{prefix}/config", ALLOC)
    a.wait_subnet_file()
    assert "Traceback" not in a.log()


def test_unreachable_etcd_and_malformed_peer_leases(nodes, cluster, prefix, tmp_path):
    topo, etcd = cluster
    etcd.etcdctl("put", f"{prefix}/config", ALLOC)
    etcd.etcdctl("put", f"{prefix}/subnets/10.1.5.0-24", "{garbage")
    a = nodes(0, config=None)
    a.extra.append("-healthz-port=18765")
    a.start()
    a.wait_subnet_file()
    assert wait_until(lambda: "10.1.5.0-24" in a.log(), 10), a.log()
    probe = (
        "import urllib.request as u, urllib.error as e\n"
        "print(u.urlopen('http://127.0.0.1:18765/healthz').read().decode())\n"
        "print(u.urlopen('http://127.0.0.1:18765/readyz?verbose').read().decode())\n"
        "try:\n    u.urlopen('http://127.0.0.1:18765/healthzz')\n"
        "except e.HTTPError as x:\n    print(x.code, x.read().decode().strip())\n"
    )
    out = topo.run(a.host.netns, sys.executable, "-c", probe).stdout
    # flanneld's texts and codes (main.go's mustRunHealthz), unknown paths 404 like Go's mux
    assert out.splitlines() == [
        "flanneld is running",
        "flanneld is ready",
        "404 404 page not found",
    ]
    # A daemon pointed at nothing: a one-line warning, no traceback, still alive.
    b = Node(topo, topo.hosts[1], etcd, prefix, tmp_path)
    b.args_orig = b.args
    b.args = lambda: [
        x if not x.startswith("-etcd-endpoints") else f"-etcd-endpoints=http://{topo.switch_ip}:1"
        for x in b.args_orig()
    ]
    b.start()
    try:
        assert wait_until(lambda: "cannot connect to etcd" in b.log(), 20), b.log()
        assert b.proc.poll() is None and "Traceback" not in b.log()
        line = next(line for line in b.log().splitlines() if "cannot connect" in line)
        assert f"{topo.switch_ip}:1" in line
        assert b.stop() == 0  # SIGTERM during the retry loop exits cleanly
    finally:
        b.stop(signal.SIGKILL)


def test_ip_masq_rules_like_flanneld_and_resynced(nodes, cluster):
    topo, _ = cluster
    a = nodes(0, "-ip-masq", "-iptables-resync=1").start()
    env = a.wait_subnet_file()
    assert env["FLANNEL_IPMASQ"] == "true"
    ns = a.host.netns
    nat = topo.run(ns, "iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout
    subnet = env["FLANNEL_SUBNET"][:-5] + ".0/24"
    assert "--mark 0x4000/0x4000" in nat
    assert f"-s {subnet} -d 10.1.0.0/16" in nat
    assert "-s 10.1.0.0/16 ! -d 224.0.0.0/4" in nat and "MASQUERADE" in nat
    assert nat.count('--comment "flanneld masq"') == 6
    assert "FLANNEL-POSTRTG" in topo.run(ns, "iptables", "-t", "nat", "-S", "POSTROUTING").stdout
    fwd = topo.run(ns, "iptables", "-S", "FLANNEL-FWD").stdout
    assert "-s 10.1.0.0/16" in fwd and "-d 10.1.0.0/16" in fwd
    # Someone flushes our chain: it comes back within the resync period.
    topo.run(ns, "iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    assert wait_until(
        lambda: (
            topo.run(ns, "iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout.count(
                "flanneld masq"
            )
            == 6
        ),
        10,
    )
    assert wait_until(lambda: "re-installed" in a.log(), 5), a.log()


def test_leases_subcommand_lists_the_table(nodes, cluster, prefix):
    topo, etcd = cluster
    a = nodes(0).start()
    subnet = a.wait_subnet_file()["FLANNEL_SUBNET"][:-5] + ".0/24"
    reserved, junk = unleased(etcd, prefix, "10.1.0.0/16", 2)
    junk_key = junk.replace("/", "-")
    etcd.etcdctl(
        "put", f"{prefix}/subnets/{reserved.replace('/', '-')}", '{"PublicIP":"192.168.100.77"}'
    )
    etcd.etcdctl("put", f"{prefix}/subnets/{junk_key}", "junk")
    res = topo.run(
        a.host.netns,
        sys.executable,
        "-m",
        "fastlane",
        f"-etcd-endpoints={etcd.endpoint}",
        f"-etcd-prefix={prefix}",
        "leases",
        check=False,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:2] == ["SUBNET", "PUBLIC"]
    assert any(line.split()[:2] == [subnet, str(a.host.ip)] and "in " in line for line in lines)
    assert any(
        lease.split()[:2] == [reserved, "192.168.100.77"] and "reservation" in lease
        for lease in lines
    )
    assert junk_key in res.stderr and "Traceback" not in res.stderr


def test_public_ip_overrides_advertised_address(nodes, cluster, prefix):
    _, etcd = cluster
    a = nodes(0, "-public-ip=203.0.113.7").start()
    a.wait_subnet_file()
    (value,) = leases(etcd, prefix).values()
    assert json.loads(value)["PublicIP"] == "203.0.113.7"


# ---- failure handling: what keeps the node up, what stops it (docs/drop-in.md) --------------

READYZ = """
import sys, urllib.request as u, urllib.error as e
try:
    print(u.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=5).status)
except e.HTTPError as x:
    print(x.code)
"""


def _readyz(topo, node, port: int) -> str:
    return topo.run(node.host.netns, sys.executable, "-c", READYZ, str(port)).stdout.strip()


def _last_line(node) -> str:
    return [line for line in node.log().splitlines() if line.strip()][-1]


def test_subnet_file_unwritable_keeps_forwarding_not_ready_then_ready(
    nodes, cluster, prefix, tmp_path
):
    topo, etcd = cluster
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the subnet file's directory should be\n")
    a = nodes(0, f"-subnet-file={blocker}/subnet.env", "-healthz-port=18771")
    a.start()
    assert wait_until(lambda: "failed to write subnet file" in a.log(), 20), a.log()
    assert len(leases(etcd, prefix)) == 1 and a.proc.poll() is None  # the lease is held
    assert _readyz(topo, a, 18771) == "503"
    blocker.unlink()  # the operator fixes it: the next retry writes the file
    assert wait_until(lambda: (blocker / "subnet.env").exists(), 40), a.log()
    assert wait_until(lambda: _readyz(topo, a, 18771) == "200", 10)
    assert "FLANNEL_SUBNET=10.1." in (blocker / "subnet.env").read_text()
    assert "Traceback" not in a.log()


FAKE_IPTABLES = """#!/bin/sh
# Fails until {flag} exists, then is the real {real}.
[ -e {flag} ] && exec {real} "$@"
echo "{name}: fake failure for the test" >&2
exit 1
"""


def test_iptables_failure_is_retried_not_fatal(nodes, cluster, tmp_path):
    import os
    import shutil

    topo, _ = cluster
    bindir, flag = tmp_path / "bin", tmp_path / "iptables-works"
    bindir.mkdir()
    for name in ("iptables", "iptables-restore"):
        fake = bindir / name
        fake.write_text(FAKE_IPTABLES.format(flag=flag, real=shutil.which(name), name=name))
        fake.chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
    a = nodes(0, "-ip-masq", "-iptables-resync=1", env=env).start()
    env_file = a.wait_subnet_file()  # flanneld writes the subnet file anyway
    assert env_file["FLANNEL_IPMASQ"] == "true"
    assert wait_until(lambda: "failed to set up iptables rules" in a.log(), 10), a.log()
    assert wait_until(lambda: False, 2.5) is False
    assert a.proc.poll() is None
    assert a.log().count("fake failure") <= 2  # logged once per distinct cause, not every second
    flag.touch()
    ns = a.host.netns
    assert wait_until(
        lambda: (
            topo.run(
                ns, "iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG", check=False
            ).stdout.count("flanneld masq")
            == 6
        ),
        15,
    ), a.log()
    assert wait_until(lambda: "iptables rules installed" in a.log(), 5), a.log()
    assert "Traceback" not in a.log()


def test_tls_files_that_cannot_be_loaded_exit_1(nodes, tmp_path):
    bad = tmp_path / "garbage.pem"
    bad.write_text("not a certificate\n")
    for files in ((tmp_path / "missing.pem", tmp_path / "missing-key.pem"), (bad, bad)):
        a = nodes(0, f"-etcd-certfile={files[0]}", f"-etcd-keyfile={files[1]}").start()
        assert a.wait_exit(20) == 1, a.log()
        assert str(files[0]) in _last_line(a) and "Traceback" not in a.log()


def test_etcd_host_name_that_resolves_later(nodes, cluster, prefix):
    """Boot order: the daemon starts before DNS (here the netns' own /etc/hosts, which
    `ip netns exec` mounts) knows the etcd host; it retries instead of exiting."""
    import pathlib
    import secrets

    topo, etcd = cluster
    ns = topo.hosts[0].netns
    etc = pathlib.Path("/etc/netns") / ns
    name = f"etcd-{secrets.token_hex(4)}.invalid"
    try:
        etc.mkdir(parents=True)
        hosts = etc / "hosts"
        hosts.write_text("127.0.0.1 localhost\n")
        a = nodes(0)
        base = a.args
        a.args = lambda: [
            f"-etcd-endpoints=http://{name}:{etcd.client_port}"
            if x.startswith("-etcd-endpoints=")
            else x
            for x in base()
        ]
        a.start()
        assert wait_until(lambda: "cannot resolve host" in a.log(), 20), a.log()
        assert a.proc.poll() is None
        with hosts.open("a") as f:  # same inode: the daemon's bind mount sees it
            f.write(f"{topo.switch_ip} {name}\n")
        a.wait_subnet_file(30)
        assert "Traceback" not in a.log()
    finally:
        import shutil

        shutil.rmtree(etc, ignore_errors=True)


def test_netlink_error_at_backend_setup_is_one_line(nodes, cluster):
    topo, _ = cluster
    ns = topo.hosts[1].netns
    # Someone else's VXLAN device already holds VNI 1 on the kernel's port: flannel.1
    # cannot be created (EEXIST).
    topo.ip(
        ns,
        "link",
        "add",
        "vxother",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "8472",
        "dev",
        "eth0",
        "local",
        str(topo.hosts[1].ip),
    )
    try:
        a = nodes(1, config='{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}').start()
        assert a.wait_exit(20) == 1, a.log()
        assert "flannel.1" in _last_line(a) and "File exists" in _last_line(a), a.log()
        assert "Traceback" not in a.log()
    finally:
        topo.ip(ns, "link", "del", "vxother")
        topo.run(ns, "ip", "link", "del", "flannel.1", check=False)


# ---- supervised background loops (fastlane/supervise.py), in-process on both loops ----------


async def test_a_failing_loop_is_logged_and_restarted(caplog):
    import asyncio

    from fastlane.supervise import supervise

    runs = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom\nsecond line")
        await asyncio.Event().wait()  # healthy from now on

    task = asyncio.create_task(supervise("flaky loop", flaky, initial=0.01))
    while len(runs) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        "flaky loop failed: RuntimeError: boom second line; restarting it in 0.01s",
        "flaky loop failed: RuntimeError: boom second line; restarting it in 0.02s",
    ]


async def test_a_loop_that_must_not_degrade_reports_fatal():
    from fastlane.supervise import supervise

    fatal: list[str] = []

    async def returns() -> None:
        return None

    async def raises() -> None:
        raise KeyError("lease")

    await supervise("engine", returns, fatal=fatal.append)
    await supervise("watch", raises, fatal=fatal.append)
    await supervise("one-shot", returns, forever=False, fatal=fatal.append)
    assert fatal == ["engine failed: stopped unexpectedly", "watch failed: KeyError: 'lease'"]
