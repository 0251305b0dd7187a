"""How the watcher folds etcd's listings and watch batches into the lease table, without etcd.

The watcher's decisions are pure (watcher.plan_snapshot, plan_batch); these examples and
properties pin the edge cases: later events win, unreadable values drop routes, our own
subnet never becomes a route, and only the last word on our lease counts.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from fastlane.lease import Lease, LeaseAttrs
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
    assert plan.puts == {N("10.1.3.0/24"): lease(3, 4)}
    assert plan.deletes == {N("10.1.2.0/24"), N("10.1.5.0/24")}
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


events = st.lists(st.tuples(st.sampled_from(["put", "delete", "unreadable"]),
                            st.integers(1, 6), st.integers(1, 4)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(start=st.dictionaries(st.integers(2, 6), st.integers(1, 4)), batch=events)
def test_applying_a_batch_equals_replaying_it_one_event_at_a_time(start, batch) -> None:
    """Property: the table after plan_batch's puts/deletes is what replaying every event in
    order would give, minus our own subnet, whose fate is the last differing event."""
    table = {N(f"10.1.{t}.0/24"): lease(t, h) for t, h in start.items()}
    evs = [put(t, h) if kind == "put" else delete(t) if kind == "delete" else unreadable(t)
           for kind, t, h in batch]
    plan = plan_batch(evs, OWN)
    got = dict(table)
    for subnet in plan.deletes:
        got.pop(subnet, None)
    got.update(plan.puts)
    want = dict(table)
    last_own: tuple[OwnChange, Lease | None] | None = None
    for ev in evs:
        assert ev.subnet is not None
        if ev.subnet == OWN.subnet:
            if ev.lease is None:
                last_own = (OwnChange.DELETED, None)
            elif ev.lease.attrs.public_ip != OWN.attrs.public_ip:
                last_own = (OwnChange.CHANGED, ev.lease)
            continue
        if ev.lease is None:
            want.pop(ev.subnet, None)
        else:
            want[ev.subnet] = ev.lease
    assert got == want
    assert OWN.subnet not in plan.puts and OWN.subnet not in plan.deletes
    assert plan.own == last_own
    assert not (set(plan.puts) & plan.deletes)
