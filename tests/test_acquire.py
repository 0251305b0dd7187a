"""Which lease to acquire (lease.plan_acquisition), decided without etcd.

The examples are flanneld's rules one by one; the properties check them against
arbitrary listings, including ones full of other nodes' leases and our own stale ones.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fastlane.config import NetworkConfig, parse_config
from fastlane.lease import (
    AcquirePlan,
    Claim,
    Exhausted,
    Lease,
    LeaseAttrs,
    Reuse,
    choose_subnet,
    free_candidates,
    plan_acquisition,
    subnet_in_use,
)

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
CONFIG = parse_config('{"Network":"10.1.0.0/16","SubnetLen":24}')
ME = LeaseAttrs(public_ip=A("192.168.0.1"))


def lease(subnet: str, ip: str, etcd_lease: int = 7) -> Lease:
    return Lease(N(subnet), LeaseAttrs(public_ip=A(ip)), etcd_lease=etcd_lease, mod_revision=3)


def test_our_lease_is_reused_and_a_reservation_stays_one() -> None:
    others = [lease("10.1.5.0/24", "192.168.0.2")]
    ours = lease("10.1.9.0/24", "192.168.0.1", etcd_lease=0)
    plan = plan_acquisition(others + [ours], CONFIG, ME, previous=N("10.1.77.0/24"))
    assert plan == AcquirePlan((), Reuse(ours))
    assert plan.action.lease.is_reservation


def test_our_leases_outside_the_config_are_dropped_before_the_one_reused() -> None:
    outside = lease("10.1.0.0/24", "192.168.0.1")  # below SubnetMin
    wrong_len = lease("10.1.8.0/25", "192.168.0.1")
    fits = lease("10.1.9.0/24", "192.168.0.1")
    after = lease("10.2.0.0/24", "192.168.0.1")  # after the reused one: left alone
    plan = plan_acquisition([outside, wrong_len, fits, after], CONFIG, ME)
    assert plan == AcquirePlan((outside, wrong_len), Reuse(fits))


def test_previous_subnet_is_claimed_when_it_fits_and_is_free() -> None:
    stale = lease("10.3.0.0/24", "192.168.0.1")
    plan = plan_acquisition([stale], CONFIG, ME, previous=N("10.1.77.0/24"))
    assert plan == AcquirePlan((stale,), Claim(N("10.1.77.0/24"), from_previous=True))


def test_previous_subnet_held_by_others_or_outside_is_not_claimed() -> None:
    held = [lease("10.1.76.0/23", "192.168.0.2")]  # overlaps 10.1.77.0/24
    for leases, previous in ((held, N("10.1.77.0/24")), ([], N("10.2.0.0/24")),
                             ([], N("10.1.0.0/24"))):
        plan = plan_acquisition(leases, CONFIG, ME, previous=previous, rng=random.Random(1))
        assert isinstance(plan.action, Claim) and not plan.action.from_previous
        assert plan.action.subnet != previous and CONFIG.fits(plan.action.subnet)


def test_random_pick_is_the_free_choice_and_full_is_exhausted() -> None:
    others = [lease("10.1.1.0/24", "192.168.0.2"), lease("10.1.2.0/24", "192.168.0.3")]
    plan = plan_acquisition(others, CONFIG, ME, rng=random.Random(42))
    assert plan.action == Claim(choose_subnet(CONFIG, [l.subnet for l in others],
                                              random.Random(42)))
    small = parse_config('{"Network":"10.3.0.0/28"}')  # three /30 subnets
    full = [lease(str(n), f"192.168.1.{i}") for i, n in enumerate(free_candidates(small, []))]
    mine_outside = lease("10.3.0.0/30", "192.168.0.1")  # SubnetMin skips the first one
    assert plan_acquisition(full + [mine_outside], small, ME) == \
        AcquirePlan((mine_outside,), Exhausted())


# ---------------------------------------------------------------------------------------------
# properties

IPS = [A(f"192.168.0.{i}") for i in range(1, 5)]  # ME is the first

configs = st.tuples(st.integers(16, 28), st.integers(2, 6)).map(
    lambda t: parse_config(json.dumps({"Network": f"10.0.0.0/{t[0]}",
                                       "SubnetLen": min(30, t[0] + t[1])})))
# Anywhere in 10.0.0.0/14, any size: inside the config, around it, overlapping its subnets.
networks = st.tuples(st.integers(0, 2**18 - 1), st.integers(14, 30)).map(
    lambda t: N((0x0A000000 + t[0], t[1]), strict=False))


def config_subnets(config: NetworkConfig) -> st.SearchStrategy[N]:
    """Subnets of the config's size between SubnetMin and SubnetMax."""
    lo, hi = config.subnet_bounds()
    size = 1 << (32 - config.subnet_len)
    count = (int(hi.network_address) - int(lo.network_address)) // size
    return st.integers(0, count).map(
        lambda i: N((int(lo.network_address) + i * size, config.subnet_len)))


