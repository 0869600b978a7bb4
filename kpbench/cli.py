"""`kpbench`: run, report, validate, scale, schema, figures, findings, clean.

Errors reach the user as one line `kpbench: ...` and an exit code (`kpbench.exitcodes`), never
as a traceback (`--debug` shows it). SIGINT and SIGTERM are handled from the first line of
`main`, which is why this module imports only the standard library at the top: everything else
is imported once the handlers are in place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from kpbench import __version__, signals
from kpbench.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK

if TYPE_CHECKING:
    from rich.console import Console

    from kpbench.config import Experiment


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from kpbench.backends import BACKEND_CHOICES
    from kpbench.limits import MAX_CELLS
    from kpbench.results import DEFAULT_RUNS_DIR

    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
    parser = _Parser(prog="kpbench", description=__doc__, parents=[debug])
    parser.add_argument("--version", action="version", version=f"kpbench {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    max_cells = {"type": _positive, "default": MAX_CELLS, "metavar": "N",
                 "help": f"refuse experiments of more cells (default {MAX_CELLS:,})"}

    run = commands.add_parser("run", help="run experiments and write a results folder",
                              parents=[debug])
    run.add_argument("configs", nargs="+", type=Path, metavar="CONFIG")
    run.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a dotted config key; VALUE is parsed as YAML")
    run.add_argument("--seeds", type=_integer, default=None,
                     help="seeds 1..N (overrides the config)")
    run.add_argument("--out", type=Path, default=DEFAULT_RUNS_DIR,
                     help="folder that receives <experiment>/<run_id>/ (default results/runs)")
    run.add_argument("--max-cells", **max_cells)  # type: ignore[arg-type]
    run.add_argument("--no-report", action="store_true", help="do not render the report")
    run.add_argument("--keep-cluster", action="store_true",
                     help="kind: keep the clusters after the run")
    run.add_argument("--kubeconfig", type=Path, default=None, help="cluster: the kubeconfig")
    run.add_argument("--dry-run", action="store_true",
                     help="kind: write the kind configs, manifests and commands the run would "
                          "apply into a folder under --out, and create nothing")

    report = commands.add_parser("report", help="render a report from results folders",
                                 parents=[debug])
    report.add_argument("results", nargs="+", type=Path, metavar="RESULTS_DIR")
    report.add_argument("--out", type=Path, default=None)

    validate = commands.add_parser("validate", help="check experiment files; exit 2 on errors",
                                   parents=[debug])
    validate.add_argument("configs", nargs="+", type=Path, metavar="CONFIG")
    validate.add_argument("--max-cells", **max_cells)  # type: ignore[arg-type]

    scale = commands.add_parser("scale", parents=[debug],
                                help="rule sync time and connect latency per mode as Services "
                                     "grow (a `kind: scale` config; root)")
    scale.add_argument("config", type=Path, metavar="CONFIG")
    scale.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a dotted config key (YAML value)")
    scale.add_argument("--only", choices=["host", "vm"], default=None,
                       help="run one placement of the config")
    scale.add_argument("--out", type=Path, default=DEFAULT_RUNS_DIR,
                       help="folder that receives <name>/<run_id>/ (default results/runs)")

    commands.add_parser("schema", help="print the JSON Schema of the experiment config",
                        parents=[debug])
    commands.add_parser("figures", help="regenerate the published figures", parents=[debug])
    findings = commands.add_parser(
        "findings", parents=[debug],
        help="judge the article's claims on the published runs, lab first: write "
             "results/published/claims/ and the README's claims table")
    findings.add_argument("--published", type=Path, default=Path("results") / "published",
                          help="the published runs (default results/published)")
    findings.add_argument("--readme", type=Path, default=Path("README.md"),
                          help="the README whose claims table is rewritten (default README.md)")
    findings.add_argument("--experiments", type=Path, default=Path("experiments"),
                          help="the experiment files (default experiments)")
    findings.add_argument("--catalogue", type=Path, default=None,
                          help="the claims catalogue (default analysis/claims.yaml)")
    clean = commands.add_parser("clean", parents=[debug],
                                help="remove what killed runs left: lab namespaces and folders, "
                                     "results' temporary files, kind clusters")
    clean.add_argument("results", nargs="*", type=Path, metavar="RESULTS_DIR",
                       help="folders to clear of temporary files (default results/runs and "
                            "results/reports)")
    return parser


def check_writable_dir(path: Path, option: str) -> None:
    """`path` is a directory kpbench can write in, or can be created as one (nothing is
    created here): checked before any work."""
    existing = path
    while not existing.exists() and not existing.is_symlink():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is not one)"
        raise UsageError(f"{option} {path}: not a directory{where}")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise UsageError(f"{option} {path}: {existing} is on a read-only filesystem")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {existing} is not writable")


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def print_summary(run_path: Path, console: Console) -> None:
    """Per mode: end-state max_mean, jain, new_pod_share, time_to_balance (mean over seeds)."""
    from rich.table import Table

    from analysis.metrics import cell_metrics, summarize
    from kpbench.config import Experiment
    from kpbench.results import load_run

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
    from kpbench.backends import PreflightError
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
    from kpbench.backends import resolve
    from kpbench.config import expand_cells, load
    from kpbench.results import ResultsWriteError
    from kpbench.runner import run_experiment

    check_writable_dir(args.out, "--out")
    experiments = [load(path, args.overrides, args.seeds, args.max_cells)
                   for path in args.configs]
    if args.dry_run:
        return cmd_dry_run(args, experiments, out)
    cells = [expand_cells(experiment) for experiment in experiments]
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
    failed: list[str] = []
    interrupted_by = ""
    try:
        for experiment, expanded in zip(experiments, cells, strict=True):
            err.print(f"[bold]{experiment.name}[/bold]: {len(expanded)} cells on backend "
                      f"{backend.name}")
            outcome = run_experiment(experiment, backend, args.out, err)
            paths.append(outcome.folder.path)
            if outcome.write_error is not None:
                raise ResultsWriteError(outcome.write_error)
            failed += [c["cell_id"] for c in outcome.folder.manifest["cells"]
                       if c["status"] == "FAILED"]
            if outcome.status in ("COMPLETED", "FAILED"):
                print_summary(outcome.folder.path, out)
            out.print(f"status {outcome.status}; results in {outcome.folder.path}")
            if not args.no_report and outcome.status in ("COMPLETED", "FAILED") \
                    and not outcome.late:
                render_run_report(outcome.folder.path, out, err)
            if outcome.exit_code != EXIT_OK:
                code = outcome.exit_code
            if outcome.exit_code == EXIT_INTERRUPTED:
                interrupted_by = outcome.interrupted_by
                break
    finally:  # the results folder is the last line of standard output, whatever happens
        if paths:
            print(paths[-1], flush=True)
    if interrupted_by:
        _say(f"interrupted ({interrupted_by}); completed cells are kept in {paths[-1]}")
    elif failed:
        _say(f"{len(failed)} cell{'s' if len(failed) != 1 else ''} failed ({failed[0]}"
             f"{', ...' if len(failed) > 1 else ''}); the others are kept in {paths[-1]}")
    return code


def cmd_scale(args: argparse.Namespace, out: Console, err: Console) -> int:
    """`kpbench scale CONFIG`: measure, print the summary table; the folder is the last line."""
    from kpbench import scale

    check_writable_dir(args.out, "--out")
    config = scale.load(args.config, args.overrides, args.only)
    scale.preflight(config)
    outcome = scale.run_scale(config, args.out, lambda text: err.print(text, highlight=False))
    summary = outcome.folder.path / "summary.md"
    if summary.exists():
        out.print(summary.read_text(), markup=False, highlight=False)
    print(outcome.folder.path, flush=True)
    if outcome.status == "INTERRUPTED":
        _say(f"{outcome.error}; the points measured are kept in {outcome.folder.path}")
        return EXIT_INTERRUPTED
    if outcome.status == "FAILED":
        _say(f"failed: {outcome.error}; the points measured are kept in {outcome.folder.path}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_validate(args: argparse.Namespace, out: Console) -> int:
    from kpbench import scale
    from kpbench.config import ConfigError, expand_cells, load, read_yaml

    problems: list[str] = []
    for path in args.configs:
        try:
            if scale.is_scale_config(read_yaml(path)):
                config = scale.load(path)
                out.print(f"{path}: ok (scale: {len(config.points('host'))} host points, "
                          f"{len(config.points('vm'))} vm points)")
                continue
            experiment = load(path, max_cells=args.max_cells)
            count = len(expand_cells(experiment))
        except ConfigError as exc:
            problems += [p if p.startswith(str(path)) else f"{path}: {p}" for p in exc.problems]
            continue
        out.print(f"{path}: ok ({count} cells)")
    if problems:
        raise ConfigError(problems)
    return EXIT_OK


def render_run_report(run_path: Path, out: Console, err: Console) -> None:
    """At the end of `kpbench run`: render the run's report; a failure is reported, not fatal."""
    from analysis.report import ReportError, build_report
    from kpbench.results import ResultsError

    try:
        report = build_report([run_path])
    except (ReportError, ResultsError, OSError) as exc:
        err.print(f"[red]report not rendered:[/red] {exc}")
        return
    out.print(f"report: {report / 'index.html'}")


