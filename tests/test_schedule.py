"""One schedule for every backend: the plan, the tie rule, and the real-time loop."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from kpbench import control, schedule
from kpbench.backends.sim import Simulation
from kpbench.config import Cell, expand_cells, validate
from kpbench.kube.driver import KubeCell
from kpbench.lab.backend import LabCell
from kpbench.schedule import EventQueue, Kind, Planned, RealTimeLoop

from .kind_double import FakeClock, FakeNodes, InMemoryKubeDouble

# Timeline events on sample instants (and two at one instant), HPA syncs on sample instants.
EVENTS = [{"at": 2.0, "action": "scale", "replicas": 4}, {"at": 2.0, "action": "rollout"},
          {"at": 7.5, "action": "load", "requests_per_second": 2.0},
          {"at": 10.0, "action": "kill-pod", "count": 1}]


def make_cell(mode: str = "ipvs-rr", duration: float = 130.0, **overrides: Any) -> Cell:
    raw: dict[str, Any] = {
        "name": "schedule", "modes": [mode], "seeds": 1, "duration_seconds": duration,
        "sample_seconds": 2.5, "cluster": {"nodes": 2},
        "backend": {"replicas": 3, "hpa": {"min_replicas": 3, "max_replicas": 6,
                                           "sync_seconds": 5.0,
                                           "metric_resolution_seconds": 15.0}},
        "workload": {"clients": 2, "connections": 12, "ramp_seconds": 1.0},
        "events": EVENTS,
    }
    raw.update(overrides)
    return expand_cells(validate(raw))[0]


def planned(cell: Cell, modelled_control: bool = True) -> list[tuple[float, Kind, int]]:
    return [(p.t, p.kind, p.arg) for p in schedule.plan(cell.config, cell.seed, cell.mode,
                                                        modelled_control=modelled_control)]


# -- the plan -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("duration", "sample", "count"),
                         [(10.0, 1.0, 10), (0.3, 0.1, 3), (10.0, 3.0, 3), (1.0, 1.0, 1)])
def test_sample_count_includes_the_end_despite_float_division(
        duration: float, sample: float, count: int) -> None:
    assert schedule.sample_count(duration, sample) == count


def test_samples_hpa_syncs_scrapes_and_graceful_passes_are_planned_at_their_periods() -> None:
    cell = make_cell()
    cfg = cell.config
    assert schedule.sample_times(cfg) == [k * 2.5 for k in range(53)]  # 0 .. 130 s
    assert schedule.hpa_sync_times(cfg) == [5.0 * k for k in range(1, 27)]
    scrapes = schedule.scrape_times(cfg, cell.seed)
    phase = control.stream(cell.seed, control.STREAM_METRICS).uniform(0.0, 15.0)
    assert scrapes[0] == phase and 0.0 <= phase < 15.0
    assert all(abs(b - a - 15.0) < 1e-9 for a, b in itertools.pairwise(scrapes))
    assert scrapes[-1] <= 130.0 < scrapes[-1] + 15.0
    assert scrapes != schedule.scrape_times(cfg, cell.seed + 1)  # the phase is the seed's
    assert schedule.ipvs_graceful_times(cfg, "ipvs-rr") == [60.0, 120.0]
    assert schedule.ipvs_graceful_times(cfg, "iptables") == []
    no_hpa = make_cell(backend={"replicas": 3}).config
    assert schedule.hpa_sync_times(no_hpa) == schedule.scrape_times(no_hpa, 1) == []


def test_kind_plans_only_the_timeline_and_the_samples() -> None:
    cell = make_cell()
    full = planned(cell)
    assert planned(cell, modelled_control=False) == [
        e for e in full if e[1] in (Kind.TIMELINE, Kind.SAMPLE)]
    assert {e[1] for e in full} == set(schedule.PLANNED)


def test_at_equal_times_timeline_then_sample_then_controllers_then_dynamic() -> None:
    cell = make_cell(events=[{"at": 120.0, "action": "rollout"}, *EVENTS])
    at_120 = [kind for t, kind, _ in planned(cell) if t == 120.0]
    assert at_120 == [Kind.TIMELINE, Kind.SAMPLE, Kind.HPA_SYNC, Kind.IPVS_GRACEFUL]
    at_2 = [(kind, arg) for t, kind, arg in planned(cell) if t == 2.0]
    assert at_2 == [(Kind.TIMELINE, 1), (Kind.TIMELINE, 2)]  # the timeline's own order
    queue = EventQueue()
    queue.at(2.5, Kind.READY, 7)  # scheduled before the plan is added: still after it
    without_hpa = make_cell(backend={"replicas": 3})
    queue.add_plan(schedule.plan(without_hpa.config, without_hpa.seed, without_hpa.mode))
    queue.at(2.5, Kind.PUBLISH)
    queue.at(2.0, Kind.SYNC, 1)
    popped = [queue.pop() for _ in range(5)]
    assert popped == [(0.0, Kind.SAMPLE, 0), (2.0, Kind.TIMELINE, 0), (2.0, Kind.TIMELINE, 1),
                      (2.0, Kind.SYNC, 1), (2.5, Kind.SAMPLE, 1)]
    assert [queue.pop() for _ in range(2)] == [(2.5, Kind.READY, 7), (2.5, Kind.PUBLISH, 0)]


def test_every_dynamic_kind_ranks_after_every_planned_kind() -> None:
    dynamic = [k for k in Kind if k not in schedule.PLANNED]
    last_planned = max(schedule.order_of(k, schedule.SEQUENCE_SPAN - 1) for k in schedule.PLANNED)
    assert all(schedule.order_of(k, 0) > last_planned for k in dynamic)
    assert len({schedule.rank(k) for k in dynamic}) == 1
    with pytest.raises(AssertionError, match="planned"):
        EventQueue().at(1.0, Kind.SAMPLE)


# -- the three backends follow it ---------------------------------------------------------------


class Recorder:
    """What a backend ran, as (clock, kind, the timeline's index or the kind's count)."""

    def __init__(self, now: Any) -> None:
        self.now = now
        self.seen: list[tuple[float, Kind, int]] = []

    def wrap(self, kind: Kind, real: Any = None) -> Any:
        def recorded(*args: Any) -> Any:
            arg = args[0] if kind == Kind.TIMELINE else sum(1 for s in self.seen if s[1] == kind)
            self.seen.append((self.now(), kind, arg))
            return real(*args) if real is not None else None
        return recorded

    def in_plan_order(self, plan: list[tuple[float, Kind, int]]) -> bool:
        """The same events in the same order, none before its planned time."""
        return ([(k, a) for _, k, a in self.seen] == [(k, a) for _, k, a in plan]
                and all(at >= t for (at, _, _), (t, _, _) in zip(self.seen, plan, strict=True)))


def test_the_simulator_runs_the_plan_in_its_order() -> None:
    cell = make_cell()
    simulation = Simulation(cell)
    recorder = Recorder(lambda: simulation.now)
    for name, kind in (("timeline", Kind.TIMELINE), ("sample", Kind.SAMPLE),
                       ("hpa_sync", Kind.HPA_SYNC), ("scrape_metrics", Kind.METRICS_SCRAPE),
                       ("ipvs_graceful_pass", Kind.IPVS_GRACEFUL)):
        setattr(simulation, name, recorder.wrap(kind, getattr(simulation, name)))
    result = simulation.run(lambda t: None)
    assert recorder.seen == planned(cell)  # in virtual time: exactly at the planned times
    assert sorted(result.samples["t"].unique()) == schedule.sample_times(cell.config)


def test_the_lab_runs_the_plan_in_its_order() -> None:
    cell = make_cell()
    clock = FakeClock()
    lab = LabCell(cell, clock=clock, sleep=clock.sleep)
    recorder = Recorder(lab.now)
    for name, kind in (("timeline", Kind.TIMELINE), ("sample", Kind.SAMPLE),
                       ("hpa_sync", Kind.HPA_SYNC), ("scrape_cpu", Kind.METRICS_SCRAPE)):
        setattr(lab, name, recorder.wrap(kind))  # the real ones need a running lab
    lab.kube_proxy.graceful_pass = recorder.wrap(Kind.IPVS_GRACEFUL)  # type: ignore[method-assign]
    lab.t0 = clock()
    try:
        lab.run_schedule(lambda t: None)
    finally:
        lab.teardown()
    assert recorder.in_plan_order(planned(cell))


def test_kind_runs_the_plan_in_its_order() -> None:
    cell = make_cell(duration=40.0)
    clock = FakeClock()
    api = InMemoryKubeDouble()
    driver = KubeCell(cell, api, "kpbench-t-1", "img:1", FakeNodes(api, "kpbench-t-1", cell.mode),
                      clock=clock, sleep=clock.sleep, wall_clock=clock.wall)
    recorder = Recorder(driver.now)
    driver.timeline = recorder.wrap(Kind.TIMELINE, driver.timeline)  # type: ignore[method-assign]
    driver.sample = recorder.wrap(Kind.SAMPLE, driver.sample)  # type: ignore[method-assign]
    driver.run(lambda t: None)
    assert recorder.in_plan_order(planned(cell, modelled_control=False))


# -- the real-time loop -------------------------------------------------------------------------


class JitteryClock:
    """A clock that only moves when slept on, and then sometimes oversleeps or wakes early
    (a loaded machine, a signal), never by less than zero."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds * self.rng.choice([0.1, 0.5, 1.0, 1.0, 3.0])


