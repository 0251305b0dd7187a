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
    leases = await asyncio.gather(
        *(reg.acquire(CONFIG, attrs(f"192.168.7.{i}")) for i in range(1, 51))
    )
    subnets = [held.subnet for held in leases]
    assert len(set(subnets)) == 50
    for i, a in enumerate(subnets):
        assert CONFIG.fits(a)
        assert not any(a.overlaps(b) for b in subnets[i + 1 :])
    listed, _, warnings = await reg.snapshot()
    assert sorted(held.subnet for held in listed) == sorted(subnets) and warnings == []


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
    await store.put(
        f"{prefix}/subnets/10.1.0.0-24", attrs("10.9.9.13").encode()
    )  # first subnet: outside SubnetMin
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
    assert [held.subnet for held in leases] == [N("10.1.1.0/24")]
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
        await store.put(f"{prefix}/subnets/10.1.99.0-24", b'{"PublicIP": 12}')
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
        etcd.etcdctl(
            "put",
            f"{prefix}/subnets/10.1.50.0-24",
            json.dumps({"PublicIP": "10.6.0.2", "PublicIPv6": None}),
        )
        assert await wait_until_async(
            lambda: a.subnet not in table and N("10.1.50.0/24") in table, 15
        )
        # Compaction while watching: put more, compact to head, the table still converges.
        for i in range(5):
            etcd.etcdctl(
                "put",
                f"{prefix}/subnets/10.1.{60 + i}.0-24",
                json.dumps({"PublicIP": f"10.6.1.{i}"}),
            )
        rev = json.loads(etcd.etcdctl("endpoint", "status", "-w", "json"))[0]["Status"]["header"][
            "revision"
        ]
        etcd.etcdctl("compact", str(rev))
        etcd.etcdctl("del", f"{prefix}/subnets/10.1.60.0-24")
        want = {N(f"10.1.{60 + i}.0/24") for i in range(1, 5)} | {N("10.1.50.0/24")}
        assert await wait_until_async(
            lambda: set(held.subnet for held in table.leases()) == want, 15
        )
        assert not task.done()
        task.cancel()
    finally:
        await store.close()


# ---------------------------------------------------------------------------------------------
# IPv6 / dual-stack against a real etcd. Keys and values as flannel v0.28 writes them
# (MakeSubnetKey, json.Marshal(LeaseAttrs)); checked with etcdctl, not through our decoder.

N6 = ipaddress.IPv6Network
A6 = ipaddress.IPv6Address
DUAL = parse_config('{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:1::/48"}')
ONLY6 = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:1::/48"}')


def attrs6(ip: str, ip6: str) -> LeaseAttrs:
    return LeaseAttrs(public_ip=A(ip), public_ipv6=A6(ip6))


async def test_dual_stack_acquire_writes_one_flannel_key_with_both_subnets(
    store, prefix, etcd_server
):
    reg = Registry(store, prefix)
    lease = await reg.acquire(DUAL, attrs6("172.31.14.97", "2001:db8::97"))
    assert DUAL.fits(lease.subnet) and DUAL.fits6(lease.ipv6_subnet)
    key = (
        f"{prefix}/subnets/{lease.subnet.network_address}-24"
        f"&{lease.ipv6_subnet.network_address.compressed}-64"
    )
    assert lease.key == key
    keys = etcd_server.etcdctl("get", f"{prefix}/subnets/", "--prefix", "--keys-only").split()
    assert keys == [key]  # one key: both subnets were claimed in one transaction
    out = etcd_server.etcdctl("get", key, "--print-value-only").strip()
    assert out == '{"PublicIP":"172.31.14.97","PublicIPv6":"2001:db8::97"}'
    assert 24 * 3600 - 60 < await store.lease_ttl(lease.etcd_lease) <= 24 * 3600


