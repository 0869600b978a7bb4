"""One cell's schedule, for every backend: what is planned when, and which event runs first.

Pure: no clock and no I/O of its own. The simulator pops the plan in virtual time; the lab and
kind run it in real time through `RealTimeLoop`, with the clock and the sleep injected.

Planned events, known before the cell starts (`plan`):

* the timeline's events, at their `at`;
* the samples, `k * sample_seconds` for k = 0 .. `sample_count` (the end included);
* where kpbench models the control plane (sim, lab; kind runs the real controllers):
  - the HPA's syncs, every `hpa.sync_seconds` from `hpa.sync_seconds`
    (kube-controller-manager's `--horizontal-pod-autoscaler-sync-period`,
    pkg/controller/podautoscaler/horizontal.go);
  - metrics-server's scrapes, every `hpa.metric_resolution_seconds` (its `--metric-resolution`)
    from a phase drawn from the cell's `control.STREAM_METRICS` stream;
  - in IPVS modes kube-proxy's graceful-termination passes, every
    `dataplane.IPVS_GRACEFUL_CHECK_SECONDS` (pkg/proxy/ipvs/graceful_termination.go).

Dynamic events are scheduled while the cell runs (a probe, a sync, a connection opening, ...).

The order at equal times, the same in every backend: the ordering key is `(t, order)` with
`order = rank * SEQUENCE_SPAN + sequence` (`order_of`). Planned kinds rank in `Kind`'s order,
timeline < sample < HPA sync < metrics scrape < IPVS graceful pass, and every dynamic kind
shares one rank after them; within a rank the sequence decides (a planned event's index within
its kind, a dynamic event's scheduling order).

* Timeline before sample: a sample at an event's instant shows the event's immediate effect
  (the rollout's new pods, a scale's terminating ones), as a measurement taken just after the
  instant; the sample at t = 0 of an event at 0 shows it too.
* Sample before the controllers: the HPA sync and the scrape at a sample's instant read what
  the sample reads, and their decisions show in the next sample, as they would a moment later.
* Planned before dynamic: which planned event runs first never depends on which consequences
  happen to land on its instant, so the plan's order is the same in every backend; dynamic
  events run in the order they were scheduled, so a consequence scheduled for "now" never
  overtakes its cause's earlier consequences.

This is the order the simulator has always used, so its results are unchanged by it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from kpbench import control
from kpbench.config import Experiment
from kpbench.dataplane import IPVS_GRACEFUL_CHECK_SECONDS


class Kind(IntEnum):
    """Event kinds. The planned ones come first, in their rank order at equal times."""

    TIMELINE = 0
    SAMPLE = 1
    HPA_SYNC = 2
    METRICS_SCRAPE = 3
    IPVS_GRACEFUL = 4
    # dynamic: one shared rank, in scheduling order
    OPEN = 5  # a client opens a connection
    CLOSE = 6  # a connection ends on its own schedule
    RAMP = 7  # the next batch of the clients' ramp
    START = 8  # a pod's container starts its server
    READY = 9  # a pod's readiness probe (the simulator: the probe that succeeds)
    EXITED = 10  # is a terminating pod's process gone?
    DELETED = 11  # a terminating pod is gone
    RECONCILE = 12  # the Deployment controller syncs
    PUBLISH = 13  # the EndpointSlice update of this instant is published
    UPDATE = 14  # an endpoint change reaches a node's kube-proxy
    SYNC = 15  # a node's kube-proxy syncs its rules
    APPLY = 16  # a sync's rules are in place (the simulator; the lab's take their real time)


PLANNED = (Kind.TIMELINE, Kind.SAMPLE, Kind.HPA_SYNC, Kind.METRICS_SCRAPE, Kind.IPVS_GRACEFUL)
DYNAMIC_RANK = len(PLANNED)
SEQUENCE_SPAN = 1 << 48  # more events than any one cell schedules


def rank(kind: Kind) -> int:
    return int(kind) if kind < DYNAMIC_RANK else DYNAMIC_RANK


def order_of(kind: Kind, sequence: int) -> int:
    """The tie-break among events at one instant (module docstring): rank, then sequence."""
    return rank(kind) * SEQUENCE_SPAN + sequence


FIRST_DYNAMIC_ORDER = order_of(Kind.OPEN, 0)  # dynamic orders count up from here


class Planned(NamedTuple):
    """A planned event; tuples compare by time, then order: the schedule's order."""

    t: float
    order: int
    kind: Kind
    arg: int  # the timeline event's index, the sample's k, else a count


def sample_count(duration_seconds: float, sample_seconds: float) -> int:
    """The last sample's k: samples are at k * sample_seconds, the cell's end included."""
    return math.floor(duration_seconds / sample_seconds + 1e-9)


