"""A loaded run folder plus the metrics computed from it, shared by report and figures.

Everything here reads the results format (the README's "Results") through
`kpbench.results.load_run` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import ValidationError

from analysis.metrics import balance_over_time, cell_metrics
from kpbench.config import Experiment, sweep_points
from kpbench.results import ResultsError, Run, load_run

MODELLED_BACKENDS = frozenset({"sim"})


def measurement_kind(backend: str) -> str:
    """'modelled' for the simulator, 'measured' for backends that drive real traffic."""
    return "modelled" if backend in MODELLED_BACKENDS else "measured"


def format_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def point_label(params: dict[str, Any]) -> str:
    """`connections=600, replicas=6` for a sweep point; '' when nothing is swept."""
    return ", ".join(f"{key.split('.')[-1]}={format_value(v)}" for key, v in params.items())


@dataclass
class RunData:
    """One run: its tables, its validated config, and per-cell metrics and balance series."""

    run: Run
    config: Experiment
    metrics: pd.DataFrame
    balance: pd.DataFrame
    label: str = ""
    points: list[dict[str, Any]] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return self.run.backend

    @property
    def measurement(self) -> str:
        return measurement_kind(self.backend)

    @property
    def backend_label(self) -> str:
        """`sim (modelled)`: how every number of this run is labelled."""
        return f"{self.backend} ({self.measurement})"

    @property
    def sweep_keys(self) -> list[str]:
        return list(self.config.sweep)

    @property
    def swept(self) -> bool:
        return bool(self.config.sweep)

    @property
    def completed_cells(self) -> list[dict[str, Any]]:
        return [c for c in self.run.cells if c["status"] == "COMPLETED"]

    @property
    def incomplete_cells(self) -> list[dict[str, Any]]:
        return [c for c in self.run.cells if c["status"] != "COMPLETED"]

    @property
    def event_marks(self) -> list[tuple[float, str]]:
        """The configured timeline as (time, description), for marking figures."""
        marks = []
        for event in self.config.events:
            detail = ""
            if event.action == "scale":
                detail = f" to {event.replicas}"
            elif event.action == "load":
                parts = []
                if event.requests_per_second is not None:
                    parts.append(f"{event.requests_per_second:g} req/s")
                if event.connections is not None:
                    parts.append(f"{event.connections} conns")
                detail = " " + ", ".join(parts)
            elif event.action == "kill-pod":
                detail = f" x{event.kill_count}"
            marks.append((event.at, f"{event.action}{detail}"))
        return marks

    def cells_at(self, mode: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Completed cells of one mode and sweep point, by seed."""
        return sorted(
            (c for c in self.completed_cells
             if c["mode"] == mode and _same_point(c.get("params", {}), params)),
            key=lambda c: c["seed"],
        )

    def modes(self) -> list[str]:
        return list(self.config.modes)


def _same_point(left: dict[str, Any], right: dict[str, Any]) -> bool:
    return all(left.get(k) == v for k, v in right.items())


def prepare_run(path: Path) -> RunData:
    """Load a run folder (one-line ResultsError if it cannot be read) and compute its metrics."""
    run = load_run(path)
    try:
        config = Experiment.model_validate(run.manifest["config"])
    except (ValidationError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0]
        raise ResultsError(f"{path}/run.json: the recorded config is not valid ({first})") from None
    for column in ("cell_id", "t", "pod", "ready", "terminating", "active_connections"):
        if column not in run.samples.columns:
            raise ResultsError(f"{path}/samples.parquet: column {column!r} is missing")
    metrics = cell_metrics(run.samples, run.events, run.connections, run.cells,
                           config.duration_seconds, config.first_event_at)
    errors = {c["cell_id"]: c.get("error") or "" for c in run.cells}
    metrics.insert(0, "run_id", run.run_id)
    metrics.insert(1, "backend", run.backend)
    metrics.insert(2, "measurement", measurement_kind(run.backend))
    metrics["error"] = metrics["cell_id"].map(errors)
    balance = balance_over_time(run.samples) if len(run.samples) else pd.DataFrame(
        columns=["cell_id", "t", "pods", "mean", "max_mean", "cv", "jain", "gini"])
    data = RunData(run, config, metrics, balance, points=sweep_points(config))
    data.label = data.backend_label
    return data


def prepare_runs(paths: Sequence[Path]) -> list[RunData]:
    """Load every folder; with several runs each gets a distinct label naming its backend."""
    runs = [prepare_run(Path(p)) for p in paths]
    if len(runs) > 1:
        experiments = {r.config.name for r in runs}
        for data in runs:
            prefix = f"{data.config.name} · " if len(experiments) > 1 else ""
            data.label = f"{prefix}{data.backend_label}, run {data.run.run_id}"
    return runs


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
