"""The Kubernetes control plane as kpbench models it, between an endpoint change and a
connection: kube-proxy's per-node sync loop, the kubelet's readiness probe, the Deployment and
ReplicaSet controllers, the scheduler's placement, metrics-server and the HPA. Pure code driven by
the caller's clock; `sim` calls it in virtual time, `lab` in real time, so both follow one rule.

Each rule's docstring names the Kubernetes file it follows (paths in kubernetes/kubernetes unless
another repository is named; the pinned version is v1.34, kind's node image). In short:

* kube-proxy (`SyncRunner`, `min_sync_seconds`, `propagation_delays`, `ipvs_insertion_order`):
  every node runs its own bounded-frequency sync loop; an endpoint change reaches each node after
  its own latency, an isolated change is synced at once, later ones wait `minSyncPeriod` after the
  previous sync's completion and coalesce; IPVS adds one sync's new endpoints in Go map order.
* kubelet (`ready_time`): readiness is probed every `periodSeconds` from the pod's own phase.
* Deployment rollout (`reconcile`) and ReplicaSet pod choice (`deletion_order`): rolling.go's
  arithmetic; ActivePodsWithRanks with LogarithmicScaleDown and random UIDs.
* Scheduler (`schedule`): default score plugins that differ between nodes here: soft topology
  spread (system default constraints) and least-allocated / balanced resources.
* metrics-server (`MetricsServer`) and HPA (`Autoscaler`): usage averaged over the metric
  window, no metric for a fresh container at first, replica_calculator.go's pod groups (missing,
  unready, cpuInitializationPeriod) and whole-percent utilisation.
"""

from __future__ import annotations

import functools
import math
import random
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from kpbench.config import ROOT_SEED, Hpa

T = TypeVar("T", bound=Any)
SCALE_UP_PERIOD_SECONDS = 15.0
# Pods that exist when a cell starts were created, started and ready this long before it.
PREEXISTING_SECONDS = 3600.0
# The backend pod's memory request (manifests/app/backend.yaml.j2), for the scheduler's scores.
MEMORY_REQUEST_MIB = 64.0

# Keys of a cell's independent random streams (after ROOT_SEED and the seed).
STREAM_KUBE_PROXY = 101  # endpoint propagation delays, one draw per node and change
STREAM_IPVS_ORDER = 102  # + node: that node's IPVS insertion order
STREAM_KUBELET = 103  # server start times, probe phases, pod UIDs
STREAM_METRICS = 104  # metrics-server's scrape phase


def stream(seed: int, *key: int) -> random.Random:
    """The cell's random stream `key`: independent of every other stream and of the mode."""
    state = np.random.SeedSequence([ROOT_SEED, seed, *key]).generate_state(2)
    return random.Random((int(state[0]) << 32) | int(state[1]))


def generator(seed: int, *key: int) -> np.random.Generator:
    """A numpy generator for stream `key` (vector draws)."""
    return np.random.default_rng(np.random.SeedSequence([ROOT_SEED, seed, *key]))


@dataclass(slots=True)
class Pod:
    """A backend pod's lifecycle as the control plane sees it."""

    index: int
    name: str
    revision: int
    node: int
    created_at: float
    ready_at: float | None = None
    terminating_at: float | None = None
    deleted_at: float | None = None
    started_at: float | None = None  # its container started (the pod is Running from then on)
    uid: int = 0  # metadata.uid compared as a string: a random order

    @property
    def live(self) -> bool:
        """Counted by its ReplicaSet: created and not terminating."""
        return self.terminating_at is None and self.deleted_at is None

    @property
    def ready(self) -> bool:
        return self.ready_at is not None and self.live


@dataclass(frozen=True)
class Plan:
    """What the Deployment controller asks for now: new pods (of `revision`) and deletions."""

    create: int = 0
    delete: tuple[Pod, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.create or self.delete)


# -- kube-proxy --

MIN_SYNC_SECONDS = {"iptables": 1.0, "nftables": 1.0, "ipvs": 0.0}


