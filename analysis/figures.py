"""The report's figures: one function per figure, `make_all()` renders every one that applies.

Figures are drawn on bare `matplotlib.figure.Figure` objects rendered by the Agg backend (no
pyplot state, no display), styled by seaborn. Every mode has one colour in every figure
(`MODE_COLOURS`). Each figure function returns a `FigureInfo` whose caption says what the
figure shows and what produced it, or None when the figure does not apply to the runs.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("agg")

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from analysis.metrics import BALANCED_MAX_MEAN, interval, serving
from analysis.runs import RunData, format_value, point_label

# One fixed colour per kube-proxy mode (Okabe-Ito, colour-blind safe), used by every figure.
MODE_COLOURS: dict[str, str] = {
    "iptables": "#0072B2",
    "nftables": "#56B4E9",
    "ipvs-rr": "#D55E00",
    "ipvs-lc": "#009E73",
    "ipvs-wlc": "#E69F00",
    "ipvs-sh": "#CC79A7",
    "ipvs-mh": "#444444",
}
RANDOM_MODES = ("iptables", "nftables")  # pick uniformly at random among serving endpoints
MAX_POD_ROWS = 150  # per-pod heatmaps with more pods average consecutive pods into rows
MAX_STRIP_POINTS = 1500  # per mode and panel in the end-state distribution
# Facets: a figure draws at most this many runs, sweep points per run and sweep rows; more are
# unreadable and make the layout's cost explode. The tables keep everything; captions say what
# was left out.
MAX_FIGURE_RUNS = 6
MAX_RUN_PANELS = 12
MAX_SWEEP_ROWS = 8
DPI = 110
EVENT_STYLE: dict[str, Any] = {"color": "#222222", "linestyle": "--", "linewidth": 1.0}


@dataclass
class FigureInfo:
    """A rendered figure: file name stem, title, and the paragraph saying what it shows."""

    name: str
    title: str
    caption: str
    path: Path


def mode_colour(mode: str) -> str:
    return MODE_COLOURS.get(mode, "#888888")


def ordered_modes(runs: Sequence[RunData]) -> list[str]:
    """Every mode present in the runs, in the palette's order."""
    present = {m for r in runs for m in r.modes()}
    return [m for m in MODE_COLOURS if m in present] + sorted(present - set(MODE_COLOURS))


@contextmanager
def _style() -> Iterator[None]:
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        yield


def _run_panels(runs: Sequence[RunData], counts: Sequence[int], max_cols: int, width: float,
                height: float, **kwargs: Any) -> tuple[Figure, list[Any], list[list[Axes]]]:
    """One block of panels per run (`counts[i]` panels, wrapped at `max_cols`), each block
    titled by its run when there are several runs. Unused grid slots are hidden."""
    cols = max(1, min(max(counts), max_cols))
    grid_rows = [max(1, math.ceil(n / cols)) for n in counts]
    title = 0.35 if len(runs) > 1 else 0.0
    figure = Figure(figsize=(width * cols + 1.0, sum((height + title) * r for r in grid_rows)
                             + 0.6), layout="constrained")
    blocks = (list(figure.subfigures(len(runs), 1, squeeze=False,
                                     height_ratios=grid_rows)[:, 0])
              if len(runs) > 1 else [figure])
    axes: list[list[Axes]] = []
    for block, data, count, rows in zip(blocks, runs, counts, grid_rows, strict=True):
        grid = block.subplots(rows, cols, squeeze=False, **kwargs)
        flat = list(grid.flat)
        for unused in flat[count:]:
            unused.set_axis_off()
        axes.append(flat[:count])
        if len(runs) > 1:
            block.suptitle(data.label, fontweight="bold", fontsize=10)
    return figure, blocks, axes


def png_bytes(figure: Figure) -> bytes:
    """The figure as a 256-colour palette PNG: a third of the size of full colour for these
    flat plots (the reports embed every figure), and the same bytes for the same figure."""
    rendered = io.BytesIO()
    figure.savefig(rendered, format="png", dpi=DPI, metadata={"Software": None})
    with Image.open(rendered) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    compact = io.BytesIO()
    palette.save(compact, format="png", optimize=True)
    return compact.getvalue()


