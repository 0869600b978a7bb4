"""`nox -s bench`: speed and memory figures (printed, never asserted).

Each simulator case runs in a fresh subprocess so that its peak memory is its own:
  quickstart  every cell of experiments/quickstart.yaml (15 cells), sim
  sim-large   experiments/sim-large.yaml, one process per mode (every mode), sim
Connection events = connections opened + closed + failed connection attempts. Wall time and peak
memory are the run's (`kpbench run --no-report`); "report s" is rendering its report afterwards.
Report of 50 runs: 50 quickstart runs (sim), then one comparative `kpbench report` over all of
them (its figures draw the first runs only, as `analysis.figures.MAX_FIGURE_RUNS` says).
Lab (root only): setup and teardown of a 12-pod cell, the most long-lived connections the lab
holds at 1 request/s with under 1% failed connects, and the lateness of the sample clock.
Workload: connections one Locust worker process holds, server CPU per 1,000 requests.
VM: boot-to-exit time of the kernel VM running `true` (median of 3, with the acceleration it
chose), and the IPVS conformance run's compared decisions per second of guest work (one
scenario per scheduler; its waits for IPVS timeouts are not counted).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kpbench.config import ALL_MODES
from kpbench.results import REPOSITORY

EXPERIMENTS = REPOSITORY / "experiments"
CASES: list[tuple[str, str, list[str]]] = [
    ("quickstart (15 cells)", "quickstart.yaml", []),
    *[(f"sim-large {mode}", "sim-large.yaml", [f"modes=[{mode}]"]) for mode in ALL_MODES],
]


def measure(config: Path, overrides: list[str]) -> dict[str, Any]:
    """Run one experiment on sim in this process; wall time, peak RSS, event rate."""
    from analysis.metrics import failed_counts
    from kpbench.backends.sim import SimBackend
    from kpbench.config import load
    from kpbench.results import load_run
    from kpbench.runner import run_experiment

    experiment = load(config, overrides)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        outcome = run_experiment(experiment, SimBackend(), Path(out), Console(quiet=True))
        wall = time.perf_counter() - started
        run = load_run(outcome.folder.path)
        connections = run.connections
        opened = len(connections)
        closed = int(connections["closed_at"].notna().sum())
        failed = int(failed_counts(run.events).sum())
        size = sum(p.stat().st_size for p in outcome.folder.path.rglob("*") if p.is_file())
        del run
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        from analysis.report import build_report

        report_started = time.perf_counter()
        build_report([outcome.folder.path])
        report_seconds = time.perf_counter() - report_started
    events = opened + closed + failed
    return {
        "status": outcome.status,
        "wall_seconds": wall,
        "peak_rss_mib": peak_rss_mib,
        "connection_events": events,
        "events_per_second": events / wall,
        "results_mib": size / 2**20,
        "report_seconds": report_seconds,
    }


def run_sim_cases(console: Console) -> list[dict[str, Any]]:
    rows = []
    for label, config, overrides in CASES:
        console.print(f"[bold]{label}[/bold] ...")
        done = subprocess.run(
            [sys.executable, "-m", "kpbench.bench", "--one", str(EXPERIMENTS / config),
             *[a for o in overrides for a in ("--set", o)]],
            capture_output=True, text=True, check=True,
        )
        rows.append({"case": label, **json.loads(done.stdout.strip().splitlines()[-1])})
    table = Table(title="simulator (backend sim; modelled connections, real wall time)")
    for column in ("case", "wall s", "peak MiB", "connection events", "events/s", "results MiB",
                   "report s"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for row in rows:
        table.add_row(row["case"], f"{row['wall_seconds']:.1f}", f"{row['peak_rss_mib']:.0f}",
                      f"{row['connection_events']:,}", f"{row['events_per_second']:,.0f}",
                      f"{row['results_mib']:.1f}", f"{row['report_seconds']:.1f}")
    console.print(table)
    return rows


REPORT_RUNS = 50


def run_report_case(console: Console) -> dict[str, Any]:
    """`kpbench report` over REPORT_RUNS quickstart runs, in a fresh process (wall time)."""
    from kpbench.backends.sim import SimBackend
    from kpbench.config import load
    from kpbench.runner import run_experiment

    experiment = load(EXPERIMENTS / "quickstart.yaml")
    with tempfile.TemporaryDirectory() as out:
        console.print(f"[bold]report of {REPORT_RUNS} quickstart runs[/bold] ...")
        runs = [str(run_experiment(experiment, SimBackend(), Path(out) / "runs",
                                   Console(quiet=True)).folder.path)
                for _ in range(REPORT_RUNS)]
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "kpbench", "report", *runs, "--out",
                               str(Path(out) / "report")], capture_output=True, text=True)
        seconds = time.perf_counter() - started
    status = "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-200:]}"
    console.print(f"report of {REPORT_RUNS} quickstart runs (750 cells): {seconds:.1f} s "
                  f"({status})")
    return {"report_50_runs_seconds": seconds, "status": status}


LAB_SETUP_CASE = {"pods": 12, "nodes": 3, "clients": 6}
LAB_CAPACITY_STEPS = (500, 1000, 2000, 3000)
FAILURE_LIMIT = 0.01


def _lab_cell(name: str, connections: int, pods: int, nodes: int, clients: int,
              duration: float, mode: str = "iptables", lab_kernel: str = "host") -> Any:
    from kpbench.config import expand_cells, validate

    experiment = validate({
        "name": name, "modes": [mode], "seeds": 1, "duration_seconds": duration,
        "sample_seconds": 1.0, "cluster": {"nodes": nodes, "lab_kernel": lab_kernel},
        "backend": {"replicas": pods, "cpu_per_request_millicores": 0},
        "workload": {"clients": clients, "connections": connections,
                     "ramp_seconds": max(2.0, connections / 500)},
    })
    return expand_cells(experiment)[0]


def run_lab_cases(console: Console, placement: str = "host") -> dict[str, Any]:
    """Lab setup/teardown per cell, connection capacity, and the jitter of the sample clock;
    with the nodes on the host (iptables) or in the kernel VM (ipvs-rr)."""
    import os

    from kpbench.lab.backend import LabCell

    if os.geteuid() != 0:
        console.print("lab benchmark: skipped (needs root)")
        return {}
    if placement == "vm":
        from kpbench import vm

        if vm.preflight():
            console.print(f"vm lab benchmark: skipped ({vm.preflight()})")
            return {}
    mode = "iptables" if placement == "host" else "ipvs-rr"
    figures: dict[str, Any] = {}
    setup = LabCell(_lab_cell("bench-lab-setup", 12, duration=3, **LAB_SETUP_CASE, mode=mode,
                              lab_kernel=placement), placement)
    setup.run(lambda t: None)
    figures["setup_seconds"] = setup.setup_seconds
    figures["teardown_seconds"] = setup.teardown_seconds
    lateness: list[float] = []
    capacity = 0
    table = Table(title=f"lab (backend lab: real kernel rules, servers and Locust; {mode}, "
                        f"nodes on the {'host' if placement == 'host' else 'kernel VM'})")
    for column in ("connections", "held at end", "failed", "failed %", "lateness median ms",
                   "lateness max ms", "result"):
        table.add_column(column, justify="right")
    for connections in LAB_CAPACITY_STEPS:
        cell = LabCell(_lab_cell("bench-lab-capacity", connections, pods=12, nodes=3,
                                 clients=6, duration=20, mode=mode, lab_kernel=placement),
                       placement)
        try:
            result = cell.run(lambda t: None)
        except Exception as exc:  # a step that breaks is a result too
            table.add_row(f"{connections:,}", "—", "—", "—", "—", "—", f"error: {exc}"[:60])
            break
        samples = result.samples
        held = int(samples[samples["t"] == samples["t"].max()]["active_connections"].sum())
        workload = result.dataplane.get("workload", {}).get("connections") or {}
        failed = int(workload.get("failed", 0))
        opened = max(int(workload.get("opened", 0)), 1)
        share = failed / (opened + failed)
        late = result.dataplane["sample_lateness_ms"]
        lateness.append(late["max"])
        ok = held == connections and share < FAILURE_LIMIT
        if ok:
            capacity = connections
        table.add_row(f"{connections:,}", f"{held:,}", f"{failed:,}", f"{share:.2%}",
                      f"{late['median']:.1f}", f"{late['max']:.1f}", "ok" if ok else "over")
        if not ok:
            break
    console.print(table)
    figures["max_connections_under_1pct_failures"] = capacity
    figures["sample_lateness_max_ms"] = max(lateness, default=float("nan"))
    console.print(
        f"lab ({placement}) setup (topology, 12 pods + 6 clients, servers ready, rules): "
        f"{figures['setup_seconds']:.2f} s; teardown {figures['teardown_seconds']:.2f} s; "
        f"most connections held with < 1% failures: {capacity:,} (of steps "
        f"{', '.join(str(s) for s in LAB_CAPACITY_STEPS)}); sample clock lateness max "
        f"{figures['sample_lateness_max_ms']:.1f} ms"
    )
    return figures


VM_BOOTS = 3


def run_vm_cases(console: Console) -> dict[str, Any]:
    """Boot time of the kernel VM and the conformance suite's decisions per second."""
    import statistics

    from kpbench import vm
    from kpbench.conformance.replay import summarise
    from kpbench.conformance.run import conform, run_in_vm
    from kpbench.conformance.scenarios import make_plan

    problem = vm.preflight()
    if problem:
        console.print(f"vm benchmark: skipped ({problem})")
        return {}
    kernel = vm.default_kernel()
    boots = [vm.run(["true"], kernel=kernel) for _ in range(VM_BOOTS)]
    boot = statistics.median(b.seconds for b in boots)
    plan = make_plan(seed=1, per_scheduler=1)
    with tempfile.TemporaryDirectory(prefix="kpbench-bench-") as folder:
        trace, _ = run_in_vm(plan, Path(folder), Console(quiet=True), timeout=900)
    working = sum(p["end"] - p["start"] for p in trace["phases"].values())
    decisions = sum(row["decisions"] for row in summarise(conform(plan, trace)).values())
    figures = {"boot_seconds": boot, "accel": boots[0].accel, "kernel": kernel.release,
               "decisions_per_second": decisions / working}
    console.print(
        f"kernel VM ({kernel.release}, {boots[0].accel}): boot to exit {boot:.1f} s (median "
        f"of {VM_BOOTS}: {', '.join(f'{b.seconds:.1f}' for b in boots)}); IPVS conformance: "
        f"{decisions} decisions in {working:.1f} s of guest work, "
        f"{figures['decisions_per_second']:.1f} decisions/s")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kpbench.bench", description=__doc__)
    parser.add_argument("--one", type=Path, help="measure one config in this process (internal)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--only", choices=["sim", "report", "lab", "workload", "vm", "vm-lab"],
                        default=None)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.overrides)))
        return 0
    console = Console(width=140)
    if args.only in (None, "sim"):
        run_sim_cases(console)
    if args.only in (None, "report"):
        run_report_case(console)
    if args.only in (None, "lab"):
        run_lab_cases(console)
    if args.only in (None, "vm"):
        run_vm_cases(console)
    if args.only in (None, "vm-lab"):
        run_lab_cases(console, "vm")
    if args.only in (None, "workload"):
        try:
            from kpbench.workload import bench as workload_bench
        except ImportError:
            console.print("workload benchmark: not available in this version")
        else:
            workload_bench.run(console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