def min_sync_seconds(mode: str, configured: float | None) -> float:
    """kube-proxy's `minSyncPeriod` for `mode` (`<mode>.minSyncPeriod` in KubeProxyConfiguration).

    pkg/proxy/apis/config/v1alpha1/defaults.go defaults `iptables.minSyncPeriod` and
    `nftables.minSyncPeriod` to 1 s and never sets `ipvs.minSyncPeriod` (0: every change is
    synced at once); conversion.go hands the mode's own value to the proxier. kind's kubeadm
    config sets `iptables.minSyncPeriod: 1s`, which only the iptables mode reads.
    """
    if configured is not None:
        return configured
    return MIN_SYNC_SECONDS["ipvs" if mode.startswith("ipvs-") else mode]


@dataclass
class SyncRunner:
    """One node's kube-proxy sync loop (pkg/proxy/runner/bounded_frequency_runner.go).

    At least `min_interval` between the *completion* of one sync and the start of the next;
    changes that arrive meanwhile coalesce into that next sync; a change that arrives after the
    cooldown is synced at once. `request` returns when the sync for a change that reached the node
    at `now` starts, or None when a sync is already scheduled (it will see the change).
    """

    min_interval: float
    last_completion: float = -math.inf
    scheduled: bool = False

    def request(self, now: float) -> float | None:
        if self.scheduled:
            return None
        self.scheduled = True
        return max(now, self.last_completion + self.min_interval)

    def run(self, completion: float) -> None:
        """The scheduled sync started; it completes at `completion`."""
        self.scheduled = False
        self.last_completion = completion


def sync_duration(endpoints: int, base_seconds: float, per_endpoint_seconds: float) -> float:
    """How long one node's sync of the Service's rules takes (measured for iptables-restore)."""
    return base_seconds + per_endpoint_seconds * endpoints


def propagation_delays(gen: np.random.Generator, count: int, median: float, sigma: float
                       ) -> np.ndarray:
    """Endpoint change -> each of `count` nodes' kube-proxy has it: kubelet status, EndpointSlice
    controller (pkg/controller/endpointslice), API watch. Lognormal, independent per node."""
    if sigma == 0:
        return np.full(count, median)
    return median * np.exp(sigma * gen.standard_normal(count))


def ipvs_insertion_order(view: AbstractSet[T], new: AbstractSet[T], rng: random.Random
                         ) -> list[T]:
    """The order in which a node's kube-proxy adds this sync's endpoints to IPVS.

    pkg/proxy/ipvs/proxier.go syncEndpoint adds `newEndpoints.UnsortedList()`, a Go map's order:
    random on every sync and on every node; endpoints IPVS already holds are skipped, so only the
    order of the `new` ones matters. New endpoints first, shuffled with the node's own stream.
    """
    return ipvs_new_order(new, rng) + list(view - new)


def ipvs_new_order(new: AbstractSet[T], rng: random.Random) -> list[T]:
    """The endpoints new to a sync in the order the node's kube-proxy adds them (see
    `ipvs_insertion_order`, which puts the rest of the view after them)."""
    fresh = sorted(new)
    rng.shuffle(fresh)
    return fresh


@dataclass(frozen=True)
class NodeSync:
    """What one consumer's sync decided: apply `view` at `apply_at`; `new` are the endpoints it
    adds (for the IPVS insertion order); look again at `next_update` if not None. `joined` and
    `left` are how `view` differs from the consumer's previous sync's."""

    apply_at: float
    view: frozenset[int]
    new: frozenset[int]
    next_update: float | None
    joined: frozenset[int] = frozenset()
    left: frozenset[int] = frozenset()