def _save(figure: Figure, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    path.write_bytes(png_bytes(figure))
    return path


def _mark_events(ax: Axes, data: RunData, *, label: bool) -> None:
    for at, text in data.event_marks:
        ax.axvline(at, **EVENT_STYLE)
        if label:
            ax.annotate(text, (at, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2),
                        textcoords="offset points", fontsize=7, va="top", ha="left",
                        color="#222222",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                              "alpha": 0.8})


def _backends_phrase(runs: Sequence[RunData]) -> str:
    labels = list(dict.fromkeys(r.backend_label for r in runs))
    return "Backend: " + " and ".join(labels)


def _panel_points(data: RunData) -> list[dict[str, Any]]:
    """The sweep points a figure draws for a run: the first MAX_RUN_PANELS."""
    return (data.points or [{}])[:MAX_RUN_PANELS]


def _last_point(data: RunData) -> dict[str, Any]:
    return _panel_points(data)[-1]


def _where(data: RunData, params: dict[str, Any]) -> str:
    return f" at {point_label(params)}" if params else ""


def _mode_legend(figure: Figure, modes: Sequence[str], extra: Sequence[Line2D] = ()) -> None:
    handles = [Line2D([], [], color=mode_colour(m), linewidth=2.5, label=m) for m in modes]
    fits = max(1, int(figure.get_figwidth() / 1.6))
    figure.legend(handles=[*handles, *extra], loc="outside lower center",
                  ncol=min(len(handles) + len(extra), fits), frameon=False)


def _cell_samples(data: RunData, cell_id: str) -> pd.DataFrame:
    samples = data.run.samples
    return samples[samples["cell_id"] == cell_id]


# --- figure 1: per-pod active connections over time, one seed -------------------------------------


