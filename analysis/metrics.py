"""The metrics (the README's "Metrics" section): pure functions over the loaded results tables.

Over the serving pods S(t) (ready, not terminating) at each sample t, with x = active connections:
max_mean = max/mean, cv = pstdev/mean, jain = (Σx)² / (|S| Σx²), gini (standard). End-state
values average the samples in the last 10% of the duration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from kpbench.config import sweep_value_label

BALANCED_MAX_MEAN = 1.25
END_FRACTION = 0.10
SUMMARY_METRICS = (
    "max_mean", "cv", "jain", "gini", "new_pod_share", "ready_order_rho", "time_to_balance",
    "request_max_mean", "failed_connections", "reset_connections",
)


def serving(samples: pd.DataFrame) -> pd.DataFrame:
    return samples[samples["ready"].astype(bool) & ~samples["terminating"].astype(bool)]


def balance_over_time(samples: pd.DataFrame) -> pd.DataFrame:
    """Per (cell_id, t): pods, mean, max_mean, cv, jain, gini of active connections."""
    frame = serving(samples)[["cell_id", "t", "active_connections"]].copy()
    frame["x"] = frame["active_connections"].astype(float)
    frame = frame.sort_values(["cell_id", "t", "x"], kind="stable")
    grouped = frame.groupby(["cell_id", "t"], observed=True, sort=True)
    frame["rank"] = grouped.cumcount() + 1
    frame["rank_x"] = frame["rank"] * frame["x"]
    frame["x2"] = frame["x"] ** 2
    agg = grouped.agg(
        pods=("x", "size"), total=("x", "sum"), peak=("x", "max"), sum_sq=("x2", "sum"),
    )
    agg["rank_x"] = frame.groupby(["cell_id", "t"], observed=True, sort=True)["rank_x"].sum()
    n, total = agg["pods"].astype(float), agg["total"]
    mean = total / n
    with np.errstate(divide="ignore", invalid="ignore"):
        agg["mean"] = mean
        agg["max_mean"] = np.where(total > 0, agg["peak"] / mean, np.nan)
        variance = (agg["sum_sq"] / n - mean**2).clip(lower=0)
        agg["cv"] = np.where(total > 0, np.sqrt(variance) / mean, np.nan)
        agg["jain"] = np.where(total > 0, total**2 / (n * agg["sum_sq"]), np.nan)
        agg["gini"] = np.where(total > 0, 2 * agg["rank_x"] / (n * total) - (n + 1) / n, np.nan)
    return agg.reset_index()[["cell_id", "t", "pods", "mean", "max_mean", "cv", "jain", "gini"]]


def end_window(duration: float) -> float:
    return duration * (1 - END_FRACTION)


def event_counts(events: pd.DataFrame, name: str) -> pd.Series:
    """Per cell, the total of `name` events (each counts its detail's `count`, default 1)."""
    matching = events[events["event"] == name]

    def count(detail: str) -> int:
        try:
            return int(json.loads(detail).get("count", 1)) if detail else 1
        except (ValueError, AttributeError):
            return 1

    counts = matching["detail"].map(count).astype("int64")
    return counts.groupby(matching["cell_id"], observed=True).sum()


def failed_counts(events: pd.DataFrame) -> pd.Series:
    return event_counts(events, "connection_failed")


def ready_times(samples: pd.DataFrame, events: pd.DataFrame) -> pd.Series:
    """Ready time per (cell_id, pod): the pod_ready event, else the first ready sample."""
    from_events = events[events["event"] == "pod_ready"].groupby(
        ["cell_id", "pod"], observed=True
    )["t"].min()
    ready = samples[samples["ready"].astype(bool)]
    from_samples = ready.groupby(["cell_id", "pod"], observed=True)["t"].min()
    return from_events.combine_first(from_samples)


def _time_to_balance(series: pd.DataFrame, start: float) -> float | None:
    after = series[series["t"] >= start]
    if after.empty:
        return None
    unbalanced = after[~(after["max_mean"] <= BALANCED_MAX_MEAN)]
    if unbalanced.empty:
        return float(after["t"].iloc[0] - start)
    later = after[after["t"] > unbalanced["t"].iloc[-1]]
    return None if later.empty else float(later["t"].iloc[0] - start)


def cell_metrics(
    samples: pd.DataFrame,
    events: pd.DataFrame,
    connections: pd.DataFrame,
    cells: Sequence[dict[str, Any]],
    duration: float,
    first_event_at: float | None,
) -> pd.DataFrame:
    """One row per cell with every metric (NaN where it does not apply)."""
    balance = balance_over_time(samples)
    window = end_window(duration)
    readiness = ready_times(samples, events)
    failed = failed_counts(events)
    # resets: closed connections with reason `reset`, or (kind, cluster: no connection table)
    # the workload's total as a `connection_reset` event
    resets = event_counts(events, "connection_reset")
    if len(connections):
        closed = connections[connections["close_reason"].astype(str) == "reset"]
        resets = resets.add(closed.groupby("cell_id", observed=True).size(), fill_value=0)
    rows = []
    for cell in cells:
        cell_id = cell["cell_id"]
        row: dict[str, Any] = {
            "cell_id": cell_id, "mode": cell["mode"], "seed": cell["seed"],
            **{k: sweep_value_label(v) for k, v in cell.get("params", {}).items()},
            "status": cell["status"],
        }
        if cell["status"] != "COMPLETED":
            rows.append(row)
            continue
        series = balance[balance["cell_id"] == cell_id]
        tail = series[series["t"] >= window]
        for metric in ("max_mean", "cv", "jain", "gini"):
            row[metric] = float(tail[metric].mean()) if len(tail) else math.nan
        start = first_event_at if first_event_at is not None else 0.0
        ttb = _time_to_balance(series, start)
        row["time_to_balance"] = math.nan if ttb is None else ttb
        cell_samples = samples[samples["cell_id"] == cell_id]
        last_t = cell_samples["t"].max()
        end = serving(cell_samples[cell_samples["t"] == last_t])
        row["new_pod_share"] = new_pod_share(end, first_event_at)
        row["ready_order_rho"] = ready_order_rho(end, readiness, cell_id)
        row["request_max_mean"] = request_max_mean(cell_samples, window)
        row["failed_connections"] = int(failed.get(cell_id, 0))
        row["reset_connections"] = int(resets.get(cell_id, 0))
        rows.append(row)
    return pd.DataFrame(rows)


def new_pod_share(end: pd.DataFrame, first_event_at: float | None) -> float:
    """(share of connections on pods created at or after the first event) / (their pod share)."""
    if first_event_at is None or end.empty:
        return math.nan
    new = end["created_at"] >= first_event_at
    total = end["active_connections"].sum()
    if not new.any() or total == 0:
        return math.nan
    connection_share = end.loc[new, "active_connections"].sum() / total
    return float(connection_share / new.mean())


def ready_order_rho(end: pd.DataFrame, readiness: pd.Series, cell_id: str) -> float:
    """Spearman rho between ready time and active connections over serving pods at the end."""
    if len(end) < 3:
        return math.nan
    ready = [readiness.get((cell_id, pod), math.nan) for pod in end["pod"]]
    frame = pd.DataFrame({"ready": ready, "x": end["active_connections"].to_numpy()}).dropna()
    if len(frame) < 3 or frame["ready"].nunique() < 2 or frame["x"].nunique() < 2:
        return math.nan
    return float(stats.spearmanr(frame["ready"], frame["x"]).statistic)


def request_rates(cell_samples: pd.DataFrame, window: float) -> pd.Series:
    """Per pod serving at the end: its request rate over the samples from `window` on."""
    tail = cell_samples[cell_samples["t"] >= window]
    if tail.empty:
        return pd.Series(dtype=float)
    last_t = tail["t"].max()
    serving_end = set(serving(tail[tail["t"] == last_t])["pod"])
    tail = tail[tail["pod"].isin(serving_end)]
    grouped = tail.groupby("pod", observed=True)
    span = grouped["t"].max() - grouped["t"].min()
    done = grouped["requests_total"].max() - grouped["requests_total"].min()
    return (done / span.where(span > 0)).dropna()


def request_max_mean(cell_samples: pd.DataFrame, window: float) -> float:
    """max/mean of per-pod request rates over the last 10%, over pods serving at the end."""
    rates = request_rates(cell_samples, window)
    if rates.empty or rates.mean() == 0:
        return math.nan
    return float(rates.max() / rates.mean())


def interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) with a Student-t interval; low = high = mean for one value."""
    data = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(data)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(data.mean())
    if n == 1:
        return mean, math.nan, math.nan, 1
    sem = float(data.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * sem)
    return mean, mean - half, mean + half, n


def summarize(metrics: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Mean and 95% t-interval over seeds of every metric, per group (e.g. mode, sweep keys)."""
    rows = []
    completed = metrics[metrics["status"] == "COMPLETED"]
    for key, group in completed.groupby(list(by), sort=False, dropna=False):
        keys = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(by, keys, strict=True))
        row["seeds"] = len(group)
        for metric in SUMMARY_METRICS:
            if metric not in group:
                continue
            mean, low, high, n = interval(group[metric].tolist())
            row[metric] = mean
            row[f"{metric}_low"] = low
            row[f"{metric}_high"] = high
            row[f"{metric}_n"] = n  # seeds with a value (NaN values are left out)
        rows.append(row)
    return pd.DataFrame(rows)


