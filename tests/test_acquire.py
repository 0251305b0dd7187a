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
    holder,
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
    assert isinstance(plan.action, Reuse) and plan.action.lease.is_reservation


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
    for leases, previous in (
        (held, N("10.1.77.0/24")),
        ([], N("10.2.0.0/24")),
        ([], N("10.1.0.0/24")),
    ):
        plan = plan_acquisition(leases, CONFIG, ME, previous=previous, rng=random.Random(1))
        assert isinstance(plan.action, Claim) and not plan.action.from_previous
        assert plan.action.subnet != previous and CONFIG.fits(plan.action.subnet)


def test_random_pick_is_the_free_choice_and_full_is_exhausted() -> None:
    others = [lease("10.1.1.0/24", "192.168.0.2"), lease("10.1.2.0/24", "192.168.0.3")]
    plan = plan_acquisition(others, CONFIG, ME, rng=random.Random(42))
    assert plan.action == Claim(
        choose_subnet(CONFIG, [held.subnet4 for held in others], random.Random(42))
    )
    small = parse_config('{"Network":"10.3.0.0/28"}')  # three /30 subnets
    full = [lease(str(n), f"192.168.1.{i}") for i, n in enumerate(free_candidates(small, []))]
    mine_outside = lease("10.3.0.0/30", "192.168.0.1")  # SubnetMin skips the first one
    assert plan_acquisition(full + [mine_outside], small, ME) == AcquirePlan(
        (mine_outside,), Exhausted()
    )


# ---------------------------------------------------------------------------------------------
# properties

IPS = [A(f"192.168.0.{i}") for i in range(1, 5)]  # ME is the first

configs = st.tuples(st.integers(16, 28), st.integers(2, 6)).map(
    lambda t: parse_config(
        json.dumps({"Network": f"10.0.0.0/{t[0]}", "SubnetLen": min(30, t[0] + t[1])})
    )
)
# Anywhere in 10.0.0.0/14, any size: inside the config, around it, overlapping its subnets.
networks = st.tuples(st.integers(0, 2**18 - 1), st.integers(14, 30)).map(
    lambda t: N((0x0A000000 + t[0], t[1]), strict=False)
)


def config_subnets(config: NetworkConfig) -> st.SearchStrategy[N]:
    """Subnets of the config's size between SubnetMin and SubnetMax."""
    lo, hi = config.subnet_bounds()
    size = 1 << (32 - config.subnet_len)
    count = (int(hi.network_address) - int(lo.network_address)) // size
    return st.integers(0, count).map(
        lambda i: N((int(lo.network_address) + i * size, config.subnet_len))
    )


@st.composite
def listings(draw: st.DrawFn, config: NetworkConfig) -> list[Lease]:
    """Leases of four nodes (ours among them), mostly proper subnets, some stray ones."""
    nets = st.one_of(config_subnets(config), config_subnets(config), networks)
    return draw(
        st.lists(
            st.builds(
                lambda net, ip, el: Lease(net, LeaseAttrs(public_ip=ip), etcd_lease=el),
                nets,
                st.sampled_from(IPS),
                st.sampled_from([0, 5]),
            ),
            max_size=30,
        )
    )


def previous_subnets(config: NetworkConfig) -> st.SearchStrategy[N | None]:
    """None, an arbitrary network, or (most interesting) one of the config's own subnets."""
    return st.one_of(st.none(), networks, config_subnets(config))


def _check(
    plan: AcquirePlan, listed: list[Lease], config: NetworkConfig, previous: N | None, seed: int
) -> None:
    mine = [held for held in listed if held.attrs.public_ip == ME.public_ip]
    others = [held.subnet4 for held in listed if held.attrs.public_ip != ME.public_ip]
    fitting = [held for held in mine if config.fits(held.subnet)]
    # Only our own leases are ever dropped, only those the config rules out, in order.
    assert all(held in mine and not config.fits(held.subnet) for held in plan.drop)
    if fitting:
        first = fitting[0]
        assert plan.action == Reuse(first)
        assert isinstance(plan.action, Reuse) and plan.action.lease is first
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
    assert action.subnet is not None and config.fits(action.subnet)
    assert not any(action.subnet.overlaps(o) for o in others)
    assert action.subnet == choose_subnet(config, others, random.Random(seed))


