"""The one narrow interface every backend implements, and what a cell hands back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from kpbench.config import Cell, Experiment

Progress = Callable[[float], None]
"""Called with the cell's elapsed (simulated or real) seconds."""


class PreflightError(RuntimeError):
    """The backend cannot run here; raised before anything is created (exit 2)."""


class Unsupported(RuntimeError):
    """This cell cannot run on this backend here (its status becomes UNSUPPORTED)."""


@dataclass
class CellResult:
    """Tables of one cell, in the results format's columns minus the run-level ones."""

    samples: pd.DataFrame
    events: pd.DataFrame
    connections: pd.DataFrame
    dataplane: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)  # file name -> content (Locust's)


class Backend(Protocol):
    name: str
    measured: bool  # False for a model: its numbers are never presented as measurements

    def preflight(self, experiment: Experiment) -> None: ...
    def attach(self, run_dir: Path) -> None:
        """Called once the run folder exists (kind keeps its clusters' kubeconfigs there)."""
    def unsupported_reason(self, mode: str) -> str | None: ...
    def versions(self) -> dict[str, Any]: ...
    def run_cell(self, cell: Cell, progress: Progress) -> CellResult: ...
    def close(self) -> None: ...
