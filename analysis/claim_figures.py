"""The README's figures, drawn from the findings (`analysis.claims`) with the data behind each.

Every figure is computed first as a table (pure functions: `claims_frame` is the findings
table, `ready_order_load_frame`, `new_pod_share_frame`, `scale_frame`), written as CSV next to
its PNG, and drawn from that table. The CSV is the reproducible part: regenerating it from
results/published/ gives the same bytes. The PNG is drawn as deterministically as matplotlib
allows (Agg, fixed size and dpi, no software metadata).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.claims import MODES, Evaluation, Finding, Judgement, ScaleJudgement
from analysis.figures import (
    FigureInfo,
    _save,
    _style,
    added_pod_share,
    mode_colour,
    scale_out_start,
)
from analysis.metrics import end_window, ready_times, request_rates
from analysis.report import METRIC_INFO
from analysis.runs import RunData
from analysis.scale import aggregate, points_figure_png

CSV_FLOAT = "%.6g"  # six significant digits: the same bytes wherever the run is re-read
SERIES = (  # (column prefix, legend, marker, filled, x offset)
    ("lab", "measured on the lab", "o", True, -0.2),
    ("twin", "modelled, same experiment", "s", False, 0.0),
    ("model", "modelled, article scale", "D", False, 0.2),
)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False, float_format=CSV_FLOAT, lineterminator="\n")


# --- the findings table and its figure ------------------------------------------------------------


def _judgement_columns(prefix: str, judgement: Judgement | None) -> dict[str, Any]:
    if judgement is None:
        return {f"{prefix}_{k}": None for k in ("experiment", "run_id", "point", "seeds",
                                                 "mean", "low", "high", "verdict", "note")}
    return {f"{prefix}_experiment": judgement.experiment, f"{prefix}_run_id": judgement.run_id,
            f"{prefix}_point": judgement.point, f"{prefix}_seeds": judgement.seeds,
            f"{prefix}_mean": judgement.mean, f"{prefix}_low": judgement.low,
            f"{prefix}_high": judgement.high, f"{prefix}_verdict": judgement.verdict or "",
            f"{prefix}_note": judgement.note}


def _kernel_columns(judgement: Judgement | ScaleJudgement | None) -> dict[str, Any]:
    kernels = judgement.kernels if judgement else ()
    return {"lab_kernel": "; ".join(k.text() for k in kernels),
            "lab_kernel_release": "; ".join(k.release for k in kernels),
            "lab_kernel_placement": "; ".join(k.placement for k in kernels),
            "lab_kernel_accel": "; ".join(k.accel for k in kernels),
            "lab_kernel_source": "; ".join(k.source for k in kernels)}


def _scale_columns(judgement: ScaleJudgement | None) -> dict[str, Any]:
    """A scale claim's measurement: its run, its points as text and its verdict (the numbers
    per repeat are in the run's measurements.csv)."""
    if judgement is None:
        return {"scale_run_id": None, "scale_measured": None, "scale_verdict": None,
                "scale_note": None}
    return {"scale_run_id": "; ".join(f"{judgement.experiment}/{path.name}"
                                      for path in judgement.paths),
            "scale_measured": "; ".join(p.text() for p in judgement.points),
            "scale_verdict": judgement.verdict or "", "scale_note": judgement.note}


def claims_frame(findings: Sequence[Finding]) -> pd.DataFrame:
    """One row per (claim, mode): every value, interval, verdict, kernel and reason."""
    rows = []
    for finding in findings:
        rows.append({
            "claim": finding.row.id, "article": finding.row.article,
            "holds_when": finding.row.holds_when, "judged_by": finding.claim_text,
            "metric": finding.metric, "expect": finding.expect, "mode": finding.mode,
            **_judgement_columns("lab", finding.measured),
            **_kernel_columns(finding.scale or finding.measured),
            **_scale_columns(finding.scale),
            **_judgement_columns("twin", finding.twin),
            **_judgement_columns("model", finding.model),
            "lab_vs_model": finding.agreement, "not_measured": finding.not_measured,
            "no_twin": finding.no_twin, "no_model": finding.no_model,
            "also_measured": "; ".join(finding.also_measured),
        })
    return pd.DataFrame(rows)


def _threshold(expect: str) -> float:
    return float(expect.split()[-1])