def cmd_report(args: argparse.Namespace, err: Console) -> int:
    """`kpbench report RESULTS_DIR... [--out DIR]`: one (comparative) report; prints index.html."""
    from analysis.report import build_report

    if args.out is not None:
        check_writable_dir(args.out, "--out")
    report = build_report(args.results, args.out, notify=lambda text: err.print(text))
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


def cmd_findings(args: argparse.Namespace, out: Console) -> int:
    """`kpbench findings`: the claims report and the README's claims table."""
    from analysis.claims import CATALOGUE
    from analysis.findings import write_findings

    written = write_findings(args.published, args.readme, args.experiments,
                             args.catalogue or CATALOGUE)
    findings = written.evaluation.findings
    measured = sum(1 for f in findings if f.measured is not None or f.scale is not None)
    split = [f"{f.row.id}/{f.mode}" for f in findings if f.agreement in ("DISAGREE", "differ")]
    out.print(f"findings: {len(written.evaluation.catalogue.claims)} claims x 5 modes, "
              f"{measured} measured on the lab; lab and model verdicts differ in "
              f"{len(split)}{': ' + ', '.join(split) if split else ''}")
    out.print(f"findings: README claims table rewritten in {written.readme}")
    print(written.folder / "README.md", flush=True)
    return EXIT_OK


