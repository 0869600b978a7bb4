"""The experiment config: YAML in, a validated and fully resolved model out.

Everything here is pure: no files are created. Errors are collected as `ConfigError`, whose lines
name the dotted key path (`workload.lifetime.mean_seconds: must be > 0`).
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kpbench.limits import (
    MAX_CELLS,
    MAX_CONFIG_BYTES,
    bound_problems,
    cell_count,
    safe_yaml,
)
from kpbench.limits import yaml_problem as _yaml_problem

Mode = Literal["iptables", "nftables", "ipvs-rr", "ipvs-lc", "ipvs-wlc", "ipvs-sh", "ipvs-mh"]
ALL_MODES: tuple[str, ...] = Mode.__args__  # type: ignore[attr-defined]
DEFAULT_MODES: list[Mode] = ["iptables", "nftables", "ipvs-rr", "ipvs-lc", "ipvs-sh"]
# connections.close_reason in results; `end` = still open when the cell ended. Kept
# here, the light module every process imports, so workload processes need not import pandas.
CLOSE_REASONS = ("lifetime", "reconnect", "max-age", "server-shutdown", "reset", "load-change",
                 "end")
L7_PROXY_REPLICAS = 2  # proxy pods of `workload.proxy: l7`, in every backend
ROOT_SEED = 0  # every random stream of a cell is spawned from (ROOT_SEED, seed, ...)
SEED_MAX = 2**63 - 1

METRICS = (
    "max_mean",
    "cv",
    "jain",
    "gini",
    "time_to_balance",
    "new_pod_share",
    "ready_order_rho",
    "request_max_mean",
    "failed_connections",
    "reset_connections",
)

_UNION_MEMBERS = frozenset({"int", "str", "list[int]"})
_PERCENT = re.compile(r"^(\d+)%$")
_EXPECT = re.compile(r"^\s*(<=|>=|<|>)\s*(-?\d+(\.\d+)?)\s*$")
# A model validator reports a problem with one of its fields as "field: message".
_FIELD_PROBLEM = re.compile(r"^([a-z_][a-z_.\[\]0-9]*): (.*)$", re.S)


class ConfigError(ValueError):
    """Invalid experiment input; each line names the offending key."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _bool_for_number(value: Any, annotation: Any) -> bool:
    """True when `value` (or an item of a list) is a YAML boolean where `annotation` wants a
    number: pydantic would take true as 1."""
    members = getattr(annotation, "__args__", ()) if get_origin(annotation) in (
        Union, UnionType) else (annotation,)
    if isinstance(value, bool):
        return bool not in members and any(m in (int, float) for m in members)
    if isinstance(value, list):
        items = [get_args(m)[0] for m in members if get_origin(m) is list and get_args(m)]
        return any(_bool_for_number(v, item) for v in value for item in items)
    return False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _bool_for_number(value, field.annotation):
            raise ValueError("must be a number, not true/false")
        return value


def _check_int_or_percent(value: int | str) -> int | str:
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must be >= 0 or a percentage like '25%'")
        return value
    if not _PERCENT.match(value):
        raise ValueError("must be an integer or a percentage like '25%'")
    return value


def resolve_int_or_percent(value: int | str, total: int, round_up: bool) -> int:
    """Kubernetes' GetScaledValueFromIntOrPercent: maxSurge rounds up, maxUnavailable down."""
    if isinstance(value, int):
        return value
    match = _PERCENT.match(value)
    assert match is not None
    exact = int(match.group(1)) * total / 100
    return math.ceil(exact) if round_up else math.floor(exact)


