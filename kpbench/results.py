"""The results format: one folder per run, never overwritten.

Format history:
  1 — run.json, samples.parquet, events.parquet, connections.parquet (written when the run
      ends), locust/, report/.
  2 — each cell is committed when it ends: its rows go to `cells/<n>.<table>.parquet` (n = the
      cell's 1-based position in run.json, 5 digits), then its record `cells/<n>.json` (status,
      error, data plane, row counts) is renamed into place: the record is the commit, so a run
      killed at any point keeps every cell whose record exists, with all its rows. run.json is
      written when the run starts (every cell PENDING, the owning process's identity) and
      rewritten when it ends; while it runs, or if it never ended, the records say which cells
      finished. Every file is written under a temporary name (`.<name>.<pid>-<start>.tmp`) and
      renamed; a temporary name is never read as data. When the run ends, its completed cells'
      parts are compacted into one `<table>.parquet` each (a 500-cell run would otherwise keep
      2,000 small files, 25x the bytes): the tables are written, then run.json with
      `"compacted": true` and every cell's record, then the parts and records are removed. A run
      that stops before that keeps its parts, and a crash in between leaves both, read as the
      flag says.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kpbench import __version__, proc, signals

FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = frozenset({1, 2})
REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_RUNS_DIR = Path("results") / "runs"
DEFAULT_REPORTS_DIR = Path("results") / "reports"
CELLS_DIR = "cells"

RUN_STATUSES = ("RUNNING", "COMPLETED", "FAILED", "INTERRUPTED")
CELL_STATUSES = ("PENDING", "COMPLETED", "FAILED", "UNSUPPORTED", "INTERRUPTED")

SAMPLE_COLUMNS = [
    "run_id", "cell_id", "mode", "seed", "t", "pod", "node", "created_at", "ready",
    "terminating", "active_connections", "connections_total", "requests_total", "cpu_millicores",
]
EVENT_COLUMNS = ["run_id", "cell_id", "t", "event", "pod", "detail"]
CONNECTION_COLUMNS = [
    "cell_id", "conn_id", "client", "node", "pod", "opened_at", "closed_at", "close_reason",
    "requests",
]
TABLES = ("samples", "events", "connections")
# `.<name>.<pid>.tmp` (format 1) or `.<name>.<pid>-<start ticks>.tmp`: a file being written.
TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)(?:-(?P<start>\d+))?\.tmp$")


class ResultsError(ValueError):
    """A results folder that cannot be read: one line says why."""


class ResultsWriteError(OSError):
    """Results could not be written (a full disk, a read-only folder): one line says where."""


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id() -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def temp_path(path: Path) -> Path:
    """The temporary name `path` is written under: it names the writing process, so that
    `kpbench clean` can tell a file still being written from one a dead process left."""
    me = proc.current()
    return path.with_name(f".{path.name}.{me.pid}-{me.start or 0}.tmp")


def temp_owner(name: str) -> proc.Identity | None:
    """The process that writes a temporary file or folder named `name`; None if not one."""
    match = TEMP_NAME.match(name)
    if match is None:
        return None
    start = match.group("start")
    return proc.Identity(int(match.group("pid")), int(start) if start else None)


def atomic_write_bytes(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write to a temporary name beside `path`, then rename; refuse to overwrite unless asked.
    On any failure (a full disk, a signal) the temporary file is removed."""
    if not replace and path.exists():
        raise FileExistsError(f"{path} exists; results are never overwritten")
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any, *, replace: bool = False) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_bytes(path, text.encode(), replace=replace)


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    """A table as parquet (zstd); raises ValueError (pyarrow's ArrowInvalid / ArrowTypeError,
    OverflowError) when a value cannot be stored."""
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowException, OverflowError) as exc:
        raise ValueError(f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(REPOSITORY), *args],
                capture_output=True, text=True, timeout=10, check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def host_info() -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def base_versions() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "kpbench": __version__,
        "numpy": package_version("numpy"),
        "pandas": package_version("pandas"),
        "pyarrow": package_version("pyarrow"),
        "kernel": platform.release(),
    }


