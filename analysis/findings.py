"""`kpbench findings`: write the claims report and the README's claims table.

From the catalogue and the runs under results/published/ (`analysis.claims.evaluate`) it
writes `results/published/claims/`: `README.md` (the comparative report), `claims.csv` (one row
per claim and mode) and the README's figures, each PNG with its data as CSV. The folder is
built in a temporary folder and swapped in. Then it rewrites the block of the repository's
README between `README_BEGIN` and `README_END`, and nothing else. Nothing here carries a date,
so regenerating from the same runs gives the same tables.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from analysis.claim_figures import claims_frame, make_figures, write_csv
from analysis.claims import (
    CATALOGUE,
    Evaluation,
    Finding,
    FindingsError,
    Judgement,
    Row,
    evaluate,
    load_catalogue,
    value_text,
)
from analysis.figures import FigureInfo
from analysis.published import rebuilt_folder
from analysis.report import METRIC_INFO
from analysis.scale import SCALE_RULE

CLAIMS_FOLDER = "claims"
README_BEGIN = "<!-- claims-table:begin (written by `kpbench findings`; do not edit) -->"
README_END = "<!-- claims-table:end -->"


@dataclass
class Written:
    folder: Path
    readme: Path
    evaluation: Evaluation
    figures: list[FigureInfo]


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _digits(finding: Finding) -> int:
    return METRIC_INFO[finding.metric][1] if finding.metric in METRIC_INFO else 2


def _judged(judgement: Judgement, digits: int, name: bool) -> str:
    """`1.58 [1.18, 1.98] CONFIRMED (rolling-update-lab, 3 seeds)`."""
    verdict = f" **{judgement.verdict}**" if judgement.verdict else " not judged"
    where = [judgement.experiment] if name else []
    if judgement.point:
        where.append(f"at {judgement.point}")
    where.append(f"{judgement.seeds} seed{'s' if judgement.seeds != 1 else ''}")
    note = f"; {judgement.note}" if judgement.note else ""
    return f"{value_text(judgement, digits)}{verdict} ({', '.join(where)}{note})"


def _claim_cell(row: Row, finding: Finding) -> str:
    if finding.metric:
        judged = (f" Judged by `{finding.metric} {finding.expect}`; the article holds when "
                  f"{row.holds_when}.")
    elif row.scale is not None:
        judged = (f" Measured by `kpbench scale` (mean over repeats, 95% t-interval) and "
                  f"{SCALE_RULE}; the article holds when {row.holds_when}.")
    else:
        judged = ""
    return f"**{row.id}**: {row.article}.{judged}"


def table_lines(evaluation: Evaluation) -> list[str]:
    """The claims table: one line per claim and mode, the lab's measurement first."""
    lines = ["| claim | mode | measured on the lab | nodes' kernel | modelled, same experiment "
             "| lab vs model | modelled, article scale |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in evaluation.catalogue.claims:
        findings = evaluation.of(row)
        if row.pending:
            lines.append(f"| {_md(_claim_cell(row, findings[0]))} | all | "
                         f"{_md(row.not_measured)} | | | | |")
            continue
        first = next((f for f in findings if f.metric), findings[0])
        for number, finding in enumerate(findings):
            digits = _digits(first)
            judged = finding.scale or finding.measured
            if finding.scale is not None:
                measured = finding.scale.text()
            elif finding.measured is not None:
                measured = _judged(finding.measured, digits, name=True)
            else:
                measured = f"not measured here: {finding.not_measured}"
            kernel = "; ".join(k.text() for k in judged.kernels) if judged else ""
            twin = (_judged(finding.twin, digits, name=False) if finding.twin
                    else finding.no_twin)
            model = (_judged(finding.model, digits, name=True) if finding.model
                     else finding.no_model)
            agreement = {"DISAGREE": "**DISAGREE**", "differ": "differ (one inconclusive)"}.get(
                finding.agreement, finding.agreement)
            claim = _claim_cell(row, first) if number == 0 else ""
            lines.append("| " + " | ".join(_md(cell) for cell in (
                claim, finding.mode, measured, kernel, twin, agreement, model)) + " |")
    return lines


def meaning_lines(evaluation: Evaluation) -> list[str]:
    """Per claim, what its outcome means for an operator: the catalogue's sentence for each
    verdict the lab gave (else the article-scale model's, said to be modelled)."""
    lines = []
    for row in evaluation.catalogue.claims:
        if row.pending:
            lines.append(f"- **{row.id}**: {row.not_measured}.")
            continue
        groups: dict[tuple[str, str], list[str]] = {}
        for finding in evaluation.of(row):
            headline = finding.headline_verdict
            if headline is not None:
                groups.setdefault(headline[::-1], []).append(finding.mode)
        parts = []
        for kind in ("measured", "modelled"):
            for (which, verdict), modes in groups.items():
                if which != kind:
                    continue
                prefix = "Measured" if kind == "measured" else "Modelled only,"
                parts.append(f"{prefix} {verdict} in {', '.join(modes)}: "
                             f"{row.meaning[verdict]}")  # type: ignore[index]
        split = [f.mode for f in evaluation.of(row) if f.agreement in ("DISAGREE", "differ")]
        if split:
            parts.append(f"The lab and the model give different verdicts in {', '.join(split)}.")
        reasons = {f.not_measured for f in evaluation.of(row)}
        none = ("No verdict in any mode: " + reasons.pop() + "." if len(reasons) == 1
                and "" not in reasons else "No verdict in any mode.")
        lines.append(f"- **{row.id}**: " + " ".join(parts or [none]))
    return lines


def block(evaluation: Evaluation) -> str:
    """What `kpbench findings` writes between the README's markers."""
    return "\n".join([
        *table_lines(evaluation), "",
        "What it means for an operator (the lab's verdict where it measured the mode):", "",
        *meaning_lines(evaluation)]) + "\n"


INTRO = """\
Every claim of the article, per kube-proxy mode, as **measured** on the lab (backend `lab`:
kube-proxy's rules in a real kernel's data plane, the real server and Locust; iptables and
nftables on the host's kernel, the IPVS modes with the nodes in a stock kernel in a VM), beside
the simulator's **modelled** value for the same experiment file and at the article's scale.
Values are the mean over seeds with the 95% t-interval; CONFIRMED / REFUTED when the whole
interval satisfies / violates the judged claim, else INCONCLUSIVE. Where the lab and the model
give different verdicts the row says so: DISAGREE when one is CONFIRMED and the other REFUTED,
"differ" when one of them is INCONCLUSIVE. The two are never averaged. The newest published lab
run that has the mode is used; the catalogue (`analysis/claims.yaml`) names each claim's
experiments and sweep point. Regenerate with `kpbench findings`."""


def source_lines(evaluation: Evaluation) -> list[str]:
    lines = []
    for row in evaluation.catalogue.claims:
        lines += [f"### {row.id}", "", f"Article: {row.article}.", ""]
        if row.pending:
            lines += [f"{row.not_measured}.", ""]
            continue
        first = next((f for f in evaluation.of(row) if f.metric), None)
        if first is not None:
            lines += [f"Judged by the experiments' claim \"{first.claim_text}\" "
                      f"(`{first.metric} {first.expect}`); the article holds when "
                      f"{row.holds_when}.", ""]
        runs: dict[str, list[str]] = {}
        for finding in evaluation.of(row):
            for judgement, what in ((finding.measured, "measured"),
                                    (finding.twin, "modelled, same experiment"),
                                    (finding.model, "modelled, article scale")):
                if judgement is not None:
                    key = (f"`{judgement.path.as_posix()}` ({what}, backend "
                           f"{judgement.backend})")
                    runs.setdefault(key, []).append(finding.mode)
            for path in finding.scale.paths if finding.scale is not None else ():
                runs.setdefault(f"`{path.as_posix()}` (measured by `kpbench scale`)",
                                []).append(finding.mode)
            if finding.also_measured:
                runs.setdefault(f"also measured, not shown: {', '.join(finding.also_measured)}",
                                []).append(finding.mode)
        lines += [f"- {run}: {', '.join(modes)}" for run, modes in runs.items()]
        lines.append("")
    return lines


def report_markdown(evaluation: Evaluation, figures: Sequence[FigureInfo]) -> str:
    lines = ["# The article's claims: measured, and modelled", "", INTRO, "",
             *table_lines(evaluation), "", "## What it means for an operator", "",
             *meaning_lines(evaluation), "", "## Figures", ""]
    for figure in figures:
        lines += [f"### {figure.title}", "", f"![{figure.title}]({figure.path.name})", "",
                  figure.caption, ""]
    lines += ["## The runs behind each claim", "", *source_lines(evaluation)]
    return "\n".join(lines).rstrip("\n") + "\n"


def replace_block(text: str, content: str, where: Path) -> str:
    """`text` with everything between the markers replaced by `content`."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin or text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise FindingsError(f"{where}: needs exactly one '{README_BEGIN}' followed by one "
                            f"'{README_END}' line, where the claims table goes")
    return text[:begin + len(README_BEGIN)] + "\n" + content + text[end:]


def _write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def write_findings(published: Path = Path("results") / "published",
                   readme: Path = Path("README.md"), experiments: Path = Path("experiments"),
                   catalogue_path: Path = CATALOGUE) -> Written:
    """Evaluate, write `published/claims/` and the README block; return what was written.
    Every check (catalogue, runs, the README's markers) passes before anything is written."""
    catalogue = load_catalogue(catalogue_path)
    if not published.is_dir():
        raise FindingsError(f"{published}: no such folder of published runs")
    try:
        readme_text = readme.read_text()
    except OSError as exc:
        raise FindingsError(f"{readme}: cannot be read ({exc.strerror})") from None
    evaluation = evaluate(catalogue, published, experiments, catalogue_path)
    new_readme = replace_block(readme_text, block(evaluation), readme)
    target = published / CLAIMS_FOLDER
    with rebuilt_folder(target) as staging:
        claims = claims_frame(evaluation.findings)
        write_csv(claims, staging / "claims.csv")
        figures = make_figures(evaluation, claims, staging)
        (staging / "README.md").write_text(report_markdown(evaluation, figures))
    if new_readme != readme_text:
        _write_atomic(readme, new_readme)
    figures = [FigureInfo(f.name, f.title, f.caption, target / f.path.name) for f in figures]
    return Written(target, readme, evaluation, figures)
