"""The report (issue 3): summary and verdicts checked against values computed here, from the raw
parquet files with plain numpy, not through analysis.metrics; self-containment; error exits.

The fixture tests/data/report-run/ is a sim run of tests/data/report-fixture.yaml (2 modes,
3 seeds, 4 pods, 40 connections, a rolling update) committed once.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from analysis.figures import uniform_expectation
from kpbench.cli import main

FIXTURE = Path(__file__).parent / "data" / "report-run"
T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student t quantiles by degrees of freedom
SUMMARY_CHECKED = ("max_mean", "cv", "jain", "gini", "ready_order_rho", "failed_connections")


# --- independent computation ----------------------------------------------------------------


def manifest() -> dict[str, Any]:
    return json.loads((FIXTURE / "run.json").read_text())


def expected_cell_values() -> pd.DataFrame:
    """One row per cell, computed from the parquet files with numpy only."""
    run = manifest()
    duration = run["config"]["duration_seconds"]
    samples = pd.read_parquet(FIXTURE / "samples.parquet")
    events = pd.read_parquet(FIXTURE / "events.parquet")
    rows = []
    for cell in run["cells"]:
        cell_id = cell["cell_id"]
        mine = samples[(samples["cell_id"] == cell_id) & samples["ready"]
                       & ~samples["terminating"]]
        per_t: dict[str, list[float]] = {"max_mean": [], "cv": [], "jain": [], "gini": []}
        for _t, group in mine[mine["t"] >= 0.9 * duration].groupby("t"):
            x = group["active_connections"].to_numpy(dtype=float)
            mean = x.mean()
            per_t["max_mean"].append(x.max() / mean)
            per_t["cv"].append(math.sqrt(((x - mean) ** 2).mean()) / mean)
            per_t["jain"].append(x.sum() ** 2 / (len(x) * (x**2).sum()))
            # Gini as the mean absolute difference over twice the mean (another formula).
            per_t["gini"].append(np.abs(x[:, None] - x[None, :]).sum()
                                 / (2 * len(x) ** 2 * mean))
        end = mine[mine["t"] == samples[samples["cell_id"] == cell_id]["t"].max()]
        ready = events[(events["cell_id"] == cell_id) & (events["event"] == "pod_ready")]
        ready_at = ready.groupby("pod", observed=True)["t"].min()
        ranks_ready = end["pod"].map(ready_at).astype(float).rank().to_numpy()
        ranks_x = end["active_connections"].astype(float).rank().to_numpy()
        failed = events[(events["cell_id"] == cell_id) & (events["event"] == "connection_failed")]
        failed_total = sum(json.loads(d).get("count", 1) if d else 1 for d in failed["detail"])
        rows.append({
            "cell_id": cell_id, "mode": cell["mode"], "seed": cell["seed"],
            **{k: float(np.mean(v)) for k, v in per_t.items()},
            "ready_order_rho": float(np.corrcoef(ranks_ready, ranks_x)[0, 1]),
            "failed_connections": float(failed_total),
            "balanced_at_end": per_t["max_mean"][-1] <= 1.25,
        })
    return pd.DataFrame(rows)


def t_interval(values: list[float]) -> tuple[float, float, float]:
    data = np.asarray(values, dtype=float)
    mean = data.mean()
    half = T_975[len(data) - 1] * data.std(ddof=1) / math.sqrt(len(data))
    return mean, mean - half, mean + half


def expected_verdict(values: list[float], op: str, threshold: float) -> str:
    _mean, low, high = t_interval(values)
    holds = {"<": lambda v: v < threshold, ">": lambda v: v > threshold,
             "<=": lambda v: v <= threshold, ">=": lambda v: v >= threshold}[op]
    if holds(low) and holds(high):
        return "CONFIRMED"
    if not holds(low) and not holds(high):
        return "REFUTED"
    return "INCONCLUSIVE"


def expected_claims() -> dict[str, tuple[str, dict[str, str]]]:
    """claim id -> (overall verdict, {mode: verdict})."""
    run = manifest()
    cells = expected_cell_values()
    result = {}
    for claim in run["config"]["claims"]:
        op, threshold = re.match(r"\s*(<=|>=|<|>)\s*(\S+)", claim["expect"]).groups()
        per_mode = {}
        for mode in claim["modes"] or run["config"]["modes"]:
            if claim["metric"] == "time_to_balance":
                # Every cell of the fixture ends unbalanced: never balanced = infinite time.
                assert not cells[cells["mode"] == mode]["balanced_at_end"].any()
                per_mode[mode] = "REFUTED" if op in ("<", "<=") else "CONFIRMED"
                continue
            values = cells[cells["mode"] == mode][claim["metric"]].tolist()
            per_mode[mode] = expected_verdict(values, op, float(threshold))
        verdicts = set(per_mode.values())
        overall = ("REFUTED" if "REFUTED" in verdicts
                   else "CONFIRMED" if verdicts == {"CONFIRMED"} else "INCONCLUSIVE")
        result[claim["id"]] = (overall, per_mode)
    return result


# --- rendering -----------------------------------------------------------------------------------


def render(paths: list[Path], out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str,
                                                                                     str]:
    code = main(["report", *map(str, paths), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report"
    assert main(["report", str(FIXTURE), "--out", str(out)]) == 0
    return out


def test_summary_matches_independent_computation(report: Path) -> None:
    summary = pd.read_csv(report / "summary.csv")
    cells = expected_cell_values()
    markdown = (report / "summary.md").read_text()
    assert set(summary["mode"]) == set(cells["mode"])
    for mode, group in cells.groupby("mode"):
        row = summary[summary["mode"] == mode].iloc[0]
        assert row["seeds"] == len(group) == 3
        assert row["backend"] == "sim" and row["measurement"] == "modelled"
        for metric in SUMMARY_CHECKED:
            mean, low, high = t_interval(group[metric].tolist())
            assert row[metric] == pytest.approx(mean, abs=1e-9), (mode, metric)
            assert row[f"{metric}_low"] == pytest.approx(low, abs=1e-9), (mode, metric)
            assert row[f"{metric}_high"] == pytest.approx(high, abs=1e-9), (mode, metric)
        table_row = next(line for line in markdown.splitlines()
                         if line.startswith(f"| {mode} |"))
        assert "sim (modelled)" in table_row
        mean, low, high = t_interval(group["max_mean"].tolist())
        assert f"{mean:.2f} [{low:.2f}, {high:.2f}]" in table_row
        mean, low, high = t_interval(group["jain"].tolist())
        assert f"{mean:.2f} [{low:.2f}, {high:.2f}]" in table_row


def test_verdicts_match_independent_computation(report: Path) -> None:
    expected = expected_claims()
    # The fixture must exercise every verdict, or this test could not catch a wrong one.
    assert {overall for overall, _ in expected.values()} == {"CONFIRMED", "REFUTED",
                                                             "INCONCLUSIVE"}
    assert expected["iptables-twice-fair"][0] == "INCONCLUSIVE"  # interval straddles 2.0
    verdicts = pd.read_csv(report / "verdicts.csv")
    markdown = (report / "summary.md").read_text()
    html = (report / "index.html").read_text()
    for claim_id, (overall, per_mode) in expected.items():
        rows = verdicts[verdicts["claim"] == claim_id]
        assert set(rows["overall"]) == {overall}, claim_id
        assert dict(zip(rows["mode"], rows["verdict"], strict=True)) == per_mode, claim_id
        assert f"### {claim_id}: **{overall}**" in markdown
        assert re.search(rf'class="verdict {overall}">{overall}</span> {claim_id}</h3>', html)


def test_index_html_is_self_contained(report: Path) -> None:
    class References(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.references: list[str] = []
            self.images = 0

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.images += tag == "img"
            for name, value in attrs:
                if name in {"src", "href", "srcset", "data", "poster", "action"} and value:
                    self.references.append(value)
            assert tag not in {"script", "link", "iframe", "object", "embed"}, tag

    html = (report / "index.html").read_text()
    parser = References()
    parser.feed(html)
    outside = [r for r in parser.references
               if not (r.startswith("data:image/png;base64,") or r.startswith("#"))]
    assert outside == []
    assert "@import" not in html and not re.search(r"url\((?!data:)", html)
    pngs = sorted((report / "figures").glob("*.png"))
    assert [p.stem for p in pngs] == ["end-state-distribution", "max-mean-over-time",
                                      "pod-connections"]
    assert parser.images == len(pngs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "Modelled, not measured" in html


def test_metrics_csv_has_one_row_per_cell(report: Path) -> None:
    metrics = pd.read_csv(report / "metrics.csv")
    assert sorted(metrics["cell_id"]) == sorted(c["cell_id"] for c in manifest()["cells"])
    assert set(metrics["backend"]) == {"sim"} and set(metrics["measurement"]) == {"modelled"}


def _copy(tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURE, target)
    return target


def _edit_manifest(folder: Path, **changes: Any) -> None:
    run = json.loads((folder / "run.json").read_text())
    run.update(changes)
    (folder / "run.json").write_text(json.dumps(run))


def test_incomplete_cells_are_listed_with_their_reason(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = _copy(tmp_path)
    run = json.loads((folder / "run.json").read_text())
    run["cells"][0].update(status="UNSUPPORTED", error="kernel has no ip_vs module")
    _edit_manifest(folder, cells=run["cells"])
    code, _out, _err = render([folder], tmp_path / "out", capsys)
    assert code == 0
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert run["cells"][0]["cell_id"] in markdown and "kernel has no ip_vs module" in markdown
    assert "kernel has no ip_vs module" in (tmp_path / "out" / "index.html").read_text()
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary.set_index("mode").loc[run["cells"][0]["mode"], "seeds"] == 2


def test_comparative_report_names_the_backend_of_every_row(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = _copy(tmp_path, "lab-run")
    _edit_manifest(other, backend="lab", run_id="20990101T000000Z-abcdef")
    code, out, _err = render([FIXTURE, other], tmp_path / "out", capsys)
    assert code == 0 and out.strip().endswith("index.html")
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert sorted(summary["backend"]) == ["lab", "lab", "sim", "sim"]
    rows = [line for line in (tmp_path / "out" / "summary.md").read_text().splitlines()
            if line.startswith("| sim") or line.startswith("| lab")]
    table = [line for line in rows if "max/mean" not in line]
    assert len([r for r in table if "sim (modelled)" in r]) == 2
    assert len([r for r in table if "lab (measured)" in r]) == 2


def test_reports_are_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _copy(tmp_path)
    assert main(["report", str(folder)]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert first == str(folder / "report" / "index.html")
    before = (folder / "report" / "index.html").read_bytes()
    assert main(["report", str(folder)]) == 0
    second = capsys.readouterr().out.strip().splitlines()[-1]
    assert second != first and Path(second).is_file()
    assert (folder / "report" / "index.html").read_bytes() == before
    code, _out, err = render([folder], folder / "report", capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "never overwritten" in err


@pytest.mark.parametrize("damage", ["format_version", "missing_samples", "no_cells"])
def test_unreadable_results_exit_2_with_one_line(tmp_path: Path, damage: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    folder = _copy(tmp_path)
    if damage == "format_version":
        _edit_manifest(folder, format_version=99)
    elif damage == "missing_samples":
        (folder / "samples.parquet").unlink()
    else:
        _edit_manifest(folder, cells=[])
    code, _out, err = render([folder], tmp_path / "out", capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert {"format_version": "format_version", "missing_samples": "samples.parquet",
            "no_cells": "no cells"}[damage] in lines[0]
    assert not (tmp_path / "out").exists()


def test_figures_without_published_runs_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["figures"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no published runs" in err[0]


def test_figures_regenerates_published_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(FIXTURE, tmp_path / "results" / "published" / "report-fixture" / "run")
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # regenerating replaces the previous figures
        assert main(["figures"]) == 0
    index = Path(capsys.readouterr().out.strip().splitlines()[-1])
    figures = tmp_path / "results" / "published" / "figures"
    assert index == Path("results/published/figures/README.md")
    assert sorted(p.name for p in (figures / "report-fixture-sim").glob("*.png")) == [
        "end-state-distribution.png", "max-mean-over-time.png", "pod-connections.png"]
    assert "backend sim (modelled)" in (figures / "README.md").read_text()
    assert [p.name for p in figures.parent.iterdir() if p.name.startswith(".")] == []


def test_run_renders_sweep_and_hpa_figures(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "name: tiny\nmodes: [iptables, ipvs-lc]\nseeds: 2\nduration_seconds: 60\n"
        "backend: {replicas: 2, hpa: {min_replicas: 2, max_replicas: 6}}\n"
        "workload: {clients: 2, connections: 12, ramp_seconds: 2}\n"
        "events: [{at: 20, action: load, requests_per_second: 20}]\n"
        "sweep: {workload.connections: [6, 12]}\n"
    )
    code = main(["run", str(config), "--backend", "sim", "--out", str(tmp_path / "runs")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    results = Path(lines[-1])
    assert results.parent == tmp_path / "runs" / "tiny"
    assert any(line == f"report: {results / 'report' / 'index.html'}" for line in lines[:-1])
    names = {p.stem for p in (results / "report" / "figures").glob("*.png")}
    assert {"sweep", "hpa-added-pods", "pod-connections", "max-mean-over-time",
            "end-state-distribution"} == names


def test_uniform_expectation_matches_exact_small_case() -> None:
    # Two connections over two pods: {2,0} or {0,2} with probability 1/2, {1,1} otherwise.
    max_mean, jain = uniform_expectation(2, 2, draws=4000)
    assert max_mean == pytest.approx(1.5, abs=0.05)
    assert jain == pytest.approx(0.75, abs=0.03)
    assert uniform_expectation(50, 1) == (1.0, 1.0)
