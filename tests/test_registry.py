"""Lease acquisition, renewal, reservations and the watcher, against a real etcd."""

import asyncio
import ipaddress
import json

import pytest

from fastlane.config import parse_config
from fastlane.etcd import Store, parse_endpoints
from fastlane.lease import LeaseAttrs
from fastlane.leasetable import LeaseTable
from fastlane.registry import LeaseConflict, OutOfSubnets, Registry
from fastlane.watcher import Watcher
from tests.waiting import wait_until_async

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
CONFIG = parse_config('{"Network":"10.1.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}')


def attrs(ip: str) -> LeaseAttrs:
    return LeaseAttrs(public_ip=A(ip))


async def test_acquire_writes_flannels_key_and_value(store, prefix, etcd_server):
    reg = Registry(store, prefix)
    lease = await reg.acquire(CONFIG, attrs("172.31.14.97"))
    assert CONFIG.fits(lease.subnet)
    key = f"{prefix}/subnets/{lease.subnet.network_address}-24"
    out = etcd_server.etcdctl("get", key, "--print-value-only").strip()
    assert out == '{"PublicIP":"172.31.14.97","PublicIPv6":null}'
    ttl = await store.lease_ttl(lease.etcd_lease)
    assert 24 * 3600 - 60 < ttl <= 24 * 3600


async def test_fifty_concurrent_acquires_get_distinct_subnets(store, prefix):
    reg = Registry(store, prefix)
    leases = await asyncio.gather(*(reg.acquire(CONFIG, attrs(f"192.168.7.{i}")) for i in range(1, 51)))
    subnets = [l.subnet for l in leases]
    assert len(set(subnets)) == 50
    for i, a in enumerate(subnets):
        assert CONFIG.fits(a)
        assert not any(a.overlaps(b) for b in subnets[i + 1:])
    listed, _, warnings = await reg.snapshot()
    assert sorted(l.subnet for l in listed) == sorted(subnets) and warnings == []


async def test_restart_reuses_lease_by_public_ip(store, prefix):
    reg = Registry(store, prefix)
    first = await reg.acquire(CONFIG, attrs("10.9.9.9"))
    again = await reg.acquire(CONFIG, attrs("10.9.9.9"), previous=N("10.1.200.0/24"))
    assert again.subnet == first.subnet
    assert again.etcd_lease != first.etcd_lease  # re-granted, as flanneld does


async def test_previous_subnet_file_is_reused_when_free(store, prefix):
    reg = Registry(store, prefix)
    lease = await reg.acquire(CONFIG, attrs("10.9.9.10"), previous=N("10.1.77.0/24"))
    assert lease.subnet == N("10.1.77.0/24")
    # Held by someone else: not reused.
    other = await reg.acquire(CONFIG, attrs("10.9.9.11"), previous=N("10.1.77.0/24"))
    assert other.subnet != N("10.1.77.0/24")
    # Outside the config: not reused.
    third = await reg.acquire(CONFIG, attrs("10.9.9.12"), previous=N("10.2.0.0/24"))
    assert CONFIG.fits(third.subnet)


async def test_lease_outside_config_is_deleted_and_replaced(store, prefix):
    reg = Registry(store, prefix)
    await store.put(f"{prefix}/subnets/10.1.0.0-24", attrs("10.9.9.13").encode())  # first subnet: outside SubnetMin
    lease = await reg.acquire(CONFIG, attrs("10.9.9.13"))
    assert lease.subnet != N("10.1.0.0/24")
    assert await store.get(f"{prefix}/subnets/10.1.0.0-24") is None


async def test_reservation_stays_a_reservation_through_renewal(store, prefix):
    reg = Registry(store, prefix, ttl=5)
    key = f"{prefix}/subnets/10.1.42.0-24"
    await store.put(key, attrs("10.9.9.14").encode())
    lease = await reg.acquire(CONFIG, attrs("10.9.9.14"))
    assert lease.subnet == N("10.1.42.0/24") and lease.is_reservation and lease.expiration is None
    renewed = await reg.renew(lease)
    assert renewed.is_reservation
    assert (await store.get(key)).lease == 0


async def test_renew_regrants_and_keeps_subnet(store, prefix):
    reg = Registry(store, prefix, ttl=30)
    lease = await reg.acquire(CONFIG, attrs("10.9.9.15"))
    renewed = await reg.renew(lease)
    assert renewed.subnet == lease.subnet and renewed.etcd_lease != lease.etcd_lease
    kv = await store.get(lease.key)
    assert kv.lease == renewed.etcd_lease


async def test_retake_after_delete_and_conflict(store, prefix):
    reg = Registry(store, prefix)
    lease = await reg.acquire(CONFIG, attrs("10.9.9.16"))
    await store.delete(lease.key)
    back = await reg.retake(lease)
    assert back.subnet == lease.subnet
    await store.delete(lease.key)
    await store.put(lease.key, attrs("10.9.9.99").encode())
    with pytest.raises(LeaseConflict):
        await reg.retake(lease)


async def test_out_of_subnets_is_a_clear_error(store, prefix):
    small = parse_config('{"Network":"10.3.0.0/28"}')  # three /30 subnets
    reg = Registry(store, prefix)
    for i in range(3):
        await reg.acquire(small, attrs(f"10.8.0.{i + 1}"))
    with pytest.raises(OutOfSubnets) as info:
        await reg.acquire(small, attrs("10.8.0.9"))
    assert "out of subnets" in str(info.value) and "\n" not in str(info.value)


