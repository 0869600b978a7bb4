"""Hostile input, signals, full disks and kills: every case ends with its documented exit code
and exactly one `kpbench:` line (never a traceback), and loses nothing or leaves nothing behind.

Input cases call `kpbench.cli.main` in this process (the same code as the command, without the
interpreter's start-up); signals, kills and full filesystems use real `kpbench` processes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from kpbench import cli, proc
from kpbench.backends.sim import SimBackend
from kpbench.config import load
from kpbench.lab.netns import WORKDIR_PREFIX, overlapping
from kpbench.limits import BOUNDS, CROSS_BOUNDS
from kpbench.results import CELLS_DIR, TABLES, RunFolder, load_run, temp_path
from kpbench.runner import run_experiment

from .conftest import EXPERIMENTS, REPOSITORY

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (mounts, users)")
TINY = """name: tiny
modes: [iptables, ipvs-rr]
seeds: {seeds}
duration_seconds: 10
sample_seconds: 1
cluster: {{nodes: 1}}
backend: {{replicas: 3}}
workload: {{clients: 2, connections: 6, ramp_seconds: 1}}
"""


# --- helpers --------------------------------------------------------------------------------


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def kpbench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kpbench", *args], capture_output=True,
                          text=True, cwd=REPOSITORY, timeout=timeout)


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kpbench", *args], cwd=REPOSITORY,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def one_line(stderr: str, fragment: str, *, alone: bool = True) -> str:
    """The single `kpbench:` line of stderr (the only line when `alone`), containing
    `fragment`; no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("kpbench:")]
    assert len(lines) == 1, stderr
    if alone:
        assert stderr.strip().splitlines() == lines, stderr
    assert fragment in lines[0], lines[0]
    return lines[0]


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")] if folder.exists() else []


def assert_cells_whole(run_dir: Path, reference: dict[str, dict[str, int]] | None = None) -> int:
    """The run loads; every COMPLETED cell has all its rows (the loader checks each part against
    its record) and, given a reference run, as many rows as there. Returns completed cells."""
    run = load_run(run_dir)
    completed = [c for c in run.cells if c["status"] == "COMPLETED"]
    for cell in completed:
        counts = {name: int((getattr(run, name)["cell_id"] == cell["cell_id"]).sum())
                  for name in TABLES}
        assert counts == cell["rows"], cell["cell_id"]
        if reference is not None:
            assert counts == reference[cell["cell_id"]], cell["cell_id"]
    assert not temp_files(run_dir)
    return len(completed)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """A tiny config of 40 cells and the rows each of its cells has when run to the end."""
    folder = tmp_path_factory.mktemp("reference")
    config = write(folder, TINY.format(seeds=20))
    outcome = run_experiment(load(config), SimBackend(), folder / "runs", Console(quiet=True))
    run = load_run(outcome.folder.path)
    rows = {c["cell_id"]: c["rows"] for c in run.cells}
    yield config, rows


# --- configs ----------------------------------------------------------------------------------