class Rollout(_Strict):
    max_surge: int | str = "25%"
    max_unavailable: int | str = "25%"

    _check = field_validator("max_surge", "max_unavailable")(_check_int_or_percent)

    def resolve(self, replicas: int) -> tuple[int, int]:
        """(max_surge, max_unavailable) in pods, with Kubernetes' fencepost rule."""
        surge = resolve_int_or_percent(self.max_surge, replicas, round_up=True)
        unavailable = resolve_int_or_percent(self.max_unavailable, replicas, round_up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        return surge, unavailable

    @model_validator(mode="after")
    def _not_both_zero(self) -> Rollout:
        if self.max_surge in (0, "0%") and self.max_unavailable in (0, "0%"):
            raise ValueError("max_surge: max_surge and max_unavailable cannot both be 0")
        return self


class Hpa(_Strict):
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(ge=1)
    target_cpu_utilization: float = Field(50, gt=0)
    sync_seconds: float = Field(15, gt=0)
    tolerance: float = Field(0.1, ge=0)
    scale_down_stabilization_seconds: float = Field(300, ge=0)
    metric_resolution_seconds: float = Field(15, gt=0)
    cpu_initialization_period_seconds: float = Field(300, ge=0)
    initial_readiness_delay_seconds: float = Field(30, ge=0)

    @model_validator(mode="after")
    def _min_le_max(self) -> Hpa:
        if self.min_replicas > self.max_replicas:
            raise ValueError("max_replicas: must be >= min_replicas")
        return self


class KubeProxy(_Strict):
    """kube-proxy's sync loop on every node (kpbench.control: SyncRunner and its neighbours)."""

    min_sync_seconds: float | None = Field(None, ge=0)  # None: the mode's Kubernetes default
    propagation_median_seconds: float = Field(0.1, gt=0)
    propagation_sigma: float = Field(0.5, ge=0)
    sync_base_seconds: float = Field(0.025, ge=0)
    sync_seconds_per_endpoint: float = Field(0.00006, ge=0)


class Cluster(_Strict):
    nodes: int = Field(3, ge=1, le=250)
    node_image: str | None = None
    # Before kube_proxy existed: one fixed delay from an endpoint change to every node's rules.
    # Still accepted (recorded runs carry it); when set it replaces the propagation distribution.
    endpoint_sync_seconds: float | None = Field(None, ge=0)
    kube_proxy: KubeProxy = KubeProxy()
    lab_kernel: Literal["auto", "host", "vm"] = "auto"
    node_cpu_millicores: float = Field(4000, gt=0)
    node_memory_mib: float = Field(8192, gt=0)

    @property
    def propagation(self) -> tuple[float, float]:
        """(median, sigma) of the endpoint propagation delay per node and change."""
        if self.endpoint_sync_seconds is not None:
            return max(self.endpoint_sync_seconds, 1e-9), 0.0
        return self.kube_proxy.propagation_median_seconds, self.kube_proxy.propagation_sigma


class Backend(_Strict):
    replicas: int = Field(6, ge=1)
    startup_seconds: float = Field(5.0, ge=0)
    server_start_median_seconds: float = Field(0.51, gt=0)
    server_start_sigma: float = Field(0.41, ge=0)
    readiness_period_seconds: float = Field(1.0, gt=0)
    termination_grace_seconds: float = Field(30, ge=0)
    max_connection_age_seconds: float | None = Field(None, gt=0)
    cpu_request_millicores: float = Field(100, gt=0)
    cpu_per_request_millicores: float = Field(5.0, ge=0)
    server_cpu_per_request_millicores: float = Field(0.16, ge=0)
    server_idle_millicores: float = Field(2.0, ge=0)
    rollout: Rollout = Rollout()
    hpa: Hpa | None = None


class Lifetime(_Strict):
    distribution: Literal["infinite", "fixed", "exponential", "lognormal", "pareto"] = "infinite"
    mean_seconds: float | None = Field(None, gt=0)
    sigma: float | None = Field(None, gt=0)
    alpha: float | None = Field(None, gt=1)

    @model_validator(mode="after")
    def _parameters_match(self) -> Lifetime:
        needed = {
            "infinite": set(),
            "fixed": {"mean_seconds"},
            "exponential": {"mean_seconds"},
            "lognormal": {"mean_seconds", "sigma"},
            "pareto": {"mean_seconds", "alpha"},
        }[self.distribution]
        for key in ("mean_seconds", "sigma", "alpha"):
            given = getattr(self, key) is not None
            if key in needed and not given:
                raise ValueError(f"{key}: required when distribution is {self.distribution}")
            if key not in needed and given:
                raise ValueError(f"{key}: not used when distribution is {self.distribution}")
        return self


class Reconnect(_Strict):
    policy: Literal["none", "periodic", "after-requests"] = "none"
    seconds: float | None = Field(None, gt=0)
    jitter: float | None = Field(None, ge=0, lt=1)
    requests: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _parameters_match(self) -> Reconnect:
        needed, allowed = {
            "none": (set(), set()),
            "periodic": ({"seconds"}, {"seconds", "jitter"}),
            "after-requests": ({"requests"}, {"requests"}),
        }[self.policy]
        for key in ("seconds", "jitter", "requests"):
            given = getattr(self, key) is not None
            if key in needed and not given:
                raise ValueError(f"{key}: required when policy is {self.policy}")
            if key not in allowed and given:
                raise ValueError(f"{key}: not used when policy is {self.policy}")
        return self

    @property
    def jitter_fraction(self) -> float:
        return 0.1 if self.jitter is None else self.jitter


class Workload(_Strict):
    clients: int = Field(6, ge=1)
    client_nodes: int | None = Field(None, ge=1)
    connections: int = Field(120, ge=0)
    requests_per_second: float = Field(1.0, gt=0)
    ramp_seconds: float = Field(10, ge=0)
    lifetime: Lifetime = Lifetime()
    reconnect: Reconnect = Reconnect()
    proxy: Literal["none", "l7"] = "none"
    protocol: Literal["http", "grpc"] = "http"


class Event(_Strict):
    at: float = Field(ge=0)
    action: Literal["rollout", "scale", "load", "kill-pod"]
    replicas: int | None = Field(None, ge=1)
    requests_per_second: float | None = Field(None, gt=0)
    connections: int | None = Field(None, ge=0)
    count: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _parameters_match(self) -> Event:
        allowed = {
            "rollout": set(),
            "scale": {"replicas"},
            "load": {"requests_per_second", "connections"},
            "kill-pod": {"count"},
        }[self.action]
        for key in ("replicas", "requests_per_second", "connections", "count"):
            if key not in allowed and getattr(self, key) is not None:
                raise ValueError(f"{key}: not used by action {self.action}")
        if self.action == "scale" and self.replicas is None:
            raise ValueError("replicas: required by action scale")
        if (
            self.action == "load"
            and self.requests_per_second is None
            and self.connections is None
        ):
            raise ValueError("requests_per_second: load needs requests_per_second or connections")
        return self

    @property
    def load_change(self) -> dict[str, Any]:
        """What a `load` event sets: {"requests_per_second": ..., "connections": ...}."""
        return {key: value for key in ("requests_per_second", "connections")
                if (value := getattr(self, key)) is not None}

    @property
    def kill_count(self) -> int:
        return 1 if self.count is None else self.count


class Claim(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    text: str
    metric: str
    expect: str
    modes: list[Mode] | None = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in METRICS:
            raise ValueError(f"must be one of {', '.join(METRICS)}")
        return value

    @field_validator("expect")
    @classmethod
    def _parsable(cls, value: str) -> str:
        if not _EXPECT.match(value):
            raise ValueError("must look like '< -0.3' (one of < <= > >= and a number)")
        return value

    @property
    def comparison(self) -> tuple[str, float]:
        match = _EXPECT.match(self.expect)
        assert match is not None
        return match.group(1), float(match.group(2))


class Experiment(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str = ""
    modes: list[Mode] = Field(default_factory=lambda: list(DEFAULT_MODES), min_length=1)
    seeds: int | list[int] = 3
    duration_seconds: float = Field(300, gt=0)
    sample_seconds: float = Field(1.0, gt=0)
    cluster: Cluster = Cluster()
    backend: Backend = Backend()
    workload: Workload = Workload()
    events: list[Event] = Field(default_factory=list)
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    claims: list[Claim] = Field(default_factory=list)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be >= 1 (a count) or a non-empty list of seeds")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("must be a non-empty list of distinct seeds")
        if isinstance(value, list) and not all(0 <= seed <= SEED_MAX for seed in value):
            raise ValueError(f"every seed must lie in 0..{SEED_MAX} (2**63-1)")
        return value

    @field_validator("modes")
    @classmethod
    def _distinct_modes(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a mode twice")
        return value

    @model_validator(mode="after")
    def _timeline_fits(self) -> Experiment:
        for index, event in enumerate(self.events):
            if event.at >= self.duration_seconds:
                raise ValueError(
                    f"events[{index}].at: {event.at:g} is not before the end "
                    f"(duration_seconds {self.duration_seconds:g})"
                )
        if self.sample_seconds > self.duration_seconds:
            raise ValueError("sample_seconds: must not exceed duration_seconds")
        for key, values in self.sweep.items():
            if not values:
                raise ValueError(f"sweep.{key}: needs at least one value")
        client_nodes = self.workload.client_nodes
        if client_nodes is not None and client_nodes > self.cluster.nodes:
            raise ValueError("workload.client_nodes: must be <= cluster.nodes")
        hpa = self.backend.hpa
        if hpa is not None and not hpa.min_replicas <= self.backend.replicas <= hpa.max_replicas:
            raise ValueError("backend.replicas: must lie within hpa min_replicas..max_replicas")
        return self

    def client_node(self, client: int) -> int:
        """Client pods go round-robin over the first `workload.client_nodes` nodes (all)."""
        return client % (self.workload.client_nodes or self.cluster.nodes)

    @property
    def seed_list(self) -> list[int]:
        return list(range(1, self.seeds + 1)) if isinstance(self.seeds, int) else self.seeds

    @property
    def first_event_at(self) -> float | None:
        return min((event.at for event in self.events), default=None)


# --- loading, overrides, sweeps ------------------------------------------------------------------


def _format_location(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The config model inside an annotation: `Model`, `Model | None`, `list[Model]`."""
    pending = [annotation]
    while pending:
        candidate = pending.pop(0)
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        pending.extend(getattr(candidate, "__args__", ()))
    return None


def _allowed_keys(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The keys that the model at `loc` (minus the last part) accepts, for suggestions."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part)
        current = _nested_model(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else []


def _describe(error: Mapping[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    messages = {
        "greater_than": "must be > {gt}",
        "greater_than_equal": "must be >= {ge}",
        "less_than": "must be < {lt}",
        "less_than_equal": "must be <= {le}",
        "missing": "required",
        "string_pattern_mismatch": "must match {pattern}",
        "too_short": "must not be empty",
    }
    if kind in messages:
        return messages[kind].format(**ctx)
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}".replace("'", "")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"wrong type ({error['msg'].lower()}), got {error.get('input')!r}"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _problems(exc: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    """One line per problem, naming its key; unknown keys get a suggestion from `model`'s
    (default Experiment)."""
    lines: list[str] = []
    for error in exc.errors():
        # Unions (int | str, ...) name their member in the location; keep the key path only.
        loc = [p for p in error["loc"] if p not in _UNION_MEMBERS]
        message = _describe(error)
        path = _format_location(loc)
        problem = _FIELD_PROBLEM.match(message)
        if problem and error["type"] == "value_error":
            # A model validator names the key relative to its own model.
            path = f"{path}.{problem.group(1)}" if path else problem.group(1)
            message = problem.group(2)
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(model or Experiment, loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            message = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
        lines.append(f"{path}: {message}" if path else message)
    return list(dict.fromkeys(lines))


def validate(raw: Any) -> Experiment:
    if not isinstance(raw, dict):
        raise ConfigError(["config: must be a mapping of keys to values"])
    try:
        experiment = Experiment.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_problems(exc)) from None
    problems = bound_problems(experiment)
    if problems:
        raise ConfigError(problems)
    return experiment


def _split_key(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for part in key.split("."):
        parts.append(int(part) if part.isdigit() else part)
    return parts


def set_dotted(raw: dict[str, Any], key: str, value: Any, *, must_exist: bool) -> None:
    """Set `a.b.c` (list items by index: `events.0.at`) in a raw config dict, in place."""
    parts = _split_key(key)
    if not key or any(p == "" for p in parts):
        raise ConfigError([f"{key or '(empty)'}: not a dotted key"])
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise ConfigError([f"{key}: no such key"])
        elif isinstance(node, dict):
            if isinstance(part, int) or (must_exist and part not in node):
                raise ConfigError([f"{key}: no such key"])
            if not last and (part not in node or node[part] is None):
                if must_exist:
                    raise ConfigError([f"{key}: no such key"])
                node[part] = {}
        else:
            raise ConfigError([f"{key}: no such key"])
        if last:
            node[part] = value
        else:
            node = node[part]


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` from `--set`, VALUE parsed as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError([f"--set {text}: expected KEY=VALUE"])
    try:
        return key, safe_yaml(value) if value.strip() else None
    except yaml.YAMLError as exc:
        problem = f"--set {key}: value is not valid YAML ({_yaml_problem(exc)})"
        raise ConfigError([problem]) from None


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file: a regular file of at most MAX_CONFIG_BYTES of UTF-8 YAML, a mapping."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError([f"{path}: not a regular file"])
    if info.st_size > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB"])
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        raw = safe_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"{path}:{where} not valid YAML ({_yaml_problem(exc)})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: must be a mapping of keys to values"])
    return raw


def load(
    path: Path, overrides: Sequence[str] = (), seeds: int | None = None,
    max_cells: int = MAX_CELLS,
) -> Experiment:
    """Read, override, validate. Raises ConfigError naming every problem found."""
    raw = read_yaml(path)
    problems: list[str] = []
    for text in overrides:
        try:
            key, value = parse_override(text)
            set_dotted(raw, key, value, must_exist=False)
        except ConfigError as exc:
            problems += exc.problems
    if seeds is not None:
        if not 1 <= seeds <= max_cells:
            problems.append(f"--seeds: must be 1..{max_cells} (the cell limit, --max-cells)")
        raw["seeds"] = seeds
    if problems:
        raise ConfigError(problems)
    given = [*(f"--set {text}" for text in overrides), *([f"--seeds {seeds}"] if seeds else [])]
    if given and isinstance(raw.get("description", ""), str):
        # the description is prose about the file: say what the command line changed
        stated = f"Run with {', '.join(given)} (the text above describes the file)."
        raw["description"] = "\n\n".join(filter(None, [raw.get("description", "").strip(),
                                                       stated]))
    experiment = validate(raw)
    count = cell_count(experiment)
    if count > max_cells:
        raise ConfigError([f"{path}: {count:,} cells (modes x sweep points x seeds) exceed the "
                           f"limit of {max_cells:,} (--max-cells)"])
    check_sweep(experiment)
    return experiment


def check_sweep(experiment: Experiment) -> None:
    """Every sweep key must name an existing key, and every swept value must validate."""
    resolved = experiment.model_dump(mode="json")
    problems: list[str] = []
    for key, values in experiment.sweep.items():
        if key.split(".")[0] in {"sweep", "name", "modes", "seeds", "claims", "events"}:
            problems.append(f"sweep.{key}: cannot be swept")
            continue
        for value in values:
            trial = copy.deepcopy(resolved)
            trial.pop("sweep")
            try:
                set_dotted(trial, key, value, must_exist=True)
            except ConfigError:
                problems.append(f"sweep.{key}: no such key")
                break
            try:
                validate(trial)
            except ConfigError as exc:
                problems += [f"sweep.{key}={value!r}: {p}" for p in exc.problems]
                break
    if problems:
        raise ConfigError(problems)


# --- cells ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One (mode, seed, sweep point), with the config that applies to it."""

    cell_id: str
    mode: str
    seed: int
    params: dict[str, Any]
    config: Experiment


def sweep_value_label(value: Any) -> Any:
    """A sweep value as a table column holds it: scalars as they are, mappings and lists as
    one-line YAML (`{distribution: pareto, mean_seconds: 60, alpha: 1.5}`)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(value)).strip("_") or "x"


def sweep_points(experiment: Experiment) -> list[dict[str, Any]]:
    keys = list(experiment.sweep)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(
        *(experiment.sweep[k] for k in keys)
    )]


def expand_cells(experiment: Experiment) -> list[Cell]:
    base = experiment.model_dump(mode="json")
    base["sweep"] = {}
    cells: list[Cell] = []
    for mode in experiment.modes:
        for params in sweep_points(experiment):
            raw = copy.deepcopy(base)
            for key, value in params.items():
                set_dotted(raw, key, value, must_exist=True)
            config = validate(raw)
            point = "".join(f"-{key.split('.')[-1]}{_slug(v)}" for key, v in params.items())
            for seed in experiment.seed_list:
                cells.append(Cell(f"{mode}{point}-s{seed}", mode, seed, params, config))
    check_cell_ids(cells)
    return cells


CELL_ID_MAX = 200  # a cell id names the cell's folder of workload files


def check_cell_ids(cells: Sequence[Cell]) -> None:
    """Cell ids name files: each must be distinct (sweep values that only differ in type or
    punctuation, 6 and '6', would collide) and short enough for a file name."""
    seen: dict[str, Cell] = {}
    for cell in cells:
        if len(cell.cell_id) > CELL_ID_MAX:
            raise ConfigError([f"sweep: cell id {cell.cell_id[:40]}... is longer than "
                               f"{CELL_ID_MAX} characters (shorter sweep values)"])
        if cell.cell_id in seen:
            raise ConfigError([f"sweep: points {seen[cell.cell_id].params} and {cell.params} "
                               f"give the same cell id {cell.cell_id}"])
        seen[cell.cell_id] = cell


def iter_keys(model: type[BaseModel] = Experiment, prefix: str = "") -> Iterator[str]:
    """Every dotted key of the config, for documentation checks."""
    for name, field in model.model_fields.items():
        yield prefix + name
        nested = _nested_model(field.annotation)
        if nested is not None:
            yield from iter_keys(nested, prefix + name + ".")


def json_schema() -> dict[str, Any]:
    schema = Experiment.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kpbench experiment"
    return schema
