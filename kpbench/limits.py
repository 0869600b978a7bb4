"""What input kpbench accepts beyond the config's types: the YAML it parses and the bounds that
keep a cell within what the backends can simulate or carry here (README "Bounds").

Each bound in `BOUNDS` states how it was derived; the README lists them from here (a test checks
the two agree). Everything is pure.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from kpbench.config import Experiment

MAX_CONFIG_BYTES = 1024 * 1024  # a config is a few KiB; a larger file is not one
MAX_YAML_NODES = 100_000  # nodes after alias expansion (the largest shipped config has < 500)
MAX_CELLS = 10_000  # default of --max-cells


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses duplicate keys and counts the nodes a document expands
    to (every alias counted with its whole anchor), so an alias bomb fails before it grows."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            expanded_size(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class says so
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def expanded_size(root: yaml.Node, limit: int = MAX_YAML_NODES) -> int:
    """Nodes of the document with every alias expanded; YAMLError beyond `limit` or on a
    recursive alias. Shared subtrees are sized once (memo), so this is linear in the text."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise yaml.composer.ComposerError(None, None, "recursive alias", node.start_mark)
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        if total > limit:
            raise yaml.composer.ComposerError(
                None, None, f"expands to more than {limit:,} nodes (aliases)", node.start_mark)
        sizes[key] = total
        return total

    return size(root)


def safe_yaml(text: str) -> Any:
    """YAML text -> Python data: safe types only, no duplicate keys, bounded alias expansion."""
    return yaml.load(text, Loader=_BoundedLoader)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """The one-line reason a YAML text was refused."""
    problem = getattr(exc, "problem", None)
    return str(problem) if problem else exc.__class__.__name__


@dataclass(frozen=True)
class Bound:
    key: str  # dotted; `events[].x` applies to every event that sets x
    low: float | None
    high: float | None
    why: str

    def text(self) -> str:
        def fmt(value: float) -> str:
            return f"{value:,g}" if value < 1e6 else f"{value:,.0f}"

        if self.low is not None and self.high is not None:
            return f"{fmt(self.low)} to {fmt(self.high)}"
        return f">= {fmt(self.low)}" if self.low is not None else f"<= {fmt(self.high or 0)}"


_POD_WHY = ("sim-large (10,000 pods on 100 nodes) is the largest run made here (46 s, 2 GiB "
            "peak); the lab gives each pod a namespace and a server process, kind a real pod")
_TURNOVER_WHY = ("a connection shorter than this is opened and closed between two samples "
                 "of the fastest sample clock (0.1 s), so no backend could show it")
BOUNDS: tuple[Bound, ...] = (
    Bound("duration_seconds", None, 86_400,
          "lab and kind cells run in real time: one day is the longest cell a run can be "
          "watched through; the simulator's cost grows with it as well"),
    Bound("sample_seconds", 0.1, None,
          "each lab sample scrapes every pod and reads every node's conntrack table; its clock "
          "was up to 16 ms late here, so 0.1 s keeps a sample well inside its interval"),
    Bound("workload.connections", None, 1_000_000,
          "sim-large (1,000,000 connections) is the largest run made here: 2 GiB peak memory"),
    Bound("events[].connections", None, 1_000_000, "as workload.connections"),
    Bound("workload.clients", None, 10_000,
          "sim-large uses 2,000 client pods; each lab client pod is a namespace and a Locust "
          "worker process (one holds 7,500 connections here)"),
    Bound("workload.requests_per_second", 0.001, 1_000,
          "per connection: the server spends 0.11-0.14 ms of CPU per request here, so one pod "
          "serves at most about 7,000-9,000 requests/s; below 0.001 (one request in 17 "
          "minutes) a connection sends no request within most cells"),
    Bound("events[].requests_per_second", 0.001, 1_000, "as workload.requests_per_second"),
    Bound("workload.ramp_seconds", None, 86_400, "as duration_seconds"),
    Bound("workload.lifetime.mean_seconds", 0.1, None, _TURNOVER_WHY),
    Bound("workload.lifetime.sigma", None, 5,
          "lognormal lifetimes with a fixed mean put the median at exp(-sigma^2/2) of it: at "
          "5 that is 4e-6 of the mean, far below any sample clock"),
    Bound("workload.lifetime.alpha", None, 100,
          "a Pareto alpha above 100 is a fixed lifetime for every practical purpose"),
    Bound("workload.reconnect.seconds", 0.1, None, _TURNOVER_WHY),
    Bound("workload.reconnect.requests", None, 1_000_000_000,
          "more requests than a connection at the highest rate sends in a day-long cell"),
    Bound("backend.max_connection_age_seconds", 0.1, None, _TURNOVER_WHY),
    Bound("backend.replicas", None, 10_000, _POD_WHY),
    Bound("backend.hpa.max_replicas", None, 10_000, _POD_WHY),
    Bound("events[].replicas", None, 10_000, _POD_WHY),
    Bound("events[].count", None, 10_000, _POD_WHY),
    Bound("backend.hpa.sync_seconds", 1, None,
          "the HPA reads pod CPU from metrics-server, whose resolution is 15 s (Kubernetes' "
          "default sync period is 15 s too); a faster loop only re-reads the same value"),
    Bound("backend.startup_seconds", None, 86_400, "as duration_seconds"),
    Bound("backend.termination_grace_seconds", None, 86_400, "as duration_seconds"),
)
MAX_SAMPLES_PER_CELL = 100_000
MAX_SAMPLE_ROWS_PER_CELL = 20_000_000
MAX_CONNECTION_EVENTS_PER_CELL = 50_000_000
CROSS_BOUNDS: tuple[tuple[str, str, str], ...] = (
    ("duration_seconds / sample_seconds", f"<= {MAX_SAMPLES_PER_CELL:,} samples per cell",
     "a lab sample takes tens of milliseconds of scraping; 100,000 samples are more than a "
     "day at 1 s"),
    ("samples x pods", f"<= {MAX_SAMPLE_ROWS_PER_CELL:,} sample rows per cell",
     "a row takes about 100 bytes in memory, so 20 M rows are about 2 GiB, the peak of "
     "sim-large (1.2 M rows)"),
    ("connections x (1 + duration / turnover)",
     f"<= {MAX_CONNECTION_EVENTS_PER_CELL:,} connection events per cell",
     "turnover = the shortest of lifetime mean, reconnect period, requests / rate and max "
     "connection age; the simulator processes 75-108 k connection events per second here, "
     "so 50 M take 8-11 minutes for one cell"),
)
NAME_MAX = 100  # experiment names become folder names