def claims_figure(frame: pd.DataFrame, out_dir: Path, name: str = "claims") -> FigureInfo | None:
    """Per claim, per mode: the lab's value beside the two models', with 95% intervals."""
    claims = [c for c in dict.fromkeys(frame["claim"])
              if frame.loc[frame["claim"] == c, ["lab_mean", "twin_mean", "model_mean"]]
              .notna().any(axis=None)]
    if not claims:
        return None
    cols = 3
    rows = math.ceil(len(claims) / cols)
    with _style():
        figure = Figure(figsize=(4.4 * cols, 3.0 * rows + 0.6), layout="constrained")
        axes = figure.subplots(rows, cols, squeeze=False).flat
        for ax, claim in zip(axes, claims, strict=False):
            chosen = frame[frame["claim"] == claim].set_index("mode")
            metric, expect = chosen["metric"].dropna().iloc[0], chosen["expect"].dropna().iloc[0]
            for position, mode in enumerate(MODES):
                if mode not in chosen.index:
                    continue
                line = chosen.loc[mode]
                for prefix, _label, marker, filled, offset in SERIES:
                    mean = line[f"{prefix}_mean"]
                    if pd.isna(mean) or not math.isfinite(mean):
                        continue
                    low, high = line[f"{prefix}_low"], line[f"{prefix}_high"]
                    error = [[mean - low], [high - mean]] if pd.notna(low) else None
                    colour = mode_colour(mode)
                    ax.errorbar([position + offset], [mean], yerr=error, color=colour,
                                marker=marker, markersize=6, capsize=3, linewidth=1.3,
                                markerfacecolor=colour if filled else "white")
            ax.axhline(_threshold(expect), color="#777777", linestyle=":", linewidth=1.2)
            ax.set_xticks(range(len(MODES)), MODES, rotation=30)
            ax.set_xlim(-0.6, len(MODES) - 0.4)
            ax.set_title(claim, fontweight="bold")
            ax.set_ylabel(f"{METRIC_INFO[metric][0]} (claim: {expect})")
        for unused in list(axes)[len(claims):]:
            unused.set_axis_off()
        handles = [Line2D([], [], color="#444444", marker=marker, linestyle="none",
                          markerfacecolor="#444444" if filled else "white", label=label)
                   for _prefix, label, marker, filled, _offset in SERIES]
        handles.append(Line2D([], [], color="#777777", linestyle=":", label="the claim's cut"))
        figure.legend(handles=handles, loc="outside lower center", ncol=len(handles),
                      frameon=False)
        path = _save(figure, out_dir, name)
    return FigureInfo(
        name, "Each claim per mode: measured on the lab beside the model",
        "One panel per claim of the article, one column per kube-proxy mode: the value the "
        "lab measured (filled circle; backend lab, real kernel data plane), the simulator on "
        "the same experiment file (open square; modelled) and the simulator at the article's "
        "scale (open diamond; modelled), each the mean over seeds with its 95% t-interval; "
        "the dotted line is the claim's cut. A mode without a filled circle was not measured; "
        "values of modes the claim does not judge (see the table) are drawn too. "
        f"Data: {name}.csv.", path)


# --- rolling update: load per pod by ready order ------------------------------------------------


def ready_order_load(data: RunData, mode: str, point: dict[str, Any]) -> pd.DataFrame:
    """Per cell of `mode` at `point`: each pod serving at the end, its rank in ready order
    (1 = ready first) and its request rate over the last 10% relative to the mean pod's."""
    window = end_window(data.config.duration_seconds)
    readiness = ready_times(data.run.samples, data.run.events)
    parts = []
    for cell in data.cells_at(mode, point):
        cell_id = cell["cell_id"]
        samples = data.run.samples[data.run.samples["cell_id"] == cell_id]
        rates = request_rates(samples, window)
        if rates.empty or rates.mean() == 0:
            continue
        frame = pd.DataFrame({"pod": rates.index.astype(str), "load": rates.to_numpy() /
                              rates.mean()})
        frame["ready"] = [readiness.get((cell_id, pod), math.nan) for pod in rates.index]
        frame = frame.sort_values(["ready", "pod"], kind="stable").reset_index(drop=True)
        frame["ready_rank"] = np.arange(1, len(frame) + 1)
        frame["cell_id"] = cell_id
        parts.append(frame)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _labelled(frame: pd.DataFrame, finding: Finding, data: RunData) -> pd.DataFrame:
    frame.insert(0, "claim", finding.row.id)
    frame.insert(1, "mode", finding.mode)
    frame.insert(2, "backend", data.backend)
    frame.insert(3, "experiment", data.config.name)
    frame.insert(4, "run_id", data.run.run_id)
    return frame


