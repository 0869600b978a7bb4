"""The article's claims against the published runs, measurements first (`kpbench findings`).

The catalogue (`analysis/claims.yaml`) ties each claim of the article to the experiment and
claim id that judge it: the modelled experiment at the article's scale (`sim`) and the lab
experiments that measure it (`lab`, one per group of modes). For every claim and every mode of
`MODES` this module finds the newest published lab run that has the mode, judges the claim on it
as the reports do (`analysis.report.claim_row`, one sweep point named in the catalogue), and
sets beside it the sim run of the same experiment file (the same config, modelled) and the sim
run at the article's scale. A lab and a model verdict that differ are flagged, never averaged.
A mode without a lab run says why. A row with `scale` is judged instead on the newest completed
published `kpbench scale` run of that experiment (`analysis.scale.scale_verdict`); such runs
have no cells and no model.

Pure core: `evaluate()` returns `Finding`s; `analysis.findings` writes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from analysis.report import claim_row
from analysis.runs import RunData, is_missing, point_label, prepare_run
from analysis.scale import (
    SCALE_RULE,
    ScalePoint,
    aggregate,
    load_points,
    scale_point,
    scale_verdict,
)
from kpbench.config import ConfigError, load

CATALOGUE = Path(__file__).with_name("claims.yaml")
MODES = ("iptables", "nftables", "ipvs-rr", "ipvs-lc", "ipvs-sh")
Verdict = Literal["CONFIRMED", "REFUTED", "INCONCLUSIVE"]
FigureKind = Literal["ready-order-load", "new-pod-share"]
NO_LAB_VARIANT = "no lab variant for this mode yet"


class FindingsError(ValueError):
    """The catalogue or the published runs cannot give the findings: one line says why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """An experiment (its folder under results/published/), one of its claims, and for a
    swept experiment the headline sweep point (a value for every swept key)."""

    experiment: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    claim: str
    point: dict[str, Any] = Field(default_factory=dict)
    not_yet: dict[str, str] = Field(default_factory=dict)

    @field_validator("not_yet")
    @classmethod
    def _modes(cls, reasons: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(reasons) - set(MODES))
        if unknown:
            raise ValueError(f"not a mode: {', '.join(unknown)} (modes: {', '.join(MODES)})")
        return reasons


class ScaleSource(_Strict):
    """A `kpbench scale` experiment (its folder under results/published/)."""

    experiment: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")


class Row(_Strict):
    """One claim of the article."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    article: str
    holds_when: Literal["CONFIRMED", "REFUTED"]
    sim: Source | None = None
    lab: list[Source] = Field(default_factory=list)
    scale: ScaleSource | None = None
    not_measured: str | None = None
    not_modelled: str | None = None
    meaning: dict[Verdict, str]
    figures: list[FigureKind] = Field(default_factory=list)

    @model_validator(mode="after")
    def _complete(self) -> Row:
        missing = [v for v in ("CONFIRMED", "REFUTED", "INCONCLUSIVE") if v not in self.meaning]
        if missing:
            raise ValueError(f"meaning: a sentence for {', '.join(missing)} is missing")
        if self.sim is None and not self.lab and self.scale is None and not self.not_measured:
            raise ValueError("without sim, lab or scale entries, not_measured must say why")
        if self.scale is not None and (self.sim is not None or self.lab):
            raise ValueError("scale: a scale row has no sim or lab entries (its runs have no "
                             "cells to judge)")
        return self

    @property
    def pending(self) -> bool:
        return self.sim is None and not self.lab and self.scale is None


class Catalogue(_Strict):
    claims: list[Row] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Catalogue:
        ids = [row.id for row in self.claims]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"claim ids repeat: {', '.join(repeated)}")
        return self


def load_catalogue(path: Path = CATALOGUE) -> Catalogue:
    """Read and validate the catalogue; a problem is one line naming the file and key."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise FindingsError(f"{path}: cannot be read ({exc.__class__.__name__})") from None
    except yaml.YAMLError as exc:
        raise FindingsError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    try:
        return Catalogue.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        raise FindingsError(f"{path}: {where}: {error['msg']}") from None


