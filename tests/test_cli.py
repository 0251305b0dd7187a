"""`fastlane leases` against a real etcd: the table and the `--json` document scripts read."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

VXLAN = (
    b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
    b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
)
UDP = b'{"PublicIP":"192.168.64.4","PublicIPv6":null}'  # flannel's udp backend: no BackendType
RESERVED = b'{"PublicIP":"192.168.64.9","PublicIPv6":null,"BackendType":"host-gw"}'


async def _leases(etcd_server, prefix: str, *args: str) -> tuple[int, str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # no FLANNELD_* from the caller's shell
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fastlane",
        f"-etcd-endpoints={etcd_server.endpoint}",
        f"-etcd-prefix={prefix}",
        "leases",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None  # communicate() waited for the exit
    return proc.returncode, out.decode(), err.decode()


async def _fill(store, prefix: str) -> None:
    grant = await store.grant(600)
    await store.put(f"{prefix}/subnets/10.1.18.0-24", VXLAN, lease=grant)
    await store.put(f"{prefix}/subnets/10.1.5.0-24", UDP, lease=grant)
    await store.put(f"{prefix}/subnets/10.1.200.0-24", RESERVED)  # no etcd lease: a reservation
    await store.put(f"{prefix}/subnets/10.1.7.0-24", b"not json", lease=grant)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_leases_json(store, prefix, etcd_server):
    await _fill(store, prefix)
    code, out, err = await _leases(etcd_server, prefix, "--json")
    assert code == 0, err
    doc = json.loads(out)  # one document, nothing else on stdout
    assert doc["prefix"] == prefix and isinstance(doc["revision"], int) and doc["revision"] > 0
    by_subnet = {row["subnet"]: row for row in doc["leases"]}
    assert list(by_subnet) == ["10.1.5.0/24", "10.1.18.0/24", "10.1.200.0/24"]  # numeric order
    vx = by_subnet["10.1.18.0/24"]
    assert vx["public_ip"] == "192.168.64.3" and vx["backend_type"] == "vxlan"
    assert vx["backend_data"] == {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
    assert vx["key"] == f"{prefix}/subnets/10.1.18.0-24" and vx["reservation"] is False
    assert 590 <= vx["expires_in"] <= 600
    udp = by_subnet["10.1.5.0/24"]
    assert udp["backend_type"] == "udp" and udp["backend_data"] is None
    res = by_subnet["10.1.200.0/24"]
    assert (
        res["reservation"] is True
        and res["expires_in"] is None
        and res["backend_type"] == "host-gw"
    )
    assert [w["key"] for w in doc["warnings"]] == [f"{prefix}/subnets/10.1.7.0-24"]
    assert "10.1.7.0-24" in doc["warnings"][0]["message"] or "JSON" in doc["warnings"][0]["message"]


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_leases_table_and_empty_json(store, prefix, etcd_server):
    code, out, _ = await _leases(etcd_server, prefix, "--json")
    assert code == 0 and json.loads(out)["leases"] == [] and json.loads(out)["warnings"] == []
    await _fill(store, prefix)
    code, out, err = await _leases(etcd_server, prefix)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["SUBNET", "PUBLIC", "IP", "BACKEND", "EXPIRES"]
    assert lines[3].split() == ["10.1.200.0/24", "192.168.64.9", "host-gw", "reservation"]
    assert err.count("warning:") == 1


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_leases_usage_and_bad_arguments(etcd_server, prefix):
    code, out, _ = await _leases(etcd_server, prefix, "--help")
    assert code == 0 and "--json" in out
    code, _, err = await _leases(etcd_server, prefix, "--jsn")
    assert code == 2 and "unrecognized arguments" in err


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_leases_json_unreachable_etcd_is_exit_1(prefix):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fastlane",
        "-etcd-endpoints=http://127.0.0.1:9",
        "leases",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and out == b"" and b"fastlane leases:" in err