BAD_CONFIGS = {
    "inf": ("duration_seconds: .inf", "duration_seconds"),
    "nan": ("workload: {requests_per_second: .nan}", "workload.requests_per_second"),
    "minus-inf-event": ("events: [{at: -.inf, action: rollout}]", "events[0].at"),
    "bool-count": ("workload: {connections: true}", "workload.connections"),
    "bool-replicas": ("backend: {replicas: false}", "backend.replicas"),
    "bool-seed": ("seeds: [1, true]", "seeds"),
    "duplicate-top": ("name: again", "duplicate key 'name'"),
    "duplicate-nested": ("workload: {connections: 5, connections: 6}",
                         "duplicate key 'connections'"),
    "alias-bomb": ("x0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "\n".join(
        f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)),
        "expands to more than"),
    "recursive-alias": ("x: &a [*a]", "not valid YAML"),
    "too-many-cells": ("seeds: 5000", "exceed the limit of 10,000"),
    "sweep-explodes": ("sweep: {workload.connections: [" + ", ".join(map(str, range(1, 60)))
                       + "], backend.replicas: [" + ", ".join(map(str, range(1, 60))) + "]}",
                       "exceed the limit"),
    "negative-seed": ("seeds: [-1, 2]", "seeds"),
    "huge-seed": (f"seeds: [{2**63}]", "seeds"),
    "zero-seeds": ("seeds: 0", "seeds"),
    "rate-high": ("workload: {requests_per_second: 1000000}", "workload.requests_per_second"),
    "rate-low": ("workload: {requests_per_second: 0.000000001}",
                 "workload.requests_per_second"),
    "lifetime-short": ("workload: {lifetime: {distribution: fixed, mean_seconds: 0.001}}",
                       "workload.lifetime.mean_seconds"),
    "reconnect-fast": ("workload: {reconnect: {policy: periodic, seconds: 0.01}}",
                       "workload.reconnect.seconds"),
    "sample-fast": ("sample_seconds: 0.01", "sample_seconds"),
    "duration-huge": ("duration_seconds: 1000000000", "duration_seconds"),
    "connections-huge": ("workload: {connections: 10000000}", "workload.connections"),
    "turnover-budget": ("duration_seconds: 3600\nworkload: {connections: 1000000, lifetime: "
                        "{distribution: exponential, mean_seconds: 1}}", "connection events"),
    "sample-rows": ("duration_seconds: 3600\nsample_seconds: 0.1\nbackend: {replicas: 10000}",
                    "sample rows"),
    "hpa-sync-fast": ("backend: {hpa: {max_replicas: 10, sync_seconds: 0.01}}",
                      "backend.hpa.sync_seconds"),
    "event-rate": ("events: [{at: 1, action: load, requests_per_second: 1000000000}]",
                   "events[0].requests_per_second"),
    "same-cell-ids": ('sweep: {workload.connections: [6, "6"]}', "same cell id"),
    "long-name": ("name: " + "x" * 150, "name"),
    "unknown-key": ("workload: {conections: 5}", "did you mean 'connections'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_with_one_line_and_creates_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    text, named = BAD_CONFIGS[case]
    base = "" if case == "duplicate-top" else "name: adversary\n"
    if case == "duplicate-top":
        text = "name: adversary\n" + text
    config = write(tmp_path, base + text + "\n")
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "run", str(config), "--backend", "sim", "--out", str(out))
    assert code == 2
    one_line(err, named)
    assert not out.exists()


def test_the_cell_limit_is_configurable(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = str(EXPERIMENTS / "quickstart.yaml")
    code, _, err = run_main(capsys, "validate", config, "--max-cells", "10")
    assert code == 2
    one_line(err, "15 cells")
    code, out, _ = run_main(capsys, "validate", config, "--max-cells", "15")
    assert code == 0 and "ok (15 cells)" in out


FILES = ("fifo", "directory", "device", "latin-1", "utf-16", "too-large", "missing", "empty",
         "a-list", "bad-yaml")


def make_config_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    path = tmp_path / f"{kind}.yaml"
    if kind == "fifo":
        os.mkfifo(path)
        return path, "not a regular file"
    if kind == "directory":
        path.mkdir()
        return path, "not a regular file"
    if kind == "device":
        return Path("/dev/null"), "not a regular file"
    if kind == "latin-1":
        path.write_bytes("name: caf\xe9\n".encode("latin-1"))
        return path, "not UTF-8"
    if kind == "utf-16":
        path.write_bytes("name: x\n".encode("utf-16"))
        return path, "not UTF-8"
    if kind == "too-large":
        path.write_text("name: big\n" + "#" * (2 * 1024 * 1024))
        return path, "larger than"
    if kind == "missing":
        return path, "cannot read"
    if kind == "empty":
        path.write_text("")
        return path, "must be a mapping"
    if kind == "a-list":
        path.write_text("- name: x\n")
        return path, "must be a mapping"
    path.write_text("name: [unclosed\n")
    return path, "not valid YAML"


@pytest.mark.parametrize("kind", FILES)
def test_config_files_that_are_not_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           kind: str) -> None:
    path, named = make_config_file(tmp_path, kind)
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "run", str(path), "--backend", "sim", "--out", str(out))
    assert code == 2
    one_line(err, named)
    assert not out.exists()


