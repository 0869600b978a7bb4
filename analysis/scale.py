"""The scale experiment's table, summary and figure (`kpbench scale`), and its judgement of the
claim that IPVS scales better than iptables (`kpbench findings`).

Every (placement, mode, Services) point is measured `repeats` times. Over the repeats each timing
is summarised as its mean with the 95% Student-t interval (`analysis.metrics.interval`, as the
reports do over seeds); the median over repeats is kept beside it. Why the mean and not the
median: a 95% interval of a median from 3 repeats does not exist without a model (the
distribution-free one, [min, max], covers 75%; a bootstrap of 3 values gives that same
[min, max] and calls it 95%), while the t-interval is the project's interval everywhere else and
is wide, not wrong, when one repeat is an outlier.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from analysis.figures import _style, mode_colour, png_bytes
from analysis.metrics import interval

COLUMNS = ["placement", "kernel", "accel", "mode", "services", "endpoints", "connects", "repeat",
           "sync_seconds", "incremental_seconds", "connect_median_us", "connect_p90_us",
           "connect_min_us", "connect_max_us", "connect_first_us", "accepted", "sync_steps",
           "incremental_steps"]
PANELS = (("connect_median_us", "connect to the last Service, median (µs)"),
          ("sync_seconds", "full sync from empty (s)"),
          ("incremental_seconds", "incremental sync: one Service changed (s)"))
METRICS = tuple(column for column, _label in PANELS)
POINT_KEYS = ["placement", "where", "kernel", "accel", "mode", "services", "endpoints"]


def where(placement: str, kernel: str, accel: str) -> str:
    """`host 6.18.44` or `VM 6.1.0-57-amd64 (tcg)`."""
    return f"host {kernel}" if placement == "host" else f"VM {kernel} ({accel})"


def frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(list(rows)).reindex(columns=COLUMNS)
    table["repeat"] = table["repeat"].fillna(1).astype(int)  # rows written before repeats
    table["accel"] = table["accel"].fillna("")
    for column in ("accepted", "sync_steps", "incremental_steps"):
        table[column] = table[column].map(lambda v: "" if v is None else str(v))
    table["where"] = [where(p, k, a) for p, k, a in
                      zip(table["placement"], table["kernel"], table["accel"], strict=True)]
    return table


def aggregate(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (placement, kernel, mode, Services): `repeats`, and per timing its mean,
    95% t-interval (`_low`, `_high`; NaN with one repeat) and median over the repeats."""
    rows = []
    for key, group in table.groupby(POINT_KEYS, sort=True):
        row: dict[str, Any] = dict(zip(POINT_KEYS, key, strict=True))
        row["repeats"] = len(group)
        for column in METRICS:
            mean, low, high, _n = interval(group[column].tolist())
            row.update({column: mean, f"{column}_low": low, f"{column}_high": high,
                        f"{column}_median": float(group[column].median())})
        rows.append(row)
    return pd.DataFrame(rows)


def estimate_text(mean: float, low: float, high: float, digits: int) -> str:
    """`8.61 [7.90, 9.32]`, or the mean alone when one repeat gives no interval."""
    if math.isnan(low):
        return f"{mean:,.{digits}f}"
    return f"{mean:,.{digits}f} [{low:,.{digits}f}, {high:,.{digits}f}]"


def summary_markdown(table: pd.DataFrame, manifest: dict[str, Any]) -> str:
    points = aggregate(table)
    lines = [f"# {manifest['experiment']} ({manifest['run_id']}): {manifest['status']}", ""]
    if manifest.get("error"):
        lines += [f"Stopped: {manifest['error']}", ""]
    lines += ["Measured on the real kernel (backend lab). Connect: one TCP connect from a client "
              "pod through the node to the last Service (its rules last in KUBE-SERVICES); each "
              "repeat gives its median over its connects. Values: the mean over repeats with "
              "its 95% t-interval; the median over repeats in parentheses.", "",
              "| where | mode | services | repeats | full sync s | incremental sync s | "
              "connect median µs |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in points.sort_values(["placement", "services", "mode"]).to_dict("records"):
        cells = [f"{estimate_text(row[c], row[f'{c}_low'], row[f'{c}_high'], digits)} "
                 f"({row[f'{c}_median']:,.{digits}f})"
                 for c, digits in (("sync_seconds", 3), ("incremental_seconds", 3),
                                   ("connect_median_us", 1))]
        lines.append(f"| {row['where']} | {row['mode']} | {row['services']:,} | "
                     f"{row['repeats']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure_png(table: pd.DataFrame) -> bytes:
    """Three log-log panels against Services, one line per mode and kernel: the mean over
    repeats with its 95% t-interval as error bars."""
    return points_figure_png(aggregate(table))


def points_figure_png(points: pd.DataFrame) -> bytes:
    """`figure_png` of points already aggregated over repeats."""
    places = sorted(points["where"].unique())
    styles = {place: style for place, style in zip(places, ("-o", "--s", ":^", "-.D"),
                                                       strict=False)}
    with _style():
        figure, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.8),
                                    layout="constrained")
        for ax, (column, label) in zip(axes, PANELS, strict=True):
            for (place, mode), line in points.groupby(["where", "mode"], sort=True):
                low = (line[column] - line[f"{column}_low"]).fillna(0)
                high = (line[f"{column}_high"] - line[column]).fillna(0)
                ax.errorbar(line["services"], line[column], yerr=[low, high],
                            fmt=styles.get(place, "-o"), color=mode_colour(str(mode)), capsize=3,
                            markersize=4, linewidth=1.2, label=f"{mode}, {place}")
            ax.set(xscale="log", yscale="log", ylabel=label,
                   xlabel=f"Services ({points['endpoints'].iloc[0]} endpoints each)")
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
        repeats = sorted(set(points["repeats"]))
        figure.suptitle("kube-proxy modes as Services grow, measured (backend lab; mean of "
                        f"{'/'.join(map(str, repeats))} repeats, 95% t-interval): "
                        + "; ".join(places))
        rendered = png_bytes(figure)
        plt.close(figure)
    return rendered


