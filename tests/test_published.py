"""The published runs behind the README's findings (issue 7).

Every run folder committed under results/published/ loads; `kpbench figures` renders every
figure from them (in a copy, since it writes into results/published/figures/); a few cells
of a committed `sim` run, re-run from the config recorded in its run.json with the same seeds,
give exactly the committed metrics, and one whole small sim run gives exactly its committed
summary and verdicts. A lab run cannot be re-run bit for bit (the kernel, the scheduler and the
clock decide its numbers), so for every published lab run the summary and verdicts are
recomputed from its committed tables and compared with its committed report.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.metrics import cell_metrics
from analysis.published import FIGURES_FOLDER, find_published_runs
from analysis.report import claim_results, summary_table, verdicts_frame
from analysis.runs import prepare_run
from kpbench.cli import main
from kpbench.config import Experiment
from kpbench.results import load_run

REPOSITORY = Path(__file__).resolve().parent.parent
PUBLISHED = REPOSITORY / "results" / "published"
EXPERIMENTS = REPOSITORY / "experiments"

# The reproduction check: a few cells of the few-connections run (cheap: 120 s, no churn).
REPRODUCED = "few-connections"
REPRODUCED_MODES = ["iptables", "ipvs-lc", "ipvs-sh"]
REPRODUCED_SEEDS = [1, 2]
REPRODUCED_POINTS = {"workload.connections": [12, 300]}


def published_runs() -> list[Path]:
    return find_published_runs(PUBLISHED)


def sim_run(experiment: str) -> Path:
    matches = [p for p in published_runs() if p.parent.name == experiment
               and json.loads((p / "run.json").read_text())["backend"] == "sim"]
    assert matches, f"no published sim run of {experiment} under {PUBLISHED}"
    return matches[-1]


def test_every_experiment_has_a_published_sim_run() -> None:
    runs = published_runs()
    assert runs, "nothing under results/published/"
    sim = {p.parent.name for p in runs
           if json.loads((p / "run.json").read_text())["backend"] == "sim"}
    catalogue = {p.stem for p in EXPERIMENTS.glob("*.yaml")
                 if p.stem not in {"_sample", "quickstart", "sim-large"}
                 and not p.stem.startswith("calibration-")}
    assert catalogue <= sim, f"experiments without a published sim run: {catalogue - sim}"


def test_published_runs_total_under_40_mb() -> None:
    total = sum(f.stat().st_size for f in PUBLISHED.rglob("*")
                if f.is_file() and FIGURES_FOLDER not in f.relative_to(PUBLISHED).parts)
    assert total < 40 * 1024 * 1024, f"results/published/ holds {total / 2**20:.1f} MB"


@pytest.mark.parametrize("path", published_runs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_published_run_loads(path: Path) -> None:
    run = load_run(path)
    assert run.manifest["status"] == "COMPLETED"
    assert run.manifest["experiment"] == path.parent.name
    config = Experiment.model_validate(run.manifest["config"])
    assert config.claims, f"{path}: an experiment of the catalogue states no claim"
    assert config.description.strip()
    assert len(run.samples) and set(run.samples["cell_id"]) <= {c["cell_id"] for c in run.cells}
    assert all(c["status"] in ("COMPLETED", "UNSUPPORTED") for c in run.cells)
    if run.manifest["backend"] == "sim":
        assert all(c["status"] == "COMPLETED" for c in run.cells)
        assert len(config.seed_list) >= 10, f"{path}: too few seeds for tight intervals"
    summary = path / "report" / "summary.md"
    assert summary.is_file(), f"{path}: the committed report is missing"
    kind = "modelled" if run.manifest["backend"] == "sim" else "measured"
    assert kind in summary.read_text()


def test_figures_render_from_published_runs(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "results" / "published"
    shutil.copytree(PUBLISHED, copy, ignore=shutil.ignore_patterns(FIGURES_FOLDER, ".*"))
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert main(["figures"]) == 0
    finally:
        os.chdir(cwd)
    index = Path(capsys.readouterr().out.strip().splitlines()[-1])
    index = index if index.is_absolute() else tmp_path / index
    assert index == copy / FIGURES_FOLDER / "README.md"
    text = index.read_text()
    for path in find_published_runs(copy):
        config = json.loads((path / "run.json").read_text())
        assert f"## {config['experiment']} — backend" in text
    linked = [line[line.index("](") + 2:-1] for line in text.splitlines()
              if line.startswith("![")]
    assert linked, "the figures index links no figure"
    for relative in linked:
        png = index.parent / relative
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", relative


def _metrics(path: Path, cell_ids: set[str]) -> pd.DataFrame:
    run = load_run(path)
    config = Experiment.model_validate(run.manifest["config"])
    cells = [c for c in run.cells if c["cell_id"] in cell_ids]
    assert {c["cell_id"] for c in cells} == cell_ids
    frame = cell_metrics(run.samples, run.events, run.connections, cells,
                         config.duration_seconds, config.first_event_at)
    return frame.sort_values("cell_id", ignore_index=True)


def test_rerunning_a_published_sim_run_reproduces_its_metrics(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    committed = sim_run(REPRODUCED)
    manifest = json.loads((committed / "run.json").read_text())
    config = manifest["config"]
    assert set(REPRODUCED_MODES) <= set(config["modes"])
    assert set(REPRODUCED_SEEDS) <= set(Experiment.model_validate(config).seed_list)
    for key, values in REPRODUCED_POINTS.items():
        assert set(values) <= set(config["sweep"][key])
    config_file = tmp_path / "rerun.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    code = main(["run", str(config_file), "--backend", "sim", "--no-report",
                 "--out", str(tmp_path / "runs"),
                 "--set", f"modes={json.dumps(REPRODUCED_MODES)}",
                 "--set", f"seeds={json.dumps(REPRODUCED_SEEDS)}",
                 "--set", f"sweep={json.dumps(REPRODUCED_POINTS)}"])
    assert code == 0
    rerun = Path(capsys.readouterr().out.strip().splitlines()[-1])
    cell_ids = {c["cell_id"] for c in json.loads((rerun / "run.json").read_text())["cells"]}
    assert len(cell_ids) == (len(REPRODUCED_MODES) * len(REPRODUCED_SEEDS)
                             * len(REPRODUCED_POINTS["workload.connections"]))
    expected = _metrics(committed, cell_ids)
    actual = _metrics(rerun, cell_ids)
    pd.testing.assert_frame_equal(actual, expected, check_exact=True)


def test_rerunning_a_published_rollout_reproduces_its_metrics(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run with churn (a rollout: server-announced closes, reconnects, refusals) as well."""
    committed = sim_run("rolling-update")
    config = json.loads((committed / "run.json").read_text())["config"]
    config_file = tmp_path / "rerun.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    code = main(["run", str(config_file), "--backend", "sim", "--no-report",
                 "--out", str(tmp_path / "runs"), "--set", "modes=[iptables, ipvs-sh]",
                 "--set", "seeds=[1, 2]"])
    assert code == 0
    rerun = Path(capsys.readouterr().out.strip().splitlines()[-1])
    cell_ids = {c["cell_id"] for c in json.loads((rerun / "run.json").read_text())["cells"]}
    assert cell_ids == {"iptables-s1", "iptables-s2", "ipvs-sh-s1", "ipvs-sh-s2"}
    pd.testing.assert_frame_equal(_metrics(rerun, cell_ids), _metrics(committed, cell_ids),
                                  check_exact=True)