SETS = {
    "inf": (["--set", "workload.connections=.inf"], "workload.connections"),
    "bool": (["--set", "workload.requests_per_second=true"], "workload.requests_per_second"),
    "recursive": (["--set", "sweep={workload.connections: &a [1, *a]}"], "--set sweep"),
    "duplicate": (["--set", "workload={connections: 1, connections: 2}"], "duplicate key"),
    "negative-seed": (["--set", "seeds=[-1]"], "seeds"),
    "index": (["--set", "events.5.at=1"], "events.5.at: no such key"),
    "no-key": (["--set", "=5"], "expected KEY=VALUE"),
    "bad-yaml": (["--set", "workload.connections=[unclosed"], "not valid YAML"),
    "seeds-zero": (["--seeds", "0"], "--seeds"),
    "seeds-huge": (["--seeds", "99999999"], "--seeds"),
    "seeds-word": (["--seeds", "many"], "--seeds"),
    "max-cells-zero": (["--max-cells", "0"], "--max-cells"),
    "backend": (["--backend", "nope"], "--backend"),
}


@pytest.mark.parametrize("case", sorted(SETS))
def test_bad_command_line_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  case: str) -> None:
    args, named = SETS[case]
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "run", str(EXPERIMENTS / "quickstart.yaml"), "--out",
                            str(out), *args)
    assert code == 2
    one_line(err, named)
    assert not out.exists()


# --- --out ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["a-file", "under-a-file"])
def test_out_that_is_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     kind: str) -> None:
    blocker = write(tmp_path, "not a folder", "file")
    out = blocker if kind == "a-file" else blocker / "sub"
    code, _, err = run_main(capsys, "run", str(EXPERIMENTS / "quickstart.yaml"), "--out",
                            str(out), "--backend", "sim")
    assert code == 2
    one_line(err, "not a directory")
    assert blocker.read_text() == "not a folder"


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[object]:
    """mount(size, ro=False) -> a fresh tmpfs of that many KiB, unmounted at the end."""
    mounted: list[Path] = []

    def make(kib: int, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={kib}k" + (",ro" if read_only else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


@needs_root
def test_out_on_a_read_only_filesystem(capsys: pytest.CaptureFixture[str], mount: object) -> None:
    point = mount(64, read_only=True)  # type: ignore[operator]
    code, _, err = run_main(capsys, "run", str(EXPERIMENTS / "quickstart.yaml"), "--out",
                            str(point / "runs"), "--backend", "sim")
    assert code == 2
    one_line(err, "read-only filesystem")


@needs_root
def test_a_full_filesystem_at_the_start_leaves_nothing(tmp_path: Path, mount: object) -> None:
    point = mount(8)  # type: ignore[operator]
    subprocess.run(["dd", "if=/dev/zero", f"of={point / 'filler'}", "bs=4k", "count=64"],
                   capture_output=True, check=False)  # fills the filesystem
    done = kpbench("run", str(write(tmp_path, TINY.format(seeds=2))), "--backend", "sim",
                   "--out", str(point / "runs"), "--no-report")
    assert done.returncode == 1
    one_line(done.stderr, "No space left on device", alone=False)
    assert not temp_files(point) and not list(point.rglob("run.json"))


def test_an_interrupt_while_the_run_starts_leaves_no_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run folder appears whole (with run.json) or not at all: a signal between its
    creation and its manifest once left a bare folder."""
    import kpbench.results as results

    def interrupted(path: Path, payload: object, *, replace: bool = False) -> None:
        path.write_text("{")  # a part written, then the signal
        raise KeyboardInterrupt

    monkeypatch.setattr(results, "atomic_write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        RunFolder.create(tmp_path / "runs", "tiny", "sim", {}, [], {}, root_seed=1)
    assert list((tmp_path / "runs" / "tiny").iterdir()) == []


@needs_root
def test_a_full_filesystem_mid_run_keeps_every_completed_cell(
        tmp_path: Path, mount: object, reference: tuple[Path, dict]) -> None:
    config, rows = reference
    point = mount(160)  # type: ignore[operator]
    done = kpbench("run", str(config), "--backend", "sim", "--out", str(point),
                   "--no-report")
    assert done.returncode == 1, done.stderr
    one_line(done.stderr, "No space left on device", alone=False)
    (run_dir,) = point.glob("tiny/*")
    assert done.stdout.strip().splitlines()[-1] == str(run_dir)
    completed = assert_cells_whole(run_dir, rows)
    assert 0 < completed < len(rows)
    report = kpbench("report", str(run_dir), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert "Not a finished run" in (tmp_path / "report" / "summary.md").read_text() or \
        json.loads((run_dir / "run.json").read_text())["status"] == "FAILED"


# --- report inputs ----------------------------------------------------------------------------


@pytest.fixture
def small_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A finished run that keeps its per-cell parts (as a run that never ended does)."""
    monkeypatch.setattr(RunFolder, "compact_on_finish", False)
    config = write(tmp_path, TINY.format(seeds=2))
    outcome = run_experiment(load(config), SimBackend(), tmp_path / "runs", Console(quiet=True))
    return outcome.folder.path


@pytest.fixture
def compacted_run(tmp_path: Path) -> Path:
    config = write(tmp_path, TINY.format(seeds=2))
    outcome = run_experiment(load(config), SimBackend(), tmp_path / "runs", Console(quiet=True))
    return outcome.folder.path


def test_a_finished_run_is_compacted_and_reads_the_same(compacted_run: Path,
                                                         small_run: Path) -> None:
    assert json.loads((compacted_run / "run.json").read_text())["compacted"] is True
    assert not list((compacted_run / CELLS_DIR).iterdir())  # parts and records folded in
    a, b = load_run(compacted_run), load_run(small_run)
    for name in TABLES:
        left = getattr(a, name).drop(columns="run_id", errors="ignore").reset_index(drop=True)
        right = getattr(b, name).drop(columns="run_id", errors="ignore").reset_index(drop=True)
        assert left.equals(right), name


@pytest.mark.parametrize(("kind", "named"), [("truncated", "unreadable"),
                                              ("missing", "unreadable"),
                                              ("wrong-rows", "the cells' records say")])
def test_a_corrupted_compacted_run_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], compacted_run: Path, kind: str,
        named: str) -> None:
    table = compacted_run / "samples.parquet"
    if kind == "truncated":
        table.write_bytes(table.read_bytes()[:100])
    elif kind == "missing":
        table.unlink()
    else:
        manifest = json.loads((compacted_run / "run.json").read_text())
        manifest["cells"][0]["rows"]["samples"] += 1
        (compacted_run / "run.json").write_text(json.dumps(manifest))
    out = tmp_path / "report"
    code, _, err = run_main(capsys, "report", str(compacted_run), "--out", str(out))
    assert code == 2
    one_line(err, named)
    assert not out.exists()