def pod_matrix(cell_samples: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(rows x times matrix of active connections, times, pods per row, pods).

    Pods are ordered by creation (oldest first); NaN where a pod did not exist. With more than
    MAX_POD_ROWS pods, each row is the mean over consecutive pods in creation order.
    """
    first = (cell_samples.groupby("pod", observed=True)["created_at"].min()
             .reset_index().sort_values(["created_at", "pod"], kind="stable"))
    order = {pod: index for index, pod in enumerate(first["pod"])}
    times = np.sort(cell_samples["t"].unique())
    pod_index = cell_samples["pod"].map(order).to_numpy(dtype=int)
    time_index = np.searchsorted(times, cell_samples["t"].to_numpy())
    matrix = np.full((len(order), len(times)), np.nan)
    matrix[pod_index, time_index] = cell_samples["active_connections"].to_numpy(dtype=float)
    pods = len(order)
    per_row = max(1, math.ceil(pods / MAX_POD_ROWS))
    if per_row > 1:
        padded = np.full((math.ceil(pods / per_row) * per_row, len(times)), np.nan)
        padded[:pods] = matrix
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            matrix = np.nanmean(padded.reshape(-1, per_row, len(times)), axis=1)
    return matrix, times, per_row, pods


def pod_connections(runs: Sequence[RunData], out_dir: Path) -> FigureInfo | None:
    modes = ordered_modes(runs)
    panels: list[tuple[int, int, RunData, dict[str, Any], str]] = []
    for row, data in enumerate(runs):
        point = _last_point(data)
        for col, mode in enumerate(modes):
            cells = data.cells_at(mode, point)
            if cells:
                panels.append((row, col, data, cells[0], mode))
    if not panels:
        return None
    matrices = {}
    for row, col, data, cell, _mode in panels:
        matrices[(row, col)] = pod_matrix(_cell_samples(data, cell["cell_id"]))
    peak = max(float(np.nanmax(m[0])) if np.isfinite(m[0]).any() else 0.0
               for m in matrices.values())
    with _style():
        figure, row_figures, axes = _run_panels(runs, [len(modes)] * len(runs), len(modes),
                                                2.9, 2.5)
        images: dict[int, Any] = {}
        for row, col, data, cell, mode in panels:
            matrix, times, per_row, _pods = matrices[(row, col)]
            ax = axes[row][col]
            step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0
            images[row] = ax.imshow(
                np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest",
                cmap=_heat_cmap(), vmin=0, vmax=max(peak, 1.0),
                extent=(times[0] - step / 2, times[-1] + step / 2, matrix.shape[0] * per_row,
                        0),
            )
            ax.grid(False)
            _mark_events(ax, data, label=col == 0)
            ax.set_title(f"{mode}, seed {cell['seed']}", color=mode_colour(mode),
                         fontweight="bold")
            unit = "pod" if per_row == 1 else f"pod (rows of {per_row})"
            ax.set_ylabel(f"{unit}, oldest at top" if col == 0 else "")
            ax.set_xlabel("time (s)")
        for row in range(len(runs)):
            for col in range(len(modes)):
                if (row, col) not in matrices:
                    axes[row][col].set_axis_off()
        for row, image in images.items():
            row_figures[row].colorbar(image, ax=axes[row], shrink=0.9,
                                      label="active connections per pod")
        path = _save(figure, out_dir, "pod-connections")
    binned = [m for m in matrices.values() if m[2] > 1]
    binning = ""
    if binned:
        largest = max(binned, key=lambda m: m[3])
        binning = (f" With up to {largest[3]:,} pods a row cannot be one pod: each row is the "
                   f"mean over {largest[2]} pods consecutive in creation order.")
    seeds = sorted({cell["seed"] for *_, cell, _m in panels})
    where = "; ".join(point_label(_last_point(d)) for d in runs if d.swept)
    return FigureInfo(
        "pod-connections",
        "Open connections on every pod over time (one seed)",
        "Each panel is one kube-proxy mode; each row is one backend pod, ordered by creation "
        "time with the oldest at the top; colour is the number of connections the pod holds "
        "open, blank where the pod did not exist. Dashed lines mark the experiment's events. "
        "Since kube-proxy picks a pod only when a connection opens, a dark row that persists "
        "after newer rows appear is a pod keeping connections it received early, and pale new "
        f"rows are pods that stay under-used. Seed {', '.join(map(str, seeds))}"
        f"{' (sweep point ' + where + ')' if where else ''}. {_backends_phrase(runs)}.{binning}",
        path,
    )


def _heat_cmap() -> Any:
    return matplotlib.colormaps["viridis"].with_extremes(bad="white")


# --- figure 2: max/mean over time, band over seeds ------------------------------------------------


def _seed_band(balance: pd.DataFrame, cell_ids: Sequence[str], metric: str) -> pd.DataFrame:
    frame = balance[balance["cell_id"].isin(cell_ids)]
    table = frame.pivot_table(index="t", columns="cell_id", values=metric, aggfunc="mean")
    return pd.DataFrame({"mean": table.mean(axis=1), "low": table.min(axis=1),
                         "high": table.max(axis=1)})


def max_mean_over_time(runs: Sequence[RunData], out_dir: Path) -> FigureInfo | None:
    modes = ordered_modes(runs)
    panels = [(data, point) for data in runs for point in _panel_points(data)]
    if not any(data.cells_at(m, p) for data, p in panels for m in modes):
        return None
    seeds = set()
    with _style():
        figure, _blocks, blocks = _run_panels(runs, [len(_panel_points(d)) for d in runs], 3,
                                              4.6, 3.0, sharey=True)
        run_axes = [ax for block in blocks for ax in block]
        for index, (data, point) in enumerate(panels):
            ax = run_axes[index]
            for mode in modes:
                cells = data.cells_at(mode, point)
                if not cells:
                    continue
                seeds.add(len(cells))
                band = _seed_band(data.balance, [c["cell_id"] for c in cells], "max_mean")
                colour = mode_colour(mode)
                ax.plot(band.index, band["mean"], color=colour, linewidth=1.6)
                if len(cells) > 1:
                    ax.fill_between(band.index, band["low"], band["high"], color=colour,
                                    alpha=0.18, linewidth=0)
            ax.axhline(BALANCED_MAX_MEAN, color="#777777", linestyle=":", linewidth=1.2)
            _mark_events(ax, data, label=True)
            ax.set_title(point_label(point) or (data.label if len(runs) == 1 else ""))
            ax.set_xlabel("time (s)")
            ax.set_ylabel("max / mean connections per pod")
            ax.set_ylim(bottom=min(1.0, ax.get_ylim()[0]))
        threshold = Line2D([], [], color="#777777", linestyle=":",
                           label=f"balanced ({BALANCED_MAX_MEAN:g})")
        _mode_legend(figure, modes, [threshold])
        path = _save(figure, out_dir, "max-mean-over-time")
    seed_text = "/".join(str(s) for s in sorted(seeds))
    return FigureInfo(
        "max-mean-over-time",
        "Imbalance over time: busiest pod / average pod",
        "For each mode, the ratio of the busiest serving pod's open connections to the average "
        "over serving pods, at every sample: 1 is a perfect spread, 2 means one pod carries "
        "twice its fair share. The line is the mean over seeds and the shaded band the range "
        f"over the {seed_text} seeds; the dotted line is the {BALANCED_MAX_MEAN:g} threshold "
        "used for time-to-balance, dashed lines the experiment's events. A line that stays "
        "high after an event means the data plane never re-spreads connections that are "
        f"already open. {_end_state_sentence(runs, 'max_mean')}{_backends_phrase(runs)}.",
        path,
    )


def _end_state_sentence(runs: Sequence[RunData], metric: str) -> str:
    sentences = []
    for data in runs:
        completed = data.metrics[data.metrics["status"] == "COMPLETED"]
        if completed.empty or metric not in completed or completed[metric].isna().all():
            continue
        by_mode = completed.groupby("mode")[metric].mean().dropna().sort_values()
        if len(by_mode) < 2:
            continue
        prefix = f"In {data.label}, averaged" if len(runs) > 1 else "Averaged"
        sentences.append(
            f"{prefix} over seeds{' and sweep points' if data.swept else ''}, the end state "
            f"is most even with {by_mode.index[0]} ({by_mode.iloc[0]:.2f}) and least even with "
            f"{by_mode.index[-1]} ({by_mode.iloc[-1]:.2f}). "
        )
    return "".join(sentences)


# --- figure 3: end-state per-pod distribution -----------------------------------------------------


def end_state_frame(data: RunData, cells: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Serving pods at each cell's last sample, with connections relative to the cell's mean."""
    parts = []
    for cell in cells:
        samples = _cell_samples(data, cell["cell_id"])
        if samples.empty:
            continue
        end = serving(samples[samples["t"] == samples["t"].max()])
        mean = end["active_connections"].mean()
        if end.empty or not mean > 0:
            continue
        parts.append(pd.DataFrame({
            "mode": cell["mode"], "seed": cell["seed"],
            "connections": end["active_connections"].to_numpy(dtype=float),
            "relative": end["active_connections"].to_numpy(dtype=float) / mean,
        }))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["mode", "seed", "connections", "relative"])


