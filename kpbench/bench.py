"""`nox -s bench`: speed and memory figures (printed, never asserted).

Each case runs in a fresh subprocess so that its peak memory is its own:
  quickstart  every cell of experiments/quickstart.yaml (15 cells), sim
  sim-large   experiments/sim-large.yaml, one process per mode, sim
Connection events = connections opened + closed + failed connection attempts.
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

from kpbench.results import REPOSITORY

EXPERIMENTS = REPOSITORY / "experiments"
CASES: list[tuple[str, str, list[str]]] = [
    ("quickstart (15 cells)", "quickstart.yaml", []),
    ("sim-large ipvs-lc", "sim-large.yaml", ["modes=[ipvs-lc]"]),
    ("sim-large iptables", "sim-large.yaml", ["modes=[iptables]"]),
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
        size = sum(p.stat().st_size for p in outcome.folder.path.iterdir() if p.is_file())
    events = opened + closed + failed
    return {
        "status": outcome.status,
        "wall_seconds": wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "connection_events": events,
        "events_per_second": events / wall,
        "results_mib": size / 2**20,
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
    for column in ("case", "wall s", "peak MiB", "connection events", "events/s", "results MiB"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for row in rows:
        table.add_row(row["case"], f"{row['wall_seconds']:.1f}", f"{row['peak_rss_mib']:.0f}",
                      f"{row['connection_events']:,}", f"{row['events_per_second']:,.0f}",
                      f"{row['results_mib']:.1f}")
    console.print(table)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kpbench.bench", description=__doc__)
    parser.add_argument("--one", type=Path, help="measure one config in this process (internal)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--only", choices=["sim", "workload"], default=None)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.overrides)))
        return 0
    console = Console()
    if args.only in (None, "sim"):
        run_sim_cases(console)
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
