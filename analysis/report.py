"""Comparative reports (`report/`): index.html, summary.md, metrics.csv, figures.

`build_report(paths, out)` loads one or more run folders through the results loader, computes
the metrics, judges every claim of every run's config, renders the figures and writes the
report folder through a temporary directory renamed into place, so an existing report is never
overwritten. A `sim` number is always labelled "modelled"; every table names its backend.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from jinja2 import Environment, FileSystemLoader, select_autoescape

from analysis.figures import MODE_COLOURS, FigureInfo, make_all, mode_colour
from analysis.metrics import BALANCED_MAX_MEAN, SUMMARY_METRICS, claim_verdict, summarize
from analysis.runs import RunData, format_value, is_missing, point_label, prepare_runs
from kpbench import __version__
from kpbench.results import DEFAULT_REPORTS_DIR, temp_path

TEMPLATES = Path(__file__).parent / "templates"

METRIC_INFO: dict[str, tuple[str, int, str]] = {
    # metric: (column title, decimals, definition)
    "max_mean": ("max/mean", 2,
                 "busiest serving pod's open connections divided by the mean over serving pods "
                 "(1 = perfectly even), end state"),
    "cv": ("cv", 2, "coefficient of variation of open connections over serving pods "
                    "(0 = even), end state"),
    "jain": ("Jain", 2, "Jain's fairness index (Σx)²/(n·Σx²): 1 = even, 1/n = one pod has "
                        "everything, end state"),
    "gini": ("Gini", 2, "Gini coefficient of open connections over serving pods (0 = even), "
                        "end state"),
    "new_pod_share": ("new-pod share", 2,
                      "at the end, the share of connections on pods created after the first "
                      "event divided by their share of serving pods (1 = fair, 0 = none)"),
    "ready_order_rho": ("ready-order ρ", 2,
                        "Spearman correlation, over serving pods at the end, between the time a "
                        "pod became ready and its open connections (negative = earlier pods "
                        "hold more)"),
    "time_to_balance": ("time to balance (s)", 0,
                        f"seconds from the first event until max/mean stays at or below "
                        f"{BALANCED_MAX_MEAN:g} for the rest of the run (never = it did not)"),
    "request_max_mean": ("request max/mean", 2,
                         "busiest pod's request rate divided by the mean over serving pods, "
                         "over the last 10% of the run"),
    "failed_connections": ("failed conns", 1, "connection attempts that failed, per cell"),
    "reset_connections": ("reset conns", 1, "connections closed by a reset, per cell"),
}
END_STATE_NOTE = "End state = mean over the samples in the last 10% of the run."


class ReportError(ValueError):
    """The report cannot be written (e.g. its folder exists): one line says why."""


@dataclass
class ClaimResult:
    """The verdict of one claim of one run: overall, and one row per (mode, sweep point)."""

    run: RunData
    claim_id: str
    text: str
    metric: str
    expect: str
    verdict: str
    rows: list[dict[str, Any]]


def _stamp() -> str:
    return f"{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def report_target(paths: Sequence[Path], out: Path | None) -> Path:
    """Where the report goes; an existing report is never overwritten."""
    if out is not None:
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ReportError(f"{out} exists; reports are never overwritten (choose another --out)")
        return out
    if len(paths) == 1:
        default = Path(paths[0]) / "report"
        return default if not default.exists() else Path(paths[0]) / f"report-{_stamp()}"
    return DEFAULT_REPORTS_DIR / _stamp()


def distinct_runs(paths: Sequence[Path], notify: Callable[[str], None]) -> list[Path]:
    """The folders to report on, each run once: a folder given twice (by any path) or two
    copies of one run (the same run_id) are read once, with a note."""
    kept: list[Path] = []
    seen: dict[str, Path] = {}
    for path in paths:
        path = Path(path)
        keys = [f"path:{path.resolve()}"]
        manifest = path / "run.json"
        if manifest.is_file():
            with suppress(OSError, ValueError, TypeError, KeyError):  # the loader says why
                keys.append(f"run:{json.loads(manifest.read_bytes())['run_id']}")
        first = next((seen[k] for k in keys if k in seen), None)
        if first is not None:
            notify(f"report: {path} is the same run as {first}; read once")
            continue
        for key in keys:
            seen[key] = path
        kept.append(path)
    return kept


def build_report(paths: Sequence[Path], out: Path | None = None,
                 notify: Callable[[str], None] = lambda text: None) -> Path:
    """Render the report of one or more run folders; returns the report folder."""
    if not paths:
        raise ReportError("report: give at least one results folder")
    paths = distinct_runs(paths, notify)
    runs = prepare_runs(paths)
    target = report_target(paths, out)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_path(target)
    staging.mkdir()
    try:
        write_report(runs, staging)
        if target.exists():  # an empty folder given as --out
            target.rmdir()
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# --- tables ---------------------------------------------------------------------------------------


def _mode_order(mode: str) -> int:
    modes = list(MODE_COLOURS)
    return modes.index(mode) if mode in modes else len(modes)


def summary_table(runs: Sequence[RunData]) -> pd.DataFrame:
    """Per run, mode and sweep point: seeds, mean and 95% t-interval of every metric."""
    parts = []
    for data in runs:
        by = ["mode", *data.sweep_keys]
        summary = summarize(data.metrics, by)
        if summary.empty:
            continue
        summary.insert(0, "run_id", data.run.run_id)
        summary.insert(1, "experiment", data.config.name)
        summary.insert(2, "backend", data.backend)
        summary.insert(3, "measurement", data.measurement)
        summary["order"] = summary["mode"].map(_mode_order)
        summary = summary.sort_values(["order", *data.sweep_keys], kind="stable")
        parts.append(summary.drop(columns="order"))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def claim_results(runs: Sequence[RunData]) -> list[ClaimResult]:
    """Every claim of every run: one verdict per (mode, sweep point) and one overall.

    A claim states that `metric expect` holds in each of its modes (all modes of the run when
    it names none) at each sweep point. Overall: REFUTED if any row is REFUTED, CONFIRMED if
    every row is CONFIRMED, else INCONCLUSIVE.
    """
    results = []
    for data in runs:
        for claim in data.config.claims:
            rows = []
            for mode in claim.modes or data.modes():
                for point in data.points:
                    rows.append(claim_row(data, claim.metric, claim.comparison, mode, point))
            verdicts = {row["verdict"] for row in rows}
            if "REFUTED" in verdicts:
                overall = "REFUTED"
            elif verdicts == {"CONFIRMED"}:
                overall = "CONFIRMED"
            else:
                overall = "INCONCLUSIVE"
            results.append(ClaimResult(data, claim.id, claim.text, claim.metric, claim.expect,
                                       overall, rows))
    return results


def claim_row(data: RunData, metric: str, comparison: tuple[str, float], mode: str,
              point: dict[str, Any]) -> dict[str, Any]:
    """One mode and sweep point of a claim: seeds, mean, 95% interval, verdict and a note."""
    cells = data.cells_at(mode, point)
    values = data.metrics[data.metrics["cell_id"].isin([c["cell_id"] for c in cells])][metric]
    result, mean, low, high, n = claim_verdict(metric, values.tolist(), comparison)
    never = int(values.isna().sum()) if metric == "time_to_balance" else 0
    note = ""
    if mode not in data.modes():
        note = "this mode was not run"
    elif not cells:
        note = "no completed cell"
    elif never == len(cells):
        note = "never balanced in any seed (counted as infinite time)"
    elif never:
        note = f"never balanced in {never} of {len(cells)} seeds"
    elif n < 2:
        note = f"{n} seed{'s' if n != 1 else ''} with a value: no interval, no verdict"
    elif n < len(cells):
        note = f"{len(cells) - n} of {len(cells)} seeds have no value"
    return {
        "run_id": data.run.run_id, "backend": data.backend, "measurement": data.measurement,
        "mode": mode, "point": point_label(point), **point, "seeds": n, "mean": mean,
        "low": low, "high": high, "verdict": result, "note": note,
    }


def verdicts_frame(claims: Sequence[ClaimResult]) -> pd.DataFrame:
    rows = []
    for claim in claims:
        for row in claim.rows:
            rows.append({"claim": claim.claim_id, "metric": claim.metric, "expect": claim.expect,
                         "overall": claim.verdict, **row})
    return pd.DataFrame(rows)


# --- formatting -----------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if is_missing(value):
        return "—"
    return f"{value:.{digits}f}"


def summary_cell(row: pd.Series, metric: str) -> tuple[str, str]:
    """(mean, '[low, high]' or a note) for one metric of one summary row."""
    digits = METRIC_INFO[metric][1]
    seeds, valued = int(row["seeds"]), int(row.get(f"{metric}_n", 0))
    mean = row.get(metric, math.nan)
    if metric == "time_to_balance" and valued == 0:
        return "never", ""
    if is_missing(mean):
        return "—", ""
    low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    detail = "" if is_missing(low) else f"[{fmt(low, digits)}, {fmt(high, digits)}]"
    if valued < seeds:
        missing = seeds - valued
        what = "never balanced" if metric == "time_to_balance" else "no value"
        detail = f"{detail} ({what}: {missing}/{seeds} seeds)".strip()
    elif valued == 1:
        detail = "(1 seed)"
    return fmt(mean, digits), detail


def _table_rows(summary: pd.DataFrame, runs: Sequence[RunData]) -> list[dict[str, Any]]:
    labels = {r.run.run_id: r for r in runs}
    rows = []
    for _, row in summary.iterrows():
        data = labels[row["run_id"]]
        rows.append({
            "run": data.label,
            "mode": row["mode"],
            "colour": mode_colour(str(row["mode"])),
            "point": point_label({k: row[k] for k in data.sweep_keys}),
            "backend": data.backend_label,
            "seeds": int(row["seeds"]),
            "cells": [summary_cell(row, metric) for metric in SUMMARY_METRICS],
        })
    return rows


def _run_facts(data: RunData) -> dict[str, Any]:
    manifest = data.run.manifest
    statuses: dict[str, int] = {}
    for cell in data.run.cells:
        statuses[cell["status"]] = statuses.get(cell["status"], 0) + 1
    dataplanes = []
    for mode in data.modes():
        found = [c["dataplane"] for c in data.run.cells
                 if c["mode"] == mode and isinstance(c.get("dataplane"), dict)]
        if found:
            dataplanes.append((mode, _dataplane_text(found)))
    git = manifest.get("git") or {}
    commit = git.get("commit") or "unknown"
    if git.get("dirty"):
        commit += " (with uncommitted changes)"
    config = manifest.get("config", {})
    return {
        "label": data.label,
        "experiment": data.config.name,
        "description": data.config.description.strip(),
        "backend": data.backend,
        "backend_label": data.backend_label,
        "modelled": data.measurement == "modelled",
        "run_id": data.run.run_id,
        "path": str(data.run.path),
        "status": manifest.get("status"),
        "started_at": manifest.get("started_at"),
        "finished_at": manifest.get("finished_at"),
        "commit": commit,
        "versions": sorted((k, v) for k, v in (manifest.get("versions") or {}).items()
                           if v is not None),
        "host": manifest.get("host") or {},
        "modes": ", ".join(data.modes()),
        "seeds": ", ".join(map(str, data.config.seed_list)),
        "duration": format_value(data.config.duration_seconds),
        "sample": format_value(data.config.sample_seconds),
        "events": ", ".join(f"{text} at {at:g} s" for at, text in data.event_marks) or "none",
        "sweep": "; ".join(f"{k}: {', '.join(map(format_value, v))}"
                           for k, v in data.config.sweep.items()),
        "cells": ", ".join(f"{n} {s.lower()}" for s, n in sorted(statuses.items())),
        "dataplanes": dataplanes,
        "config_yaml": yaml.safe_dump(config, sort_keys=False, default_flow_style=False,
                                      width=100),
        "unfinished": data.run.unfinished,
    }


_DATAPLANE_SKIPPED = frozenset({"note", "verified", "source", "workload", "sample_lateness_ms",
                                 "setup_seconds"})


def _dataplane_text(dataplanes: Sequence[dict[str, Any]]) -> str:
    """One line per mode: how many cells' data planes were verified, how, and an example."""
    first = dataplanes[0]
    verified = sum(1 for d in dataplanes if d.get("verified"))
    text = str(first.get("note") or first.get("source") or "")
    facts = [f"{k}={v}" for k, v in first.items()
             if k not in _DATAPLANE_SKIPPED and isinstance(v, str | int | float | bool)]
    if facts:
        text += f" ({', '.join(facts[:6])})"
    examples = next((v for k, v in first.items() if k.startswith("example_rules") and v), None)
    if examples:
        text += f"; e.g. `{examples[0]}`"
    return f"{verified} of {len(dataplanes)} cells verified; {text}"