class EndpointFanout:
    """The Service's endpoints on their way to every node's kube-proxy (or the L7 proxies).

    Changes of one instant form one version (one EndpointSlice update). Each consumer receives a
    version after its own propagation delay, in order (a watch is ordered), and syncs through its
    own `SyncRunner`; a sync sees every version that arrived by its start and its rules take
    effect when it completes. The caller schedules the events this returns: `publish` -> per
    consumer an update time; `update` -> a sync start; `sync` -> when to apply which view.
    """

    def __init__(self, consumers: int, initial: Iterable[int], min_interval: float,
                 gen: np.random.Generator, propagation: tuple[float, float],
                 duration: Callable[[int], float]) -> None:
        self.consumers = consumers
        self.runners = [SyncRunner(min_interval) for _ in range(consumers)]
        self.views = [set(initial) for _ in range(consumers)]
        self.known = [0] * consumers  # newest version each consumer has synced
        self.watching = np.zeros(consumers, dtype=bool)  # an update or sync is queued
        self._gen, self._propagation, self._duration = gen, propagation, duration
        self._log: list[tuple[int, bool]] = []  # (endpoint, added), in order
        self._ends = [0]  # version v covers _log[_ends[v - 1]:_ends[v]]
        self._arrivals: list[np.ndarray] = [np.zeros(consumers)]
        self._pending: list[tuple[int, bool]] = []

    def change(self, endpoint: int, added: bool) -> bool:
        """Record a change; True when it is the first of this instant (publish it afterwards)."""
        self._pending.append((endpoint, added))
        return len(self._pending) == 1

    def publish(self, now: float) -> list[tuple[int, float]]:
        """One version of everything changed since the last; (consumer, update time) to queue."""
        self._log += self._pending
        self._pending = []
        self._ends.append(len(self._log))
        delays = propagation_delays(self._gen, self.consumers, *self._propagation)
        arrival = np.maximum(now + delays, self._arrivals[-1])
        self._arrivals.append(arrival)
        idle = np.flatnonzero(~self.watching)
        self.watching[idle] = True
        return [(int(c), float(arrival[c])) for c in idle]

    def update(self, consumer: int, now: float) -> float | None:
        """A version reached `consumer`: when its sync starts (None: one is already queued)."""
        return self.runners[consumer].request(now)

    def sync(self, consumer: int, now: float) -> NodeSync:
        known, latest = self.known[consumer], len(self._ends) - 1
        arrivals = self._arrivals
        newest = known + bisect_right(range(known + 1, latest + 1), now,
                                      key=lambda v: arrivals[v][consumer])
        view = self.views[consumer]
        added: set[int] = set()
        was_in_view: dict[int, bool] = {}  # of each endpoint this sync's changes touch
        for endpoint, is_added in self._log[self._ends[known]:self._ends[newest]]:
            if endpoint not in was_in_view:
                was_in_view[endpoint] = endpoint in view
            if is_added:
                view.add(endpoint)
                added.add(endpoint)
            else:
                view.discard(endpoint)
                added.discard(endpoint)
        self.known[consumer] = newest
        completion = now + self._duration(len(view))
        self.runners[consumer].run(completion)
        next_update = None
        if newest < latest:
            next_update = float(arrivals[newest + 1][consumer])
        else:
            self.watching[consumer] = False
        joined = frozenset(e for e, was in was_in_view.items() if not was and e in view)
        left = frozenset(e for e, was in was_in_view.items() if was and e not in view)
        return NodeSync(completion, frozenset(view), frozenset(added), next_update, joined, left)


# -- kubelet --


def ready_time(container_started: float, server_up_after: float, probe_phase: float,
               period: float) -> float:
    """The first readiness probe that finds the server answering.

    pkg/kubelet/prober/worker.go: the pod's probe worker probes every `periodSeconds` from its own
    start (after a random part of the period when the kubelet has just started), so relative to
    the container's start its phase is `probe_phase` in [0, period). The server answers
    `server_up_after` seconds after its container started; each pod's own start time and phase
    make the pods of one surge batch ready at different moments.
    """
    first = container_started + probe_phase
    up = container_started + server_up_after
    if up <= first:
        return first
    return first + period * math.ceil((up - first) / period - 1e-9)


# -- Deployment and ReplicaSet controllers --


