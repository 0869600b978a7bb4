"""The Kubernetes control plane as kpbench models it: Deployment rollout, ReplicaSet pod choice,
pod placement and the HPA. Pure code driven by the caller's clock; `sim` calls it in virtual time,
`lab` in real time.

Rules (design §6.1, research notes on Deployments and the HPA):

* Rolling update (deployment controller, rolling.go): the new ReplicaSet may grow while all
  non-terminating pods stay <= replicas + maxSurge; old pods are removed first when unhealthy,
  then while available pods stay >= replicas - maxUnavailable. maxSurge rounds up,
  maxUnavailable rounds down, and both 0 means maxUnavailable 1.
* Scale-down pod choice (ReplicaSet controller, ActivePodsWithRanks): not-ready before ready,
  pods on nodes holding more of the set first, then the most recently ready, then the newest.
* Placement: the node with the fewest live backend pods (the scheduler's default spreading),
  ties broken at random.
* HPA: every sync, ratio = mean CPU utilisation of ready pods / target; no change within the
  tolerance; desired = ceil(ratio * ready); unready pods count as 0% when scaling up; scale-up
  limited to max(100%, 4 pods) per 15 s; scale-down takes the highest recommendation of the
  stabilisation window; clamped to min..max replicas.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

SCALE_UP_PERIOD_SECONDS = 15.0


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


def deletion_order(pods: Iterable[Pod], all_live: Sequence[Pod]) -> list[Pod]:
    """ReplicaSet's preference for which pods to delete first."""
    per_node = Counter(p.node for p in all_live)
    return sorted(
        pods,
        key=lambda p: (
            p.ready,  # not ready first
            -per_node[p.node],  # doubled-up nodes first
            -(p.ready_at or 0.0),  # most recently ready first
            -p.created_at,  # newest first
            -p.index,
        ),
    )


def reconcile(
    pods: Sequence[Pod], replicas: int, revision: int, max_surge: int, max_unavailable: int
) -> Plan:
    """One deployment-controller sync: at most one scaling step, as rolloutRolling does."""
    live = [p for p in pods if p.live]
    new = [p for p in live if p.revision == revision]
    old = [p for p in live if p.revision != revision]
    if not old:  # steady state or plain scaling
        if len(new) < replicas:
            return Plan(create=replicas - len(new))
        if len(new) > replicas:
            return Plan(delete=tuple(deletion_order(new, live)[: len(new) - replicas]))
        return Plan()
    # reconcileNewReplicaSet
    if len(new) > replicas:
        return Plan(delete=tuple(deletion_order(new, live)[: len(new) - replicas]))
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
    unhealthy = [p for p in deletion_order(old, live) if not p.ready][:max_scaled_down]
    if unhealthy:
        return Plan(delete=tuple(unhealthy))
    available = sum(1 for p in live if p.ready)
    scale_down = min(available - min_available, len(old))
    if scale_down <= 0:
        return Plan()
    return Plan(delete=tuple(deletion_order(old, live)[:scale_down]))


def place(live_per_node: Sequence[int], rng: random.Random) -> int:
    """The node for a new pod: the fewest live pods, ties at random."""
    fewest = min(live_per_node)
    return rng.choice([n for n, count in enumerate(live_per_node) if count == fewest])


@dataclass
class Autoscaler:
    """The HPA's replica calculation and behaviour (autoscaling/v2 defaults)."""

    min_replicas: int
    max_replicas: int
    target_utilization: float  # percent of the CPU request
    tolerance: float = 0.1
    scale_down_stabilization_seconds: float = 300.0
    _recommendations: list[tuple[float, int]] = field(default_factory=list)
    _scale_ups: list[tuple[float, int]] = field(default_factory=list)

    def desired(
        self,
        now: float,
        current: int,
        ready_utilization: Sequence[float],
        unready: int,
    ) -> int:
        """Replicas the HPA sets at `now`; `ready_utilization` in percent of the request."""
        recommendation = self._recommend(current, ready_utilization, unready)
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
        cpu_millicores: Callable[[Pod], float],
        request_millicores: float,
    ) -> tuple[int, float]:
        """(desired replicas, mean utilisation %) from the pods' CPU, as one HPA sync sees it."""
        pods = list(pods)
        ready = [p for p in pods if p.ready]
        unready = sum(1 for p in pods if p.live and not p.ready)
        utilization = [cpu_millicores(p) / request_millicores * 100 for p in ready]
        mean = sum(utilization) / len(utilization) if utilization else 0.0
        return self.desired(now, current, utilization, unready), mean

    def _recommend(self, current: int, ready_utilization: Sequence[float], unready: int) -> int:
        if not ready_utilization:
            return current
        ratio = sum(ready_utilization) / len(ready_utilization) / self.target_utilization
        if abs(1.0 - ratio) <= self.tolerance:
            return current
        if ratio > 1.0 and unready:
            # Not-yet-ready pods count as 0% on scale-up; no change if that flips the decision.
            total = len(ready_utilization) + unready
            ratio = sum(ready_utilization) / total / self.target_utilization
            if ratio <= 1.0 + self.tolerance:
                return current
            return math.ceil(ratio * total)
        return math.ceil(ratio * len(ready_utilization))