def _report_tables(path: Path, run_id: str) -> dict[str, str]:
    """The run's summary.csv and verdicts.csv as `kpbench report` writes them, computed now
    from its tables (with `run_id` in the run_id column)."""
    data = prepare_run(path)
    tables = {"summary.csv": summary_table([data]),
              "verdicts.csv": verdicts_frame(claim_results([data]))}
    for frame in tables.values():
        frame["run_id"] = run_id
    return {name: frame.to_csv(index=False) for name, frame in tables.items()}


def test_rerunning_a_whole_published_sim_run_reproduces_its_summary_and_verdicts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """calibration-few (20 cells of 20 s) re-run from its recorded config: its per-mode summary
    (every metric's mean and 95% interval) and its verdicts equal the committed report's."""
    committed = sim_run("calibration-few")
    manifest = json.loads((committed / "run.json").read_text())
    config_file = tmp_path / "rerun.yaml"
    config_file.write_text(yaml.safe_dump(manifest["config"], sort_keys=False))
    code = main(["run", str(config_file), "--backend", "sim", "--no-report",
                 "--out", str(tmp_path / "runs")])
    assert code == 0
    rerun = Path(capsys.readouterr().out.strip().splitlines()[-1])
    for name, text in _report_tables(rerun, manifest["run_id"]).items():
        assert text == (committed / "report" / name).read_text(), name


LAB_RUNS = [p for p in published_runs()
            if json.loads((p / "run.json").read_text())["backend"] == "lab"]


@pytest.mark.parametrize("path", LAB_RUNS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_published_lab_report_follows_from_its_committed_tables(path: Path) -> None:
    """What this proves: the committed summary and verdicts of a lab run (the numbers the
    README quotes) are what today's analysis computes from the committed samples, events and
    connections, with nothing edited by hand and no drift in the metrics since. It does not
    prove that the lab would measure the same again: that is what the seeds' intervals say."""
    manifest = json.loads((path / "run.json").read_text())
    for name, text in _report_tables(path, manifest["run_id"]).items():
        assert text == (path / "report" / name).read_text(), f"{path}/report/{name}"