def _log2_rank(now: float, stamp: float) -> int:
    """controller_utils.go logarithmicRankDiff: int64(log2(now - t)) in nanoseconds, -1 if <= 0.
    API timestamps have whole-second resolution, so `stamp` is truncated first."""
    elapsed = (now - math.floor(stamp)) * 1e9
    return int(math.log2(elapsed)) if elapsed > 0 else -1


def deletion_order(pods: Iterable[Pod], related: Sequence[Pod], now: float) -> list[Pod]:
    """Which pods the ReplicaSet controller deletes first (pkg/controller/controller_utils.go
    ActivePodsWithRanks.Less; ranks from pkg/controller/replicaset/replica_set.go
    getPodsRankedByRelatedPodsOnSameNode).

    Pending (container not started) before running; not ready before ready; pods on nodes that
    hold more active pods of the Deployment first; then, with LogarithmicScaleDown (on by default),
    the more recently ready in log2 buckets of the time since they became ready, then created, and
    within a bucket by UID, which is random. (Go compares UIDs only when the ready times differ;
    pods ready in the same second go on to the creation buckets, as here.)
    """
    per_node = Counter(p.node for p in related if p.live)

    def key(p: Pod) -> tuple[bool, bool, int, int, int, int]:
        ready = p.ready
        return (
            p.started_at is not None and p.started_at <= now,  # Pending first
            ready,  # not ready first
            -per_node[p.node],  # doubled-up nodes first
            _log2_rank(now, p.ready_at) if ready and p.ready_at is not None else 0,
            _log2_rank(now, p.created_at),
            p.uid,
        )

    return sorted(pods, key=key)


def controller_delay(rng: random.Random, propagation: tuple[float, float]) -> float:
    """A pod's readiness reaches the Deployment controller: kubelet status update, API watch,
    workqueue (pkg/controller/deployment/deployment_controller.go enqueueDeployment). The same
    path as the endpoints' (`propagation_delays`). A Deployment already queued is not queued
    again (client-go util/workqueue), so events inside this delay share one sync."""
    median, sigma = propagation
    return median * math.exp(sigma * rng.gauss(0.0, 1.0)) if sigma else median


def reconcile(
    pods: Sequence[Pod], replicas: int, revision: int, max_surge: int, max_unavailable: int,
    now: float = 0.0,
) -> Plan:
    """One deployment-controller sync: at most one scaling step, as rolloutRolling does
    (pkg/controller/deployment/rolling.go, sync.go)."""
    live = [p for p in pods if p.live]
    new = [p for p in live if p.revision == revision]
    old = [p for p in live if p.revision != revision]

    def first(candidates: list[Pod], count: int) -> tuple[Pod, ...]:
        return tuple(deletion_order(candidates, live, now)[:count])

    if not old:  # steady state or plain scaling
        if len(new) < replicas:
            return Plan(create=replicas - len(new))
        if len(new) > replicas:
            return Plan(delete=first(new, len(new) - replicas))
        return Plan()
    # reconcileNewReplicaSet
    if len(new) > replicas:
        return Plan(delete=first(new, len(new) - replicas))
    if len(new) < replicas:
        scale_up = min(replicas + max_surge - len(live), replicas - len(new))
        if scale_up > 0:
            return Plan(create=scale_up)
    # reconcileOldReplicaSets
    min_available = replicas - max_unavailable
    new_unavailable = sum(1 for p in new if not p.ready)
    max_scaled_down = len(live) - min_available - new_unavailable
    if max_scaled_down <= 0:
        return Plan()
    unhealthy = [p for p in old if not p.ready]
    if unhealthy:
        return Plan(delete=first(unhealthy, max_scaled_down))
    available = sum(1 for p in live if p.ready)
    scale_down = min(available - min_available, len(old))
    if scale_down <= 0:
        return Plan()
    return Plan(delete=first(old, scale_down))


# -- scheduler --