def sample_times(cfg: Experiment) -> list[float]:
    return [k * cfg.sample_seconds
            for k in range(sample_count(cfg.duration_seconds, cfg.sample_seconds) + 1)]


def _every(first: float, period: float, until: float) -> Iterator[float]:
    t = first
    while t <= until:
        yield t
        t += period


def hpa_sync_times(cfg: Experiment) -> list[float]:
    hpa = cfg.backend.hpa
    if hpa is None:
        return []
    return list(_every(hpa.sync_seconds, hpa.sync_seconds, cfg.duration_seconds))


def scrape_times(cfg: Experiment, seed: int) -> list[float]:
    """metrics-server's scrapes: its resolution, from a phase of the cell's own stream."""
    hpa = cfg.backend.hpa
    if hpa is None:
        return []
    phase = control.stream(seed, control.STREAM_METRICS).uniform(
        0.0, hpa.metric_resolution_seconds)
    return list(_every(phase, hpa.metric_resolution_seconds, cfg.duration_seconds))


def ipvs_graceful_times(cfg: Experiment, mode: str) -> list[float]:
    if not mode.startswith("ipvs-"):
        return []
    return list(_every(IPVS_GRACEFUL_CHECK_SECONDS, IPVS_GRACEFUL_CHECK_SECONDS,
                       cfg.duration_seconds))


def plan(cfg: Experiment, seed: int, mode: str, *, modelled_control: bool = True
         ) -> list[Planned]:
    """A cell's planned events in the order they run. `modelled_control=False` (kind: the
    cluster's own HPA, metrics-server and kube-proxy) plans only the timeline and the samples."""
    times: dict[Kind, list[float]] = {
        Kind.TIMELINE: [event.at for event in cfg.events],
        Kind.SAMPLE: sample_times(cfg),
    }
    if modelled_control:
        times |= {Kind.HPA_SYNC: hpa_sync_times(cfg),
                  Kind.METRICS_SCRAPE: scrape_times(cfg, seed),
                  Kind.IPVS_GRACEFUL: ipvs_graceful_times(cfg, mode)}
    return sorted(Planned(t, rank(kind) * SEQUENCE_SPAN + index, kind, index)
                  for kind, ts in times.items() for index, t in enumerate(ts))


class EventQueue:
    """Planned and dynamic events by `(t, order)`: the real-time backends' queue."""

    def __init__(self, planned: list[Planned] | None = None) -> None:
        self.heap: list[tuple[float, int, Kind, int]] = []  # Planned or the same fields
        self.next_order = FIRST_DYNAMIC_ORDER
        if planned:
            self.add_plan(planned)

    def add_plan(self, planned: list[Planned]) -> None:
        self.heap += planned
        heapq.heapify(self.heap)

    def at(self, t: float, kind: Kind, arg: int = 0) -> None:
        """A dynamic event."""
        assert kind not in PLANNED, f"{kind.name} is planned, not scheduled"
        self.next_order += 1
        heapq.heappush(self.heap, (t, self.next_order, kind, arg))

    def next_time(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def pop(self) -> tuple[float, Kind, int]:
        t, _, kind, arg = heapq.heappop(self.heap)
        return t, kind, arg

    def clear(self) -> None:
        self.heap.clear()

    def __len__(self) -> int:
        return len(self.heap)


Handler = Callable[[float, int], None]  # (the event's planned time, its argument)


@dataclass
class RealTimeLoop:
    """Runs a queue against a clock: every event once its time has come, never before, in the
    queue's order; sleeps (at most `max_sleep` at a time, calling `waiting` first) until then.

    `now` is the cell's clock (seconds since t = 0); `sleep` waits. Both are injected, so the
    loop runs without sleeping under a fake clock in tests."""

    queue: EventQueue
    now: Callable[[], float]
    sleep: Callable[[float], None]
    max_sleep: float = 0.5
    waiting: Callable[[], None] = lambda: None

    def run(self, handlers: Mapping[Kind, Handler], until: float) -> None:
        """Run every event due at or before `until`; one without a handler is an error."""
        missing = {kind for _, _, kind, _ in self.queue.heap} - set(handlers)
        if missing:
            raise ValueError(f"no handler for {', '.join(sorted(k.name for k in missing))}")
        while True:
            t = self.queue.next_time()
            if t is None or t > until:
                return
            wait = t - self.now()
            if wait > 0:
                self.waiting()
                self.sleep(min(wait, self.max_sleep))
                continue
            _, kind, arg = self.queue.pop()
            handler = handlers.get(kind)
            if handler is None:
                raise ValueError(f"no handler for {kind.name}")
            handler(t, arg)