async def test_ipv6_only_acquire_writes_flannels_empty_ipv4_part(store, prefix, etcd_server):
    reg = Registry(store, prefix)
    a = await reg.acquire(ONLY6, attrs6("0.0.0.0", "2001:db8::1"))
    b = await reg.acquire(ONLY6, attrs6("0.0.0.0", "2001:db8::2"))
    assert a.subnet is None and b.subnet is None and a.ipv6_subnet != b.ipv6_subnet
    assert a.key == f"{prefix}/subnets/0.0.0.0-0&{a.ipv6_subnet.network_address.compressed}-64"
    out = etcd_server.etcdctl("get", a.key, "--print-value-only").strip()
    assert out == '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::1"}'
    # a restart of the first node finds its lease by PublicIPv6 (PublicIP is 0.0.0.0 for all)
    again = await reg.acquire(ONLY6, attrs6("0.0.0.0", "2001:db8::1"))
    assert again.ident == a.ident and again.etcd_lease != a.etcd_lease


async def test_fifty_concurrent_dual_stack_acquires_get_distinct_pairs(store, prefix):
    reg = Registry(store, prefix)
    leases = await asyncio.gather(
        *(reg.acquire(DUAL, attrs6(f"192.168.7.{i}", f"2001:db8::{i:x}")) for i in range(1, 51))
    )
    assert (
        len({held.subnet for held in leases}) == 50
        and len({held.ipv6_subnet for held in leases}) == 50
    )
    listed, _, warnings = await reg.snapshot()
    assert (
        sorted(held.ident for held in listed) == sorted(held.ident for held in leases)
        and warnings == []
    )


async def test_dual_stack_restart_reuses_both_by_public_ip_and_from_the_subnet_file(store, prefix):
    reg = Registry(store, prefix)
    first = await reg.acquire(DUAL, attrs6("10.9.9.9", "2001:db8::9"))
    again = await reg.acquire(
        DUAL,
        attrs6("10.9.9.9", "2001:db8::9"),
        previous=N("10.1.200.0/24"),
        previous6=N6("fd00:1:0:200::/64"),
    )
    assert again.ident == first.ident and again.etcd_lease != first.etcd_lease
    # the lease expired while the node was down: both subnets come back from subnet.env
    await store.delete(first.key)
    back = await reg.acquire(
        DUAL, attrs6("10.9.9.9", "2001:db8::9"), previous=first.subnet, previous6=first.ipv6_subnet
    )
    assert back.ident == first.ident and back.key == first.key


async def test_switching_ipv6_on_keeps_the_ipv4_subnet_and_off_drops_the_pair(store, prefix):
    reg = Registry(store, prefix)
    v4 = await reg.acquire(CONFIG, attrs("10.9.9.20"))
    dual = await reg.acquire(DUAL, attrs6("10.9.9.20", "2001:db8::20"), previous=v4.subnet)
    assert dual.subnet == v4.subnet and DUAL.fits6(dual.ipv6_subnet)
    assert await store.get(v4.key) is None  # the IPv4-only key no longer fits: deleted
    back = await reg.acquire(
        CONFIG, attrs("10.9.9.20"), previous=dual.subnet, previous6=dual.ipv6_subnet
    )
    assert back.subnet == v4.subnet and back.ipv6_subnet is None and back.key == v4.key
    assert await store.get(dual.key) is None


async def test_dual_stack_renew_retake_and_a_reservation_keyed_by_hand(store, prefix, etcd_server):
    reg = Registry(store, prefix, ttl=30)
    me = attrs6("10.9.9.30", "2001:db8::30")
    lease = await reg.acquire(DUAL, me)
    renewed = await reg.renew(lease)
    assert renewed.ident == lease.ident and (await store.get(lease.key)).lease == renewed.etcd_lease
    await store.delete(lease.key)
    back = await reg.retake(lease)
    assert back.ident == lease.ident and back.key == lease.key
    await store.delete(lease.key)
    await store.put(lease.key, attrs6("10.9.9.99", "2001:db8::99").encode())
    with pytest.raises(LeaseConflict):
        await reg.retake(lease)
    # an operator's dual-stack reservation, the IPv6 part written longhand: kept as written
    key = f"{prefix}/subnets/10.1.44.0-24&fd00:1:0:44:0:0:0:0-64"
    await store.put(key, attrs6("10.9.9.31", "2001:db8::31").encode())
    res = await reg.acquire(DUAL, attrs6("10.9.9.31", "2001:db8::31"))
    assert res.is_reservation and res.key == key and res.ipv6_subnet == N6("fd00:1:0:44::/64")
    assert (await reg.renew(res)).key == key and (await store.get(key)).lease == 0


