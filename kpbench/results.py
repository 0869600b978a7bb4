"""The results format (design §5, `format_version: 1`): one folder per run, never overwritten.

Format history:
  1 — run.json, samples.parquet, events.parquet, connections.parquet, locust/, report/.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kpbench import __version__

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_RUNS_DIR = Path("results") / "runs"

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


class ResultsError(ValueError):
    """A results folder that cannot be read: one line says why."""


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id() -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def atomic_write_bytes(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write to a temporary name beside `path`, then rename; refuse to overwrite unless asked."""
    if not replace and path.exists():
        raise FileExistsError(f"{path} exists; results are never overwritten")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, payload: Any, *, replace: bool = False) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_bytes(path, text.encode(), replace=replace)


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; results are never overwritten")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


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
    """A run folder being written: run.json is rewritten atomically as cells finish."""

    path: Path
    manifest: dict[str, Any]

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
        path.mkdir(parents=True, exist_ok=False)
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
            "root_seed": root_seed,
            "cells": cells,
        }
        folder = cls(path, manifest)
        atomic_write_json(path / "run.json", manifest)
        return folder

    @property
    def run_id(self) -> str:
        return str(self.manifest["run_id"])

    def update_cell(self, cell_id: str, **fields: Any) -> None:
        for cell in self.manifest["cells"]:
            if cell["cell_id"] == cell_id:
                cell.update(fields)
                break
        else:
            raise KeyError(cell_id)
        self.save()

    def finish(self, status: str) -> None:
        assert status in RUN_STATUSES
        self.manifest["status"] = status
        self.manifest["finished_at"] = utc_now()
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path / "run.json", self.manifest, replace=True)

    def write_artifact(self, relative: str, content: bytes) -> None:
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, content)

    def write_table(self, name: str, frames: Iterable[pd.DataFrame], columns: list[str]) -> None:
        parts = [f for f in frames if len(f)]
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        atomic_write_parquet(self.path / f"{name}.parquet", table)


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


def load_run(path: Path) -> Run:
    """Read a run folder into pandas; reject an unknown format_version or a missing file."""
    path = Path(path)
    manifest_path = path / "run.json"
    if not manifest_path.is_file():
        raise ResultsError(f"{path}: not a results folder (no run.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{manifest_path}: unreadable ({exc})") from None
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ResultsError(
            f"{manifest_path}: format_version {version!r} is not supported "
            f"(this kpbench reads {sorted(SUPPORTED_FORMAT_VERSIONS)})"
        )
    if not manifest.get("cells"):
        raise ResultsError(f"{manifest_path}: the run has no cells")
    tables: dict[str, pd.DataFrame] = {}
    for name in TABLES:
        table_path = path / f"{name}.parquet"
        if not table_path.is_file():
            if name == "connections":
                tables[name] = pd.DataFrame(columns=CONNECTION_COLUMNS)
                continue
            raise ResultsError(f"{path}: {name}.parquet is missing")
        try:
            tables[name] = pd.read_parquet(table_path)
        except Exception as exc:
            raise ResultsError(f"{table_path}: unreadable ({exc.__class__.__name__})") from None
    return Run(path, manifest, tables["samples"], tables["events"], tables["connections"])
