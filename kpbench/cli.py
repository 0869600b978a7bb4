"""`kpbench`: run, report, validate, schema, figures, clean (design §4)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kpbench import __version__
from kpbench.backends import BACKEND_CHOICES, PreflightError, resolve
from kpbench.config import ConfigError, Experiment, expand_cells, json_schema, load
from kpbench.results import DEFAULT_RUNS_DIR, ResultsError, load_run
from kpbench.runner import EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, run_experiment


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kpbench", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kpbench {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="run experiments and write a results folder")
    run.add_argument("configs", nargs="+", type=Path, metavar="CONFIG")
    run.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a dotted config key; VALUE is parsed as YAML")
    run.add_argument("--seeds", type=int, default=None, help="seeds 1..N (overrides the config)")
    run.add_argument("--out", type=Path, default=DEFAULT_RUNS_DIR,
                     help="folder that receives <experiment>/<run_id>/ (default results/runs)")
    run.add_argument("--no-report", action="store_true", help="do not render the report")
    run.add_argument("--keep-cluster", action="store_true",
                     help="kind: keep the clusters after the run")
    run.add_argument("--kubeconfig", type=Path, default=None, help="cluster: the kubeconfig")
    run.add_argument("--dry-run", action="store_true",
                     help="kind: write the kind configs, manifests and commands the run would "
                          "apply into a folder under --out, and create nothing")

    report = commands.add_parser("report", help="render a report from results folders")
    report.add_argument("results", nargs="+", type=Path, metavar="RESULTS_DIR")
    report.add_argument("--out", type=Path, default=None)

    validate = commands.add_parser("validate", help="check experiment files; exit 2 on errors")
    validate.add_argument("configs", nargs="+", type=Path, metavar="CONFIG")

    commands.add_parser("schema", help="print the JSON Schema of the experiment config")
    commands.add_parser("figures", help="regenerate the published figures")
    commands.add_parser("clean", help="remove clusters and lab namespaces this suite created")
    return parser


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def print_summary(run_path: Path, console: Console) -> None:
    """Per mode: end-state max_mean, jain, new_pod_share, time_to_balance (mean over seeds)."""
    from analysis.metrics import cell_metrics, summarize

    run = load_run(run_path)
    config = Experiment.model_validate(run.manifest["config"])
    metrics = cell_metrics(run.samples, run.events, run.connections, run.cells,
                           config.duration_seconds, config.first_event_at)
    by = ["mode", *run.sweep_keys]
    table = Table(title=f"{config.name}: end state per mode, mean over seeds "
                        f"(backend {run.backend}{', modelled' if run.backend == 'sim' else ''})")
    for column in [*by, "seeds", "max_mean", "jain", "new_pod_share", "time_to_balance s"]:
        table.add_column(column, justify="left" if column in by else "right")
    summary = summarize(metrics, by)
    for _, row in summary.iterrows():
        table.add_row(
            *[str(row[k]) for k in by], str(row["seeds"]), _fmt(row["max_mean"]),
            _fmt(row["jain"]), _fmt(row["new_pod_share"]), _fmt(row["time_to_balance"], 0),
        )
    console.print(table)
    skipped = [c for c in run.cells if c["status"] != "COMPLETED"]
    for cell in skipped:
        console.print(f"  {cell['cell_id']}: {cell['status']} — {cell.get('error') or ''}")


def cmd_dry_run(args: argparse.Namespace, experiments: list[Experiment], out: Console) -> int:
    """`kpbench run --backend kind --dry-run`: write what the run would apply, run nothing."""
    from kpbench.kube.backend import dry_run_problems
    from kpbench.kube.dryrun import write_dry_run
    from kpbench.kube.preflight import problems_line

    if args.backend != "kind":
        raise UsageError(f"--dry-run: only with --backend kind (got --backend {args.backend})")
    for experiment in experiments:
        problems = dry_run_problems(experiment)
        if problems:
            raise PreflightError(problems_line("kind", problems))
    folders = [write_dry_run(e, args.out, args.keep_cluster) for e in experiments]
    for folder in folders:
        out.print(f"dry run: nothing created; what the run would apply is in {folder}")
    print(folders[-1], flush=True)
    return EXIT_OK


def cmd_run(args: argparse.Namespace, out: Console, err: Console) -> int:
    experiments = [load(path, args.overrides, args.seeds) for path in args.configs]
    if args.dry_run:
        return cmd_dry_run(args, experiments, out)
    backend, note = resolve(args.backend, keep_cluster=args.keep_cluster,
                            kubeconfig=args.kubeconfig)
    for experiment in experiments:
        backend.preflight(experiment)
    if note:
        err.print(f"[cyan]{note}[/cyan]")
    for warning in getattr(backend, "warnings", []):
        err.print(f"[yellow]warning: {warning}[/yellow]")
    code = EXIT_OK
    paths: list[Path] = []
    for experiment in experiments:
        cells = expand_cells(experiment)
        err.print(f"[bold]{experiment.name}[/bold]: {len(cells)} cells on backend "
                  f"{backend.name}")
        outcome = run_experiment(experiment, backend, args.out, err)
        paths.append(outcome.folder.path)
        if outcome.status in ("COMPLETED", "FAILED"):
            print_summary(outcome.folder.path, out)
        out.print(f"status {outcome.status}; results in {outcome.folder.path}")
        if not args.no_report and outcome.status in ("COMPLETED", "FAILED"):
            render_run_report(outcome.folder.path, out, err)
        if outcome.exit_code != EXIT_OK:
            code = outcome.exit_code
        if outcome.exit_code == EXIT_INTERRUPTED:
            break
    print(paths[-1], flush=True)
    return code


def cmd_validate(args: argparse.Namespace, out: Console) -> int:
    problems: list[str] = []
    for path in args.configs:
        try:
            experiment = load(path)
        except ConfigError as exc:
            problems += [f"{path}: {p}" for p in exc.problems]
            continue
        out.print(f"{path}: ok ({len(expand_cells(experiment))} cells)")
    if problems:
        raise ConfigError(problems)
    return EXIT_OK


def render_run_report(run_path: Path, out: Console, err: Console) -> None:
    """At the end of `kpbench run`: render the run's report; a failure is reported, not fatal."""
    from analysis.report import ReportError, build_report

    try:
        report = build_report([run_path])
    except (ReportError, ResultsError) as exc:
        err.print(f"[red]report not rendered:[/red] {exc}")
        return
    out.print(f"report: {report / 'index.html'}")