def end_state_distribution(runs: Sequence[RunData], out_dir: Path) -> FigureInfo | None:
    modes = ordered_modes(runs)
    panels = [(data, point) for data in runs for point in _panel_points(data)]
    frames = {}
    for index, (data, point) in enumerate(panels):
        cells = [c for m in modes for c in data.cells_at(m, point)]
        frames[index] = end_state_frame(data, cells)
    if all(f.empty for f in frames.values()):
        return None
    rng = np.random.default_rng(0)
    sampled = False
    fair_counts = []
    with _style():
        figure, _blocks, blocks = _run_panels(runs, [len(_panel_points(d)) for d in runs], 3,
                                              max(2.8, 0.9 * len(modes) + 1.2), 3.0,
                                              sharey=True)
        run_axes = [ax for block in blocks for ax in block]
        for index, (data, point) in enumerate(panels):
            ax = run_axes[index]
            frame = frames[index]
            present = [m for m in modes if m in set(frame["mode"])]
            if frame.empty:
                ax.set_axis_off()
                continue
            fair_counts.append(frame.groupby("seed")["connections"].mean().mean())
            palette = {m: mode_colour(m) for m in present}
            sns.boxplot(data=frame, x="mode", y="relative", order=present, hue="mode",
                        hue_order=present, palette=palette, legend=False, showfliers=False,
                        width=0.55, boxprops={"alpha": 0.45}, ax=ax)
            strip = frame.groupby("mode", group_keys=False)[frame.columns.tolist()].apply(
                lambda g: g.sample(min(len(g), MAX_STRIP_POINTS), random_state=rng))
            sampled = sampled or len(strip) < len(frame)
            sns.stripplot(data=strip, x="mode", y="relative", order=present, hue="mode",
                          hue_order=present, palette=palette, legend=False, size=2.6,
                          alpha=0.7, jitter=0.22, ax=ax)
            ax.axhline(1.0, color="#777777", linestyle=":", linewidth=1.2)
            ax.set_title(point_label(point) or (data.label if len(runs) == 1 else ""))
            ax.set_xlabel("")
            ax.set_ylabel("connections / mean per pod")
            ax.tick_params(axis="x", rotation=30)
        path = _save(figure, out_dir, "end-state-distribution")
    fair = f"{min(fair_counts):.0f}" if min(fair_counts) == max(fair_counts) else \
        f"{min(fair_counts):.0f} to {max(fair_counts):.0f}"
    return FigureInfo(
        "end-state-distribution",
        "How connections are spread over pods at the end",
        "Each dot is one serving pod at the last sample of one seed (all seeds pooled); its "
        "height is the pod's open connections divided by the average over that cell's serving "
        f"pods (an average pod holds {fair} connections), so the dotted line at 1 is a fair "
        "share. Boxes span the middle half of the pods with the median inside. A tall spread "
        "means some pods carry several times the load of others while the Service looks "
        "healthy. "
        + (f"Where a mode has more than {MAX_STRIP_POINTS:,} pods, the dots are a random "
           "sample of them; the boxes use every pod. " if sampled else "")
        + f"{_backends_phrase(runs)}.",
        path,
    )


