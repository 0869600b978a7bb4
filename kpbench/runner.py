"""Run an experiment: expand cells, drive the backend, commit each cell's results as it ends.

Each cell is committed on its own (`RunFolder.commit_cell`), so Ctrl-C, SIGTERM, a second signal,
a full disk or a SIGKILL lose at most the cell that was running. A cell whose rows cannot be
stored is FAILED with the reason; a write that fails (OSError) stops the run: the cells
committed so far stay, and the error is raised as one `ResultsWriteError` line.
"""

from __future__ import annotations

import time
import traceback
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kpbench import signals
from kpbench.backends import Backend, CellResult, Unsupported
from kpbench.config import ROOT_SEED, Cell, Experiment, expand_cells, sweep_value_label
from kpbench.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK
from kpbench.results import CONNECTION_COLUMNS, ResultsWriteError, RunFolder, base_versions

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_INVALID", "EXIT_OK", "RunOutcome",
           "run_experiment"]


@dataclass
class RunOutcome:
    folder: RunFolder
    status: str
    write_error: str | None = None
    interrupted_by: str = "SIGINT"
    late: bool = False  # a signal came after the run was recorded: its status stands

    @property
    def exit_code(self) -> int:
        if self.write_error is not None:
            return EXIT_FAILED
        if self.late:
            return EXIT_INTERRUPTED
        return {"COMPLETED": EXIT_OK, "FAILED": EXIT_FAILED}.get(self.status, EXIT_INTERRUPTED)


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


def cell_tables(result: CellResult, run_id: str, cell: Cell) -> dict[str, pd.DataFrame]:
    """A cell's rows as they are stored: stamped with the run, the cell and its sweep point."""
    return {
        "samples": _stamp(result.samples, run_id, cell, with_mode=True),
        "events": _stamp(result.events, run_id, cell, with_mode=False),
        "connections": result.connections.assign(cell_id=cell.cell_id)[CONNECTION_COLUMNS],
    }


def _write_error(folder: RunFolder, exc: OSError) -> str:
    return f"cannot write results in {folder.path}: {exc.strerror or exc}"


def run_experiment(
    experiment: Experiment,
    backend: Backend,
    runs_dir: Path,
    console: Console,
) -> RunOutcome:
    cells = expand_cells(experiment)
    versions = base_versions() | backend.versions()
    try:
        folder = RunFolder.create(
            runs_dir, experiment.name, backend.name, experiment.model_dump(mode="json"),
            [_cell_entry(c) for c in cells], versions, ROOT_SEED,
        )
    except OSError as exc:
        raise ResultsWriteError(f"cannot create a results folder in {runs_dir}: "
                                f"{exc.strerror or exc}") from None
    backend.attach(folder.path)
    status = "COMPLETED"
    write_error: str | None = None
    progress = Progress(
        TextColumn("[bold]{task.fields[cell]}"),
        BarColumn(),
        TextColumn("{task.fields[clock]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    clock = "simulated" if not backend.measured else "real"
    running: str | None = None  # the cell being run, until it is committed
    # Without a terminal the bar shows nothing: a measured run (minutes a cell) logs each cell.
    log_cells = backend.measured and not console.is_terminal

    def commit(label: str, started: float, cell_id: str, cell_status: str, *args: Any,
               **kwargs: Any) -> None:
        folder.commit_cell(cell_id, cell_status, *args, **kwargs)
        if log_cells:
            console.print(f"{label}: {cell_status} after {time.monotonic() - started:.0f} s",
                          highlight=False)

    interrupted_by, stopped, late_signal = "SIGINT", "", ""
    with signals.handled():
        try:
            with progress:
                task = progress.add_task("", total=experiment.duration_seconds, cell="",
                                         clock="")
                for number, cell in enumerate(cells, start=1):
                    label = f"cell {number}/{len(cells)} {cell.cell_id}"
                    started = time.monotonic()
                    progress.update(task, completed=0, cell=label, clock="")
                    reason = backend.unsupported_reason(cell.mode)
                    if reason is not None:
                        commit(label, started, cell.cell_id, "UNSUPPORTED", error=reason)
                        continue

                    def report(elapsed: float, _label: str = label) -> None:
                        shown = f"{elapsed:.0f}/{experiment.duration_seconds:g} s {clock}"
                        progress.update(task, completed=elapsed, clock=shown)

                    running = cell.cell_id
                    try:
                        result: CellResult = backend.run_cell(cell, report)
                    except Unsupported as exc:
                        commit(label, started, cell.cell_id, "UNSUPPORTED", error=str(exc))
                        continue
                    except Exception as exc:
                        status = "FAILED"
                        console.print(f"[red]cell {cell.cell_id} failed:[/red] {exc}")
                        commit(label, started, cell.cell_id, "FAILED",
                               error=f"{exc.__class__.__name__}: {exc}",
                               traceback=traceback.format_exc(limit=8))
                        continue
                    try:
                        commit(label, started, cell.cell_id, "COMPLETED",
                               cell_tables(result, folder.run_id, cell), result.artifacts,
                               dataplane=result.dataplane)
                    except ValueError as exc:  # a value the results format cannot hold
                        status = "FAILED"
                        console.print(f"[red]cell {cell.cell_id} failed:[/red] {exc}")
                        commit(label, started, cell.cell_id, "FAILED",
                               error=f"results not storable: {exc}")
                    running = None
        except KeyboardInterrupt as exc:
            status, stopped = "INTERRUPTED", "the run was interrupted"
            if isinstance(exc, signals.Interrupted):
                interrupted_by = str(exc.args[0])
        except OSError as exc:
            status, write_error = "FAILED", _write_error(folder, exc)
            stopped = "results could not be written"
        except Exception:
            status, stopped = "FAILED", "kpbench stopped on an error"
            raise
        finally:
            try:
                with signals.deferred():  # a (first) signal now waits until the run is recorded
                    with suppress(Exception):
                        backend.close()
                    for entry in folder.manifest["cells"]:
                        if entry["status"] == "PENDING":
                            entry.update(
                                status="INTERRUPTED" if status == "INTERRUPTED" else "FAILED",
                                error=(f"cut off: {stopped}" if entry["cell_id"] == running
                                       else f"not started: {stopped}"))
                    try:
                        folder.finish(status)
                    except OSError as exc:
                        write_error = write_error or _write_error(folder, exc)
            except signals.Interrupted as exc:  # came while the run was being recorded
                late_signal = str(exc.args[0])
    return RunOutcome(folder, status, write_error, late_signal or interrupted_by,
                      late=bool(late_signal))