@settings(max_examples=300)
@given(st.data(), configs, st.integers(0, 2**32))
def test_plan_follows_flanneld_rules(data: st.DataObject, config: NetworkConfig, seed: int) -> None:
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
    after = [held for held in listed if held not in plan.drop]
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


# ---------------------------------------------------------------------------------------------
# IPv6 and dual-stack (flanneld's tryAcquireLease/allocateSubnet with EnableIPv6)

N6 = ipaddress.IPv6Network
A6 = ipaddress.IPv6Address
DUAL = parse_config('{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:1::/48"}')
ONLY6 = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:1::/48"}')
ME6 = LeaseAttrs(public_ip=A("192.168.0.1"), public_ipv6=A6("2001:db8::1"))
ME6_ONLY = LeaseAttrs(public_ip=A("0.0.0.0"), public_ipv6=A6("2001:db8::1"))


def dlease(v4: str | None, v6: str | None, ip: str, ip6: str | None = None) -> Lease:
    return Lease(
        N(v4) if v4 else None,
        LeaseAttrs(A(ip), public_ipv6=A6(ip6) if ip6 else None),
        etcd_lease=7,
        ipv6_subnet=N6(v6) if v6 else None,
    )


def test_dual_stack_claim_has_both_subnets_and_draws_ipv4_first() -> None:
    others = [dlease("10.1.1.0/24", "fd00:1:0:1::/64", "192.168.0.2")]
    plan = plan_acquisition(others, DUAL, ME6, rng=random.Random(5))
    rng = random.Random(5)
    want4 = choose_subnet(DUAL, [N("10.1.1.0/24")], rng)
    want6 = choose_subnet(DUAL, [N6("fd00:1:0:1::/64")], rng, family=6)
    assert plan == AcquirePlan((), Claim(want4, False, want6))


def test_our_v4_only_lease_is_dropped_when_ipv6_is_switched_on() -> None:
    """isIPv6SubnetConfigCompat: an empty IPv6 subnet does not fit an IPv6 config..."""
    old = lease("10.1.9.0/24", "192.168.0.1")
    plan = plan_acquisition([old], DUAL, ME6, previous=N("10.1.9.0/24"), rng=random.Random(1))
    assert plan.drop == (old,)
    # ...but (unlike flanneld, which drops both) the previous file's IPv4 subnet is kept
    assert isinstance(plan.action, Claim) and plan.action.subnet == N("10.1.9.0/24")
    assert plan.action.from_previous and DUAL.fits6(plan.action.ipv6_subnet)


def test_our_dual_stack_lease_is_dropped_when_ipv6_is_switched_off() -> None:
    ours = dlease("10.1.9.0/24", "fd00:1:0:9::/64", "192.168.0.1")
    plan = plan_acquisition([ours], CONFIG, ME, previous=N("10.1.9.0/24"))
    assert plan == AcquirePlan((ours,), Claim(N("10.1.9.0/24"), from_previous=True))


def test_previous_subnet_file_gives_both_families() -> None:
    plan = plan_acquisition(
        [], DUAL, ME6, previous=N("10.1.77.0/24"), previous6=N6("fd00:1:0:77::/64")
    )
    assert plan.action == Claim(N("10.1.77.0/24"), True, N6("fd00:1:0:77::/64"))
    # the IPv6 one held by someone else: the IPv4 one is still reused, IPv6 is fresh
    held = [dlease("10.1.3.0/24", "fd00:1:0:77::/64", "192.168.0.2")]
    plan = plan_acquisition(
        held,
        DUAL,
        ME6,
        previous=N("10.1.77.0/24"),
        previous6=N6("fd00:1:0:77::/64"),
        rng=random.Random(2),
    )
    assert isinstance(plan.action, Claim)
    assert plan.action.subnet == N("10.1.77.0/24") and plan.action.ipv6_subnet != N6(
        "fd00:1:0:77::/64"
    )