# --- figure 4: sweeps -----------------------------------------------------------------------------


@lru_cache(maxsize=256)
def uniform_expectation(connections: int, pods: int, draws: int = 400) -> tuple[float, float]:
    """(E[max/mean], E[jain]) when `connections` each pick one of `pods` uniformly at random."""
    if connections <= 0 or pods <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(connections * 7919 + pods)
    draws = max(20, min(draws, 4_000_000 // pods))
    counts = rng.multinomial(connections, np.full(pods, 1.0 / pods), size=draws).astype(float)
    mean = connections / pods
    max_mean = float((counts.max(axis=1) / mean).mean())
    jain = float((connections**2 / (pods * (counts**2).sum(axis=1))).mean())
    return max_mean, jain


def end_counts(data: RunData, cell_id: str) -> tuple[int, int]:
    """(open connections, serving pods) at the cell's last sample."""
    samples = _cell_samples(data, cell_id)
    if samples.empty:
        return 0, 0
    end = serving(samples[samples["t"] == samples["t"].max()])
    return int(end["active_connections"].sum()), len(end)


SWEEP_METRICS = (("max_mean", "max / mean connections per pod"),
                 ("jain", "Jain fairness (1 = even)"))


def sweep_figure(runs: Sequence[RunData], out_dir: Path) -> FigureInfo | None:
    swept = [d for d in runs if d.swept and len(d.points) > 1]
    if not swept:
        return None
    modes = ordered_modes(swept)
    # One row of panels per (run, swept key, values of the other swept keys).
    rows_spec: list[tuple[RunData, str, dict[str, Any]]] = []
    for data in swept:
        for key in data.sweep_keys:
            if len(data.config.sweep[key]) < 2:
                continue
            others = [k for k in data.sweep_keys if k != key]
            seen: list[dict[str, Any]] = []
            for point in data.points:
                rest = {k: point[k] for k in others}
                if rest not in seen:
                    seen.append(rest)
            rows_spec += [(data, key, rest) for rest in seen]
    if not rows_spec:
        return None
    left_out = len(rows_spec) - MAX_SWEEP_ROWS
    rows_spec = rows_spec[:MAX_SWEEP_ROWS]
    swept = [d for d in swept if any(d is r for r, *_ in rows_spec)]
    dodge = 0.09
    with _style():
        counts = [len(SWEEP_METRICS) * sum(1 for d, *_ in rows_spec if d is data)
                  for data in swept]
        figure, _blocks, blocks = _run_panels(swept, counts, len(SWEEP_METRICS), 4.6, 3.0)
        run_axes = [ax for block in blocks for ax in block]
        for row, (data, key, rest) in enumerate(rows_spec):
            values = data.config.sweep[key]
            for col, (metric, ylabel) in enumerate(SWEEP_METRICS):
                ax = run_axes[row * len(SWEEP_METRICS) + col]
                for number, mode in enumerate(modes):
                    offset = (number - (len(modes) - 1) / 2) * dodge
                    xs, means, lows, highs, expected = [], [], [], [], []
                    for position, value in enumerate(values):
                        cells = data.cells_at(mode, {**rest, key: value})
                        if not cells:
                            continue
                        ids = [c["cell_id"] for c in cells]
                        chosen = data.metrics[data.metrics["cell_id"].isin(ids)][metric]
                        mean, low, high, _n = interval(chosen.tolist())
                        xs.append(position + offset)
                        means.append(mean)
                        lows.append(mean - low if not math.isnan(low) else 0.0)
                        highs.append(high - mean if not math.isnan(high) else 0.0)
                        if mode in RANDOM_MODES:
                            draws = [uniform_expectation(*end_counts(data, i)) for i in ids]
                            expected.append(float(np.nanmean([d[col] for d in draws])))
                    if not xs:
                        continue
                    colour = mode_colour(mode)
                    ax.errorbar(xs, means, yerr=[lows, highs], color=colour, marker="o",
                                markersize=5, capsize=3, linewidth=1.5)
                    if expected:
                        ax.plot([x + dodge / 2 for x in xs], expected, color=colour,
                                linestyle="--", marker="D", markersize=5,
                                markerfacecolor="white", linewidth=1.1)
                if metric == "max_mean":
                    ax.axhline(BALANCED_MAX_MEAN, color="#777777", linestyle=":", linewidth=1.2)
                ax.set_xticks(range(len(values)), [format_value(v) for v in values])
                ax.set_xlabel(key)
                ax.set_ylabel(ylabel)
                named = data.label if len(runs) > 1 and len(swept) == 1 else ""
                title = " · ".join(x for x in (named, point_label(rest)) if x)
                if title:
                    ax.set_title(title)
        expectation = Line2D([], [], color="#555555", linestyle="--", marker="D",
                             markerfacecolor="white", label="uniform random (same mode colour)")
        _mode_legend(figure, modes, [expectation])
        path = _save(figure, out_dir, "sweep")
    keys = ", ".join(dict.fromkeys(k for _d, k, _r in rows_spec))
    has_random = any(m in RANDOM_MODES for m in modes)
    return FigureInfo(
        "sweep",
        f"End-state balance against {keys}",
        f"End-state imbalance (left: busiest / average pod, lower is better; right: Jain's "
        f"fairness index, 1 = perfectly even) for each value of {keys}, one line per mode: "
        "mean over seeds with a 95% t-interval as error bars (end state = mean over the last "
        "10% of the run). "
        + ("The dashed lines with open diamonds are what iptables and nftables would give if "
           "every open connection had picked one of the serving pods uniformly at random "
           "(Monte Carlo expectation for the same numbers of connections and serving pods as at "
           "the end of each cell): a mode on its dashed line is as balanced as random choice "
           "allows, and few connections per pod are unbalanced even when the choice is fair. "
           if has_random else "")
        + f"{_backends_phrase(swept)}."
        + (f" {left_out} more rows of panels (other values of the other swept keys) are left "
           f"out: a figure draws at most {MAX_SWEEP_ROWS}; the summary table has every point."
           if left_out > 0 else ""),
        path,
    )


# --- figure 5: HPA scale-out ----------------------------------------------------------------------


def scale_out_start(events: pd.DataFrame, cell_id: str) -> float | None:
    """Time of the first scale-up decision of the cell (HPA or `scale` event), if any."""
    import json

    chosen = events[(events["cell_id"] == cell_id)
                    & events["event"].isin(["hpa_desired", "scaled"])].sort_values("t")
    for t, detail in zip(chosen["t"], chosen["detail"], strict=True):
        try:
            parsed = json.loads(detail) if detail else {}
        except ValueError:
            continue
        previous, replicas = parsed.get("previous"), parsed.get("replicas")
        if previous is not None and replicas is not None and replicas > previous:
            return float(t)
    return None


def added_pod_share(cell_samples: pd.DataFrame, start: float) -> pd.DataFrame:
    """Per sample: share of connections and of serving pods on pods created at/after `start`."""
    frame = serving(cell_samples)[["t", "created_at", "active_connections"]].copy()
    frame["added"] = frame["created_at"] >= start
    frame["added_connections"] = frame["active_connections"].where(frame["added"], 0)
    grouped = frame.groupby("t")
    totals = grouped[["active_connections", "added_connections", "added"]].sum()
    pods = grouped.size()
    with np.errstate(divide="ignore", invalid="ignore"):
        return pd.DataFrame({
            "connection_share": totals["added_connections"] / totals["active_connections"]
            .where(totals["active_connections"] > 0),
            "pod_share": totals["added"] / pods,
        })


def hpa_share(runs: Sequence[RunData], out_dir: Path) -> FigureInfo | None:
    hpa_runs = [d for d in runs if d.config.backend.hpa is not None]
    if not hpa_runs:
        return None
    modes = ordered_modes(hpa_runs)
    series: dict[tuple[int, int], list[pd.DataFrame]] = {}
    starts: list[float] = []
    for row, data in enumerate(hpa_runs):
        for col, mode in enumerate(modes):
            for cell in data.cells_at(mode, _last_point(data)):
                start = scale_out_start(data.run.events, cell["cell_id"])
                if start is None:
                    continue
                starts.append(start)
                share = added_pod_share(_cell_samples(data, cell["cell_id"]), start)
                series.setdefault((row, col), []).append(share[share.index >= start])
    if not series:
        return None
    with _style():
        figure, _blocks, axes = _run_panels(hpa_runs, [len(modes)] * len(hpa_runs), len(modes),
                                            2.9, 2.6, sharey=True)
        for (row, col), shares in series.items():
            ax = axes[row][col]
            mode, data = modes[col], hpa_runs[row]
            colour = mode_colour(mode)
            connection = pd.concat([s["connection_share"] for s in shares], axis=1)
            pods = pd.concat([s["pod_share"] for s in shares], axis=1)
            ax.plot(connection.index, connection.mean(axis=1), color=colour, linewidth=1.7)
            if connection.shape[1] > 1:
                ax.fill_between(connection.index, connection.min(axis=1),
                                connection.max(axis=1), color=colour, alpha=0.18, linewidth=0)
            ax.plot(pods.index, pods.mean(axis=1), color=colour, linestyle="--", linewidth=1.2)
            _mark_events(ax, data, label=col == 0)
            ax.set_title(mode, color=colour, fontweight="bold")
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("time (s)")
            if col == 0:
                ax.set_ylabel("share held by added pods")
        for row in range(len(hpa_runs)):
            for col in range(len(modes)):
                if (row, col) not in series:
                    axes[row][col].set_axis_off()
        solid = Line2D([], [], color="#555555", label="share of open connections")
        dashed = Line2D([], [], color="#555555", linestyle="--",
                        label="share of serving pods (fair share)")
        figure.legend(handles=[solid, dashed], loc="outside lower center", ncol=2,
                      frameon=False)
        path = _save(figure, out_dir, "hpa-added-pods")
    return FigureInfo(
        "hpa-added-pods",
        "Do the pods added by the autoscaler get connections?",
        "After the first scale-up decision (HPA or a scale event; at "
        f"{min(starts):g}–{max(starts):g} s in these cells), the share of all open connections "
        "held by the pods created from then on (solid line: mean over seeds; band: range over "
        "seeds), against their share of the serving pods (dashed): if connections were spread "
        "evenly the solid line would follow the dashed one. A solid line far below the dashed "
        "one means the new pods sit idle while the old ones keep their long-lived connections, "
        "so scaling out does not relieve the pods that triggered it. "
        f"{_backends_phrase(hpa_runs)}.",
        path,
    )


FIGURES: tuple[Callable[[Sequence[RunData], Path], FigureInfo | None], ...] = (
    pod_connections,
    max_mean_over_time,
    end_state_distribution,
    sweep_figure,
    hpa_share,
)


def facet_note(runs: Sequence[RunData]) -> str:
    """What the figures leave out of `runs` (see MAX_FIGURE_RUNS, MAX_RUN_PANELS), or ''."""
    notes = []
    if len(runs) > MAX_FIGURE_RUNS:
        notes.append(f"the figures draw the first {MAX_FIGURE_RUNS} of the {len(runs)} runs "
                     f"given ({len(runs) - MAX_FIGURE_RUNS} left out)")
    for data in runs[:MAX_FIGURE_RUNS]:
        if len(data.points) > MAX_RUN_PANELS:
            notes.append(f"{data.label}: the first {MAX_RUN_PANELS} of its "
                         f"{len(data.points)} sweep points are drawn")
    if not notes:
        return ""
    return " Left out: " + "; ".join(notes) + ". The tables hold every run and sweep point."


def make_all(runs: Sequence[RunData], out_dir: Path) -> list[FigureInfo]:
    """Render every figure that applies to the runs into `out_dir` (PNG), drawing at most
    MAX_FIGURE_RUNS runs; each caption says what was left out."""
    note = facet_note(runs)
    shown = list(runs[:MAX_FIGURE_RUNS])
    rendered = []
    for make in FIGURES:
        info = make(shown, out_dir)
        if info is not None:
            info.caption += note
            rendered.append(info)
    return rendered