def ready_order_load_frame(evaluation: Evaluation) -> pd.DataFrame:
    """For each row with the ready-order-load figure and each mode measured on the lab: load
    per ready rank (mean, min and max over seeds), lab and its same-experiment model."""
    parts = []
    for finding, data, params in _figure_runs(evaluation, "ready-order-load"):
        pods = ready_order_load(data, finding.mode, params)
        if not pods.empty:
            summary = pods.groupby("ready_rank")["load"].agg(
                seeds="size", load_mean="mean", load_min="min", load_max="max")
            parts.append(_labelled(summary.reset_index(), finding, data))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _figure_runs(evaluation: Evaluation,
                 figure: str) -> Iterator[tuple[Finding, RunData, dict[str, Any]]]:
    """(finding, run, sweep point) for each lab run and its same-experiment model run of the
    rows that draw `figure`."""
    for row in evaluation.catalogue.claims:
        if figure not in row.figures:
            continue
        for finding, lab, twin in evaluation.measured_pairs(row):
            assert finding.measured is not None
            for data in (lab, twin):
                if data is not None:
                    yield finding, data, finding.measured.params


def _mode_panels(modes: Sequence[str], height: float) -> tuple[Figure, dict[str, Any]]:
    figure = Figure(figsize=(max(3.2 * len(modes), 9.0) + 0.6, height), layout="constrained")
    axes = figure.subplots(1, len(modes), squeeze=False, sharey=True)[0]
    return figure, dict(zip(modes, axes, strict=True))


def _backend_handles(extra: Sequence[Line2D] = ()) -> list[Line2D]:
    return [Line2D([], [], color="#444444", marker="o", label="lab (measured)"),
            Line2D([], [], color="#444444", linestyle="--", marker="s", markerfacecolor="white",
                   label="sim, same experiment (modelled)"), *extra]


def ready_order_figure(frame: pd.DataFrame, out_dir: Path,
                       name: str = "rolling-update-pod-load") -> FigureInfo | None:
    if frame.empty:
        return None
    modes = [m for m in MODES if m in set(frame["mode"])]
    with _style():
        figure, axes = _mode_panels(modes, 3.2)
        for mode, ax in axes.items():
            colour = mode_colour(mode)
            for backend, style, marker in (("lab", "-", "o"), ("sim", "--", "s")):
                line = frame[(frame["mode"] == mode) & (frame["backend"] == backend)]
                if line.empty:
                    continue
                ax.plot(line["ready_rank"], line["load_mean"], color=colour, linestyle=style,
                        marker=marker, markerfacecolor=colour if backend == "lab" else "white")
                ax.fill_between(line["ready_rank"], line["load_min"], line["load_max"],
                                color=colour, alpha=0.15 if backend == "lab" else 0.07,
                                linewidth=0)
            ax.axhline(1.0, color="#777777", linestyle=":", linewidth=1.2)
            ax.set_title(mode, color=colour, fontweight="bold")
            ax.set_xlabel("pod, in the order it became ready")
            ax.xaxis.get_major_locator().set_params(integer=True)
        next(iter(axes.values())).set_ylabel("request rate / mean pod's")
        fair = Line2D([], [], color="#777777", linestyle=":", label="fair share")
        figure.legend(handles=_backend_handles([fair]), loc="outside lower center", ncol=3,
                      frameon=False)
        path = _save(figure, out_dir, name)
    experiments = ", ".join(dict.fromkeys(frame["experiment"]))
    return FigureInfo(
        name, "After a rolling update: each pod's load by the order it became ready",
        "Each panel is one kube-proxy mode; the x axis ranks the pods serving at the end by "
        "the time they became ready (1 = first), the y axis is the pod's request rate over "
        "the last 10% of the run divided by the mean pod's (1 = fair share). Solid: measured "
        "on the lab; dashed: the simulator on the same experiment file (modelled); the line "
        "is the mean over seeds and the band the range. A falling line means the pods that "
        f"became ready first kept the reconnected connections. Experiments: {experiments}. "
        f"Data: {name}.csv.", path)


# --- HPA scale-out: share of connections on the added pods ----------------------------------------


def new_pod_share_series(data: RunData, mode: str, point: dict[str, Any]) -> pd.DataFrame:
    """Per sample time (on the run's sample grid) after each cell's first scale-up: the share
    of connections on the added pods and their share of serving pods, mean over the cells."""
    step = data.config.sample_seconds
    parts = []
    for cell in data.cells_at(mode, point):
        cell_id = cell["cell_id"]
        start = scale_out_start(data.run.events, cell_id)
        if start is None:
            continue
        samples = data.run.samples[data.run.samples["cell_id"] == cell_id]
        share = added_pod_share(samples, start)
        share = share[share.index >= start]
        grid = np.round(share.index.to_numpy(dtype=float) / step) * step
        parts.append(share.set_axis(pd.Index(grid, name="t")).groupby(level=0).mean())
    if not parts:
        return pd.DataFrame()
    frame = pd.concat(parts)
    grouped = frame.groupby(level=0)
    return pd.DataFrame({"cells": grouped.size(),
                         "connection_share": grouped["connection_share"].mean(),
                         "pod_share": grouped["pod_share"].mean()}).rename_axis("t")