def test_ipv6_only_is_matched_by_public_ipv6_and_keyed_without_ipv4() -> None:
    """An IPv6-only node writes PublicIP 0.0.0.0 (as flanneld); PublicIPv6 tells nodes apart."""
    other = dlease(None, "fd00:1:0:5::/64", "0.0.0.0", "2001:db8::2")
    ours = dlease(None, "fd00:1:0:6::/64", "0.0.0.0", "2001:db8::1")
    assert plan_acquisition([other, ours], ONLY6, ME6_ONLY) == AcquirePlan((), Reuse(ours))
    plan = plan_acquisition(
        [other], ONLY6, ME6_ONLY, previous6=N6("fd00:1:0:5::/64"), rng=random.Random(3)
    )
    assert isinstance(plan.action, Claim) and plan.action.subnet is None
    assert (
        plan.action.ipv6_subnet not in (None, N6("fd00:1:0:5::/64"))
        and not plan.action.from_previous
    )


def test_ipv6_exhaustion_is_reported_for_ipv6() -> None:
    small = parse_config('{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/124"}')
    full = [
        dlease(f"10.1.{i}.0/24", str(n), f"192.168.1.{i}")
        for i, n in enumerate(free_candidates(small, [], family=6), start=1)
    ]
    assert plan_acquisition(full, small, ME6).action == Exhausted(6)


# properties: random listings of dual-stack, IPv4-only and IPv6-only leases of four nodes

NODES = [(A(f"192.168.0.{i}"), A6(f"2001:db8::{i}")) for i in range(1, 5)]  # ME6 is the first
dual_configs = st.tuples(
    st.integers(16, 28),
    st.integers(2, 6),
    st.integers(100, 122),
    st.integers(2, 6),
    st.sampled_from([True, False]),
).map(
    lambda t: parse_config(
        json.dumps(
            {
                "EnableIPv4": t[4],
                "Network": f"10.0.0.0/{t[0]}",
                "SubnetLen": min(30, t[0] + t[1]),
                "EnableIPv6": True,
                "IPv6Network": f"fd00::/{t[2]}",
                "IPv6SubnetLen": min(126, t[2] + t[3]),
            }
        )
    )
)
networks6 = st.tuples(st.integers(0, 2**30 - 1), st.integers(96, 126)).map(
    lambda t: N6((int(A6("fd00::")) + t[0], t[1]), strict=False)
)


def config_subnets6(config: NetworkConfig) -> st.SearchStrategy[N6]:
    lo, hi = config.subnet_bounds6()
    size = 1 << (128 - config.ipv6_subnet_len)
    count = (int(hi.network_address) - int(lo.network_address)) // size
    return st.integers(0, count).map(
        lambda i: N6((int(lo.network_address) + i * size, config.ipv6_subnet_len))
    )


@st.composite
def dual_listings(draw: st.DrawFn, config: NetworkConfig) -> list[Lease]:
    v4s = st.one_of(
        st.none(), config_subnets(config) if config.enable_ipv4 else st.none(), networks
    )
    v6s = st.one_of(st.none(), config_subnets6(config), config_subnets6(config), networks6)

    def build(v4, v6, node, v6only):
        if v4 is None and v6 is None:
            v6 = N6("fd00::/126")
        ip4, ip6 = node
        if v4 is None and v6only:  # an IPv6-only node's value
            return Lease(
                None, LeaseAttrs(A("0.0.0.0"), public_ipv6=ip6), etcd_lease=5, ipv6_subnet=v6
            )
        return Lease(
            v4, LeaseAttrs(ip4, public_ipv6=ip6 if v6 else None), etcd_lease=5, ipv6_subnet=v6
        )

    return draw(
        st.lists(st.builds(build, v4s, v6s, st.sampled_from(NODES), st.booleans()), max_size=25)
    )