MAX_NODE_SCORE = 100
HOSTNAME_MAX_SKEW = 3  # the system default constraint on kubernetes.io/hostname
TOPOLOGY_SPREAD_WEIGHT, RESOURCES_FIT_WEIGHT, BALANCED_ALLOCATION_WEIGHT = 2, 1, 1


@dataclass(frozen=True)
class NodeResources:
    cpu_millicores: float
    memory_mib: float


def schedule(
    same_revision: Sequence[int],
    assigned: Sequence[int],
    request: NodeResources,
    allocatable: NodeResources,
    rng: random.Random,
) -> int:
    """The node kube-scheduler picks for a new backend pod: the highest weighted score, ties at
    random (pkg/scheduler/schedule_one.go selectHost).

    `same_revision`: live (not terminating) pods of the new pod's ReplicaSet per node;
    `assigned`: backend pods per node that still hold their requests (terminating ones too,
    until deleted). Default weights (pkg/scheduler/apis/config/v1/default_plugins.go): topology
    spread 2, resources fit 1, balanced allocation 1; the other score plugins give every node the
    same score here. Topology spread (plugins/podtopologyspread/scoring.go) with the system
    default constraints: only `kubernetes.io/hostname` (maxSkew 3) applies, kind nodes carry no
    zone label; it counts the pods matching the Service's and the ReplicaSet's selectors, which
    include the pod-template-hash. Resources (plugins/noderesources/least_allocated.go,
    balanced_allocation.go) count the backend pods' CPU and memory requests only.
    """
    nodes = len(same_revision)
    weight = math.log(nodes + 2)
    # scoreForCount, rounded half away from zero as Go's math.Round
    raw = [math.floor(count * weight + (HOSTNAME_MAX_SKEW - 1) + 0.5) for count in same_revision]
    low, high = min(raw), max(raw)
    scores = [
        TOPOLOGY_SPREAD_WEIGHT * (MAX_NODE_SCORE if high == 0
                                  else MAX_NODE_SCORE * (high + low - s) // high)
        + _resource_score(assigned[node] + 1, request, allocatable)
        for node, s in enumerate(raw)
    ]
    top = max(scores)
    best = [node for node, score in enumerate(scores) if score == top]
    return best[0] if len(best) == 1 else rng.choice(best)


@functools.lru_cache(maxsize=4096)
def _resource_score(pods: int, request: NodeResources, allocatable: NodeResources) -> int:
    """Least-allocated and balanced-allocation scores, weighted, of a node holding `pods`
    backend pods (the incoming one included)."""
    cpu, memory = pods * request.cpu_millicores, pods * request.memory_mib

    def least(requested: float, capacity: float) -> int:
        if requested > capacity:
            return 0
        return int((capacity - requested) * MAX_NODE_SCORE // capacity)

    fit = (least(cpu, allocatable.cpu_millicores) + least(memory, allocatable.memory_mib)) // 2
    fractions = (min(cpu / allocatable.cpu_millicores, 1.0),
                 min(memory / allocatable.memory_mib, 1.0))
    balanced = int((1 - abs(fractions[0] - fractions[1]) / 2) * MAX_NODE_SCORE)
    return RESOURCES_FIT_WEIGHT * fit + BALANCED_ALLOCATION_WEIGHT * balanced


class Placement:
    """Where the backend pods are, as the scheduler counts them, and `schedule` over it."""

    def __init__(self, nodes: int, request: NodeResources, allocatable: NodeResources) -> None:
        self.nodes, self.request, self.allocatable = nodes, request, allocatable
        self.assigned = [0] * nodes  # pods holding their requests: until deleted
        self.live: dict[int, list[int]] = {}  # revision -> live pods per node

    def place(self, revision: int, rng: random.Random) -> int:
        live = self.live.setdefault(revision, [0] * self.nodes)
        node = schedule(live, self.assigned, self.request, self.allocatable, rng)
        live[node] += 1
        self.assigned[node] += 1
        return node

    def terminating(self, pod: Pod) -> None:
        self.live[pod.revision][pod.node] -= 1

    def deleted(self, pod: Pod) -> None:
        self.assigned[pod.node] -= 1


# -- metrics-server and the HPA --

FRESH_CONTAINER_MIN_SECONDS = 10.0


@dataclass(frozen=True)
class PodMetric:
    """One pod's CPU as metrics.k8s.io serves it: millicores, scrape time, window."""

    millicores: int
    timestamp: float
    window: float


@dataclass
class MetricsServer:
    """kubernetes-sigs/metrics-server (pkg/storage/pod.go, pkg/scraper): every `resolution`
    seconds (`--metric-resolution`, 15 s) it reads each container's cumulative CPU and serves the
    rate between the last two points, so usage is averaged over the window. A container started
    less than `resolution` before a scrape is given a start point of zero usage at its start time,
    if it started at least 10 s before; younger ones have no metric until the next scrape.
    Usage in nanocores, read by the HPA as `MilliValue()`, which rounds up."""

    resolution: float = 15.0
    _last: dict[int, tuple[float, float]] = field(default_factory=dict)
    _prev: dict[int, tuple[float, float]] = field(default_factory=dict)

    def scrape(self, now: float, pods: Iterable[Pod], cpu_seconds: Callable[[Pod], float]
               ) -> None:
        """Record each running pod's cumulative CPU seconds at `now`."""
        last, prev = {}, {}
        for pod in pods:
            if pod.started_at is None or pod.started_at > now or pod.deleted_at is not None:
                continue
            point = (now, cpu_seconds(pod))
            last[pod.index] = point
            age = now - pod.started_at
            if FRESH_CONTAINER_MIN_SECONDS <= age < self.resolution:
                prev[pod.index] = (pod.started_at, 0.0)
            elif pod.index in self._last and self._last[pod.index][0] < now:
                prev[pod.index] = self._last[pod.index]
        self._last, self._prev = last, prev

    def metrics(self) -> dict[int, PodMetric]:
        result = {}
        for index, (t, used) in self._last.items():
            if index not in self._prev:
                continue
            t0, used0 = self._prev[index]
            window = t - t0
            nanocores = int((used - used0) * 1e9 / window)
            result[index] = PodMetric(max(0, math.ceil(nanocores / 1e6)), t, window)
        return result


def autoscaler(hpa: Hpa) -> Autoscaler:
    """The HPA of an experiment's `backend.hpa`."""
    return Autoscaler(hpa.min_replicas, hpa.max_replicas, hpa.target_cpu_utilization,
                      hpa.tolerance, hpa.scale_down_stabilization_seconds,
                      hpa.cpu_initialization_period_seconds, hpa.initial_readiness_delay_seconds)


@dataclass
class Autoscaler:
    """The HPA's replica calculation and behaviour (autoscaling/v2 defaults)."""

    min_replicas: int
    max_replicas: int
    target_utilization: float  # percent of the CPU request
    tolerance: float = 0.1
    scale_down_stabilization_seconds: float = 300.0
    cpu_initialization_period: float = 300.0
    initial_readiness_delay: float = 30.0
    _recommendations: list[tuple[float, int]] = field(default_factory=list)
    _scale_ups: list[tuple[float, int]] = field(default_factory=list)

    def desired(
        self,
        now: float,
        current: int,
        ready_utilization: Sequence[float],
        unready: int,
    ) -> int:
        """Replicas the HPA sets at `now` from ready pods' utilisation (percent) and a count of
        unready ones (0% on scale-up), with the behaviour's limits
        (pkg/controller/podautoscaler/horizontal.go)."""
        requests = [100] * (len(ready_utilization) + unready)
        metrics = [int(u) for u in ready_utilization]
        recommendation = self._calculate(current, metrics, requests[: len(metrics)], [], unready)
        return self._behave(now, current, recommendation)

    def _behave(self, now: float, current: int, recommendation: int) -> int:
        self._recommendations.append((now, recommendation))
        window = now - self.scale_down_stabilization_seconds
        self._recommendations = [(t, r) for t, r in self._recommendations if t >= window]
        if recommendation < current:
            recommendation = min(current, max(r for _, r in self._recommendations))
        if recommendation > current:
            period = now - SCALE_UP_PERIOD_SECONDS
            self._scale_ups = [(t, n) for t, n in self._scale_ups if t > period]
            base = current - sum(n for _, n in self._scale_ups)
            limit = max(2 * base, base + 4)
            recommendation = min(recommendation, max(limit, current))
        recommendation = max(self.min_replicas, min(self.max_replicas, recommendation))
        if recommendation > current:
            self._scale_ups.append((now, recommendation - current))
        return recommendation

    def evaluate(
        self,
        now: float,
        current: int,
        pods: Iterable[Pod],
        metrics: Mapping[int, PodMetric],
        request_millicores: float,
    ) -> tuple[int, int | None]:
        """(desired replicas, utilisation %) from metrics.k8s.io, as one HPA sync sees it.

        pkg/controller/podautoscaler/replica_calculator.go groupPods: terminating and Pending pods
        are ignored; pods without a metric are missing (0% on scale-up, 100% on scale-down);
        inside `cpuInitializationPeriod` of its start a pod is unready while not ready or while
        its metric window began before it became ready; later only a never-ready pod is. Unready
        pods count as 0% when scaling up. Utilisation is `int32(sum(usage) * 100 / sum(requests))`
        over the pods with metrics, in whole percents.
        """
        request = int(request_millicores)
        ready_metrics: list[int] = []
        missing = unready = 0
        for pod in pods:
            if not pod.live or pod.started_at is None or pod.started_at > now:
                continue
            metric = metrics.get(pod.index)
            if metric is None:
                missing += 1
                continue
            ready_since = pod.ready_at if pod.ready else None
            if pod.started_at + self.cpu_initialization_period > now:
                not_counted = (ready_since is None
                               or metric.timestamp - metric.window < math.floor(ready_since))
            else:
                not_counted = (ready_since is None
                               and pod.started_at + self.initial_readiness_delay > now)
            if not_counted:
                unready += 1
                continue
            ready_metrics.append(metric.millicores)
        if not ready_metrics:
            return current, None  # "did not receive metrics for targeted pods": no change
        utilization = sum(ready_metrics) * 100 // (request * len(ready_metrics))
        recommendation = self._calculate(current, ready_metrics, [request] * len(ready_metrics),
                                         [request] * missing, unready)
        return self._behave(now, current, recommendation), utilization

    def _calculate(self, current: int, metrics: list[int], requests: list[int],
                   missing_requests: list[int], unready: int) -> int:
        """GetResourceReplicas: the ratio, then the missing / unready adjustments."""
        if not metrics:
            return current
        utilization = sum(metrics) * 100 // sum(requests)
        ratio = utilization / self.target_utilization
        scale_up_with_unready = unready > 0 and ratio > 1.0
        if not scale_up_with_unready and not missing_requests:
            if abs(1.0 - ratio) <= self.tolerance:
                return current
            return math.ceil(ratio * len(metrics))
        values, totals = list(metrics), list(requests)
        if missing_requests:
            if ratio < 1.0:
                fallback = max(100, int(self.target_utilization))
                values += [r * fallback // 100 for r in missing_requests]
                totals += missing_requests
            elif ratio > 1.0:
                values += [0] * len(missing_requests)
                totals += missing_requests
        if scale_up_with_unready:
            values += [0] * unready
            totals += [requests[0]] * unready
        new_ratio = (sum(values) * 100 // sum(totals)) / self.target_utilization
        if (abs(1.0 - new_ratio) <= self.tolerance or (ratio < 1.0 < new_ratio)
                or (ratio > 1.0 > new_ratio)):
            return current
        replicas = math.ceil(new_ratio * len(values))
        if (new_ratio < 1.0 and replicas > current) or (new_ratio > 1.0 and replicas < current):
            return current
        return replicas
