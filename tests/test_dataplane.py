"""The per-node selection rules, against the kernel's and kube-proxy's documented behaviour."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from kpbench.dataplane import (
    IPVS_GRACEFUL_CHECK_SECONDS,
    IPVS_TIME_WAIT_SECONDS,
    MH_KEY_1,
    MH_TABLE_SIZE,
    SH_BUCKETS,
    IcmpRateLimit,
    IpvsSelector,
    RandomSelector,
    endpoint_address,
    hsiphash_u32,
    iptables_probabilities,
    maglev_table,
    sh_bucket,
)


def test_iptables_probabilities_are_kube_proxys() -> None:
    assert iptables_probabilities(1) == []
    assert iptables_probabilities(4) == ["0.2500000000", "0.3333333333", "0.5000000000"]


def test_random_selector_is_uniform_over_its_view() -> None:
    selector = RandomSelector(random.Random(1))
    selector.sync([10, 11, 12, 13], 0.0)
    counts = Counter(selector.pick(1, 0, 0.0) for _ in range(40_000))
    assert set(counts) == {10, 11, 12, 13}
    assert all(abs(c - 10_000) < 500 for c in counts.values())  # > 5 standard deviations


def test_rr_visits_the_list_from_the_head_and_reaches_new_destinations_on_wrap() -> None:
    ipvs = IpvsSelector("rr")
    ipvs.sync([1, 2, 3], 0.0)
    assert ipvs.list_order() == [3, 2, 1]  # new destinations are inserted at the head
    assert [ipvs.pick(0, 0, 0.0) for _ in range(4)] == [3, 2, 1, 3]
    ipvs.sync([1, 2, 3, 4], 1.0)
    assert [ipvs.pick(0, 0, 1.0) for _ in range(5)] == [2, 1, 4, 3, 2]


def test_rr_after_deleting_the_cursor_continues_with_its_successor() -> None:
    ipvs = IpvsSelector("rr")
    ipvs.sync([1, 2, 3], 0.0)
    assert ipvs.pick(0, 0, 0.0) == 3
    assert ipvs.pick(0, 0, 0.0) == 2
    ipvs.sync([1, 3], 0.0)  # 2 had no connections: deleted at once
    assert ipvs.pick(0, 0, 0.0) == 1


def test_lc_picks_least_overhead_and_breaks_ties_to_the_newest() -> None:
    ipvs = IpvsSelector("lc")
    ipvs.sync([1, 2, 3], 0.0)
    picks = []
    for _ in range(6):
        chosen = ipvs.pick(0, 0, 0.0)
        assert chosen is not None
        ipvs.opened(chosen, 0.0)
        picks.append(chosen)
    assert picks == [3, 2, 1, 3, 2, 1]
    ipvs.closed(1, 1.0)  # 1: one active, one inactive -> overhead 257 < 512
    assert ipvs.pick(0, 0, 1.0) == 1
    ipvs.opened(1, 1.0)  # 1: 2 active + 1 inactive = 513 > 512 of 2 and 3
    assert ipvs.pick(0, 0, 1.0) == 3


def test_lc_forgets_inactive_connections_after_time_wait() -> None:
    ipvs = IpvsSelector("lc")
    ipvs.sync([1, 2], 0.0)
    ipvs.opened(2, 0.0)
    ipvs.closed(2, 0.0)  # 2 has 1 inactive, 1 none: 1 wins
    assert ipvs.pick(0, 0, 1.0) == 1
    assert ipvs.pick(0, 0, IPVS_TIME_WAIT_SECONDS + 1) == 2  # tie again: the head (2) wins


def test_graceful_termination_quiesces_then_deletes_once_drained() -> None:
    ipvs = IpvsSelector("rr")
    ipvs.sync([1, 2], 0.0)
    ipvs.opened(2, 0.0)
    ipvs.sync([1], 1.0)
    assert ipvs.dests[2].weight == 0
    assert {ipvs.pick(0, 0, 1.0) for _ in range(4)} == {1}
    ipvs.closed(2, 5.0)
    ipvs.tick(IPVS_GRACEFUL_CHECK_SECONDS)  # still inactive (TIME_WAIT)
    assert 2 in ipvs.dests
    ipvs.tick(5.0 + IPVS_TIME_WAIT_SECONDS + IPVS_GRACEFUL_CHECK_SECONDS)
    assert 2 not in ipvs.dests


def test_sh_fills_256_buckets_round_robin_and_refuses_quiesced_buckets() -> None:
    ipvs = IpvsSelector("sh")
    ipvs.sync([1, 2, 3], 0.0)
    head_first = ipvs.list_order()
    client = (198 << 24) + (18 << 16) + 100
    bucket = sh_bucket(client)
    expected = head_first[bucket % 3]
    assert {ipvs.pick(client, port, 0.0) for port in range(50)} == {expected}  # port ignored
    ipvs.opened(expected, 0.0)
    ipvs.sync([e for e in (1, 2, 3) if e != expected], 1.0)  # quiesced, keeps its buckets
    assert ipvs.pick(client, 0, 1.0) is None


def test_sh_hash_is_hash_32_of_the_address() -> None:
    # hash_32(v, 8) = (v * 0x61C88647 mod 2^32) >> 24, computed by hand for 198.18.0.100
    address = 0xC6120064
    assert sh_bucket(address) == ((address * 1640531527) % 2**32) >> 24


def test_mh_spreads_ports_and_a_quiesced_destination_keeps_its_slots() -> None:
    ipvs = IpvsSelector("mh")
    ipvs.sync([1, 2, 3], 0.0)
    before = {port: ipvs.pick(7, port, 0.0) for port in range(3000)}
    counts = Counter(before.values())
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 800
    ipvs.opened(1, 0.0)
    ipvs.sync([2, 3], 1.0)  # 1 holds a connection: quiesced, its slots stay (last_weight)
    after = {port: ipvs.pick(7, port, 1.0) for port in range(3000)}
    assert all(after[p] is None for p in before if before[p] == 1)  # refused, no fallback
    assert all(after[p] == before[p] for p in before if before[p] != 1)


def test_hsiphash_matches_the_kernels_test_vector() -> None:
    # lib/siphash_kunit.c: hsiphash_1u32(0x03020100) with key bytes 0..15 on 64-bit kernels.
    assert hsiphash_u32(0x03020100, (0x0706050403020100, 0x0F0E0D0C0B0A0908)) == 0x88D38328


def test_rr_cursor_on_a_deleted_head_moves_to_the_list_head() -> None:
    # ip_vs_rr_del_dest: the cursor's destination was first in the list, so the cursor goes
    # to the head and the next pick is whatever is first then: the endpoint added again.
    ipvs = IpvsSelector("rr", graceful_check_seconds=math.inf)
    ipvs.sync([1, 2, 3], 0.0)  # list: 3, 2, 1
    assert ipvs.pick(0, 0, 0.0) == 3
    ipvs.opened(3, 0.0)
    ipvs.sync([1, 2], 1.0)  # 3 quiesced; the cursor stays on it
    assert ipvs.pick(0, 0, 1.0) == 2
    ipvs.opened(2, 1.0)
    assert ipvs.pick(0, 0, 1.0) == 1
    ipvs.opened(1, 1.0)
    ipvs.sync([1, 2, 4], 2.0)  # 4 added at the head: 4, 3(w0), 2, 1; cursor on 1
    assert ipvs.pick(0, 0, 2.0) == 4
    ipvs.sync([1, 2, 4, 3], 3.0)  # 3 back: deleted and re-added at the head
    assert ipvs.list_order() == [3, 4, 2, 1]
    assert ipvs.pick(0, 0, 3.0) == 2  # the cursor was on 4, so 2 follows


def test_a_returning_destination_keeps_its_counters_from_the_trash() -> None:
    # ip_vs_add_dest -> ip_vs_trash_get_dest: the same object comes back with its counters.
    ipvs = IpvsSelector("lc", graceful_check_seconds=math.inf)
    ipvs.sync([1, 2], 0.0)
    for endpoint in (2, 2, 1):
        ipvs.opened(endpoint, 0.0)
    ipvs.sync([1], 1.0)  # 2 quiesced with 2 connections
    ipvs.sync([1, 2], 2.0)  # back: deleted and re-added
    dest = ipvs.dests[2]
    assert (dest.weight, dest.active, dest.inactive) == (1, 2, 0)
    assert ipvs.pick(0, 0, 2.0) == 1  # 1 holds fewer connections
    ipvs.closed(2, 3.0, reset=True)
    ipvs.closed(2, 3.0)
    assert (dest.active, dest.inactive) == (0, 2)
    ipvs.expire(13.5)  # a reset entry lives 10 s (CLOSE), a closed one 120 s (TIME_WAIT)
    assert dest.inactive == 1
    ipvs.expire(123.5)
    assert dest.inactive == 0


def test_unknown_scheduler() -> None:
    with pytest.raises(ValueError, match="unknown IPVS scheduler"):
        IpvsSelector("xx")


@pytest.mark.parametrize("scheduler", ["rr", "lc", "sh", "mh"])
def test_update_with_the_change_equals_sync_with_the_whole_view(scheduler: str) -> None:
    rng = random.Random(scheduler)
    full, delta = IpvsSelector(scheduler), IpvsSelector(scheduler)
    view: set[int] = set()
    held: list[int] = []
    for step in range(300):
        now = step * 7.0
        new = set(rng.sample(range(40), rng.randint(0, 4)))
        gone = set(rng.sample(sorted(view), min(len(view), rng.randint(0, 3))))
        joined = sorted(new - view)
        rng.shuffle(joined)
        view = (view - gone) | new
        full.sync(joined + sorted(view - set(joined)), now)
        delta.update(joined, gone - view, now)
        for _ in range(rng.randint(0, 6)):
            client, port = rng.getrandbits(32), rng.randrange(1024, 65536)
            chosen = full.pick(client, port, now)
            assert delta.pick(client, port, now) == chosen
            if chosen is not None:
                full.opened(chosen, now)
                delta.opened(chosen, now)
                held.append(chosen)
        if held and rng.random() < 0.5:
            endpoint = held.pop(rng.randrange(len(held)))
            reset = rng.random() < 0.3
            full.closed(endpoint, now, reset=reset)
            delta.closed(endpoint, now, reset=reset)
        assert full.list_order() == delta.list_order()
        assert [(d.weight, d.active, d.inactive) for d in full.dests.values()] == [
            (delta.dests[e].weight, delta.dests[e].active, delta.dests[e].inactive)
            for e in full.dests]


def rule_pick(ipvs: IpvsSelector, client: int, port: int) -> int | None:
    """The scheduler's rule applied to the whole list as it stands, with none of the selector's
    caches: its heap, its kept tables, their truncation to the slots that can be claimed."""
    order = [ipvs.dests[e] for e in ipvs.list_order()]
    if ipvs.scheduler in ("lc", "wlc"):
        candidates = [d for d in order if d.weight > 0]
        return min(candidates, key=lambda d: (d.overhead, -d.seq)).endpoint if candidates else None
    if not order:
        return None
    if ipvs.scheduler == "sh":
        endpoint = [order[i % len(order)].endpoint for i in range(SH_BUCKETS)][sh_bucket(client)]
    else:
        table = maglev_table([(d.endpoint, *endpoint_address(d.endpoint)) for d in order
                              if d.last_weight > 0])
        endpoint = table[hsiphash_u32((client + port) & 0xFFFFFFFF, MH_KEY_1) % MH_TABLE_SIZE]
    return endpoint if ipvs.dests[endpoint].weight > 0 else None


@pytest.mark.parametrize(("scheduler", "endpoints", "steps"),
                         [("lc", 60, 600), ("wlc", 60, 300), ("sh", 400, 300), ("mh", 60, 300),
                          ("mh", 2 * MH_TABLE_SIZE, 25)])
def test_picks_follow_the_rule_over_the_whole_list_under_churn(
    scheduler: str, endpoints: int, steps: int
) -> None:
    # More endpoints than sh buckets or Maglev slots: only the list's head can be in the table.
    rng = random.Random(f"{scheduler}-{endpoints}")
    ipvs = IpvsSelector(scheduler)
    view = set(rng.sample(range(endpoints), endpoints * 3 // 4))
    ipvs.sync(sorted(view), 0.0)
    held: list[int] = []
    now = 0.0
    for _ in range(steps):
        now += rng.uniform(0.0, 15.0)
        if rng.random() < 0.3:
            outside = sorted(set(range(endpoints)) - view)
            joined = rng.sample(outside, min(len(outside), rng.randint(0, 3)))
            gone = set(rng.sample(sorted(view), min(len(view), rng.randint(0, 3))))
            view = (view - gone) | set(joined)
            ipvs.update(joined, gone - view, now)
        ipvs.tick(now)
        for _ in range(rng.randint(1, 8)):
            client, port = rng.getrandbits(32), rng.randrange(32768, 61000)
            ipvs.expire(now)
            expected = rule_pick(ipvs, client, port)
            chosen = ipvs.pick(client, port, now)
            assert chosen == expected
            if chosen is not None:
                ipvs.opened(chosen, now)
                held.append(chosen)
        if ipvs.dests and rng.random() < 0.2:  # a connection the rule did not choose
            endpoint = rng.choice(sorted(ipvs.dests))
            ipvs.opened(endpoint, now)
            held.append(endpoint)
        for _ in range(rng.randint(0, 6)):
            if held:
                ipvs.closed(held.pop(rng.randrange(len(held))), now, reset=rng.random() < 0.2)


def test_icmp_rate_limit_is_a_burst_of_six_then_one_per_second_per_address() -> None:
    limit = IcmpRateLimit()
    assert [limit.allow(1, 0.01 * i) for i in range(8)] == [True] * 6 + [False] * 2
    assert limit.allow(2, 0.1)  # another client's address has its own bucket
    assert not limit.allow(1, 0.9) and limit.allow(1, 1.0) and not limit.allow(1, 1.5)
    assert sum(limit.allow(1, 2.0 + 0.25 * i) for i in range(40)) == 10  # 1/s while busy
    assert [limit.allow(1, 100.0) for _ in range(7)] == [True] * 6 + [False]  # refilled to 6