async def test_snapshot_and_watch_are_decoded_with_warnings_naming_the_key(store, prefix):
    reg = Registry(store, prefix)
    sub = f"{prefix}/subnets/"
    await store.put(sub + "10.1.1.0-24", attrs("10.9.8.1").encode())
    await store.put(sub + "not-a-subnet", b"{}")
    await store.put(sub + "10.1.2.0-24", b"junk")
    leases, revision, warnings = await reg.snapshot()
    assert [l.subnet for l in leases] == [N("10.1.1.0/24")]
    assert leases[0].key == sub + "10.1.1.0-24" and leases[0].is_reservation
    assert sorted(w.key for w in warnings) == [sub + "10.1.2.0-24", sub + "not-a-subnet"]
    assert all(w.key in str(w) and w.mod_revision <= revision for w in warnings)

    batches = reg.watch(revision + 1)
    await store.put(sub + "10.1.3.0-24", attrs("10.9.8.3").encode())
    await store.put(sub + "10.1.4.0-24", b'{"PublicIP":12}')
    await store.put(sub + "bad", attrs("10.9.8.5").encode())
    await store.delete(sub + "10.1.1.0-24")
    events = []
    async with asyncio.timeout(5):
        async for batch in batches:
            events += batch
            if len(events) >= 4:
                break
    await batches.aclose()
    put, unreadable, bad_key, deleted = events
    assert put.subnet == N("10.1.3.0/24") and put.lease.attrs == attrs("10.9.8.3")
    assert put.lease.mod_revision == put.mod_revision and put.warning is None
    assert unreadable.subnet == N("10.1.4.0/24") and unreadable.lease is None
    assert "10.1.4.0-24" in str(unreadable.warning)
    assert bad_key.subnet is None and bad_key.lease is None and "bad" in str(bad_key.warning)
    assert deleted.subnet == N("10.1.1.0/24") and deleted.lease is None and deleted.warning is None




async def _start_watcher(store, prefix, own=None):
    reg = Registry(store, prefix)
    table = LeaseTable()
    events = []
    table.subscribe(lambda t, change: events.append(change))
    own_events = []

    async def on_own(what, lease):
        own_events.append(what)

    w = Watcher(reg, table, lambda: own, on_own)
    task = asyncio.create_task(w.run())
    await asyncio.wait_for(w.synced.wait(), 10)
    return reg, table, w, task, events, own_events


async def test_watcher_sees_peers_within_a_second_and_skips_garbage(store, prefix, caplog):
    reg, table, w, task, events, _ = await _start_watcher(store, prefix)
    try:
        other = Registry(store, prefix)
        lease = await other.acquire(CONFIG, attrs("10.7.0.1"))
        assert await wait_until_async(lambda: lease.subnet in table, 1.0)
        assert table.get(lease.subnet).attrs.public_ip == A("10.7.0.1")
        # Garbage from someone else: a bad key and a bad value, each warned about by name.
        await store.put(f"{prefix}/subnets/not-a-subnet", b"{}")
        await store.put(f"{prefix}/subnets/10.1.99.0-24", b"{\"PublicIP\": 12}")
        await store.delete(lease.key)
        assert await wait_until_async(lambda: lease.subnet not in table, 1.0)
        assert N("10.1.99.0/24") not in table
        text = caplog.text
        assert "not-a-subnet" in text and "10.1.99.0-24" in text
        assert not task.done()
    finally:
        task.cancel()


async def test_watcher_excludes_own_and_reports_own_deletion(store, prefix):
    reg = Registry(store, prefix)
    mine = await reg.acquire(CONFIG, attrs("10.7.0.2"))
    _, table, w, task, _, own_events = await _start_watcher(store, prefix, own=mine)
    try:
        assert mine.subnet not in table
        await store.delete(mine.key)
        assert await wait_until_async(lambda: own_events == ["deleted"], 1.0)
    finally:
        task.cancel()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_watch_survives_etcd_restart_and_compaction(etcd, prefix):
    store = await Store.connect(parse_endpoints(etcd.endpoint), timeout=5.0)
    try:
        reg, table, w, task, _, _ = await _start_watcher(store, prefix)
        writer = Registry(store, prefix)
        a = await writer.acquire(CONFIG, attrs("10.6.0.1"))
        assert await wait_until_async(lambda: a.subnet in table)
        # etcd goes away; meanwhile (from another client after restart) state changes.
        etcd.kill()
        await asyncio.sleep(0.5)
        etcd.start()
        etcd.etcdctl("del", a.key)
        etcd.etcdctl("put", f"{prefix}/subnets/10.1.50.0-24", json.dumps({"PublicIP": "10.6.0.2", "PublicIPv6": None}))
        assert await wait_until_async(lambda: a.subnet not in table and N("10.1.50.0/24") in table, 15)
        # Compaction while watching: put more, compact to head, the table still converges.
        for i in range(5):
            etcd.etcdctl("put", f"{prefix}/subnets/10.1.{60 + i}.0-24", json.dumps({"PublicIP": f"10.6.1.{i}"}))
        rev = json.loads(etcd.etcdctl("endpoint", "status", "-w", "json"))[0]["Status"]["header"]["revision"]
        etcd.etcdctl("compact", str(rev))
        etcd.etcdctl("del", f"{prefix}/subnets/10.1.60.0-24")
        want = {N(f"10.1.{60 + i}.0/24") for i in range(1, 5)} | {N("10.1.50.0/24")}
        assert await wait_until_async(lambda: set(l.subnet for l in table.leases()) == want, 15)
        assert not task.done()
        task.cancel()
    finally:
        await store.close()