@dataclass
class RunFolder:
    """A run folder being written: each cell is committed on its own when it ends."""

    path: Path
    manifest: dict[str, Any]
    compact_on_finish: ClassVar[bool] = True  # tests of the parts turn it off

    @classmethod
    def create(
        cls,
        runs_dir: Path,
        experiment: str,
        backend: str,
        config: dict[str, Any],
        cells: list[dict[str, Any]],
        versions: dict[str, Any],
        root_seed: int,
    ) -> RunFolder:
        run_id = new_run_id()
        path = runs_dir / experiment / run_id
        if path.exists():
            raise FileExistsError(f"{path} exists; results are never overwritten")
        manifest = {
            "format_version": FORMAT_VERSION,
            "run_id": run_id,
            "experiment": experiment,
            "backend": backend,
            "config": config,
            "status": "RUNNING",
            "started_at": utc_now(),
            "finished_at": None,
            "git": git_state(),
            "versions": versions,
            "host": host_info(),
            "process": proc.current().to_json(),
            "root_seed": root_seed,
            "cells": cells,
        }
        # The folder appears with its run.json or not at all: it is staged under a temporary
        # name and renamed, so a signal or a full disk at start-up leaves no bare folder.
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = temp_path(path)
        try:
            (staging / CELLS_DIR).mkdir(parents=True)
            atomic_write_json(staging / "run.json", manifest)
            os.rename(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # nothing of a run that could not start
            raise
        return cls(path, manifest)

    @property
    def run_id(self) -> str:
        return str(self.manifest["run_id"])

    def _position(self, cell_id: str) -> int:
        for number, cell in enumerate(self.manifest["cells"], start=1):
            if cell["cell_id"] == cell_id:
                return number
        raise KeyError(cell_id)

    def commit_cell(
        self,
        cell_id: str,
        status: str,
        tables: dict[str, pd.DataFrame] | None = None,
        artifacts: dict[str, bytes] | None = None,
        **fields: Any,
    ) -> None:
        """Commit one finished cell: its artifacts and table parts, then its record.

        A table that cannot be stored raises ValueError before anything is written; a write
        that fails (OSError) removes what this commit wrote. A signal waits for the commit.
        """
        assert status in CELL_STATUSES
        number = self._position(cell_id)
        encoded = {name: parquet_bytes(frame) for name, frame in (tables or {}).items()}
        record: dict[str, Any] = {"cell_id": cell_id, "status": status, **fields}
        if tables is not None:
            record["rows"] = {name: len(frame) for name, frame in tables.items()}
        written: list[Path] = []
        with signals.deferred():
            try:
                for relative, content in (artifacts or {}).items():
                    target = self.path / "locust" / cell_id / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(target, content)
                    written.append(target)
                for name, content in encoded.items():
                    target = self.path / part_name(number, name)
                    atomic_write_bytes(target, content)
                    written.append(target)
                atomic_write_json(self.path / record_name(number), record)
            except BaseException:
                for target in written:
                    target.unlink(missing_ok=True)
                raise
        self.manifest["cells"][number - 1].update(record)

    def finish(self, status: str) -> None:
        assert status in RUN_STATUSES
        with signals.deferred():
            self.manifest["status"] = status
            self.manifest["finished_at"] = utc_now()
            if self.compact_on_finish:
                self.compact()
            else:
                atomic_write_json(self.path / "run.json", self.manifest, replace=True)

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        """A written format-2 run folder, its cells' records folded into its manifest."""
        manifest = read_manifest(path)
        if manifest["format_version"] != 2:
            raise _fail(path, "only format 2 runs are written in cells")
        _load_format_2(path, manifest)  # checks every part and folds the records in
        return cls(path, manifest)

    def compact(self) -> None:
        """Fold the completed cells' parts into one file per table and the records into
        run.json, then remove them (see the module docstring); parts kept if it cannot."""
        compacted = bool(self.manifest.get("compacted")) or self._write_compacted_tables()
        self.manifest["compacted"] = compacted
        atomic_write_json(self.path / "run.json", self.manifest, replace=True)
        if compacted:
            for number in range(1, len(self.manifest["cells"]) + 1):
                for name in TABLES:
                    (self.path / part_name(number, name)).unlink(missing_ok=True)
                (self.path / record_name(number)).unlink(missing_ok=True)

    def _write_compacted_tables(self) -> bool:
        """One `<table>.parquet` per table from the completed cells' parts; False (parts kept)
        when they cannot be written, e.g. on a full disk."""
        parts: dict[str, list[pa.Table]] = {name: [] for name in TABLES}
        try:
            for number, cell in enumerate(self.manifest["cells"], start=1):
                if cell["status"] == "COMPLETED":
                    for name in TABLES:
                        parts[name].append(_read_part(self.path / part_name(number, name)))
            for name, columns in zip(TABLES, TABLE_COLUMNS, strict=True):
                atomic_write_bytes(self.path / f"{name}.parquet",
                                   parquet_bytes(_concat(parts[name], columns)), replace=True)
        except (OSError, ValueError):
            for name in TABLES:
                (self.path / f"{name}.parquet").unlink(missing_ok=True)
            return False
        return True


TABLE_COLUMNS = (SAMPLE_COLUMNS, EVENT_COLUMNS, CONNECTION_COLUMNS)


def part_name(number: int, table: str) -> str:
    return f"{CELLS_DIR}/{number:05d}.{table}.parquet"


def record_name(number: int) -> str:
    return f"{CELLS_DIR}/{number:05d}.json"


@dataclass
class Run:
    """A loaded run folder."""

    path: Path
    manifest: dict[str, Any]
    samples: pd.DataFrame
    events: pd.DataFrame
    connections: pd.DataFrame

    @property
    def run_id(self) -> str:
        return str(self.manifest["run_id"])

    @property
    def backend(self) -> str:
        return str(self.manifest["backend"])

    @property
    def cells(self) -> list[dict[str, Any]]:
        return list(self.manifest["cells"])

    @property
    def sweep_keys(self) -> list[str]:
        return list(self.manifest["config"].get("sweep", {}))

    @property
    def status(self) -> str:
        return str(self.manifest.get("status"))

    @property
    def owner_alive(self) -> bool:
        """True while the process that writes this RUNNING run is alive."""
        owner = proc.Identity.from_json(self.manifest.get("process"))
        return self.status == "RUNNING" and owner is not None and owner.alive()

    @property
    def unfinished(self) -> str | None:
        """Why the run is not a finished one (said on the report), or None."""
        done = sum(1 for c in self.cells if c["status"] == "COMPLETED")
        progress = f"{done} of {len(self.cells)} cells completed"
        if self.status == "RUNNING" and self.owner_alive:
            return f"still running: {progress} so far; the report shows those"
        if self.status == "RUNNING":
            return (f"unfinished: the process writing this run stopped before the end "
                    f"(killed?); {progress}, kept; the others never ran or were cut off")
        if self.status == "INTERRUPTED":
            return f"interrupted (Ctrl-C or SIGTERM): {progress}, kept"
        return None


def _fail(path: Path, problem: str) -> ResultsError:
    return ResultsError(f"{path}: {problem}")


def read_manifest(path: Path) -> dict[str, Any]:
    """run.json, checked for the keys every reader relies on (one-line ResultsError)."""
    manifest_path = path / "run.json"
    if not manifest_path.is_file():
        raise _fail(path, "not a results folder (no run.json)")
    try:
        manifest = json.loads(manifest_path.read_bytes().decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(manifest_path, f"unreadable ({exc.__class__.__name__})") from None
    if not isinstance(manifest, dict):
        raise _fail(manifest_path, "not a JSON object")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise _fail(manifest_path, f"format_version {version!r} is not supported "
                                   f"(this kpbench reads {sorted(SUPPORTED_FORMAT_VERSIONS)})")
    cells = manifest.get("cells")
    if not isinstance(cells, list) or not cells:
        raise _fail(manifest_path, "the run has no cells")
    for key, kind in (("run_id", str), ("backend", str), ("config", dict)):
        if not isinstance(manifest.get(key), kind):
            raise _fail(manifest_path, f"{key} is missing or not a {kind.__name__}")
    if manifest.get("status") not in RUN_STATUSES:
        raise _fail(manifest_path, f"status {manifest.get('status')!r} is not one of "
                                   f"{', '.join(RUN_STATUSES)}")
    for number, cell in enumerate(cells, start=1):
        if not isinstance(cell, dict) or not isinstance(cell.get("cell_id"), str):
            raise _fail(manifest_path, f"cell {number} has no cell_id")
        if cell.get("status") not in CELL_STATUSES:
            raise _fail(manifest_path, f"cell {cell['cell_id']}: status "
                                       f"{cell.get('status')!r} is unknown")
    return manifest


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:
        raise _fail(path, f"unreadable ({exc.__class__.__name__})") from None


def _read_part(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except Exception as exc:
        raise _fail(path, f"unreadable ({exc.__class__.__name__})") from None


def _concat(parts: list[pa.Table], columns: list[str]) -> pd.DataFrame:
    """Cells' parts as one frame: concatenated in arrow (one conversion), or through pandas
    when the cells' column types differ (a sweep of values of different types)."""
    filled = [t for t in parts if t.num_rows] or parts[:1]
    if not filled:
        return pd.DataFrame(columns=columns)
    try:
        return pa.concat_tables(filled, promote_options="permissive").to_pandas()
    except (pa.ArrowException, ValueError):
        return pd.concat([t.to_pandas() for t in filled], ignore_index=True)


def _load_format_1(path: Path, manifest: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Format 1: one file per table, written when the run ended (missing while it ran)."""
    tables: dict[str, pd.DataFrame] = {}
    for name, columns in zip(TABLES, (SAMPLE_COLUMNS, EVENT_COLUMNS, CONNECTION_COLUMNS),
                             strict=True):
        table_path = path / f"{name}.parquet"
        if table_path.is_file():
            tables[name] = _read_parquet(table_path)
        elif name == "connections" or manifest["status"] == "RUNNING":
            tables[name] = pd.DataFrame(columns=columns)
        else:
            raise _fail(path, f"{name}.parquet is missing")
    return tables


def _load_format_2(path: Path, manifest: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Format 2: each cell's record overrides run.json's entry; a COMPLETED cell's parts must
    all be there with the rows its record counts. A compacted run: one file per table, holding
    every completed cell's rows."""
    if manifest.get("compacted"):
        tables = {}
        for name in TABLES:
            tables[name] = _read_parquet(path / f"{name}.parquet")
            expected = sum((c.get("rows") or {}).get(name, 0) for c in manifest["cells"]
                           if c["status"] == "COMPLETED")
            if len(tables[name]) != expected:
                raise _fail(path, f"{name}.parquet holds {len(tables[name])} rows, the cells' "
                                  f"records say {expected}")
        return tables
    frames: dict[str, list[pa.Table]] = {name: [] for name in TABLES}
    for number, cell in enumerate(manifest["cells"], start=1):
        record_path = path / record_name(number)
        if record_path.is_file():
            try:
                record = json.loads(record_path.read_bytes().decode())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise _fail(record_path, f"unreadable ({exc.__class__.__name__})") from None
            if not isinstance(record, dict) or record.get("cell_id") != cell["cell_id"] \
                    or record.get("status") not in CELL_STATUSES:
                raise _fail(record_path, f"not the record of cell {cell['cell_id']}")
            cell.update(record)
        if cell["status"] != "COMPLETED":
            continue
        rows = cell.get("rows") or {}
        for name in TABLES:
            part = path / part_name(number, name)
            if not part.is_file():
                raise _fail(path, f"cell {cell['cell_id']} is COMPLETED but "
                                  f"{part_name(number, name)} is missing")
            table = _read_part(part)
            if rows.get(name) != table.num_rows:
                raise _fail(part, f"{table.num_rows} rows, the cell's record says "
                                  f"{rows.get(name)}")
            frames[name].append(table)
    return {name: _concat(frames[name], cols) for name, cols in zip(TABLES, TABLE_COLUMNS,
                                                                     strict=True)}


def load_run(path: Path) -> Run:
    """Read a run folder (finished or not) into pandas; one-line ResultsError if it cannot be
    read: an unknown format_version, a missing file, a part without its rows."""
    path = Path(path)
    manifest = read_manifest(path)
    loader = _load_format_1 if manifest["format_version"] == 1 else _load_format_2
    tables = loader(path, manifest)
    return Run(path, manifest, tables["samples"], tables["events"], tables["connections"])