def verdict(values: Sequence[float], comparison: tuple[str, float]) -> tuple[str, float, float,
                                                                              float, int]:
    """CONFIRMED if the whole 95% interval satisfies the comparison, REFUTED if it violates it."""
    op, threshold = comparison
    mean, low, high, n = interval(values)
    if n < 2:  # no interval from fewer than two seeds
        return "INCONCLUSIVE", mean, low, high, n
    checks = {
        "<": lambda v: v < threshold, "<=": lambda v: v <= threshold,
        ">": lambda v: v > threshold, ">=": lambda v: v >= threshold,
    }[op]
    if checks(low) and checks(high):
        result = "CONFIRMED"
    elif not checks(low) and not checks(high):
        result = "REFUTED"
    else:
        result = "INCONCLUSIVE"
    return result, mean, low, high, n


def claim_verdict(metric: str, values: Sequence[float], comparison: tuple[str, float]) -> tuple[
        str, float, float, float, int]:
    """`verdict`, except that a time_to_balance that is null in every seed (never balanced)
    counts as infinite: it violates `<`/`<=` and satisfies `>`/`>=` in every seed."""
    data = [v for v in values if v is not None]
    if (metric == "time_to_balance" and data and all(math.isnan(v) for v in data)):
        op, _threshold = comparison
        result = "REFUTED" if op in ("<", "<=") else "CONFIRMED"
        return result, math.inf, math.inf, math.inf, len(data)
    return verdict(values, comparison)
