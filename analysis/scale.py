"""The scale experiment's table, summary and figure (`kpbench scale`)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from analysis.figures import DPI, _style, mode_colour

COLUMNS = ["placement", "kernel", "accel", "mode", "services", "endpoints", "connects",
           "sync_seconds", "incremental_seconds", "connect_median_us", "connect_p90_us",
           "connect_min_us", "connect_max_us", "connect_first_us", "accepted", "sync_steps",
           "incremental_steps"]
PANELS = (("connect_median_us", "connect to the last Service, median (µs)"),
          ("sync_seconds", "full sync from empty (s)"),
          ("incremental_seconds", "incremental sync: one Service changed (s)"))


def where(placement: str, kernel: str, accel: str) -> str:
    """`host 6.18.44` or `VM 6.1.0-57-amd64 (tcg)`."""
    return f"host {kernel}" if placement == "host" else f"VM {kernel} ({accel})"


def frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(list(rows)).reindex(columns=COLUMNS)
    for column in ("accepted", "sync_steps", "incremental_steps"):
        table[column] = table[column].map(lambda v: "" if v is None else str(v))
    table["where"] = [where(p, k, a) for p, k, a in
                      zip(table["placement"], table["kernel"], table["accel"].fillna(""),
                          strict=True)]
    return table


def summary_markdown(table: pd.DataFrame, manifest: dict[str, Any]) -> str:
    lines = [f"# {manifest['experiment']} ({manifest['run_id']}): {manifest['status']}", ""]
    if manifest.get("error"):
        lines += [f"Stopped: {manifest['error']}", ""]
    lines += ["Measured on the real kernel (backend lab). Connect: one TCP connect from a client "
              "pod through the node to the last Service (its rules last in KUBE-SERVICES).", "",
              "| where | mode | services | full sync s | incremental sync s | connect median µs "
              "| connect p90 µs |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in table.sort_values(["placement", "services", "mode"]).itertuples():
        lines.append(f"| {row.where} | {row.mode} | {row.services:,} | {row.sync_seconds:.3f} | "
                     f"{row.incremental_seconds:.3f} | {row.connect_median_us:.1f} | "
                     f"{row.connect_p90_us:.1f} |")
    return "\n".join(lines) + "\n"


def figure_png(table: pd.DataFrame) -> bytes:
    """Three log-log panels against Services, one line per mode and kernel."""
    modes = sorted(table["mode"].unique())
    places = sorted(table["where"].unique())
    with _style():
        figure, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.8),
                                    layout="constrained")
        for ax, (column, label) in zip(axes, PANELS, strict=True):
            sns.lineplot(data=table, x="services", y=column, hue="mode", hue_order=modes,
                         palette={m: mode_colour(m) for m in modes}, style="where",
                         style_order=places, markers=True, dashes=True, ax=ax,
                         legend=ax is axes[-1])
            ax.set(xscale="log", yscale="log", ylabel=label,
                   xlabel=f"Services ({table['endpoints'].iloc[0]} endpoints each)")
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
        figure.suptitle("kube-proxy modes as Services grow, measured (backend lab): "
                        + "; ".join(places))
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI)
        plt.close(figure)
    return buffer.getvalue()


def render(table: pd.DataFrame, manifest: dict[str, Any]) -> dict[str, bytes]:
    """The files a finished scale run gets beside its measurements."""
    return {"summary.md": summary_markdown(table, manifest).encode(),
            "scale.png": figure_png(table)}