def _me(config: NetworkConfig) -> LeaseAttrs:
    return ME6 if config.enable_ipv4 else ME6_ONLY


@settings(max_examples=300, deadline=None)
@given(st.data(), dual_configs, st.integers(0, 2**32))
def test_dual_stack_plan_follows_flanneld_rules(
    data: st.DataObject, config: NetworkConfig, seed: int
) -> None:
    listed = data.draw(dual_listings(config))
    previous = data.draw(
        st.one_of(st.none(), networks, config_subnets(config)) if config.enable_ipv4 else st.none()
    )
    previous6 = data.draw(st.one_of(st.none(), networks6, config_subnets6(config)))
    me = _me(config)
    before = copy.deepcopy(listed)
    plan = plan_acquisition(listed, config, me, previous, random.Random(seed), previous6)
    assert listed == before
    mine = [held for held in listed if holder(held.attrs) == holder(me)]
    others = [held for held in listed if holder(held.attrs) != holder(me)]
    fitting = [held for held in mine if config.fits_lease(held.subnet, held.ipv6_subnet)]
    assert all(
        held in mine and not config.fits_lease(held.subnet, held.ipv6_subnet) for held in plan.drop
    )
    if fitting:
        assert plan == AcquirePlan(tuple(mine[: mine.index(fitting[0])]), Reuse(fitting[0]))
        return
    assert list(plan.drop) == mine
    taken4 = [held.subnet for held in others if held.subnet is not None]
    taken6 = [held.ipv6_subnet for held in others if held.ipv6_subnet is not None]
    action = plan.action
    if isinstance(action, Exhausted):
        fam_taken = taken6 if action.family == 6 else taken4
        assert free_candidates(config, fam_taken, family=action.family) == []
        return
    assert isinstance(action, Claim)
    # each enabled family gets a fitting subnet nobody else's lease overlaps; a disabled one none
    if config.enable_ipv4:
        assert action.subnet is not None
        assert config.fits(action.subnet) and not subnet_in_use(action.subnet, taken4)
    else:
        assert action.subnet is None
    assert action.ipv6_subnet is not None
    assert config.fits6(action.ipv6_subnet) and not subnet_in_use(action.ipv6_subnet, taken6)
    assert config.fits_lease(action.subnet, action.ipv6_subnet)
    # the previous file's subnet of a family is taken whenever it is free and fits
    prev4_ok = (
        config.enable_ipv4
        and previous is not None
        and config.fits(previous)
        and not subnet_in_use(previous, taken4)
    )
    prev6_ok = (
        previous6 is not None and config.fits6(previous6) and not subnet_in_use(previous6, taken6)
    )
    if prev4_ok:
        assert action.subnet == previous
    if prev6_ok:
        assert action.ipv6_subnet == previous6
    assert action.from_previous == bool(prev4_ok or prev6_ok)
    assert plan_acquisition(listed, config, me, previous, random.Random(seed), previous6) == plan


@settings(max_examples=200, deadline=None)
@given(st.data(), dual_configs, st.integers(0, 2**32))
def test_dual_stack_claim_then_plan_again_reuses_it(
    data: st.DataObject, config: NetworkConfig, seed: int
) -> None:
    listed = data.draw(dual_listings(config))
    me = _me(config)
    plan = plan_acquisition(listed, config, me, None, random.Random(seed))
    after = [held for held in listed if held not in plan.drop]
    action = plan.action
    if isinstance(action, Exhausted):
        return
    if isinstance(action, Claim):
        got = Lease(action.subnet, me, etcd_lease=9, ipv6_subnet=action.ipv6_subnet)
        after.append(got)
    else:
        got = action.lease
    assert plan_acquisition(after, config, me, None, random.Random(seed)) == AcquirePlan(
        (), Reuse(got)
    )
