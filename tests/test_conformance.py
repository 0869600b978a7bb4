"""The IPVS model replayed against a trace recorded from a real kernel (6.1, in the kernel VM).

`tests/data/conformance/` holds one scenario per scheduler of a `nox -s kernel-conformance`
run: every decision and counter the kernel reported. These tests need no VM; the session
itself records a fresh trace and compares it the same way.
"""

from __future__ import annotations

import copy
import gzip
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from kpbench.conformance.replay import replay, summarise
from kpbench.conformance.run import conform
from kpbench.conformance.scenarios import SCHEDULERS, make_plan

DATA = Path(__file__).parent / "data" / "conformance"


def _load(name: str) -> dict[str, Any]:
    with gzip.open(DATA / f"{name}.json.gz", "rt") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def recorded() -> tuple[dict[str, Any], dict[str, Any]]:
    return _load("plan"), _load("trace")


def test_the_model_agrees_with_the_kernel_on_every_decision_and_counter(recorded) -> None:
    plan, trace = recorded
    assert trace["kernel"].startswith("6.1.")
    summary = summarise(conform(plan, trace))
    assert set(summary) == set(SCHEDULERS)
    for scheduler, row in summary.items():
        assert row["decision_mismatches"] == 0 and row["counter_mismatches"] == 0, scheduler
        assert row["decisions"] >= 80 and row["counter_checks"] > 1000, scheduler
    # Quiesced destinations keep their sh buckets and mh slots, and the kernel refuses those
    # clients (kube-proxy sets no fallback flag).
    assert summary["sh"]["refused"] > 0 and summary["mh"]["refused"] > 0
    assert summary["rr"]["refused"] == summary["lc"]["refused"] == 0


def _first(trace: dict[str, Any], scheduler: str) -> dict[str, Any]:
    return next(s for s in trace["scenarios"] if s["id"].startswith(f"{scheduler}-"))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_changed_decision_is_a_mismatch(recorded, scheduler: str) -> None:
    plan, trace = recorded
    scenario = copy.deepcopy(_first(trace, scheduler))
    spec = next(s for s in plan["scenarios"] if s["id"] == scenario["id"])
    connect = next(e for e in scenario["events"][40:] if e["op"] == "connect" and e["dest"])
    servers = [f"{a}:8080" for a in spec["servers"]]
    connect["dest"] = next(a for a in servers if a != connect["dest"]
                           and any(row[0] == a for row in connect["table"]))
    assert replay(spec, scenario).decision_mismatches >= 1


def test_a_changed_counter_is_a_mismatch(recorded) -> None:
    plan, trace = recorded
    scenario = copy.deepcopy(_first(trace, "lc"))
    spec = next(s for s in plan["scenarios"] if s["id"] == scenario["id"])
    event = scenario["events"][30]
    event["table"][0][3] += 1  # one more inactive connection than the kernel reported
    result = replay(spec, scenario)
    assert result.counter_mismatches == 1 and "inactive" in result.examples[0]


def test_a_kernel_drop_ends_the_comparison_of_its_scenario(recorded) -> None:
    plan, trace = recorded
    scenario = copy.deepcopy(_first(trace, "rr"))
    spec = next(s for s in plan["scenarios"] if s["id"] == scenario["id"])
    scenario["events"][20]["dropped"] = "198.19.1.1:8080"
    result = replay(spec, scenario)
    assert result.dropped_at == 20 and result.decision_mismatches == 0


def test_plans_are_seeded_and_stay_in_the_lab_range() -> None:
    assert make_plan(seed=3) == make_plan(seed=3)
    assert make_plan(seed=3) != make_plan(seed=4)
    plan = make_plan(seed=3)
    assert len(plan["scenarios"]) == 5 * len(SCHEDULERS)
    lab = ipaddress.ip_network("198.18.0.0/15")
    for spec in plan["scenarios"]:
        for address in [spec["vip"], *spec["servers"], *spec["clients"]]:
            assert ipaddress.ip_address(address) in lab
        ops = [op for phase in spec["phases"].values() for op in phase]
        assert {op["op"] for op in ops} == {"sync", "connect", "close", "graceful"}
        assert sum(len(op["clients"]) for op in ops if op["op"] == "connect") >= 80