def _corrupt(run_dir: Path, kind: str) -> str:
    manifest = run_dir / "run.json"
    if kind == "garbage-json":
        manifest.write_text("{not json")
        return "unreadable"
    if kind == "json-list":
        manifest.write_text("[1, 2]")
        return "not a JSON object"
    if kind == "format-99":
        data = json.loads(manifest.read_text())
        manifest.write_text(json.dumps(data | {"format_version": 99}))
        return "format_version 99"
    if kind == "no-run-id":
        data = json.loads(manifest.read_text())
        del data["run_id"]
        manifest.write_text(json.dumps(data))
        return "run_id is missing"
    if kind == "bad-status":
        data = json.loads(manifest.read_text())
        manifest.write_text(json.dumps(data | {"status": "MAYBE"}))
        return "status 'MAYBE'"
    part = run_dir / CELLS_DIR / "00001.samples.parquet"
    if kind == "truncated-part":
        part.write_bytes(part.read_bytes()[:100])
        return "unreadable"
    if kind == "missing-part":
        part.unlink()
        return "is missing"
    if kind == "wrong-rows":
        record = run_dir / CELLS_DIR / "00001.json"
        data = json.loads(record.read_text())
        data["rows"]["samples"] += 1
        record.write_text(json.dumps(data))
        return "the cell's record says"
    if kind == "foreign-record":
        record = run_dir / CELLS_DIR / "00001.json"
        data = json.loads(record.read_text())
        record.write_text(json.dumps(data | {"cell_id": "someone-else"}))
        return "not the record of cell"
    raise AssertionError(kind)


CORRUPTIONS = ("garbage-json", "json-list", "format-99", "no-run-id", "bad-status",
               "truncated-part", "missing-part", "wrong-rows", "foreign-record")


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_corrupted_run_is_one_line_and_no_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], small_run: Path, kind: str) -> None:
    named = _corrupt(small_run, kind)
    out = tmp_path / "report"
    code, _, err = run_main(capsys, "report", str(small_run), "--out", str(out))
    assert code == 2
    one_line(err, named)
    assert not out.exists() and not temp_files(tmp_path)


def test_report_of_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "report", str(tmp_path / "nothing"))
    assert code == 2
    one_line(err, "not a results folder")