def render(table: pd.DataFrame, manifest: dict[str, Any]) -> dict[str, bytes]:
    """The files a finished scale run gets beside its measurements."""
    return {"summary.md": summary_markdown(table, manifest).encode(),
            "scale.png": figure_png(table)}


# --- a published scale run, and the claim judged on it -------------------------------------------


def is_scale_run(folder: Path) -> bool:
    """Whether `folder/run.json` is a `kpbench scale` run (not a `kpbench run` one)."""
    try:
        return json.loads((folder / "run.json").read_bytes()).get("kind") == "scale"
    except (OSError, ValueError, AttributeError):
        return False


def load_points(folder: Path) -> pd.DataFrame:
    """A scale run's measurements, from its committed points (complete or not)."""
    rows = [json.loads(p.read_bytes()) for p in sorted((folder / "points").glob("*.json"))]
    return frame(rows)


SCALE_RULE = (
    "judged in the kernel VM, where every mode ran on one kernel, at the largest number of "
    "Services measured there for both: CONFIRMED when IPVS's 95% interval lies entirely below "
    "iptables' for connect latency, full sync and incremental sync; REFUTED when it lies "
    "entirely above for any of the three (the article claims IPVS is better at all of them); "
    "else INCONCLUSIVE")
ASPECTS = (("connect_median_us", "connect latency"), ("sync_seconds", "full sync"),
           ("incremental_seconds", "incremental sync"))
JUDGED_ON = "vm"
BASELINE = "iptables"


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float

    def text(self, digits: int, unit: str) -> str:
        return f"{estimate_text(self.mean, self.low, self.high, digits)} {unit}"


@dataclass(frozen=True)
class ScalePoint:
    """One mode on one placement at one number of Services, over its repeats."""

    placement: str
    kernel: str
    accel: str
    services: int
    repeats: int
    connect_us: Estimate
    sync_s: Estimate
    incremental_s: Estimate

    def estimate(self, column: str) -> Estimate:
        return {"connect_median_us": self.connect_us, "sync_seconds": self.sync_s,
                "incremental_seconds": self.incremental_s}[column]

    def text(self) -> str:
        return (f"{where(self.placement, self.kernel, self.accel)}, {self.services:,} Services, "
                f"{self.repeats} repeat{'s' if self.repeats != 1 else ''}: connect "
                f"{self.connect_us.text(0, 'µs')}, full sync {self.sync_s.text(2, 's')}, "
                f"incremental sync {self.incremental_s.text(2, 's')}")


def scale_point(points: pd.DataFrame, placement: str, mode: str, services: int | None = None
                ) -> ScalePoint | None:
    """`mode` on `placement` at `services` (default: the largest it was measured at)."""
    chosen = points[(points["placement"] == placement) & (points["mode"] == mode)]
    if services is not None:
        chosen = chosen[chosen["services"] == services]
    if chosen.empty:
        return None
    row = chosen.sort_values("services").iloc[-1]

    def estimate(column: str) -> Estimate:
        return Estimate(float(row[column]), float(row[f"{column}_low"]),
                        float(row[f"{column}_high"]))

    return ScalePoint(str(row["placement"]), str(row["kernel"]), str(row["accel"]),
                      int(row["services"]), int(row["repeats"]), estimate("connect_median_us"),
                      estimate("sync_seconds"), estimate("incremental_seconds"))


def compare(ipvs: Estimate, baseline: Estimate) -> str:
    """'better' (interval entirely lower: less time), 'worse', 'overlaps', or 'no interval'."""
    if math.isnan(ipvs.low) or math.isnan(baseline.low):
        return "no interval"
    if ipvs.high < baseline.low:
        return "better"
    if ipvs.low > baseline.high:
        return "worse"
    return "overlaps"


def scale_verdict(points: pd.DataFrame, mode: str) -> tuple[str | None, str]:
    """(verdict, note) of 'IPVS scales better than iptables' for `mode` (SCALE_RULE); the
    verdict is None for a mode the claim does not judge."""
    if not mode.startswith("ipvs-"):
        return None, ("the baseline the IPVS modes are judged against" if mode == BASELINE
                      else "the claim compares IPVS with iptables; shown for reference")
    sizes = [set(points.loc[(points["placement"] == JUDGED_ON) & (points["mode"] == m),
                            "services"]) for m in (mode, BASELINE)]
    common = sizes[0] & sizes[1]
    if not common:
        return "INCONCLUSIVE", (f"{mode} and {BASELINE} were not both measured in the kernel "
                                "VM at one number of Services")
    services = max(common)
    ipvs = scale_point(points, JUDGED_ON, mode, services)
    baseline = scale_point(points, JUDGED_ON, BASELINE, services)
    assert ipvs is not None and baseline is not None
    outcomes = {label: compare(ipvs.estimate(c), baseline.estimate(c)) for c, label in ASPECTS}
    if all(o == "better" for o in outcomes.values()):
        verdict = "CONFIRMED"
    elif any(o == "worse" for o in outcomes.values()):
        verdict = "REFUTED"
    else:
        verdict = "INCONCLUSIVE"
    said = ", ".join(f"{label} {outcome}" for label, outcome in outcomes.items())
    return verdict, (f"against {BASELINE} in {where(JUDGED_ON, ipvs.kernel, ipvs.accel)} at "
                     f"{services:,} Services: {said}")
