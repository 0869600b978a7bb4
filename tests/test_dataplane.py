"""The per-node selection rules, against the kernel's and kube-proxy's documented behaviour."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kpbench.dataplane import (
    IPVS_GRACEFUL_CHECK_SECONDS,
    IPVS_TIME_WAIT_SECONDS,
    IpvsSelector,
    RandomSelector,
    iptables_probabilities,
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


def test_mh_spreads_ports_and_skips_quiesced_destinations() -> None:
    ipvs = IpvsSelector("mh")
    ipvs.sync([1, 2, 3], 0.0)
    picks = Counter(ipvs.pick(7, port, 0.0) for port in range(3000))
    assert set(picks) == {1, 2, 3} and min(picks.values()) > 800
    ipvs.opened(1, 0.0)
    ipvs.sync([2, 3], 1.0)
    assert {ipvs.pick(7, port, 1.0) for port in range(300)} == {2, 3}


def test_unknown_scheduler() -> None:
    with pytest.raises(ValueError, match="unknown IPVS scheduler"):
        IpvsSelector("xx")
