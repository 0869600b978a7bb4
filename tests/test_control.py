"""Deployment rollout, ReplicaSet choice and HPA arithmetic, checked by hand-computed cases."""

from __future__ import annotations

import random

from kpbench.control import Autoscaler, Pod, deletion_order, place, reconcile


def pods(count: int, revision: int = 1, ready: bool = True) -> list[Pod]:
    return [Pod(i, f"p{i}", revision, i % 3, 0.0, 0.0 if ready else None) for i in range(count)]


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


def test_deletion_prefers_unready_then_crowded_nodes_then_newest() -> None:
    a = Pod(0, "a", 1, 0, 0.0, 0.0)
    b = Pod(1, "b", 1, 0, 1.0, 5.0)
    c = Pod(2, "c", 1, 1, 2.0, None)
    d = Pod(3, "d", 1, 1, 3.0, 6.0)
    e = Pod(4, "e", 1, 0, 4.0, 4.0)
    order = deletion_order([a, b, c, d, e], [a, b, c, d, e])
    assert [p.name for p in order] == ["c", "b", "e", "a", "d"]


def test_place_spreads_over_the_least_loaded_node() -> None:
    assert place([2, 1, 2], random.Random(0)) == 1
    assert {place([1, 1, 2], random.Random(s)) for s in range(20)} == {0, 1}


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