@pytest.mark.parametrize("seed", range(40))
def test_the_real_time_loop_never_runs_an_event_early_and_keeps_the_order(seed: int) -> None:
    rng = random.Random(seed)
    clock = JitteryClock(rng)
    times = [round(rng.uniform(0, 20), rng.choice([0, 1, 3])) for _ in range(30)]
    kinds = [rng.choice(schedule.PLANNED) for _ in times]
    plan = sorted(Planned(t, schedule.order_of(k, i), k, i)
                  for i, (t, k) in enumerate(zip(times, kinds, strict=True)))
    queue = EventQueue(plan)
    ran: list[tuple[float, float, Kind, int]] = []  # (clock, planned, kind, arg)

    def handler(kind: Kind) -> schedule.Handler:
        def run(t: float, arg: int) -> None:
            ran.append((clock.now(), t, kind, arg))
            if kind == Kind.SAMPLE and rng.random() < 0.5:  # events cause others, some at once
                queue.at(t + rng.choice([0.0, 0.0, 0.7]), Kind.PUBLISH, arg)
            clock.t += rng.choice([0.0, 0.01, 0.4])  # handlers take time
        return run

    handlers = {kind: handler(kind) for kind in Kind}
    RealTimeLoop(queue, clock.now, clock.sleep, max_sleep=0.5).run(handlers, until=15.0)
    assert all(at >= t for at, t, _, _ in ran), "an event ran before its time"
    assert all(t <= 15.0 for _, t, _, _ in ran) and all(t > 15.0 for t, *_ in queue.heap)
    expected_planned = [(p.t, p.kind, p.arg) for p in plan if p.t <= 15.0]
    assert [(t, k, a) for _, t, k, a in ran if k in schedule.PLANNED] == expected_planned
    keys = [(t, schedule.rank(k)) for _, t, k, _ in ran]
    # Planned events never run after a later one; a dynamic event scheduled for an instant
    # already past runs as soon as the loop sees it, so only the planned order is total.
    assert all(a <= b for a, b in zip([k for k in keys if k[1] < schedule.DYNAMIC_RANK],
                                      [k for k in keys if k[1] < schedule.DYNAMIC_RANK][1:],
                                      strict=False))


def test_the_real_time_loop_refuses_a_kind_without_handler() -> None:
    queue = EventQueue([Planned(1.0, schedule.order_of(Kind.HPA_SYNC, 0), Kind.HPA_SYNC, 0)])
    clock = FakeClock()
    with pytest.raises(ValueError, match="no handler for HPA_SYNC"):
        RealTimeLoop(queue, clock, clock.sleep).run({Kind.SAMPLE: lambda t, a: None}, 10.0)