def test_report_out_that_exists_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           small_run: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep").write_text("mine")
    code, _, err = run_main(capsys, "report", str(small_run), "--out", str(out))
    assert code == 2
    one_line(err, "never overwritten")
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_the_same_run_twice_is_read_once(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         small_run: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(small_run)
    copy = tmp_path / "copy"
    shutil.copytree(small_run, copy)
    out = tmp_path / "report"
    code, _, err = run_main(capsys, "report", str(small_run), str(link), str(copy), "--out",
                            str(out))
    assert code == 0, err
    assert err.count("same run as") == 2
    assert len({line.split(",")[0] for line in (out / "summary.csv").read_text().splitlines()[1:]}
               ) == 1


def test_a_stale_temp_file_is_not_data_and_clean_removes_it(
        capsys: pytest.CaptureFixture[str], small_run: Path) -> None:
    dead = proc.Identity(4_000_000, 1)  # no such PID (above pid_max)
    stale = small_run / CELLS_DIR / f".00001.samples.parquet.{dead.pid}-{dead.start}.tmp"
    stale.write_bytes(b"half a parquet file")
    mine = temp_path(small_run / CELLS_DIR / "00002.samples.parquet")
    mine.write_bytes(b"being written by this live process")
    reused = small_run / CELLS_DIR / f".00003.json.{os.getpid()}-1.tmp"  # our PID, not our start
    reused.write_bytes(b"{")
    before = load_run(small_run)
    assert len(before.samples)
    code, _, err = run_main(capsys, "clean", str(small_run.parent))
    assert code == 0, err
    assert not stale.exists() and not reused.exists() and mine.exists()
    assert f"removed temporary {stale}" in err and f"left temporary {mine}" in err
    mine.unlink()
    assert_cells_whole(small_run)


def test_facets_are_capped_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, TINY.format(seeds=1).replace("[iptables, ipvs-rr]", "[iptables]"))
    runs = [run_experiment(load(config), SimBackend(), tmp_path / "runs",
                           Console(quiet=True)).folder.path for _ in range(8)]
    out = tmp_path / "report"
    code, _, err = run_main(capsys, "report", *map(str, runs), "--out", str(out))
    assert code == 0, err
    summary = (out / "summary.md").read_text()
    assert "draw the first 6 of the 8 runs" in summary


# --- signals ----------------------------------------------------------------------------------


def wait_for(condition: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM]])
def test_a_signal_at_start_up_is_130_and_one_line(tmp_path: Path, signals: list[int]) -> None:
    rng = random.Random(sum(signals))
    process = spawn("run", str(EXPERIMENTS / "quickstart.yaml"), "--backend", "sim", "--out",
                    str(tmp_path / "out"))
    time.sleep(rng.uniform(0.3, 1.5))  # after the interpreter starts kpbench, before any cell
    for signum in signals:
        process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    one_line(stderr, f"interrupted ({signal.Signals(signals[0]).name})", alone=False)
    for run_dir in (tmp_path / "out").glob("quickstart/*"):
        assert_cells_whole(run_dir)


SIGNAL_SEQUENCES = {
    "sigint": [signal.SIGINT],
    "sigterm": [signal.SIGTERM],
    "double-sigint": [signal.SIGINT, signal.SIGINT],
    "sigint-then-sigterm": [signal.SIGINT, signal.SIGTERM],
    "triple-sigterm": [signal.SIGTERM, signal.SIGTERM, signal.SIGTERM],
}


@pytest.mark.parametrize("case", sorted(SIGNAL_SEQUENCES))
def test_signals_at_a_random_point_of_a_run(tmp_path: Path, case: str,
                                            reference: tuple[Path, dict]) -> None:
    config, rows = reference
    rng = random.Random(case)
    out = tmp_path / "out"
    process = spawn("run", str(config), "--backend", "sim", "--out", str(out), "--no-report")
    wait_for(lambda: list(out.glob("tiny/*/run.json")))
    time.sleep(rng.uniform(0.0, 1.0))
    for signum in SIGNAL_SEQUENCES[case]:
        process.send_signal(signum)
        time.sleep(rng.uniform(0.0, 0.02))
    stdout, stderr = process.communicate(timeout=120)
    (run_dir,) = out.glob("tiny/*")
    status = json.loads((run_dir / "run.json").read_text())["status"]
    if process.returncode == 0:  # the run ended before the signal landed
        assert status == "COMPLETED"
    else:  # COMPLETED when the signal came after the run was recorded (in its summary)
        assert process.returncode == 130, stderr
        one_line(stderr, "interrupted", alone=False)
        assert status in ("INTERRUPTED", "COMPLETED")
    assert stdout.strip().splitlines()[-1] == str(run_dir)
    assert_cells_whole(run_dir, rows)