async def test_malformed_ipv6_leases_from_others_are_skipped_with_a_warning(store, prefix):
    reg = Registry(store, prefix)
    sub = f"{prefix}/subnets/"
    good = attrs6("10.9.8.1", "2001:db8::81").encode()
    await store.put(sub + "10.1.1.0-24&fd00:1:0:1::-64", good)
    await store.put(
        sub + "10.1.2.0-24&fd00:1:0:2::-64", b'{"PublicIP":"10.9.8.2","PublicIPv6":"nope"}'
    )
    await store.put(sub + "10.1.3.0-24&FD00:1:0:3::-64", good)  # flannel's regex: lower case only
    await store.put(sub + "10.1.4.0-24&fd00:1:0:4::1-64", good)  # host bits
    leases, revision, warnings = await reg.snapshot()
    assert [held.ident for held in leases] == [(N("10.1.1.0/24"), N6("fd00:1:0:1::/64"))]
    assert sorted(w.key for w in warnings) == sorted(
        sub + k
        for k in (
            "10.1.2.0-24&fd00:1:0:2::-64",
            "10.1.3.0-24&FD00:1:0:3::-64",
            "10.1.4.0-24&fd00:1:0:4::1-64",
        )
    )
    assert all(w.key in str(w) and "\n" not in str(w) for w in warnings)
    # allocation steps around the readable pair and ignores the unreadable ones
    mine = await reg.acquire(DUAL, attrs6("10.9.8.9", "2001:db8::89"))
    assert mine.subnet != N("10.1.1.0/24") and mine.ipv6_subnet != N6("fd00:1:0:1::/64")
    # the watch decodes events the same way; it starts after our own lease's put, and only the
    # two keys written here count (our lease was picked at random and may share a prefix)
    batches = reg.watch(mine.mod_revision + 1)
    written = (sub + "0.0.0.0-0&fd00:1:0:9::-64", sub + "10.1.5.0-24&fd00:1:0:5::-64")
    await store.put(written[0], attrs6("0.0.0.0", "2001:db8::99").encode())
    await store.put(written[1], b'{"PublicIP":"10.9.8.5","PublicIPv6":7}')
    events = []
    async with asyncio.timeout(5):
        async for batch in batches:
            events += [e for e in batch if e.key in written]
            if len(events) >= 2:
                break
    await batches.aclose()
    only6, bad = events
    assert only6.ident == (None, N6("fd00:1:0:9::/64")) and only6.lease.attrs.public_ipv6 == A6(
        "2001:db8::99"
    )
    assert bad.ident == (N("10.1.5.0/24"), N6("fd00:1:0:5::/64")) and bad.lease is None
    assert "PublicIPv6" in str(bad.warning)


async def test_watcher_keeps_a_dual_stack_lease_as_one_entry(store, prefix):
    reg = Registry(store, prefix)
    mine = await reg.acquire(DUAL, attrs6("10.7.0.40", "2001:db8::40"))
    _, table, w, task, _, own_events = await _start_watcher(store, prefix, own=mine)
    try:
        peer = await Registry(store, prefix).acquire(DUAL, attrs6("10.7.0.41", "2001:db8::41"))
        assert await wait_until_async(lambda: peer.ident in table, 2.0)
        assert len(table) == 1 and mine.ident not in table
        assert table.get(peer.ident).attrs.public_ipv6 == A6("2001:db8::41")
        # a v4-only key with the same IPv4 subnet is another lease, not an update of this one
        await store.put(
            f"{prefix}/subnets/{peer.subnet.network_address}-24", attrs("10.7.0.42").encode()
        )
        assert await wait_until_async(lambda: len(table) == 2, 2.0)
        assert table.get(peer.ident).attrs.public_ip == A("10.7.0.41")
        await store.delete(peer.key)
        assert await wait_until_async(lambda: peer.ident not in table and len(table) == 1, 2.0)
        await store.delete(mine.key)
        assert await wait_until_async(lambda: own_events == ["deleted"], 2.0)
    finally:
        task.cancel()