def _values(model: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(location, value) of a dotted key in the validated config; `events[]` iterates."""
    head, _, rest = key.partition(".")
    if head.endswith("[]"):
        for index, item in enumerate(getattr(model, head[:-2])):
            for where, value in _values(item, rest):
                yield f"{head[:-2]}[{index}].{where}", value
        return
    value = getattr(model, head, None)
    if value is None:
        return
    if rest:
        for where, inner in _values(value, rest):
            yield f"{head}.{where}", inner
    else:
        yield head, value


def _turnover(experiment: Experiment) -> float:
    workload, backend = experiment.workload, experiment.backend
    candidates = [math.inf]
    if workload.lifetime.distribution != "infinite" and workload.lifetime.mean_seconds:
        candidates.append(workload.lifetime.mean_seconds)
    if workload.reconnect.seconds:
        candidates.append(workload.reconnect.seconds)
    rates = [workload.requests_per_second, *(e.requests_per_second for e in experiment.events
                                             if e.requests_per_second)]
    if workload.reconnect.requests:
        candidates.append(workload.reconnect.requests / max(rates))
    if backend.max_connection_age_seconds:
        candidates.append(backend.max_connection_age_seconds)
    return min(candidates)


def max_pods(experiment: Experiment) -> int:
    """The most backend pods a cell can hold: replicas, HPA maximum, scale events, x2 for a
    rollout's surge."""
    hpa = experiment.backend.hpa
    counts = [experiment.backend.replicas, *(e.replicas for e in experiment.events
                                             if e.replicas)]
    if hpa is not None:
        counts.append(hpa.max_replicas)
    return 2 * max(counts)


def bound_problems(experiment: Experiment) -> list[str]:
    """Every bound the validated config violates, one line each naming the key."""
    problems = []
    for bound in BOUNDS:
        for where, value in _values(experiment, bound.key):
            if not isinstance(value, int | float):
                continue
            if (bound.low is not None and value < bound.low) or (
                    bound.high is not None and value > bound.high):
                problems.append(f"{where}: must be {bound.text()} (README, Bounds)")
    if len(experiment.name) > NAME_MAX:
        problems.append(f"name: at most {NAME_MAX} characters")
    if problems:  # the estimates below would only repeat them
        return problems
    samples = experiment.duration_seconds / experiment.sample_seconds
    if samples > MAX_SAMPLES_PER_CELL:
        problems.append(f"sample_seconds: {samples:,.0f} samples per cell exceed "
                        f"{MAX_SAMPLES_PER_CELL:,} (README, Bounds)")
    elif (samples + 1) * max_pods(experiment) > MAX_SAMPLE_ROWS_PER_CELL:
        problems.append(f"sample_seconds: about {(samples + 1) * max_pods(experiment):,.0f} "
                        f"sample rows per cell exceed {MAX_SAMPLE_ROWS_PER_CELL:,} "
                        "(README, Bounds)")
    connections = max([experiment.workload.connections,
                       *(e.connections for e in experiment.events if e.connections)])
    events = connections * (1 + experiment.duration_seconds / _turnover(experiment))
    if events > MAX_CONNECTION_EVENTS_PER_CELL:
        problems.append(f"workload.connections: about {events:,.0f} connection events per cell "
                        f"(connections x duration / turnover) exceed "
                        f"{MAX_CONNECTION_EVENTS_PER_CELL:,} (README, Bounds)")
    return problems


def cell_count(experiment: Experiment) -> int:
    """Cells of an experiment (modes x sweep points x seeds), without expanding them."""
    seeds = experiment.seeds if isinstance(experiment.seeds, int) else len(experiment.seeds)
    points = math.prod(len(values) for values in experiment.sweep.values())
    return len(experiment.modes) * points * seeds
