"""How the watcher folds etcd's listings and watch batches into the lease table, without etcd.

The watcher's decisions are pure (watcher.plan_snapshot, plan_batch); these examples and
properties pin the edge cases: later events win, unreadable values drop routes, our own
subnet never becomes a route, and only the last word on our lease counts.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from fastlane.lease import Lease, LeaseAttrs, LeaseId
from fastlane.registry import LeaseEvent, LeaseWarning
from fastlane.watcher import OwnChange, plan_batch, plan_snapshot

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
OWN = Lease(N("10.1.1.0/24"), LeaseAttrs(public_ip=A("192.168.0.1")))


def lease(third: int, host: int) -> Lease:
    return Lease(N(f"10.1.{third}.0/24"), LeaseAttrs(public_ip=A(f"192.168.0.{host}")))


def put(third: int, host: int) -> LeaseEvent:
    return LeaseEvent(f"/k/10.1.{third}.0-24", 1, N(f"10.1.{third}.0/24"), lease(third, host))


def delete(third: int) -> LeaseEvent:
    return LeaseEvent(f"/k/10.1.{third}.0-24", 1, N(f"10.1.{third}.0/24"), None)


def unreadable(third: int) -> LeaseEvent:
    key = f"/k/10.1.{third}.0-24"
    return LeaseEvent(key, 1, N(f"10.1.{third}.0/24"), None, LeaseWarning(key, 1, "bad JSON"))


def test_snapshot_leaves_our_lease_out_and_says_what_happened_to_it() -> None:
    peers = [lease(2, 2), lease(3, 3)]
    assert plan_snapshot(peers + [lease(1, 1)], OWN) == (peers, None, lease(1, 1))
    assert plan_snapshot(peers, OWN) == (peers, OwnChange.DELETED, None)
    assert plan_snapshot(peers + [lease(1, 9)], OWN) == (peers, OwnChange.CHANGED, lease(1, 9))
    assert plan_snapshot(peers + [lease(1, 9)], None) == (peers + [lease(1, 9)], None, None)


def test_batch_later_events_win_and_unreadable_values_drop_the_route() -> None:
    plan = plan_batch([put(2, 2), delete(2), put(3, 3), put(3, 4), put(5, 5), unreadable(5)], OWN)
    assert plan.puts == {(N("10.1.3.0/24"), None): lease(3, 4)}
    assert plan.deletes == {(N("10.1.2.0/24"), None), (N("10.1.5.0/24"), None)}
    assert plan.own is None


def test_batch_reports_only_the_last_word_on_our_lease() -> None:
    assert plan_batch([put(1, 9), delete(1)], OWN).own == (OwnChange.DELETED, None)
    assert plan_batch([delete(1), put(1, 9)], OWN).own == (OwnChange.CHANGED, lease(1, 9))
    # a re-put with our own address changes nothing
    assert plan_batch([put(1, 1)], OWN).own is None
    # an unreadable key (no subnet) is skipped
    assert plan_batch([LeaseEvent("/k/junk", 1, None, None)], OWN) == plan_batch([], OWN)


def test_own_change_is_a_string_for_older_callers() -> None:
    assert OwnChange.DELETED == "deleted" and OwnChange.CHANGED == "changed"


events = st.lists(
    st.tuples(
        st.sampled_from(["put", "delete", "unreadable"]), st.integers(1, 6), st.integers(1, 4)
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(start=st.dictionaries(st.integers(2, 6), st.integers(1, 4)), batch=events)
def test_applying_a_batch_equals_replaying_it_one_event_at_a_time(start, batch) -> None:
    """Property: the table after plan_batch's puts/deletes is what replaying every event in
    order would give, minus our own subnet, whose fate is the last differing event."""
    table: dict[LeaseId, Lease] = {
        (N(f"10.1.{t}.0/24"), None): lease(t, h) for t, h in start.items()
    }
    evs = [
        put(t, h) if kind == "put" else delete(t) if kind == "delete" else unreadable(t)
        for kind, t, h in batch
    ]
    plan = plan_batch(evs, OWN)
    got = dict(table)
    for subnet in plan.deletes:
        got.pop(subnet, None)
    got.update(plan.puts)
    want = dict(table)
    last_own: tuple[OwnChange, Lease | None] | None = None
    for ev in evs:
        assert ev.ident is not None
        if ev.ident == OWN.ident:
            if ev.lease is None:
                last_own = (OwnChange.DELETED, None)
            elif ev.lease.attrs.public_ip != OWN.attrs.public_ip:
                last_own = (OwnChange.CHANGED, ev.lease)
            continue
        if ev.lease is None:
            want.pop(ev.ident, None)
        else:
            want[ev.ident] = ev.lease
    assert got == want
    assert OWN.ident not in plan.puts and OWN.ident not in plan.deletes
    assert plan.own == last_own
    assert not (set(plan.puts) & plan.deletes)


def test_a_dual_stack_lease_is_one_entry_keyed_by_both_subnets() -> None:
    """flannel's sameSubnet: the pair identifies a lease; a v4-only key with the same IPv4
    subnet is another lease, and an IPv6-only one is keyed by its IPv6 subnet alone."""
    N6 = ipaddress.IPv6Network
    attrs = LeaseAttrs(public_ip=A("192.168.0.7"), public_ipv6=ipaddress.IPv6Address("fd00::7"))
    dual = Lease(N("10.1.7.0/24"), attrs, ipv6_subnet=N6("fd00:1:0:7::/64"))
    only4 = Lease(N("10.1.7.0/24"), attrs)
    only6 = Lease(
        None,
        LeaseAttrs(public_ip=A("0.0.0.0"), public_ipv6=ipaddress.IPv6Address("fd00::8")),
        ipv6_subnet=N6("fd00:1:0:8::/64"),
    )
    evs = [
        LeaseEvent("/k/a", 1, held.subnet, held, ipv6_subnet=held.ipv6_subnet)
        for held in (dual, only4, only6)
    ]
    plan = plan_batch(evs, OWN)
    assert plan.puts == {dual.ident: dual, only4.ident: only4, only6.ident: only6}
    gone = plan_batch([LeaseEvent("/k/a", 2, dual.subnet, None, ipv6_subnet=dual.ipv6_subnet)], OWN)
    assert gone.deletes == {(N("10.1.7.0/24"), N6("fd00:1:0:7::/64"))}
    # our own dual-stack lease never enters the table; another holder on it is a change
    own = dual
    assert plan_batch(evs, own).puts == {only4.ident: only4, only6.ident: only6}
    taken = Lease(dual.subnet, LeaseAttrs(public_ip=A("192.168.0.9")), ipv6_subnet=dual.ipv6_subnet)
    ev = LeaseEvent("/k/a", 3, taken.subnet, taken, ipv6_subnet=taken.ipv6_subnet)
    assert plan_batch([ev], own).own == (OwnChange.CHANGED, taken)