# --- what the published folder holds --------------------------------------------------------------


@dataclass(frozen=True)
class ScaleRun:
    """A published `kpbench scale` run as its run.json describes it."""

    path: Path
    experiment: str
    run_id: str
    status: str
    placements: frozenset[str]


@dataclass(frozen=True)
class PublishedRun:
    """A published run as its run.json describes it (loaded only when a finding needs it)."""

    path: Path
    experiment: str
    run_id: str
    backend: str
    completed_modes: frozenset[str]


class Published:
    """The runs under a published folder, loaded lazily and once each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: list[PublishedRun] = []
        self.scale_runs: list[ScaleRun] = []
        for manifest_path in sorted(root.glob("*/*/run.json")):
            try:
                manifest = json.loads(manifest_path.read_bytes())
                if manifest.get("kind") == "scale":
                    self.scale_runs.append(ScaleRun(
                        manifest_path.parent, str(manifest["experiment"]),
                        str(manifest["run_id"]), str(manifest["status"]),
                        frozenset(manifest.get("placements") or ())))
                    continue
                cells = manifest["cells"]
                self.runs.append(PublishedRun(
                    manifest_path.parent, str(manifest["experiment"]), str(manifest["run_id"]),
                    str(manifest["backend"]),
                    frozenset(c["mode"] for c in cells if c["status"] == "COMPLETED")))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise FindingsError(f"{manifest_path}: not a readable run manifest "
                                    f"({exc.__class__.__name__}: {exc})") from None
        self._loaded: dict[Path, RunData] = {}
        self._scale_tables: dict[Path, pd.DataFrame] = {}

    def newest(self, experiment: str, backend: str, mode: str | None = None
               ) -> PublishedRun | None:
        """The newest run (run ids start with their UTC start time) of `experiment` on
        `backend`, with a completed cell in `mode` when one is given."""
        found = [r for r in self.runs if r.experiment == experiment and r.backend == backend
                 and (mode is None or mode in r.completed_modes)]
        return max(found, key=lambda r: r.run_id, default=None)

    def data(self, run: PublishedRun) -> RunData:
        if run.path not in self._loaded:
            self._loaded[run.path] = prepare_run(run.path)
        return self._loaded[run.path]

    def newest_scale(self, experiment: str) -> dict[str, ScaleRun]:
        """Per placement (host, vm), the newest completed scale run of `experiment` that
        measured it (a `--only vm` run replaces only the VM's points)."""
        newest: dict[str, ScaleRun] = {}
        for run in sorted(self.scale_runs, key=lambda r: r.run_id):
            if run.experiment == experiment and run.status == "COMPLETED":
                newest |= dict.fromkeys(run.placements, run)
        return newest

    def scale_measurements(self, runs: dict[str, ScaleRun]) -> pd.DataFrame:
        """Each run's measurements (one row per repeat) of its own placement, together."""
        parts = []
        for placement, run in sorted(runs.items()):
            if run.path not in self._scale_tables:
                try:
                    self._scale_tables[run.path] = load_points(run.path)
                except (OSError, ValueError, KeyError) as exc:
                    raise FindingsError(f"{run.path}: not a readable scale run "
                                        f"({exc.__class__.__name__}: {exc})") from None
            table = self._scale_tables[run.path]
            parts.append(table[table["placement"] == placement])
        return pd.concat(parts, ignore_index=True)


# --- findings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """Where the nodes' data plane ran: the kernel release, `host` or `vm`, the VM's
    accelerator, and where that was read (`cell`: the cells' dataplane.kernel; `run`: the
    run's recorded host kernel, for runs whose cells predate that record)."""

    release: str
    placement: str
    accel: str
    source: str

    def text(self) -> str:
        where = {"host": "host", "vm": "VM"}.get(self.placement, self.placement)
        accel = f" ({self.accel})" if self.accel else ""
        recorded = " (the run's record, not the cells')" if self.source == "run" else ""
        return f"{where} {self.release}{accel}{recorded}".strip()


@dataclass(frozen=True)
class Judgement:
    """A claim judged on one run, one mode, one sweep point."""

    experiment: str
    run_id: str
    backend: str
    path: Path
    params: dict[str, Any]
    seeds: int
    mean: float
    low: float
    high: float
    verdict: str | None  # None: the claim does not cover this mode (the value is shown)
    note: str
    kernels: tuple[Kernel, ...] = ()

    @property
    def point(self) -> str:
        return point_label(self.params)


@dataclass(frozen=True)
class ScaleJudgement:
    """The scale claim in one mode: the mode's points at the largest Services measured per
    placement, and the verdict judged in the VM against iptables (None: not judged)."""

    experiment: str
    paths: tuple[Path, ...]
    points: tuple[ScalePoint, ...]
    verdict: str | None
    note: str

    @property
    def kernels(self) -> tuple[Kernel, ...]:
        return tuple(Kernel(p.kernel, p.placement, p.accel, "point") for p in self.points)

    def text(self) -> str:
        verdict = f" **{self.verdict}**" if self.verdict else " not judged"
        return (f"{'; '.join(p.text() for p in self.points)};{verdict} ({self.experiment}; "
                f"{self.note})")


@dataclass
class Finding:
    """One claim in one mode: measured, the same experiment modelled, the article's scale
    modelled, and why a missing one is missing."""

    row: Row
    mode: str
    claim_text: str = ""
    metric: str = ""
    expect: str = ""
    measured: Judgement | None = None
    twin: Judgement | None = None
    model: Judgement | None = None
    not_measured: str = ""
    no_twin: str = ""
    no_model: str = ""
    also_measured: list[str] = field(default_factory=list)
    scale: ScaleJudgement | None = None

    @property
    def agreement(self) -> str:
        """'agree', 'DISAGREE' (one CONFIRMED, the other REFUTED), 'differ' (one of them
        INCONCLUSIVE), or '' when there is no pair of verdicts to compare."""
        if self.measured is None or self.twin is None:
            return ""
        lab, sim = self.measured.verdict, self.twin.verdict
        if lab is None or sim is None:
            return ""
        if lab == sim:
            return "agree"
        return "differ" if "INCONCLUSIVE" in (lab, sim) else "DISAGREE"

    @property
    def headline_verdict(self) -> tuple[str, str] | None:
        """(verdict, 'measured' | 'modelled'): the lab's when it judged this mode, else the
        article-scale model's."""
        if self.scale is not None and self.scale.verdict:
            return self.scale.verdict, "measured"
        if self.measured is not None and self.measured.verdict:
            return self.measured.verdict, "measured"
        if self.model is not None and self.model.verdict:
            return self.model.verdict, "modelled"
        return None


@dataclass
class Evaluation:
    """Every finding, grouped by catalogue row, plus the runs they read."""

    catalogue: Catalogue
    findings: list[Finding]
    published: Published

    def of(self, row: Row) -> list[Finding]:
        return [f for f in self.findings if f.row.id == row.id]

    def scale_measurements(self) -> pd.DataFrame:
        """The measurements behind the scale rows: per experiment and placement, its newest
        completed run's (empty without one)."""
        parts = [self.published.scale_measurements(runs) for runs in (
            self.published.newest_scale(row.scale.experiment)
            for row in self.catalogue.claims if row.scale is not None) if runs]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def measured_pairs(self, row: Row) -> Iterator[tuple[Finding, RunData, RunData | None]]:
        """Per mode of `row` measured on the lab: the finding, its lab run, its sim twin."""
        for finding in self.of(row):
            if finding.measured is None:
                continue
            lab = self.published.data(self._ref(finding.measured))
            twin = self.published.data(self._ref(finding.twin)) if finding.twin else None
            yield finding, lab, twin

    def _ref(self, judgement: Judgement) -> PublishedRun:
        return next(r for r in self.published.runs if r.path == judgement.path)


def evaluate(catalogue: Catalogue, root: Path, experiments: Path,
             catalogue_path: Path = CATALOGUE) -> Evaluation:
    """Judge every catalogue row in every mode of MODES on the runs under `root`."""
    published = Published(root)
    context = _Context(published, experiments, catalogue_path)
    findings = [context.finding(index, row, mode)
                for index, row in enumerate(catalogue.claims) for mode in MODES]
    return Evaluation(catalogue, findings, published)


@dataclass
class _Context:
    published: Published
    experiments: Path
    catalogue_path: Path

    def key(self, index: int, *parts: object) -> str:
        return ".".join(["claims", str(index), *map(str, parts)])

    def finding(self, index: int, row: Row, mode: str) -> Finding:
        finding = Finding(row, mode)
        if row.pending:
            finding.not_measured = finding.no_model = row.not_measured or ""
            return finding
        if row.scale is not None:
            finding.no_twin = finding.no_model = row.not_modelled or "no sim experiment"
            self.judge_scale(row.scale, row, finding)
            return finding
        measured = []
        for number, source in enumerate(row.lab):
            run = self.published.newest(source.experiment, "lab", mode)
            if run is not None:
                where = self.key(index, "lab", number)
                measured.append((run, source, where))
        if measured:
            run, source, where = max(measured, key=lambda item: item[0].run_id)
            finding.measured = self.judge(run, source, mode, where, finding)
            finding.also_measured = [f"{r.experiment}/{r.run_id}" for r, _s, _w in measured
                                     if r is not run]
            twin = self.published.newest(source.experiment, "sim", mode)
            if twin is None:
                finding.no_twin = f"no published sim run of {source.experiment} in this mode"
            else:
                finding.twin = self.judge(twin, source, mode, where, finding)
        else:
            finding.not_measured = self.why_not_measured(index, row, mode)
        if row.sim is None:
            finding.no_model = "no sim experiment in the catalogue"
        else:
            run = self.published.newest(row.sim.experiment, "sim", mode)
            if run is None:
                any_run = self.published.newest(row.sim.experiment, "sim")
                finding.no_model = (f"{row.sim.experiment} does not run this mode" if any_run
                                    else f"no published sim run of {row.sim.experiment}")
            else:
                finding.model = self.judge(run, row.sim, mode, self.key(index, "sim"), finding)
        return finding

    def judge_scale(self, source: ScaleSource, row: Row, finding: Finding) -> None:
        runs = self.published.newest_scale(source.experiment)
        if not runs:
            finding.not_measured = (f"no completed published run of the scale experiment "
                                    f"{source.experiment} (results/published/"
                                    f"{source.experiment}/<run_id>/, by `kpbench scale`)")
            return
        points = aggregate(self.published.scale_measurements(runs))
        found = tuple(p for p in (scale_point(points, placement, finding.mode)
                                  for placement in ("host", "vm")) if p is not None)
        if not found:
            swept = ", ".join(m for m in MODES if m in set(points["mode"]))
            names = ", ".join(sorted({f"{r.experiment}/{r.run_id}" for r in runs.values()}))
            reason = f"; {row.not_measured}" if row.not_measured else ""
            finding.not_measured = f"not in the scale run {names} (its modes: {swept}){reason}"
            return
        verdict, note = scale_verdict(points, finding.mode)
        finding.claim_text = SCALE_RULE
        used = sorted({runs[p.placement].path for p in found})
        finding.scale = ScaleJudgement(source.experiment, tuple(used), found, verdict, note)

    def judge(self, run: PublishedRun, source: Source, mode: str, where: str,
              finding: Finding) -> Judgement:
        data = self.published.data(run)
        claim = next((c for c in data.config.claims if c.id == source.claim), None)
        if claim is None:
            raise FindingsError(f"{self.catalogue_path}: {where}.claim: {data.config.name} "
                                f"({run.path}) has no claim {source.claim!r}")
        self.check_point(data, source, where, run.path)
        if not finding.metric:
            finding.claim_text, finding.metric, finding.expect = claim.text, claim.metric, \
                claim.expect
        row = claim_row(data, claim.metric, claim.comparison, mode, source.point)
        covered = mode in (claim.modes or data.modes())
        cells = data.cells_at(mode, source.point)
        return Judgement(
            experiment=data.config.name, run_id=run.run_id, backend=run.backend,
            path=run.path, params=dict(source.point), seeds=int(row["seeds"]),
            mean=row["mean"], low=row["low"], high=row["high"],
            verdict=row["verdict"] if covered else None,
            note=row["note"] if covered else
            f"the claim covers {', '.join(claim.modes or data.modes())} only",
            kernels=kernels(data, cells) if run.backend != "sim" else ())

    def check_point(self, data: RunData, source: Source, where: str, path: Path) -> None:
        swept = set(data.sweep_keys)
        if set(source.point) != swept:
            wanted = ", ".join(sorted(swept)) or "nothing (the experiment is not swept)"
            raise FindingsError(f"{self.catalogue_path}: {where}.point: {data.config.name} "
                                f"({path}) needs a value for {wanted}")
        for key, value in source.point.items():
            if value not in data.config.sweep[key]:
                raise FindingsError(f"{self.catalogue_path}: {where}.point.{key}: {value!r} is "
                                    f"not a sweep point of {data.config.name} ({path})")

    def why_not_measured(self, index: int, row: Row, mode: str) -> str:
        for number, source in enumerate(row.lab):
            modes = self.lab_modes(source.experiment, self.key(index, "lab", number))
            if mode in modes:
                return (f"the lab variant {source.experiment} has this mode; "
                        + source.not_yet.get(mode, "no lab run of it in this mode is published "
                                                   "yet"))
        return row.not_measured or NO_LAB_VARIANT

    def lab_modes(self, experiment: str, where: str) -> set[str]:
        """The modes of a lab experiment: its file's, and those of any published lab run."""
        modes = {m for r in self.published.runs if r.experiment == experiment
                 and r.backend == "lab" for m in r.completed_modes}
        files = [self.experiments / "lab" / f"{experiment}.yaml",
                 self.experiments / f"{experiment}.yaml"]
        path = next((p for p in files if p.is_file()), None)
        if path is None:
            if not modes and not any(r.experiment == experiment for r in self.published.runs):
                raise FindingsError(f"{self.catalogue_path}: {where}.experiment: no file "
                                    f"{files[0]} and no published run of {experiment}")
            return modes
        try:
            return modes | set(load(path).modes)
        except ConfigError as exc:
            raise FindingsError(f"{path}: {exc.problems[0]}") from None


def kernels(data: RunData, cells: list[dict[str, Any]]) -> tuple[Kernel, ...]:
    """The kernels that ran the nodes of `cells`: each cell's `dataplane.kernel`; for a run
    made before cells recorded it (its config has no `cluster.lab_kernel`, so its nodes could
    only run on the host), the host kernel in the run's `versions`."""
    found = []
    for cell in cells:
        record = (cell.get("dataplane") or {}).get("kernel")
        if isinstance(record, dict):
            kernel = Kernel(str(record.get("kernel") or "unknown"),
                            str(record.get("placement") or "unknown"),
                            str(record.get("accel") or ""), "cell")
            if kernel not in found:
                found.append(kernel)
    if found or not cells:
        return tuple(found)
    manifest = data.run.manifest
    if "lab_kernel" not in (manifest.get("config", {}).get("cluster") or {}):
        release = (manifest.get("versions") or {}).get("kernel")
        if release:
            return (Kernel(str(release), "host", "", "run"),)
    return (Kernel("not recorded", "", "", ""),)


def value_text(judgement: Judgement, digits: int) -> str:
    """`1.58 [1.18, 1.98]`, or the mean alone with why there is no interval."""
    if is_missing(judgement.mean):
        return "no value"
    if judgement.mean == math.inf:
        return "never"
    mean = f"{judgement.mean:.{digits}f}"
    if is_missing(judgement.low):
        return f"{mean} ({judgement.seeds} seed{'s' if judgement.seeds != 1 else ''}, no interval)"
    return f"{mean} [{judgement.low:.{digits}f}, {judgement.high:.{digits}f}]"