@st.composite
def listings(draw: st.DrawFn, config: NetworkConfig) -> list[Lease]:
    """Leases of four nodes (ours among them), mostly proper subnets, some stray ones."""
    nets = st.one_of(config_subnets(config), config_subnets(config), networks)
    return draw(st.lists(
        st.builds(lambda net, ip, el: Lease(net, LeaseAttrs(public_ip=ip), etcd_lease=el),
                  nets, st.sampled_from(IPS), st.sampled_from([0, 5])),
        max_size=30))


def previous_subnets(config: NetworkConfig) -> st.SearchStrategy[N | None]:
    """None, an arbitrary network, or (most interesting) one of the config's own subnets."""
    return st.one_of(st.none(), networks, config_subnets(config))


def _check(plan: AcquirePlan, listed: list[Lease], config: NetworkConfig,
           previous: N | None, seed: int) -> None:
    mine = [l for l in listed if l.attrs.public_ip == ME.public_ip]
    others = [l.subnet for l in listed if l.attrs.public_ip != ME.public_ip]
    fitting = [l for l in mine if config.fits(l.subnet)]
    # Only our own leases are ever dropped, only those the config rules out, in order.
    assert all(l in mine and not config.fits(l.subnet) for l in plan.drop)
    if fitting:
        first = fitting[0]
        assert plan.action == Reuse(first) and plan.action.lease is first
        assert list(plan.drop) == mine[: mine.index(first)]
        return
    assert list(plan.drop) == mine
    action = plan.action
    if previous is not None and config.fits(previous) and not subnet_in_use(previous, others):
        assert action == Claim(previous, from_previous=True)
        return
    if isinstance(action, Exhausted):
        assert free_candidates(config, others) == []
        return
    assert isinstance(action, Claim) and not action.from_previous
    assert config.fits(action.subnet)
    assert not any(action.subnet.overlaps(o) for o in others)
    assert action.subnet == choose_subnet(config, others, random.Random(seed))


@settings(max_examples=300)
@given(st.data(), configs, st.integers(0, 2**32))
def test_plan_follows_flanneld_rules(data: st.DataObject, config: NetworkConfig,
                                     seed: int) -> None:
    listed = data.draw(listings(config))
    previous = data.draw(previous_subnets(config))
    before = copy.deepcopy(listed)
    plan = plan_acquisition(listed, config, ME, previous, random.Random(seed))
    assert listed == before  # pure: the listing is not touched
    _check(plan, listed, config, previous, seed)
    # Deterministic given the random source.
    assert plan_acquisition(listed, config, ME, previous, random.Random(seed)) == plan


@settings(max_examples=200)
@given(st.data(), configs, st.integers(0, 2**32))
def test_carrying_out_a_plan_then_planning_again_reuses_it(
    data: st.DataObject, config: NetworkConfig, seed: int
) -> None:
    """After the drops and the claim, the next listing's plan is to reuse what we got."""
    listed = data.draw(listings(config))
    plan = plan_acquisition(listed, config, ME, None, random.Random(seed))
    after = [l for l in listed if l not in plan.drop]
    action = plan.action
    if isinstance(action, Exhausted):
        return
    if isinstance(action, Claim):
        got = Lease(action.subnet, ME, etcd_lease=9)
        after.append(got)
    else:
        got = action.lease  # re-written in place: same subnet, same key
    again = plan_acquisition(after, config, ME, None, random.Random(seed))
    assert again == AcquirePlan((), Reuse(got))
