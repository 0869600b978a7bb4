"""Run an experiment: expand cells, drive the backend, write the results folder, summarise."""

from __future__ import annotations

import signal
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kpbench.backends import Backend, CellResult, Unsupported
from kpbench.config import ROOT_SEED, Cell, Experiment, expand_cells, sweep_value_label
from kpbench.results import (
    CONNECTION_COLUMNS,
    EVENT_COLUMNS,
    SAMPLE_COLUMNS,
    RunFolder,
    base_versions,
)

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class RunOutcome:
    folder: RunFolder
    status: str

    @property
    def exit_code(self) -> int:
        return {"COMPLETED": EXIT_OK, "FAILED": EXIT_FAILED}.get(self.status, EXIT_INTERRUPTED)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops a run the way Ctrl-C does: completed cells are kept."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cell_entry(cell: Cell) -> dict[str, Any]:
    return {
        "cell_id": cell.cell_id, "mode": cell.mode, "seed": cell.seed, "params": cell.params,
        "status": "PENDING", "error": None, "dataplane": None,
    }


def _stamp(frame: pd.DataFrame, run_id: str, cell: Cell, with_mode: bool) -> pd.DataFrame:
    frame = frame.copy()
    front: dict[str, Any] = {"run_id": run_id, "cell_id": cell.cell_id}
    if with_mode:
        labels = {key: sweep_value_label(value) for key, value in cell.params.items()}
        front |= {"mode": cell.mode, "seed": cell.seed, **labels}
    for position, (key, value) in enumerate(front.items()):
        frame.insert(position, key, value)
    return frame


def run_experiment(
    experiment: Experiment,
    backend: Backend,
    runs_dir: Path,
    console: Console,
) -> RunOutcome:
    cells = expand_cells(experiment)
    versions = base_versions() | backend.versions()
    folder = RunFolder.create(
        runs_dir, experiment.name, backend.name, experiment.model_dump(mode="json"),
        [_cell_entry(c) for c in cells], versions, ROOT_SEED,
    )
    backend.attach(folder.path)
    samples: list[pd.DataFrame] = []
    events: list[pd.DataFrame] = []
    connections: list[pd.DataFrame] = []
    status = "COMPLETED"
    progress = Progress(
        TextColumn("[bold]{task.fields[cell]}"),
        BarColumn(),
        TextColumn("{task.fields[clock]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    clock = "simulated" if not backend.measured else "real"
    try:
        with sigterm_as_interrupt(), progress:
            task = progress.add_task("", total=experiment.duration_seconds, cell="", clock="")
            for number, cell in enumerate(cells, start=1):
                label = f"cell {number}/{len(cells)} {cell.cell_id}"
                progress.update(task, completed=0, cell=label, clock="")
                reason = backend.unsupported_reason(cell.mode)
                if reason is not None:
                    folder.update_cell(cell.cell_id, status="UNSUPPORTED", error=reason)
                    continue

                def report(elapsed: float, _label: str = label) -> None:
                    shown = f"{elapsed:.0f}/{experiment.duration_seconds:g} s {clock}"
                    progress.update(task, completed=elapsed, clock=shown)

                try:
                    result: CellResult = backend.run_cell(cell, report)
                except KeyboardInterrupt:
                    folder.update_cell(cell.cell_id, status="INTERRUPTED",
                                       error="interrupted while running")
                    raise
                except Unsupported as exc:
                    folder.update_cell(cell.cell_id, status="UNSUPPORTED", error=str(exc))
                    continue
                except Exception as exc:
                    status = "FAILED"
                    console.print(f"[red]cell {cell.cell_id} failed:[/red] {exc}")
                    folder.update_cell(
                        cell.cell_id, status="FAILED",
                        error=f"{exc.__class__.__name__}: {exc}",
                        traceback=traceback.format_exc(limit=8),
                    )
                    continue
                samples.append(_stamp(result.samples, folder.run_id, cell, with_mode=True))
                events.append(_stamp(result.events, folder.run_id, cell, with_mode=False))
                connections.append(result.connections.assign(cell_id=cell.cell_id))
                for name, content in result.artifacts.items():
                    folder.write_artifact(f"locust/{cell.cell_id}/{name}", content)
                folder.update_cell(cell.cell_id, status="COMPLETED", dataplane=result.dataplane)
    except KeyboardInterrupt:
        status = "INTERRUPTED"
        for entry in folder.manifest["cells"]:
            if entry["status"] == "PENDING":
                entry.update(status="INTERRUPTED", error="not started: the run was interrupted")
        console.print("[yellow]interrupted: completed cells are kept[/yellow]")
    finally:
        backend.close()
        sweep_keys = list(experiment.sweep)
        folder.write_table("samples", samples, SAMPLE_COLUMNS[:4] + sweep_keys + SAMPLE_COLUMNS[4:])
        folder.write_table("events", events, EVENT_COLUMNS)
        folder.write_table(
            "connections",
            [c[CONNECTION_COLUMNS] for c in connections],
            CONNECTION_COLUMNS,
        )
        folder.finish(status)
    return RunOutcome(folder, status)