def test_sigterm_while_the_report_renders(tmp_path: Path, small_run: Path) -> None:
    out = tmp_path / "report"
    process = spawn("report", str(small_run), "--out", str(out))
    wait_for(lambda: temp_files(tmp_path) or out.exists(), timeout=120)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        assert (out / "index.html").is_file()
    else:
        assert process.returncode == 130, stderr
        one_line(stderr, "interrupted (SIGTERM)")
        assert not out.exists()
    assert not temp_files(tmp_path)


# --- SIGKILL ----------------------------------------------------------------------------------


def kill_at_random_points(config: Path, rows: dict[str, dict[str, int]], out: Path, times: int,
                          span: float, seed: int) -> None:
    """Run `config` and SIGKILL it at a random point, `times` times: each killed run reads as
    unfinished and every COMPLETED cell has all its rows; `kpbench clean` leaves no temp file."""
    rng = random.Random(seed)
    for attempt in range(times):
        target = out / str(attempt)
        process = spawn("run", str(config), "--backend", "sim", "--out", str(target),
                        "--no-report")
        wait_for(lambda t=target: list(t.glob("*/*/run.json")), timeout=120)
        time.sleep(rng.uniform(0.0, span))
        process.kill()
        process.communicate(timeout=60)
        (run_dir,) = target.glob("*/*")
        done = kpbench("clean", str(target))
        assert done.returncode == 0, done.stderr
        assert_cells_whole(run_dir, rows)
        run = load_run(run_dir)
        assert run.unfinished is not None or run.status == "COMPLETED"


def test_sigkill_at_random_points_loses_no_completed_cell(tmp_path: Path,
                                                          reference: tuple[Path, dict]) -> None:
    config, rows = reference
    kill_at_random_points(config, rows, tmp_path, times=3, span=2.0, seed=14)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_of_a_300_cell_run_twenty_times(tmp_path: Path) -> None:
    config = write(tmp_path, TINY.format(seeds=150))
    outcome = run_experiment(load(config), SimBackend(), tmp_path / "ref", Console(quiet=True))
    rows = {c["cell_id"]: c["rows"] for c in load_run(outcome.folder.path).cells}
    assert len(rows) == 300
    started = time.monotonic()
    kpbench("run", str(config), "--backend", "sim", "--out", str(tmp_path / "timing"),
            "--no-report")
    span = time.monotonic() - started
    kill_at_random_points(config, rows, tmp_path / "killed", times=20, span=span, seed=300)


