"""Metric helpers on edge cases (the report tests check the metrics against hand computations)."""

from __future__ import annotations

import pandas as pd

from analysis.metrics import failed_counts, interval, verdict


def test_failed_counts_without_failures_is_an_integer_zero() -> None:
    events = pd.DataFrame({"cell_id": ["a"], "event": ["pod_ready"], "detail": [""]})
    assert int(failed_counts(events).sum()) == 0
    events = pd.DataFrame({"cell_id": ["a", "a"], "event": ["connection_failed"] * 2,
                           "detail": ['{"count": 3}', ""]})
    assert failed_counts(events).to_dict() == {"a": 4}


def test_one_seed_gives_no_interval_and_no_verdict() -> None:
    mean, low, high, n = interval([1.7])
    assert (mean, n) == (1.7, 1) and pd.isna(low) and pd.isna(high)
    assert verdict([1.7], (">", 1.5))[0] == "INCONCLUSIVE"
    assert verdict([1.7, 1.8, 1.75], (">", 1.5))[0] == "CONFIRMED"
    assert verdict([1.0, 1.1, 1.05], (">", 1.5))[0] == "REFUTED"
