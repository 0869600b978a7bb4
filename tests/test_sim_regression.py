"""The simulator's results, bit for bit, against digests recorded before its hot paths were
optimised: speed work must not change a seeded cell (samples, connections, events).

The cases churn on purpose (rollouts, kills, scaling, lifetimes, max age, reconnects, load
changes, TIME_WAIT expiry, graceful deletion, the L7 proxy) so that every mode's selector and
every connection handler runs. A change to the model itself changes these digests too: then
check that the change is meant and record them again with `python -m tests.test_sim_regression`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd
import pytest

from kpbench.config import ALL_MODES
from tests.test_sim import simulate

CASES: dict[str, dict[str, Any]] = {
    "churn": {
        "duration_seconds": 400, "sample_seconds": 5, "cluster__nodes": 4,
        "backend__replicas": 20, "backend__max_connection_age_seconds": 150,
        "workload__clients": 8, "workload__connections": 400,
        "workload__lifetime": {"distribution": "exponential", "mean_seconds": 90},
        "events": [{"at": 60, "action": "rollout"},
                   {"at": 250, "action": "kill-pod", "count": 3},
                   {"at": 320, "action": "scale", "replicas": 12}],
    },
    "long-lived": {
        "duration_seconds": 300, "sample_seconds": 5, "cluster__nodes": 5,
        "backend__replicas": 30, "workload__clients": 10, "workload__connections": 600,
        "workload__reconnect": {"policy": "periodic", "seconds": 100, "jitter": 0.2},
        "events": [{"at": 60, "action": "rollout"},
                   {"at": 200, "action": "load", "connections": 300,
                    "requests_per_second": 2}],
    },
}
L7_CASE = {**CASES["long-lived"], "workload__proxy": "l7"}

# Recorded from the code before the optimisation (python -m tests.test_sim_regression), and
# again with the pod address plan, from the code before the optimisation was merged beside it.
DIGESTS: dict[str, dict[str, str]] = {
    "iptables/churn": {
        "connections": "20ad937772105217",
        "events": "11f299cb7569bb33",
        "samples": "893ed26323fad82f"
    },
    "iptables/l7": {
        "connections": "cc4f7ef624d61c96",
        "events": "52685ea8e6fe270d",
        "samples": "82aeb2361ca97627"
    },
    "iptables/long-lived": {
        "connections": "4dd6a5d2a0d1f18a",
        "events": "06ac1a05bd65086a",
        "samples": "4cb90c0b49e32f4f"
    },
    "ipvs-lc/churn": {
        "connections": "7ce7edaa3577271d",
        "events": "385d05e50012ff30",
        "samples": "6c260c4d227f630f"
    },
    "ipvs-lc/long-lived": {
        "connections": "e058508f4c18cab4",
        "events": "fbd47bcc93a0b4d1",
        "samples": "76dc7e004ca3a4e2"
    },
    "ipvs-mh/churn": {
        "connections": "acdad7291902b74d",
        "events": "3d77c0b0522afe0a",
        "samples": "d1eaa10174da2cf1"
    },
    "ipvs-mh/long-lived": {
        "connections": "6172e5b8e5bae0ee",
        "events": "73fb4541cfa00827",
        "samples": "6f9717b830df5798"
    },
    "ipvs-rr/churn": {
        "connections": "a916da8aeb2e18b4",
        "events": "48e49cda355c3cd5",
        "samples": "b79a409a198a1e45"
    },
    "ipvs-rr/long-lived": {
        "connections": "904bf3a745f60a4f",
        "events": "949807501af83363",
        "samples": "3762e85145c9b99a"
    },
    "ipvs-sh/churn": {
        "connections": "00ef5f401deaed6f",
        "events": "73f10149f970b6d8",
        "samples": "d30e67a5f506ca8e"
    },
    "ipvs-sh/long-lived": {
        "connections": "89f3e1f06f6b0f6d",
        "events": "35d839f50b2f7680",
        "samples": "0962d79d9643a94a"
    },
    "ipvs-wlc/churn": {
        "connections": "7ce7edaa3577271d",
        "events": "385d05e50012ff30",
        "samples": "6c260c4d227f630f"
    },
    "ipvs-wlc/long-lived": {
        "connections": "e058508f4c18cab4",
        "events": "fbd47bcc93a0b4d1",
        "samples": "76dc7e004ca3a4e2"
    },
    "nftables/churn": {
        "connections": "6cf3bafeb4f72146",
        "events": "2b6128341709c083",
        "samples": "7971d7a5594b636e"
    },
    "nftables/long-lived": {
        "connections": "69a4150a366b33d8",
        "events": "f1ebf2fd3ba9e721",
        "samples": "ddea937fd6121778"
    }
}


def digest(frame: pd.DataFrame) -> str:
    """sha256 of the frame as CSV: every value, dtype-independent, floats in full precision."""
    return hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()[:16]


def digests_of(mode: str, case: dict[str, Any]) -> dict[str, str]:
    result = simulate(mode, **case)
    return {"samples": digest(result.samples), "connections": digest(result.connections),
            "events": digest(result.events)}


def all_digests() -> dict[str, dict[str, str]]:
    found = {f"{mode}/{name}": digests_of(mode, case)
             for mode in ALL_MODES for name, case in CASES.items()}
    found["iptables/l7"] = digests_of("iptables", L7_CASE)
    return found


@pytest.mark.parametrize("key", sorted(DIGESTS))
def test_seeded_cells_are_unchanged(key: str) -> None:
    mode, name = key.split("/")
    case = L7_CASE if name == "l7" else CASES[name]
    assert digests_of(mode, case) == DIGESTS[key]


def test_every_mode_is_covered() -> None:
    assert {key.split("/")[0] for key in DIGESTS} == set(ALL_MODES)


if __name__ == "__main__":
    print(json.dumps(all_digests(), indent=4, sort_keys=True))