def cmd_clean(args: argparse.Namespace, err: Console) -> int:
    """Remove what killed runs left; list what was removed and what was left, and why."""
    from kpbench.clean import clean
    from kpbench.results import DEFAULT_REPORTS_DIR, DEFAULT_RUNS_DIR

    found = clean(args.results or [DEFAULT_RUNS_DIR, DEFAULT_REPORTS_DIR])
    for item, why in found.removed:
        err.print(f"clean: removed {item} ({why})", markup=False, highlight=False)
    for item, why in found.left:
        err.print(f"clean: left {item} ({why})", markup=False, highlight=False)
    err.print(f"clean: removed {len(found.removed)}, left {len(found.left)}")
    return EXIT_OK


def _dispatch(args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.command == "run":
        return cmd_run(args, out, err)
    if args.command == "validate":
        return cmd_validate(args, out)
    if args.command == "scale":
        return cmd_scale(args, out, err)
    if args.command == "schema":
        from kpbench.config import json_schema

        print(json.dumps(json_schema(), indent=2))
        return EXIT_OK
    if args.command == "report":
        return cmd_report(args, err)
    if args.command == "figures":
        return cmd_figures(out)
    if args.command == "findings":
        return cmd_findings(args, out)
    if args.command == "clean":
        return cmd_clean(args, err)
    raise UsageError(f"unknown command {args.command}")


def _one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _classify(exc: BaseException) -> tuple[int, list[str]]:
    """An exception -> (exit code, the lines to print after `kpbench: `)."""
    from kpbench.backends import PreflightError
    from kpbench.clean import CleanRefused
    from kpbench.config import ConfigError
    from kpbench.results import ResultsError, ResultsWriteError

    try:
        from analysis.claims import FindingsError
        from analysis.report import ReportError
    except ImportError:  # pragma: no cover - analysis is part of the package
        ReportError = FindingsError = UsageError  # type: ignore[misc,assignment]
    if isinstance(exc, ConfigError):
        return EXIT_INVALID, [_one_line(p) for p in exc.problems]
    if isinstance(exc, UsageError | PreflightError | ResultsError | ReportError | FindingsError
                  | CleanRefused):
        return EXIT_INVALID, [_one_line(exc)]
    if isinstance(exc, ResultsWriteError):
        return EXIT_FAILED, [_one_line(exc)]
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return EXIT_FAILED, [f"{exc.strerror or _one_line(exc)}{where}"]
    return EXIT_FAILED, [f"internal error: {exc.__class__.__name__}: {_one_line(exc)} "
                         "(--debug shows the traceback)"]


def entry() -> int:
    """The `kpbench` command: `main`, after which a late signal can no longer change the exit
    code (Python's own handlers would kill the process while it exits)."""
    return main(final=True)


def main(argv: Sequence[str] | None = None, final: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[: argv.index("--")] if "--" in argv else "--debug" in argv
    with signals.handled(final=final):
        try:
            from rich.console import Console

            out = Console(soft_wrap=True)
            err = Console(stderr=True, soft_wrap=True)
            args = build_parser().parse_args(argv)
            return _dispatch(args, out, err)
        except KeyboardInterrupt as exc:
            if debug:
                traceback.print_exc()
            name = exc.args[0] if isinstance(exc, signals.Interrupted) else "SIGINT"
            _say(f"interrupted ({name})")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            _silence_stdout()
            _say("standard output was closed")
            return EXIT_FAILED
        except Exception as exc:
            if debug:
                traceback.print_exc()
            try:
                code, lines = _classify(exc)
            except KeyboardInterrupt:
                _say("interrupted")
                return EXIT_INTERRUPTED
            for line in lines:
                _say(line)
            return code


def _say(line: str) -> None:
    with suppress(OSError):
        print(f"kpbench: {line}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so that Python's exit flush is quiet."""
    with suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(entry())