def cmd_report(args: argparse.Namespace) -> int:
    """`kpbench report RESULTS_DIR... [--out DIR]`: one (comparative) report; prints index.html."""
    from analysis.report import ReportError, build_report

    try:
        report = build_report(args.results, args.out)
    except ReportError as exc:
        raise UsageError(str(exc)) from None
    print(report / "index.html", flush=True)
    return EXIT_OK


def cmd_figures(out: Console) -> int:
    """`kpbench figures`: regenerate results/published/figures/ from the committed runs."""
    from analysis.published import PublishedError, regenerate

    try:
        index, published = regenerate()
    except PublishedError as exc:
        raise UsageError(f"figures: {exc}") from None
    for item in published:
        out.print(f"{item.run.config.name} ({item.run.backend_label}): "
                  f"{len(item.figures)} figures in {index.parent / item.folder}")
    print(index, flush=True)
    return EXIT_OK


def cmd_clean(err: Console) -> int:
    """Remove every lab namespace (with its links, rules and processes) this suite left, and
    every kind cluster named `kpbench-*` when kind and a container engine are usable."""
    from kpbench.backends import docker_and_kind
    from kpbench.lab.netns import clean_all

    try:
        removed = clean_all()
    except FileNotFoundError:
        removed = []  # no iproute2: there cannot be lab namespaces
    err.print(f"clean: removed {len(removed)} lab namespaces" + (
        f" ({', '.join(removed)})" if removed else ""))
    from kpbench.vm import kill_leftovers

    vms = kill_leftovers()
    err.print(f"clean: stopped {len(vms)} kernel VMs whose kpbench process was gone" + (
        f" (pids {', '.join(map(str, vms))})" if vms else ""))
    if docker_and_kind() is None:
        from kpbench.kube.cluster import ClusterError, KindCli
        from kpbench.kube.preflight import Host, container_engine

        engine = container_engine(Host())
        cli = KindCli(engine[0] if engine else "docker")
        try:
            clusters = cli.kpbench_clusters()
            for name in clusters:
                cli.delete(name)
        except ClusterError as exc:
            err.print(f"[red]clean: kind clusters not removed:[/red] {exc}")
            return EXIT_OK
        err.print(f"clean: removed {len(clusters)} kind clusters" + (
            f" ({', '.join(clusters)})" if clusters else ""))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    out = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return cmd_run(args, out, err)
        if args.command == "validate":
            return cmd_validate(args, out)
        if args.command == "schema":
            print(json.dumps(json_schema(), indent=2))
            return EXIT_OK
        if args.command == "report":
            return cmd_report(args)
        if args.command == "figures":
            return cmd_figures(out)
        if args.command == "clean":
            return cmd_clean(err)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"kpbench: {line}", file=sys.stderr)
        return EXIT_INVALID
    except (UsageError, PreflightError, ResultsError) as exc:
        print(f"kpbench: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("kpbench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