def new_pod_share_frame(evaluation: Evaluation) -> pd.DataFrame:
    parts = []
    for finding, data, params in _figure_runs(evaluation, "new-pod-share"):
        series = new_pod_share_series(data, finding.mode, params)
        if not series.empty:
            parts.append(_labelled(series.reset_index(), finding, data))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def new_pod_share_figure(frame: pd.DataFrame, out_dir: Path,
                         name: str = "hpa-new-pod-share") -> FigureInfo | None:
    if frame.empty:
        return None
    modes = [m for m in MODES if m in set(frame["mode"])]
    with _style():
        figure, axes = _mode_panels(modes, 3.0)
        for mode, ax in axes.items():
            colour = mode_colour(mode)
            for backend, style in (("lab", "-"), ("sim", "--")):
                line = frame[(frame["mode"] == mode) & (frame["backend"] == backend)]
                if line.empty:
                    continue
                ax.plot(line["t"], line["connection_share"], color=colour, linestyle=style,
                        linewidth=1.6)
                if backend == "lab":
                    ax.plot(line["t"], line["pod_share"], color="#555555", linestyle=":",
                            linewidth=1.2)
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(mode, color=colour, fontweight="bold")
            ax.set_xlabel("time (s)")
        next(iter(axes.values())).set_ylabel("share held by the added pods")
        handles = [Line2D([], [], color="#444444", label="connections, lab (measured)"),
                   Line2D([], [], color="#444444", linestyle="--",
                          label="connections, sim same experiment (modelled)"),
                   Line2D([], [], color="#555555", linestyle=":",
                          label="serving pods, lab (fair share)")]
        figure.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False)
        path = _save(figure, out_dir, name)
    experiments = ", ".join(dict.fromkeys(frame["experiment"]))
    return FigureInfo(
        name, "After an HPA scale-out: do the added pods get connections?",
        "From each cell's first scale-up decision on, the share of all open connections held "
        "by the pods created from then on (solid: measured on the lab; dashed: the simulator "
        "on the same experiment file, modelled; mean over seeds), against the added pods' "
        "share of the serving pods on the lab (dotted): with an even spread the solid line "
        f"would follow the dotted one. Experiments: {experiments}. Data: {name}.csv.", path)


def scale_frame(evaluation: Evaluation) -> pd.DataFrame:
    """The scale claim's points: mean over repeats with the 95% t-interval per placement, mode
    and Services, from each placement's newest published run."""
    measurements = evaluation.scale_measurements()
    return aggregate(measurements) if not measurements.empty else pd.DataFrame()


def scale_figure(frame: pd.DataFrame, out_dir: Path, name: str = "scale") -> FigureInfo | None:
    if frame.empty:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    path.write_bytes(points_figure_png(frame))
    return FigureInfo(
        name, "kube-proxy's modes as Services grow, measured",
        "Full rule sync, the sync after one Service's endpoints change, and a connect through "
        "the node to the Service whose rules come last, against the number of Services (log "
        "axes): the mean over repeats with its 95% t-interval, per mode, on the host's kernel "
        "and in the kernel VM (named on the figure; VM numbers compare modes with each other, "
        f"not with the host). Data: {name}.csv.", path)


def make_figures(evaluation: Evaluation, claims: pd.DataFrame, out_dir: Path
                 ) -> list[FigureInfo]:
    """Render the README's figures, each with the data behind it next to it (the claims
    figure's data is the findings table, `claims.csv`, which the caller writes)."""
    rendered = []
    for name, frame, draw in (
            ("claims", claims, claims_figure),
            ("rolling-update-pod-load", ready_order_load_frame(evaluation), ready_order_figure),
            ("hpa-new-pod-share", new_pod_share_frame(evaluation), new_pod_share_figure),
            ("scale", scale_frame(evaluation), scale_figure)):
        info = draw(frame, out_dir, name)
        if info is None:
            continue
        if name != "claims":
            write_csv(frame, out_dir / f"{name}.csv")
        rendered.append(info)
    return rendered
