"""The command line contract: exit codes, last line, nothing created on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kpbench.results import FORMAT_VERSION, ResultsError, atomic_write_json, load_run

from .conftest import EXPERIMENTS, REPOSITORY


def kpbench(*args: str, cwd: Path = REPOSITORY) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kpbench", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_quickstart_completes_with_15_cells(tmp_path: Path) -> None:
    done = kpbench("run", str(EXPERIMENTS / "quickstart.yaml"), "--out", str(tmp_path),
                   "--no-report")
    assert done.returncode == 0, done.stderr
    last_line = done.stdout.strip().splitlines()[-1]
    run_dir = Path(last_line)
    assert run_dir.parent.parent == tmp_path and run_dir.is_dir()
    assert "backend auto -> sim" in done.stderr
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "COMPLETED" and manifest["backend"] == "sim"
    assert len(manifest["cells"]) == 15
    assert {c["status"] for c in manifest["cells"]} == {"COMPLETED"}
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["git"]["commit"] is None or len(manifest["git"]["commit"]) == 40
    run = load_run(run_dir)
    assert set(run.samples["cell_id"]) == {c["cell_id"] for c in manifest["cells"]}
    assert {"max_mean", "jain"} <= set(done.stdout.split())
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "workload.connections=-5"], "workload.connections"),
        (["--set", "modes=[iptables, ipvs-xyz]"], "modes[1]"),
        (["--set", "workload.conections=5"], "workload.conections"),
        (["--set", "sweep={workload.nope: [1]}"], "sweep.workload.nope"),
        (["--set", "events=[{at: 999, action: rollout}]"], "events[0].at"),
        (["--set", "novalue"], "--set novalue"),
        (["--seeds", "0"], "--seeds"),
        (["--backend", "kind"], "--backend kind"),
        (["--backend", "cluster"], "--backend cluster"),
        (["--backend", "nope"], "--backend"),
    ],
)
def test_invalid_input_exits_2_and_creates_nothing(
    tmp_path: Path, args: list[str], named: str
) -> None:
    out = tmp_path / "runs"
    done = kpbench("run", str(EXPERIMENTS / "quickstart.yaml"), "--out", str(out), *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], lines
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_validate_and_schema() -> None:
    assert kpbench("validate", str(EXPERIMENTS / "quickstart.yaml")).returncode == 0
    schema = json.loads(kpbench("schema").stdout)
    assert schema["title"] == "kpbench experiment"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_keeps_completed_cells(tmp_path: Path, signum: int) -> None:
    config = tmp_path / "slow.yaml"
    config.write_text(
        "name: slow\nmodes: [iptables, ipvs-rr]\nseeds: 1\nduration_seconds: 80000\n"
        "sample_seconds: 50\nworkload: {connections: 2000, ramp_seconds: 40000,"
        " lifetime: {distribution: exponential, mean_seconds: 5}}\n"
    )
    quick = tmp_path / "quick.yaml"
    quick.write_text("name: quick\nmodes: [iptables]\nseeds: 1\nduration_seconds: 20\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "kpbench", "run", str(quick), str(config), "--out", str(tmp_path),
         "--no-report"],
        cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("slow/*/run.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    (run_dir,) = tmp_path.glob("slow/*")
    assert stdout.strip().splitlines()[-1] == str(run_dir)
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "INTERRUPTED"
    assert [c["status"] for c in manifest["cells"]] == ["INTERRUPTED", "INTERRUPTED"]
    (quick_dir,) = tmp_path.glob("quick/*")
    assert json.loads((quick_dir / "run.json").read_text())["status"] == "COMPLETED"
    assert load_run(run_dir).samples.empty


def test_loader_rejects_unknown_format_and_missing_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    atomic_write_json(run_dir / "run.json", {"format_version": 99, "cells": [{}]})
    with pytest.raises(ResultsError, match="format_version 99"):
        load_run(run_dir)
    manifest = {"format_version": 1, "run_id": "r", "backend": "sim", "config": {},
                "status": "COMPLETED", "cells": [{"cell_id": "c", "status": "COMPLETED"}]}
    atomic_write_json(run_dir / "run.json", manifest, replace=True)
    with pytest.raises(ResultsError, match=r"samples\.parquet is missing"):
        load_run(run_dir)
    atomic_write_json(run_dir / "run.json", manifest | {"cells": [{}]}, replace=True)
    with pytest.raises(ResultsError, match="cell 1 has no cell_id"):
        load_run(run_dir)
    atomic_write_json(run_dir / "run.json", {"format_version": 1, "cells": []}, replace=True)
    with pytest.raises(ResultsError, match="no cells"):
        load_run(run_dir)


def test_results_are_never_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(FileExistsError):
        atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