def test_report_of_a_killed_run_says_unfinished(tmp_path: Path, small_run: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    manifest = json.loads((small_run / "run.json").read_text())
    dead = {"pid": 4_000_000, "start_ticks": 1, "boot_id": proc.boot_id(), "host": ""}
    manifest |= {"status": "RUNNING", "finished_at": None, "process": dead}
    for cell in manifest["cells"][1:]:
        cell.update(status="PENDING", rows=None)
    (small_run / "run.json").write_text(json.dumps(manifest))
    for record in sorted((small_run / CELLS_DIR).glob("*.json"))[1:]:
        record.unlink()
    out = tmp_path / "report"
    code, _, err = run_main(capsys, "report", str(small_run), "--out", str(out))
    assert code == 0, err
    summary = (out / "summary.md").read_text()
    assert "Not a finished run" in summary and "1 of 4 cells completed" in summary


# --- clean --------------------------------------------------------------------------------------


def lab_folder(owner: proc.Identity) -> Path:
    folder = Path(tempfile.gettempdir()) / f"{WORKDIR_PREFIX}abcdef-adversary{owner.pid}"
    folder.mkdir()
    (folder / "owner").write_text(owner.to_text())
    return folder


def test_clean_without_root_refuses_lab_leftovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Run as a user other than root (here: the effective uid is reported as 1000)."""
    leftover = lab_folder(proc.Identity(4_000_001, 1))
    stale = tmp_path / f".run.json.{4_000_001}-1.tmp"
    stale.write_text("{")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    try:
        code, _, err = run_main(capsys, "clean", str(tmp_path))
        assert code == 2
        one_line(err, "need root")
        assert leftover.exists() and stale.exists()  # refused: nothing removed
    finally:
        shutil.rmtree(leftover, ignore_errors=True)


@needs_root
def test_clean_removes_dead_lab_folders_and_keeps_live_ones(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = lab_folder(proc.Identity(4_000_002, 1))
    live = lab_folder(proc.current())
    try:
        code, _, err = run_main(capsys, "clean", str(tmp_path))
        assert code == 0, err
        assert not dead.exists() and live.exists()
        assert f"removed lab folder {dead}" in err
        assert f"left lab folder {live} (its cell's process {os.getpid()} is alive)" in err
    finally:
        shutil.rmtree(dead, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)


# --- errors in general --------------------------------------------------------------------------


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "--debug", "report", str(tmp_path / "nothing"))
    assert code == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("kpbench: ")


def test_an_unexpected_error_is_one_line_exit_1(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*_: object) -> int:
        raise RuntimeError("something nobody expected\nwith a second line")

    monkeypatch.setattr(cli, "_dispatch", broken)
    code, _, err = run_main(capsys, "schema")
    assert code == 1
    one_line(err, "internal error: RuntimeError: something nobody expected with a second line")


@pytest.mark.parametrize(("addresses", "routes", "found"), [
    ("2: eth0    inet 198.19.3.4/16 brd 198.19.255.255 scope global eth0", "", 1),
    ("", "198.16.0.0/12 via 10.0.0.1 dev eth0", 1),
    ("", "local 198.18.0.1 dev lo table local proto kernel scope host", 1),
    ("", "default via 10.0.0.1 dev eth0\n0.0.0.0/1 via 10.8.0.1 dev tun0\n"
         "128.0.0.0/1 via 10.8.0.1 dev tun0\n10.0.0.0/8 dev eth0", 0),
])
def test_lab_preflight_sees_any_overlap_with_the_benchmark_range(addresses: str, routes: str,
                                                                  found: int) -> None:
    assert len(overlapping(addresses, routes)) == found


@needs_root
def test_lab_preflight_refuses_a_host_that_uses_the_range(tmp_path: Path) -> None:
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2")
    namespace = f"kpbt-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        def ip(*args: str) -> None:
            subprocess.run(["ip", "-n", namespace, *args], check=True)

        ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ip("link", "set", "v0", "up")
        ip("addr", "add", "10.99.0.1/24", "dev", "v0")
        ip("route", "add", "198.16.0.0/12", "via", "10.99.0.2")
        config = write(tmp_path, "name: lab-range\nmodes: [iptables]\nseeds: 1\n")
        done = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "kpbench", "run",
             str(config), "--backend", "lab", "--out", str(tmp_path / "out")],
            capture_output=True, text=True, cwd=REPOSITORY, timeout=120)
        assert done.returncode == 2, done.stderr
        one_line(done.stderr, "198.16.0.0/12 via 10.99.0.2")
        assert not (tmp_path / "out").exists()
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)


def test_readme_lists_every_bound_and_exit_code() -> None:
    readme = (REPOSITORY / "README.md").read_text()
    section = readme[readme.index("### Bounds"):readme.index("## Nox sessions")]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    for bound in BOUNDS:
        assert any(f"`{bound.key}`" in row and f"| {bound.text()} |" in row for row in rows), \
            bound.key
    for _key, text, _why in CROSS_BOUNDS:
        assert any(f"| {text} |" in row for row in rows), text
    codes = readme[readme.index("Exit codes, and what"):readme.index("### Bounds")]
    assert all(f"| {code} |" in codes for code in (0, 1, 2, 130))


def test_a_value_that_cannot_be_stored_fails_only_its_cell(small_run: Path) -> None:
    import pandas as pd

    from kpbench.results import RunFolder

    folder = RunFolder(small_run, json.loads((small_run / "run.json").read_text()))
    cell = folder.manifest["cells"][0]["cell_id"]
    before = sorted(p.name for p in (small_run / CELLS_DIR).iterdir())
    bad = pd.DataFrame({"cell_id": [cell, cell], "t": [1, "one"]})
    with pytest.raises(ValueError, match="Arrow"):
        folder.commit_cell(cell, "COMPLETED", {"samples": bad})
    assert sorted(p.name for p in (small_run / CELLS_DIR).iterdir()) == before
    assert_cells_whole(small_run)
