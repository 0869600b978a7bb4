"""The control plane's rules (kpbench.control), each checked against a hand-computed case."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from kpbench.control import (
    Autoscaler,
    EndpointFanout,
    MetricsServer,
    NodeResources,
    Placement,
    Pod,
    PodMetric,
    SyncRunner,
    deletion_order,
    ipvs_insertion_order,
    min_sync_seconds,
    ready_time,
    reconcile,
    schedule,
    stream,
)

REQUEST = NodeResources(100, 64)
NODE = NodeResources(4000, 8192)


def pods(count: int, revision: int = 1, ready: bool = True) -> list[Pod]:
    return [Pod(i, f"p{i}", revision, i % 3, 0.0, 0.0 if ready else None, started_at=0.0)
            for i in range(count)]


def test_rollout_first_step_surges_then_scales_down_by_max_unavailable() -> None:
    current = pods(6)
    plan = reconcile(current, 6, revision=2, max_surge=2, max_unavailable=1)
    assert plan.create == 2 and not plan.delete  # 6 + 2 surge
    current += [Pod(6 + i, f"n{i}", 2, i, 1.0) for i in range(2)]
    plan = reconcile(current, 6, revision=2, max_surge=2, max_unavailable=1)
    # 8 live, min available 5, 2 new unavailable: may remove 8 - 5 - 2 = 1; available 6 - 5 = 1
    assert plan.create == 0 and len(plan.delete) == 1 and plan.delete[0].revision == 1


def test_steady_state_replaces_missing_pods_and_scales_down() -> None:
    assert reconcile(pods(4), 6, 1, 1, 1).create == 2
    plan = reconcile(pods(6), 4, 1, 1, 1)
    assert len(plan.delete) == 2


def test_deletion_ranks_pending_unready_crowded_then_log2_ready_buckets_then_uid() -> None:
    now = 100.0
    pending = Pod(0, "pending", 1, 1, 99.0, None, started_at=105.0, uid=9)
    unready = Pod(1, "unready", 1, 1, 90.0, None, started_at=95.0, uid=9)
    # node 0 holds three pods of the Deployment, node 1 four (with the two above), node 2 one
    crowded = Pod(2, "crowded", 1, 1, 0.0, 10.0, started_at=1.0, uid=9)
    old = Pod(3, "old", 1, 1, 0.0, 5.0, started_at=1.0, uid=1)
    # ready 36 s and 33 s ago: the same log2 bucket (2^35 ns ~ 34.4 s), so the smaller UID goes
    a = Pod(4, "a", 1, 0, 0.0, 64.0, started_at=1.0, uid=7)
    b = Pod(5, "b", 1, 0, 0.0, 67.0, started_at=1.0, uid=3)
    # ready 4 s ago: a lower bucket than a and b, deleted before them whatever its UID
    recent = Pod(6, "recent", 1, 0, 0.0, 96.0, started_at=1.0, uid=99)
    alone = Pod(7, "alone", 1, 2, 0.0, 99.0, started_at=1.0, uid=0)
    everyone = [pending, unready, crowded, old, a, b, recent, alone]
    order = deletion_order(everyone, everyone, now)
    # crowded vs old: same node; ready 90 s and 95 s ago lie in one bucket -> the smaller UID
    assert math.floor(math.log2(90e9)) == math.floor(math.log2(95e9))
    assert [p.name for p in order] == ["pending", "unready", "old", "crowded", "recent", "b",
                                       "a", "alone"]


def test_deletion_ties_follow_the_random_uids() -> None:
    rng = random.Random(4)
    twins = [Pod(i, f"t{i}", 1, i % 2, 0.0, 0.0, started_at=0.0, uid=rng.getrandbits(63))
             for i in range(6)]
    order = deletion_order(twins, twins, 50.0)
    assert [p.uid for p in order] == sorted(p.uid for p in twins)
    assert [p.index for p in order] != list(range(6))


def test_scheduler_spreads_a_revision_then_prefers_the_least_allocated_node() -> None:
    rng = random.Random(0)
    # node 1 already has a pod of this revision: topology spread sends the next one elsewhere
    assert schedule([0, 1, 0], [3, 3, 3], REQUEST, NODE, rng) in (0, 2)
    # same-revision counts equal: the node with fewer pods holding requests (terminating
    # ones included) wins, even though "fewest live pods" would tie
    assert schedule([1, 1, 1], [4, 3, 4], REQUEST, NODE, rng) == 1
    # a rollout's first new pod: no pod of the new revision anywhere; node 2 still holds a
    # terminating old pod, so it is avoided
    assert schedule([0, 0, 0], [2, 2, 3], REQUEST, NODE, random.Random(1)) in (0, 1)
    assert {schedule([0, 0, 0], [2, 2, 2], REQUEST, NODE, random.Random(s))
            for s in range(30)} == {0, 1, 2}


def test_placement_counts_terminating_pods_until_deleted() -> None:
    placement = Placement(2, REQUEST, NODE)
    first = Pod(0, "a", 1, placement.place(1, random.Random(0)), 0.0)
    second = Pod(1, "b", 1, placement.place(1, random.Random(0)), 0.0)
    assert {first.node, second.node} == {0, 1}
    placement.terminating(first)
    placement.terminating(second)
    placement.deleted(second)
    # revision 2's first pod: `first` still holds its request while it terminates
    assert placement.place(2, random.Random(0)) == second.node
    placement.deleted(first)
    assert placement.assigned == [1 if n == second.node else 0 for n in range(2)]


def test_min_sync_period_defaults_per_mode() -> None:
    assert min_sync_seconds("iptables", None) == 1.0
    assert min_sync_seconds("nftables", None) == 1.0
    assert min_sync_seconds("ipvs-lc", None) == 0.0
    assert min_sync_seconds("ipvs-rr", 2.5) == 2.5


def test_sync_runner_runs_an_isolated_change_at_once_and_coalesces_within_the_period() -> None:
    runner = SyncRunner(min_interval=1.0)
    assert runner.request(10.0) == 10.0
    runner.run(10.2)  # the sync took 0.2 s
    assert runner.request(10.5) == pytest.approx(11.2)  # 1 s after completion, not after start
    assert runner.request(10.9) is None  # coalesced into the queued sync
    runner.run(11.3)
    assert runner.request(20.0) == 20.0


def test_fanout_reaches_each_node_after_its_own_delay_and_coalesces_per_node() -> None:
    fanout = EndpointFanout(3, [1, 2], 1.0, np.random.default_rng(5), (0.1, 0.5),
                            lambda endpoints: 0.0)
    assert fanout.change(3, True) and not fanout.change(1, False)
    updates = fanout.publish(10.0)
    assert [c for c, _ in updates] == [0, 1, 2]
    times = [t for _, t in updates]
    assert len(set(times)) == 3 and all(10.0 < t < 12.0 for t in times)
    first = min(range(3), key=lambda c: times[c])
    start = fanout.update(first, times[first])
    assert start == times[first]
    decided = fanout.sync(first, start)
    assert decided.view == {2, 3} and decided.new == {3} and decided.next_update is None
    assert decided.joined == {3} and decided.left == {1}
    # a second change right after: this node's next sync waits for min_interval
    fanout.change(4, True)
    (again,) = [t for c, t in fanout.publish(start + 0.01) if c == first]
    assert fanout.update(first, again) == pytest.approx(start + 1.0)
    assert fanout.sync(first, start + 1.0).view == {2, 3, 4}
    # another node that had not synced yet sees both versions in one sync
    other = (first + 1) % 3
    late = fanout.sync(other, 100.0)
    assert late.view == {2, 3, 4} and late.new == {3, 4}
    assert late.joined == {3, 4} and late.left == {1}
    # an endpoint that leaves and comes back between two syncs neither joined nor left
    fanout.change(2, False)
    fanout.publish(101.0)
    fanout.change(2, True)
    fanout.publish(101.5)
    back = fanout.sync(other, 200.0)
    assert back.view == {2, 3, 4} and back.new == {2} and not back.joined and not back.left


def test_ipvs_insertion_order_is_random_per_node_and_only_for_new_endpoints() -> None:
    view = frozenset(range(10))
    new = frozenset(range(4, 10))
    orders = [ipvs_insertion_order(view, new, stream(1, 102, node)) for node in range(4)]
    assert all(sorted(o[:6]) == list(range(4, 10)) and sorted(o[6:]) == [0, 1, 2, 3]
               for o in orders)
    assert len({tuple(o[:6]) for o in orders}) > 1
    assert orders[0] == ipvs_insertion_order(view, new, stream(1, 102, 0))


def test_readiness_is_the_first_probe_after_the_server_answers() -> None:
    assert ready_time(10.0, 0.5, 0.2, 1.0) == pytest.approx(10.2 + 1.0)  # probes 10.2, 11.2
    assert ready_time(10.0, 0.1, 0.2, 1.0) == pytest.approx(10.2)
    assert ready_time(10.0, 2.0, 0.0, 1.0) == pytest.approx(12.0)
    batch = [ready_time(5.0, 0.51 * math.exp(0.41 * random.Random(s).gauss(0, 1)),
                        random.Random(100 + s).uniform(0, 1), 1.0) for s in range(4)]
    assert len(set(batch)) == 4


def test_metrics_server_averages_over_its_window_and_waits_for_fresh_containers() -> None:
    server = MetricsServer(15.0)
    old = Pod(0, "old", 1, 0, 0.0, -100.0, started_at=-100.0)
    fresh = Pod(1, "fresh", 1, 0, 0.0, None, started_at=2.0)
    young = Pod(2, "young", 1, 0, 0.0, None, started_at=8.0)
    cpu = {0: 1.0, 1: 0.3, 2: 0.1}
    server.scrape(14.0, [old, fresh, young], lambda p: cpu[p.index])
    metrics = server.metrics()
    assert 0 not in metrics  # one point only
    assert metrics[1] == PodMetric(math.ceil(0.3 / 12.0 * 1000), 14.0, 12.0)  # from its start
    assert 2 not in metrics  # started 6 s before the scrape: under 10 s
    cpu = {0: 1.75, 1: 0.6, 2: 0.4}
    server.scrape(29.0, [old, fresh, young], lambda p: cpu[p.index])
    metrics = server.metrics()
    assert metrics[0] == PodMetric(50, 29.0, 15.0)  # 0.75 s over 15 s
    assert metrics[2].millicores == 20


def test_hpa_counts_missing_metrics_as_zero_up_and_full_down_in_whole_percents() -> None:
    ready = [Pod(i, f"r{i}", 1, 0, 0.0, -600.0, started_at=-600.0) for i in range(4)]
    new = Pod(9, "new", 1, 0, 100.0, None, started_at=101.0)
    hpa = Autoscaler(1, 20, 50, scale_down_stabilization_seconds=0)
    hot = {p.index: PodMetric(80, 110.0, 15.0) for p in ready}  # 80% > 50%: scale up
    desired, utilization = hpa.evaluate(115.0, 5, [*ready, new], hot, 100)
    # with the new pod at 0%: 320 / 500 = 64% -> ratio 1.28 -> ceil(1.28 * 5) = 7
    assert (desired, utilization) == (7, 80)
    cold = {p.index: PodMetric(20, 110.0, 15.0) for p in ready}
    # scale-down: the pod without a metric counts as 100%: (80 + 100) / 500 = 36% -> 4
    assert Autoscaler(1, 20, 50, scale_down_stabilization_seconds=0).evaluate(
        115.0, 5, [*ready, new], cold, 100)[0] == 4
    # whole percents: 50.9% truncates to 50%, inside the tolerance either way
    exact = {p.index: PodMetric(55 if p.index else 54, 110.0, 15.0) for p in ready}
    assert Autoscaler(1, 20, 50).evaluate(115.0, 4, ready, exact, 100) == (4, 54)


def test_hpa_ignores_pods_whose_metric_window_overlaps_their_readiness() -> None:
    hpa = Autoscaler(1, 20, 50)
    steady = [Pod(i, f"r{i}", 1, 0, 0.0, -600.0, started_at=-600.0) for i in range(2)]
    # started 100 s ago, ready 5 s ago: inside cpuInitializationPeriod and its 15 s window
    # began before it became ready -> unready, counted as 0% on this scale-up
    warming = Pod(5, "w", 1, 0, 0.0, 195.0, started_at=100.0)
    metrics = {0: PodMetric(100, 199.0, 15.0), 1: PodMetric(100, 199.0, 15.0),
               5: PodMetric(300, 199.0, 15.0)}
    desired, utilization = hpa.evaluate(200.0, 3, [*steady, warming], metrics, 100)
    assert utilization == 100  # the warming pod's 300% is not in the average
    assert desired == 4  # (100 + 100 + 0) / 300 = 66% -> ratio 1.33 -> ceil(1.33 * 3) = 4


def test_hpa_scales_up_by_ratio_within_the_rate_limit() -> None:
    hpa = Autoscaler(min_replicas=2, max_replicas=50, target_utilization=50)
    # 4 pods at 150%: ratio 3 -> ceil(12) = 12, limited to max(2*4, 4+4) = 8 per 15 s
    assert hpa.desired(15.0, 4, [150.0] * 4, unready=0) == 8
    assert hpa.desired(30.0, 8, [150.0] * 8, unready=0) == 16


def test_hpa_tolerance_and_unready_pods() -> None:
    hpa = Autoscaler(min_replicas=1, max_replicas=10, target_utilization=50)
    assert hpa.desired(15.0, 4, [54.0] * 4, unready=0) == 4  # within 10%
    # scale-up with unready pods counted at 0%: 4 at 100% + 4 unready -> ratio 1.0 -> no change
    assert hpa.desired(30.0, 8, [100.0] * 4, unready=4) == 8


def test_hpa_scale_down_waits_for_the_stabilisation_window() -> None:
    hpa = Autoscaler(min_replicas=1, max_replicas=20, target_utilization=50,
                     scale_down_stabilization_seconds=300)
    assert hpa.desired(0.0, 10, [50.0] * 10, unready=0) == 10
    assert hpa.desired(15.0, 10, [10.0] * 10, unready=0) == 10  # 2 recommended, held at 10
    assert hpa.desired(301.0, 10, [10.0] * 10, unready=0) == 2