def _incomplete(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    return [
        {"run": data.label, "backend": data.backend_label, "cell_id": cell["cell_id"],
         "mode": cell["mode"], "seed": cell["seed"], "point": point_label(cell.get("params", {})),
         "status": cell["status"], "reason": cell.get("error") or "no reason recorded"}
        for data in runs for cell in data.incomplete_cells
    ]


INCIDENT_EVENTS = ("pod_crashed", "pod_restarted", "pod_vanished")


def _incidents(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Pod crashes, restarts and disappearances that no timeline event caused."""
    rows = []
    for data in runs:
        events = data.run.events
        if events.empty or "event" not in events:
            continue
        chosen = events[events["event"].isin(INCIDENT_EVENTS)]
        for row in chosen.itertuples(index=False):
            rows.append({"run": data.label, "cell_id": row.cell_id, "t": f"{row.t:g}",
                         "event": row.event, "pod": row.pod, "detail": row.detail or ""})
    return rows


def _claim_view(claim: ClaimResult) -> dict[str, Any]:
    digits = METRIC_INFO[claim.metric][1]
    rows = []
    for row in claim.rows:
        if row["mean"] == math.inf:
            mean_text, interval = "never", "—"
        else:
            mean_text = fmt(row["mean"], digits)
            interval = "—" if is_missing(row["low"]) else \
                f"[{fmt(row['low'], digits)}, {fmt(row['high'], digits)}]"
        rows.append({**row, "mean_text": mean_text, "interval": interval,
                     "colour": mode_colour(row["mode"]),
                     "backend_label": f"{row['backend']} ({row['measurement']})"})
    return {"id": claim.claim_id, "text": claim.text, "metric": claim.metric,
            "expect": claim.expect, "verdict": claim.verdict, "rows": rows,
            "run": claim.run.label}


# --- writing --------------------------------------------------------------------------------------


def write_report(runs: Sequence[RunData], folder: Path) -> None:
    figures = make_all(runs, folder / "figures")
    summary = summary_table(runs)
    claims = claim_results(runs)
    metrics = pd.concat([r.metrics for r in runs], ignore_index=True)
    metrics.to_csv(folder / "metrics.csv", index=False)
    summary.to_csv(folder / "summary.csv", index=False)
    verdicts_frame(claims).to_csv(folder / "verdicts.csv", index=False)
    context = _context(runs, summary, claims, figures)
    (folder / "summary.md").write_text(render_markdown(context))
    (folder / "index.html").write_text(render_html(context, figures))


def _context(runs: Sequence[RunData], summary: pd.DataFrame, claims: Sequence[ClaimResult],
             figures: Sequence[FigureInfo]) -> dict[str, Any]:
    names = list(dict.fromkeys(r.config.name for r in runs))
    backends = list(dict.fromkeys(r.backend_label for r in runs))
    modelled = [r.backend for r in runs if r.measurement == "modelled"]
    return {
        "title": f"kpbench report: {', '.join(names)}",
        "comparative": len(runs) > 1,
        "generated_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kpbench_version": __version__,
        "backends": backends,
        "modelled": sorted(set(modelled)),
        "runs": [_run_facts(r) for r in runs],
        "metric_titles": [METRIC_INFO[m][0] for m in SUMMARY_METRICS],
        "metric_defs": [(METRIC_INFO[m][0], m, METRIC_INFO[m][2]) for m in SUMMARY_METRICS],
        "end_state_note": END_STATE_NOTE,
        "summary_rows": _table_rows(summary, runs) if not summary.empty else [],
        "claims": [_claim_view(c) for c in claims],
        "incomplete": _incomplete(runs),
        "incidents": _incidents(runs),
        "figures": [{"name": f.name, "title": f.title, "caption": f.caption,
                     "file": f"figures/{f.path.name}"} for f in figures],
    }


def _environment() -> Environment:
    return Environment(loader=FileSystemLoader(TEMPLATES),
                       autoescape=select_autoescape(["html", "j2"]),
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render_html(context: dict[str, Any], figures: Sequence[FigureInfo]) -> str:
    images = {f.name: "data:image/png;base64," + base64.b64encode(f.path.read_bytes()).decode()
              for f in figures}
    return _environment().get_template("report.html.j2").render(**context, images=images)


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(context: dict[str, Any]) -> str:
    lines = [f"# {context['title']}", ""]
    if context["modelled"]:
        lines += [f"> Numbers from backend {', '.join(context['modelled'])} are **modelled** by "
                  "kpbench's simulator, not measured.", ""]
    lines += ["## What was run", ""]
    for run in context["runs"]:
        lines += [
            f"### {run['label']}" if context["comparative"] else f"### {run['experiment']}",
            "",
            *([run["description"], ""] if run["description"] else []),
            f"- backend: **{run['backend_label']}**; run `{run['run_id']}`, status "
            f"{run['status']}, {run['started_at']} – {run['finished_at']}",
            f"- git commit: {run['commit']}",
            f"- versions: {', '.join(f'{k} {v}' for k, v in run['versions'])}",
            f"- modes: {run['modes']}; seeds: {run['seeds']}; duration {run['duration']} s, "
            f"sampled every {run['sample']} s; events: {run['events']}",
            *([f"- sweep: {run['sweep']}"] if run["sweep"] else []),
            f"- cells: {run['cells']}",
            *[f"- data plane ({mode}): {text}" for mode, text in run["dataplanes"]],
            "",
        ]
    lines += ["## Summary per mode", "",
              f"Mean over seeds with the 95% t-interval in brackets. {context['end_state_note']}",
              ""]
    show_point = any(row["point"] for row in context["summary_rows"])
    header = ["mode", *(["sweep point"] if show_point else []), "backend", "seeds",
              *context["metric_titles"]]
    if context["comparative"]:
        header.insert(0, "run")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in context["summary_rows"]:
        values = [row["mode"], *([row["point"]] if show_point else []), row["backend"],
                  str(row["seeds"])]
        values += [f"{mean} {detail}".strip() for mean, detail in row["cells"]]
        if context["comparative"]:
            values.insert(0, row["run"])
        lines.append("| " + " | ".join(_md_escape(v) for v in values) + " |")
    if not context["summary_rows"]:
        lines.append("No completed cell: nothing to summarise.")
    lines += ["", "## Claims", ""]
    if not context["claims"]:
        lines += ["The experiment states no claims.", ""]
    for claim in context["claims"]:
        show_point = any(row["point"] for row in claim["rows"])
        header = ["mode", *(["sweep point"] if show_point else []), "backend", "seeds", "mean",
                  "95% interval", "verdict", "note"]
        lines += [f"### {claim['id']}: **{claim['verdict']}**", "",
                  f"{claim['text']} — expects `{claim['metric']} {claim['expect']}`"
                  + (f" ({claim['run']})" if context["comparative"] else ""), "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in claim["rows"]:
            lines.append("| " + " | ".join(_md_escape(v) for v in (
                row["mode"], *([row["point"]] if show_point else []), row["backend_label"],
                row["seeds"], row["mean_text"], row["interval"], row["verdict"], row["note"]))
                + " |")
        lines.append("")
    unfinished = [run for run in context["runs"] if run["unfinished"]]
    if unfinished:
        lines[2:2] = [*(f"> **Not a finished run.** {run['label']}: {run['unfinished']}."
                        for run in unfinished), ""]
    lines += ["## Cells that did not complete", ""]
    if context["incomplete"]:
        lines += ["| run | cell | status | reason |", "|---|---|---|---|"]
        lines += [f"| {_md_escape(c['run'])} | {c['cell_id']} | {c['status']} | "
                  f"{_md_escape(c['reason'])} |" for c in context["incomplete"]]
    else:
        lines.append("Every cell completed.")
    if context["incidents"]:
        lines += ["", "## Pod incidents", "",
                  "Pods that crashed, restarted or vanished without a timeline event causing it.",
                  "", "| run | cell | t (s) | event | pod | detail |", "|---|---|---|---|---|---|"]
        lines += [f"| {_md_escape(i['run'])} | {i['cell_id']} | {i['t']} | {i['event']} | "
                  f"{i['pod']} | {_md_escape(i['detail'])} |" for i in context["incidents"]]
    lines += ["", "## Figures", ""]
    for figure in context["figures"]:
        lines += [f"### {figure['title']}", "", f"![{figure['title']}]({figure['file']})", "",
                  figure["caption"], ""]
    lines += ["## Metrics", ""]
    lines += [f"- **{title}** (`{name}`): {text}" for title, name, text in context["metric_defs"]]
    lines += ["", f"_Generated {context['generated_at']} by kpbench {context['kpbench_version']}._",
              ""]
    return "\n".join(lines)
