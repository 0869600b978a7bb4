"""`nox -s kernel-conformance`: the IPVS model against a real kernel's IPVS, in the kernel VM.

Writes `results/conformance/<run_id>/` (plan.json, trace.json, summary.json: never
overwritten), prints a table per scheduler and exits 0 only when no decision and no counter
disagrees (2 when the VM cannot run here, with the package to install).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kpbench import vm
from kpbench.conformance.replay import ScenarioResult, replay, summarise
from kpbench.conformance.scenarios import POST_AFTER_CLOSE, make_plan
from kpbench.results import atomic_write_json, new_run_id

DEFAULT_OUT = Path("results") / "conformance"


def conform(plan: dict[str, Any], trace: dict[str, Any]) -> list[ScenarioResult]:
    by_id = {s["id"]: s for s in trace["scenarios"]}
    return [replay(spec, by_id[spec["id"]]) for spec in plan["scenarios"]]


def run_in_vm(plan: dict[str, Any], folder: Path, console: Console,
              timeout: float) -> tuple[dict[str, Any], vm.VmResult]:
    """Carry out `plan` in the kernel VM; the trace lands in `folder`."""
    plan_path, trace_path = folder / "plan.json", folder / "trace.json"
    atomic_write_json(plan_path, plan)
    result = vm.run([sys.executable, "-m", "kpbench.conformance.guest", str(plan_path),
                     str(trace_path)], share=folder, timeout=timeout, cpus=1,
                    cwd=Path(__file__).resolve().parents[2],
                    on_output=lambda line: console.print(f"  guest: {line}", markup=False,
                                                         highlight=False))
    if result.exit_status != 0 or not trace_path.exists():
        raise vm.VmError(f"the guest's conformance run failed (exit {result.exit_status}); "
                         f"its output is above")
    return json.loads(trace_path.read_text()), result


def print_table(summary: dict[str, dict[str, int]], console: Console) -> None:
    table = Table(title="IPVS model against the kernel, per scheduler")
    columns = ("scenarios", "decisions", "refused", "decision_mismatches", "counter_checks",
               "counter_mismatches", "skipped_steps", "dropped")
    table.add_column("scheduler")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    for scheduler, row in summary.items():
        table.add_row(scheduler, *(str(row[c]) for c in columns))
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernel-conformance", description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--per-scheduler", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    console = Console(stderr=True, width=120)  # the table stays readable in CI logs
    problem = vm.preflight()
    if problem:
        console.print(f"kernel-conformance: {problem}", markup=False)
        return 2
    if args.per_scheduler < 1:
        console.print("kernel-conformance: --per-scheduler must be at least 1", markup=False)
        return 2
    plan = make_plan(seed=args.seed, per_scheduler=args.per_scheduler)
    folder = args.out / new_run_id()
    folder.mkdir(parents=True)
    kernel = vm.default_kernel()
    console.print(f"booting {kernel.release} in QEMU; {len(plan['scenarios'])} scenarios, "
                  f"about {POST_AFTER_CLOSE:.0f} s of it waiting for IPVS timeouts")
    started = time.monotonic()
    try:
        trace, booted = run_in_vm(plan, folder, console, args.timeout)
    except vm.VmError as error:
        console.print(f"kernel-conformance: {error}", markup=False)
        return 1
    results = conform(plan, trace)
    summary = summarise(results)
    mismatches = sum(r.decision_mismatches + r.counter_mismatches for r in results)
    decisions = sum(r.decisions for r in results)
    report = {
        "kernel": trace["kernel"], "accel": booted.accel, "seconds": round(booted.seconds, 1),
        "decisions": decisions, "mismatches": mismatches,
        "decisions_per_second": round(decisions / sum(
            p["end"] - p["start"] for p in trace["phases"].values()), 1),
        "per_scheduler": summary, "scenarios": [asdict(r) for r in results],
    }
    atomic_write_json(folder / "summary.json", report)
    print_table(summary, console)
    for r in results:
        for example in r.examples:
            console.print(f"  {r.scenario}: {example}", markup=False)
    console.print(f"kernel {trace['kernel']} ({booted.accel}), {decisions} decisions, "
                  f"{mismatches} mismatches, {time.monotonic() - started:.0f} s; {folder}",
                  markup=False)
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
