"""`kpbench findings`: the claims catalogue judged on published runs, lab first.

Synthetic published trees are built in tmp_path from copies of real published runs (a few
hundred kB each), edited where a case needs it; one module-scoped evaluation of the real
catalogue over the real results/published/ checks that the committed claims table, the README's
block and the figures' data are exactly what the runs give today.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.claim_figures import (
    claims_frame,
    make_figures,
    new_pod_share_frame,
    ready_order_load_frame,
    scale_frame,
    write_csv,
)
from analysis.claims import (
    CATALOGUE,
    MODES,
    Evaluation,
    evaluate,
    load_catalogue,
)
from analysis.findings import CLAIMS_FOLDER, README_BEGIN, README_END, block, write_findings
from kpbench.cli import main

REPOSITORY = Path(__file__).resolve().parent.parent
PUBLISHED = REPOSITORY / "results" / "published"
EXPERIMENTS = REPOSITORY / "experiments"
README = REPOSITORY / "README.md"



def published_sim_run(experiment: str) -> str:
    """`<experiment>/<run_id>` of the published sim run (regenerated with every model change)."""
    (run,) = [p.parent for p in (PUBLISHED / experiment).glob("*/run.json")
              if json.loads(p.read_text())["backend"] == "sim"]
    return f"{experiment}/{run.name}"


ROLLING_LAB = "rolling-update-lab/20261126T073448Z-bac2e0"
ROLLING_SIM = published_sim_run("rolling-update-lab")
ROLLING_IPVS_LAB = "rolling-update-ipvs-lab/20261129T113222Z-3c35cb"
ROLLING_IPVS_SIM = published_sim_run("rolling-update-ipvs-lab")
MEANING = {"CONFIRMED": "it holds.", "REFUTED": "it does not.", "INCONCLUSIVE": "unsure."}


def _copy_runs(root: Path, *runs: str) -> None:
    for run in runs:
        shutil.copytree(PUBLISHED / run, root / run, ignore=shutil.ignore_patterns("locust"))


def _edit_manifest(path: Path, edit: object) -> None:
    manifest = json.loads((path / "run.json").read_text())
    edit(manifest)  # type: ignore[operator]
    (path / "run.json").write_text(json.dumps(manifest))


def _rows(*rows: dict[str, object]) -> dict[str, object]:
    return copy.deepcopy(
        {"claims": [{"holds_when": "CONFIRMED", "meaning": MEANING, **row} for row in rows]})


def _tree(tmp_path: Path, catalogue: dict[str, object]) -> tuple[Path, Path, Path, Path]:
    published = tmp_path / "published"
    experiments = tmp_path / "experiments"
    (experiments / "lab").mkdir(parents=True)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{README_BEGIN}\nold table\n{README_END}\n\nafter\n")
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(catalogue, sort_keys=False))
    return published, experiments, readme, path


ROLLOUT = {"experiment": "rolling-update-lab", "claim": "rollout-leaves-load-unbalanced"}
ROLLOUT_IPVS = {"experiment": "rolling-update-ipvs-lab", "claim": "rollout-leaves-load-unbalanced"}


def test_lab_first_with_the_model_beside_it_and_disagreements_flagged(tmp_path: Path) -> None:
    published, experiments, readme, catalogue = _tree(tmp_path, _rows(
        {"id": "rollout", "article": "a rollout unbalances", "sim": ROLLOUT,
         "lab": [ROLLOUT, ROLLOUT_IPVS], "figures": ["ready-order-load"]},
        {"id": "scale", "article": "ipvs scales", "not_measured": "being built"}))
    _copy_runs(published, ROLLING_LAB, ROLLING_SIM, ROLLING_IPVS_LAB, ROLLING_IPVS_SIM)

    def stricter(manifest: dict) -> None:  # the twin's claim made stricter: REFUTED in sim
        for claim in manifest["config"]["claims"]:
            if claim["id"] == "rollout-leaves-load-unbalanced":
                claim["expect"] = "> 1.7"

    _edit_manifest(published / ROLLING_SIM, stricter)
    written = write_findings(published, readme, experiments, catalogue)
    found = {(f.row.id, f.mode): f for f in written.evaluation.findings}
    assert len(found) == 2 * len(MODES)

    nft = found[("rollout", "nftables")]
    assert nft.measured is not None and nft.measured.backend == "lab"
    assert nft.measured.verdict == "CONFIRMED" and nft.measured.seeds == 3
    assert nft.twin is not None and nft.twin.backend == "sim" and nft.twin.verdict == "REFUTED"
    assert nft.agreement == "DISAGREE"
    # the host run predates per-cell kernels: the run's own record, said to be that
    assert [(k.placement, k.source) for k in nft.measured.kernels] == [("host", "run")]
    ipt = found[("rollout", "iptables")]
    assert (ipt.measured.verdict, ipt.twin.verdict, ipt.agreement) == (  # type: ignore[union-attr]
        "INCONCLUSIVE", "REFUTED", "differ")
    rr = found[("rollout", "ipvs-rr")]
    assert rr.measured is not None and rr.measured.experiment == "rolling-update-ipvs-lab"
    assert [(k.placement, k.release, k.accel) for k in rr.measured.kernels] == [
        ("vm", "6.1.0-57-amd64", "tcg")]
    assert rr.twin is not None and rr.twin.verdict == "CONFIRMED" and rr.agreement == "agree"
    assert rr.model is None and rr.no_model == "rolling-update-lab does not run this mode"
    for mode in MODES:
        pending = found[("scale", mode)]
        assert pending.measured is None and pending.model is None
        assert pending.not_measured == "being built"

    table = (written.folder / "README.md").read_text()
    assert "**DISAGREE**" in table and "differ (one inconclusive)" in table
    assert "VM 6.1.0-57-amd64 (tcg)" in table
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith(f"{README_END}\n\nafter\n")
    assert "old table" not in text and "| **rollout**: a rollout unbalances." in text
    claims = pd.read_csv(written.folder / "claims.csv")
    assert len(claims) == 2 * len(MODES)
    assert set(claims.loc[claims["lab_mean"].notna(), "lab_verdict"]) <= {
        "CONFIRMED", "REFUTED", "INCONCLUSIVE"}
    figures = {f.name for f in written.figures}
    assert figures == {"claims", "rolling-update-pod-load"}
    for name in figures:
        assert (written.folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (written.folder / f"{name}.csv").is_file()
    load = pd.read_csv(written.folder / "rolling-update-pod-load.csv")
    assert set(load["backend"]) == {"lab", "sim"}
    assert set(load["mode"]) == {"iptables", "nftables", "ipvs-rr", "ipvs-lc", "ipvs-sh"}

    # regenerating from the same runs gives the same bytes, tables and figures alike
    before = {p.name: p.read_bytes() for p in written.folder.iterdir()}
    readme_before = readme.read_text()
    again = write_findings(published, readme, experiments, catalogue)
    assert {p.name: p.read_bytes() for p in again.folder.iterdir()} == before
    assert readme.read_text() == readme_before


def test_the_newest_lab_run_is_used_and_missing_modes_say_why(tmp_path: Path) -> None:
    few = {"experiment": "few-connections-lab", "claim": "kube-proxy-balances-connections",
           "point": {"workload.connections": 12}}
    few_ipvs = {**few, "experiment": "few-connections-ipvs-lab"}
    published, experiments, _readme, catalogue = _tree(tmp_path, _rows(
        {"id": "few", "article": "few connections skew", "holds_when": "REFUTED",
         "sim": few, "lab": [few, few_ipvs]}))
    _copy_runs(published, "few-connections-lab/20261126T072112Z-45e669",
               "few-connections-lab/20261126T101650Z-a2acd0",
               published_sim_run("few-connections-lab"))
    shutil.copy(EXPERIMENTS / "lab" / "few-connections-ipvs-lab.yaml", experiments / "lab")
    evaluation = evaluate(load_catalogue(catalogue), published, experiments, catalogue)
    found = {f.mode: f for f in evaluation.findings}
    assert found["iptables"].measured is not None
    assert found["iptables"].measured.run_id == "20261126T101650Z-a2acd0"  # 10 seeds, newer
    assert found["iptables"].measured.seeds == 10
    assert found["iptables"].measured.point == "connections=12"
    assert found["ipvs-rr"].measured is None
    assert found["ipvs-rr"].not_measured == (
        "the lab variant few-connections-ipvs-lab has this mode; no lab run of it in this mode "
        "is published yet")
    assert found["ipvs-rr"].no_model == "few-connections-lab does not run this mode"

    few_ipvs["not_yet"] = {"ipvs-rr": "not run yet: the VM was busy"}
    _tree(tmp_path / "why", _rows({"id": "few", "article": "few connections skew",
                                   "holds_when": "REFUTED", "sim": few, "lab": [few, few_ipvs]}))
    why = load_catalogue(tmp_path / "why" / "claims.yaml")
    evaluation = evaluate(why, published, experiments, catalogue)
    found = {f.mode: f for f in evaluation.findings}
    assert found["ipvs-rr"].not_measured == (
        "the lab variant few-connections-ipvs-lab has this mode; not run yet: the VM was busy")
    assert found["ipvs-lc"].not_measured.endswith("no lab run of it in this mode is published yet")


@pytest.mark.parametrize(("change", "key"), [
    (lambda c: c["claims"][0].pop("meaning"), "claims.0.meaning"),
    (lambda c: c["claims"][0]["meaning"].pop("REFUTED"), "claims.0"),
    (lambda c: c["claims"][0].update(colour="red"), "claims.0.colour"),
    (lambda c: c["claims"][0]["lab"][0].update(claim="no-such-claim"), "claims.0.lab.0.claim"),
    (lambda c: c["claims"][0]["sim"].update(point={"workload.connections": 12}),
     "claims.0.sim.point"),
    (lambda c: c["claims"].append(dict(c["claims"][0])), "claim ids repeat"),
    (lambda c: c["claims"][0]["lab"][0].update(not_yet={"ipvs-xx": "later"}),
     "claims.0.lab.0.not_yet"),
])
def test_a_bad_catalogue_is_one_line_exit_2_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], change: object, key: str) -> None:
    catalogue = _rows({"id": "rollout", "article": "a rollout unbalances", "sim": ROLLOUT,
                       "lab": [dict(ROLLOUT)]})
    change(catalogue)  # type: ignore[operator]
    published, experiments, readme, path = _tree(tmp_path, catalogue)
    _copy_runs(published, ROLLING_LAB, ROLLING_SIM)
    text = readme.read_text()
    code = main(["findings", "--published", str(published), "--readme", str(readme),
                 "--experiments", str(experiments), "--catalogue", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("kpbench: ") and key in err[0], err
    assert not (published / CLAIMS_FOLDER).exists()
    assert readme.read_text() == text


def test_a_readme_without_the_markers_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    published, experiments, readme, path = _tree(tmp_path, _rows(
        {"id": "rollout", "article": "a rollout unbalances", "sim": ROLLOUT}))
    _copy_runs(published, ROLLING_SIM)
    readme.write_text("# no markers\n")
    code = main(["findings", "--published", str(published), "--readme", str(readme),
                 "--experiments", str(experiments), "--catalogue", str(path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(readme) in err[0] and "claims-table:begin" in err[0]
    assert not (published / CLAIMS_FOLDER).exists()
    assert readme.read_text() == "# no markers\n"


# --- the real catalogue over the real published runs ----------------------------------------------


@pytest.fixture(scope="module")
def real() -> Evaluation:
    return evaluate(load_catalogue(CATALOGUE), PUBLISHED, EXPERIMENTS, CATALOGUE)


def test_the_catalogue_covers_the_article_and_measures_first(real: Evaluation) -> None:
    ids = [row.id for row in real.catalogue.claims]
    assert {"rolling-update-imbalance", "rr-varying-lifetimes", "hpa-new-pods-idle",
            "lc-per-node", "sh-balance", "periodic-reconnects", "reconnect-after-requests",
            "l7-proxy", "ipvs-scalability"} <= set(ids)
    for finding in real.findings:
        if finding.measured is not None:
            assert finding.measured.backend == "lab"  # a modelled number is never "measured"
            assert finding.measured.kernels, f"{finding.row.id}/{finding.mode}: no kernel"
            assert finding.twin is None or finding.twin.backend == "sim"
        elif finding.scale is not None:  # measured by `kpbench scale`: timings, not cells
            assert finding.scale.kernels, f"{finding.row.id}/{finding.mode}: no kernel"
        else:
            assert finding.not_measured, f"{finding.row.id}/{finding.mode}: no reason"
        assert finding.model is None or finding.model.backend == "sim"
    measured = {(f.row.id, f.mode) for f in real.findings if f.measured is not None}
    assert {("rolling-update-imbalance", m) for m in MODES} <= measured
    assert ("lc-per-node", "ipvs-lc") in measured and ("sh-balance", "ipvs-sh") in measured


def test_the_committed_claims_table_is_what_the_published_runs_give(
        real: Evaluation, tmp_path: Path) -> None:
    """`kpbench findings` was run after the last change to the runs or the catalogue: its
    tables, the figures' data and the README's block regenerate to the same bytes."""
    committed = PUBLISHED / CLAIMS_FOLDER
    claims = claims_frame(real.findings)
    for name, frame in (("claims", claims),
                        ("rolling-update-pod-load", ready_order_load_frame(real)),
                        ("hpa-new-pod-share", new_pod_share_frame(real)),
                        ("scale", scale_frame(real))):
        write_csv(frame, tmp_path / f"{name}.csv")
        regenerated = (tmp_path / f"{name}.csv").read_bytes()
        assert regenerated == (committed / f"{name}.csv").read_bytes(), (
            f"{name}.csv differs from the committed one: run `kpbench findings`")
    text = README.read_text()
    inside = text[text.index(README_BEGIN) + len(README_BEGIN) + 1:text.index(README_END)]
    assert inside == block(real), "the README's claims table is stale: run `kpbench findings`"
    for line in (committed / "README.md").read_text().splitlines():
        if line.startswith("!["):
            assert (committed / line[line.index("](") + 2:-1]).is_file(), line
    figures = make_figures(real, claims, tmp_path / "once")
    again = make_figures(real, claims, tmp_path / "twice")
    assert [f.name for f in figures] == ["claims", "rolling-update-pod-load", "hpa-new-pod-share",
                                         "scale"]
    for first, second in zip(figures, again, strict=True):
        assert first.path.read_bytes() == second.path.read_bytes(), first.name


# --- the scale claim, on synthetic `kpbench scale` runs -------------------------------------------


def _scale_run(root: Path, run_id: str, status: str, rows: list[dict]) -> Path:
    folder = root / "scale" / run_id
    (folder / "points").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(
        {"kind": "scale", "experiment": "scale", "run_id": run_id, "status": status,
         "placements": {row["placement"]: {} for row in rows}}))
    for number, row in enumerate(rows, start=1):
        (folder / "points" / f"{number:05d}.json").write_text(json.dumps(row))
    return folder


SCALE_ROW = {"id": "ipvs-scalability", "article": "ipvs scales", "scale": {"experiment": "scale"},
             "not_measured": "the scheduler does not change the rules",
             "not_modelled": "not modelled (the simulator has no timing of rule programming)"}


def test_the_scale_claim_per_mode_with_its_kernels_and_the_vm_verdict(tmp_path: Path) -> None:
    from analysis.published import find_published_runs

    from .test_scale import synthetic_rows

    slow, fast = ([500, 510, 520], [8.0, 8.5, 9.0], [20.0, 21.0, 22.0]), \
        ([300, 305, 310], [25.0, 26.0, 27.0], [10.0, 10.5, 11.0])
    rows = [*synthetic_rows("host", "iptables", 100, *fast),
            *synthetic_rows("host", "iptables", 3000, *slow),
            *synthetic_rows("host", "nftables", 3000, *fast),
            *synthetic_rows("vm", "iptables", 300, *slow),
            *synthetic_rows("vm", "nftables", 300, *fast),
            *synthetic_rows("vm", "ipvs-rr", 300, *fast),
            *synthetic_rows("vm", "ipvs-lc", 300, *slow)]
    published, experiments, readme, catalogue = _tree(tmp_path, _rows(
        SCALE_ROW, {"id": "rollout", "article": "a rollout unbalances", "sim": ROLLOUT}))
    _copy_runs(published, ROLLING_SIM)
    _scale_run(published, "20261201T000000Z-aaaaaa", "COMPLETED", rows)
    _scale_run(published, "20261130T000000Z-bbbbbb", "COMPLETED", rows[:3])  # older
    _scale_run(published, "20261202T000000Z-cccccc", "INTERRUPTED", rows[:1])  # not complete
    written = write_findings(published, readme, experiments, catalogue)
    found = {f.mode: f for f in written.evaluation.findings if f.row.id == "ipvs-scalability"}

    ipt = found["iptables"].scale
    assert ipt is not None and ipt.verdict is None
    assert [p.name for p in ipt.paths] == ["20261201T000000Z-aaaaaa"]
    assert [(p.placement, p.services, p.repeats) for p in ipt.points] == [
        ("host", 3000, 3), ("vm", 300, 3)]  # the largest measured per placement
    assert [k.text() for k in ipt.kernels] == ["host 6.18.44", "VM 6.1.0-57-amd64 (tcg)"]
    assert ipt.points[0].connect_us.mean == pytest.approx(510)
    rr = found["ipvs-rr"].scale
    assert rr is not None and rr.verdict == "REFUTED"  # faster connects, slower full sync
    assert "connect latency better, full sync worse, incremental sync better" in rr.note
    lc = found["ipvs-lc"].scale
    assert lc is not None and lc.verdict == "INCONCLUSIVE"  # the same timings as iptables
    sh = found["ipvs-sh"]
    assert sh.scale is None and sh.not_measured == (
        "not in the scale run scale/20261201T000000Z-aaaaaa (its modes: iptables, nftables, "
        "ipvs-rr, ipvs-lc); the scheduler does not change the rules")
    for finding in found.values():
        assert finding.measured is None and finding.twin is None and finding.model is None
        assert finding.no_model == finding.no_twin == SCALE_ROW["not_modelled"]
    assert found["ipvs-rr"].headline_verdict == ("REFUTED", "measured")

    table = readme.read_text()
    assert ("VM 6.1.0-57-amd64 (tcg), 300 Services, 3 repeats: connect 305 [293, 317] µs, "
            "full sync 26.00 [23.52, 28.48] s") in table
    assert "| ipvs-rr |" in table and "**REFUTED** (scale; against iptables in VM" in table
    assert "not modelled (the simulator has no timing of rule programming)" in table
    assert "Measured REFUTED in ipvs-rr: it does not." in table
    claims = pd.read_csv(written.folder / "claims.csv")
    chosen = claims[claims["claim"] == "ipvs-scalability"].set_index("mode")
    assert chosen.loc["ipvs-rr", "scale_verdict"] == "REFUTED"
    assert chosen.loc["iptables", "lab_kernel"] == "host 6.18.44; VM 6.1.0-57-amd64 (tcg)"
    assert chosen["lab_mean"].isna().all()  # nothing of it is a cell's claim value
    assert "scale/20261201T000000Z-aaaaaa" in (written.folder / "README.md").read_text()
    # `kpbench figures` draws cell runs only; a scale run brings its own figure
    assert [p.name for p in find_published_runs(published)] == [ROLLING_SIM.split("/")[1]]


def test_a_newer_run_of_one_placement_replaces_only_its_points(tmp_path: Path) -> None:
    from .test_scale import synthetic_rows

    slow, fast = ([500, 510, 520], [8.0, 8.5, 9.0], [20.0, 21.0, 22.0]), \
        ([300, 305, 310], [25.0, 26.0, 27.0], [10.0, 10.5, 11.0])
    both = [*synthetic_rows("host", "iptables", 3000, *slow),
            *synthetic_rows("vm", "iptables", 300, *slow),
            *synthetic_rows("vm", "ipvs-rr", 300, *slow)]
    vm_only = [*synthetic_rows("vm", "iptables", 1000, *slow),
               *synthetic_rows("vm", "ipvs-rr", 1000, *fast)]
    published, experiments, _readme, catalogue = _tree(tmp_path, _rows(SCALE_ROW))
    _scale_run(published, "20261201T000000Z-aaaaaa", "COMPLETED", both)
    _scale_run(published, "20261202T000000Z-bbbbbb", "COMPLETED", vm_only)  # `--only vm`
    evaluation = evaluate(load_catalogue(catalogue), published, experiments, catalogue)
    found = {f.mode: f.scale for f in evaluation.findings}
    ipt, rr = found["iptables"], found["ipvs-rr"]
    assert ipt is not None and rr is not None
    assert [(p.placement, p.services) for p in ipt.points] == [("host", 3000), ("vm", 1000)]
    assert [p.name for p in ipt.paths] == ["20261201T000000Z-aaaaaa", "20261202T000000Z-bbbbbb"]
    assert [p.name for p in rr.paths] == ["20261202T000000Z-bbbbbb"]
    assert rr.verdict == "REFUTED"  # judged on the newer VM points only
    drawn = scale_frame(evaluation)  # the README's scale figure: the same points
    assert sorted(zip(drawn["placement"], drawn["mode"], drawn["services"], strict=True)) == [
        ("host", "iptables", 3000), ("vm", "iptables", 1000), ("vm", "ipvs-rr", 1000)]


def test_a_scale_row_without_a_published_run_says_where_it_would_be(tmp_path: Path) -> None:
    published, experiments, _readme, catalogue = _tree(tmp_path, _rows(SCALE_ROW))
    published.mkdir()
    evaluation = evaluate(load_catalogue(catalogue), published, experiments, catalogue)
    for finding in evaluation.findings:
        assert finding.scale is None and finding.not_measured.startswith(
            "no completed published run of the scale experiment scale")
    bad = _rows({**SCALE_ROW, "sim": ROLLOUT})
    _p, _e, _r, path = _tree(tmp_path / "bad", bad)
    with pytest.raises(Exception, match="a scale row has no sim or lab entries"):
        load_catalogue(path)
