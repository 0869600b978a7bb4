"""What each Locust user does, derived from the experiment config; and the client-side tally.

Pure code (no Locust, no gevent), so it can be imported and tested anywhere.

Connection ends, mirroring `kpbench.backends.sim`:

- `lifetime`: a duration drawn per connection from `workload.lifetime` (same formulas as the sim);
  the client closes at that moment (reason `lifetime`) and reconnects at once.
- `reconnect.policy: periodic`: `seconds * (1 + uniform(-jitter, jitter))`, reason `reconnect`;
  the earlier of this and the lifetime wins, as in the sim.
- `reconnect.policy: after-requests`: after `requests` answered requests the connection is closed
  (reason `reconnect`) when the next request is due, and that request opens the new connection.
- server-side ends are noticed by the client: `max-age` and `server-shutdown` when the server
  announces them (`X-Kpbench-Close` on HTTP); a connection the server closed silently is
  attributed to `max-age` when `backend.max_connection_age_seconds` is set and the connection is
  at least 90% that old (grpc core jitters the age by ±10%), else to `server-shutdown`;
  `reset` for an error on an open connection (RST, EOF mid-response, timeout, gRPC UNAVAILABLE).
- `load-change`: closed because a `load` event lowered the number of connections.
- `end`: closed because the run ended.

A failed connect is retried at the next paced request, which after a connect timeout is due at
once.

`load` events are followed by the workload itself, on its own clock (t = 0 when Locust starts
the test, which is when the cell's clients start their ramp): each user paces its requests at
`requests_per_second_at(t)`, and when the events change `connections` the master's load shape
(`users_at`) moves the number of users, ramping up over `workload.ramp_seconds` like the start.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from kpbench.config import CLOSE_REASONS, Experiment

SILENT_MAX_AGE_FRACTION = 0.9
# A request, and an HTTP connect (or a gRPC channel's first call), gives up after this long: a
# connect whose SYNs the node drops silently fails as a timeout then (the simulator follows it).
REQUEST_TIMEOUT_SECONDS = 10.0
SUMMARY_FORMAT = "kpbench-workload-summary/1"


def connect_failure(error: BaseException) -> str:
    """How a connect failed as the client saw it: `refused` (the SYN answered by a reset or an
    ICMP port unreachable), `timed out` (no answer, e.g. beyond the node's ICMP rate limit) or
    `other`. gRPC says it only in its status text."""
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, TimeoutError):
        return "timed out"
    text = str(error).lower()
    if "refused" in text:
        return "refused"
    if "deadline" in text or "timed out" in text or "timeout" in text:
        return "timed out"
    return "other"


def workload_failures(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The failed connects of a workload summary as `connection_failed` event details: one per
    reason, or one "counted by the workload" for a summary that has no reasons."""
    connections = summary.get("connections") or {}
    by_reason = {k: v for k, v in (connections.get("failed_by_reason") or {}).items() if v}
    if not by_reason:
        failed = connections.get("failed", 0)
        return [{"count": failed, "reason": "counted by the workload"}] if failed else []
    return [{"count": n, "reason": f"{reason} (counted by the workload)"}
            for reason, n in sorted(by_reason.items())]


def spawn_rate(users: int, ramp_seconds: float) -> float:
    """The spawn rate that opens `users` connections evenly over `ramp_seconds` (0: at once)."""
    rate = users / ramp_seconds if ramp_seconds > 0 and users else max(users, 1)
    return max(rate, 0.001)


@dataclass(frozen=True)
class WorkloadPlan:
    """The parts of an experiment config that a load-generating process needs."""

    protocol: str
    connections: int
    requests_per_second: float
    ramp_seconds: float
    duration_seconds: float
    lifetime_distribution: str
    lifetime_mean_seconds: float | None
    lifetime_sigma: float | None
    lifetime_alpha: float | None
    reconnect_policy: str
    reconnect_seconds: float | None
    reconnect_jitter: float
    reconnect_requests: int | None
    max_connection_age_seconds: float | None
    proxy: str = "none"  # `l7`: connections end at an L7 proxy, requests reach any pod
    rate_changes: tuple[tuple[float, float], ...] = ()  # (at, requests_per_second), by time
    connection_changes: tuple[tuple[float, int], ...] = ()  # (at, connections), by time

    @classmethod
    def from_experiment(cls, experiment: Experiment) -> WorkloadPlan:
        workload = experiment.workload
        return cls(
            protocol=workload.protocol,
            connections=workload.connections,
            requests_per_second=workload.requests_per_second,
            ramp_seconds=workload.ramp_seconds,
            duration_seconds=experiment.duration_seconds,
            lifetime_distribution=workload.lifetime.distribution,
            lifetime_mean_seconds=workload.lifetime.mean_seconds,
            lifetime_sigma=workload.lifetime.sigma,
            lifetime_alpha=workload.lifetime.alpha,
            reconnect_policy=workload.reconnect.policy,
            reconnect_seconds=workload.reconnect.seconds,
            reconnect_jitter=workload.reconnect.jitter_fraction,
            reconnect_requests=workload.reconnect.requests,
            max_connection_age_seconds=experiment.backend.max_connection_age_seconds,
            proxy=experiment.workload.proxy,
            # by time; events at the same time in file order, so the last one wins
            rate_changes=tuple(sorted(
                ((e.at, e.requests_per_second) for e in experiment.events
                 if e.action == "load" and e.requests_per_second is not None),
                key=lambda change: change[0])),
            connection_changes=tuple(sorted(
                ((e.at, e.connections) for e in experiment.events
                 if e.action == "load" and e.connections is not None),
                key=lambda change: change[0])),
        )

    def requests_per_second_at(self, elapsed: float) -> float:
        """The per-connection request rate `elapsed` seconds into the test."""
        rate = self.requests_per_second
        for at, value in self.rate_changes:
            if elapsed < at:
                break
            rate = value
        return rate

    def request_interval_at(self, elapsed: float) -> float:
        return 1.0 / self.requests_per_second_at(elapsed)

    def users_at(self, elapsed: float) -> tuple[int, float]:
        """(users, spawn rate) the load shape asks for `elapsed` seconds into the test.

        The start ramps to `connections` over `ramp_seconds`; each change ramps its difference
        over `ramp_seconds` too (all at once when that is 0), as the simulator does.
        """
        users, change = self.connections, self.connections
        for at, value in self.connection_changes:
            if elapsed < at:
                break
            users, change = value, abs(value - users)
        return users, spawn_rate(change, self.ramp_seconds)

    @property
    def request_limit(self) -> int | None:
        """Requests per connection before an after-requests reconnect, or None."""
        return self.reconnect_requests if self.reconnect_policy == "after-requests" else None

    def draw_lifetime(self, rng: random.Random) -> float:
        mean = self.lifetime_mean_seconds or 0.0
        distribution = self.lifetime_distribution
        if distribution == "infinite":
            return math.inf
        if distribution == "fixed":
            return mean
        if distribution == "exponential":
            return rng.expovariate(1.0 / mean)
        if distribution == "lognormal":
            sigma = self.lifetime_sigma or 0.0
            return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)
        alpha = self.lifetime_alpha or 2.0
        return mean * (alpha - 1) / alpha * rng.paretovariate(alpha)

    def client_end(self, rng: random.Random) -> tuple[float, str | None]:
        """Seconds after opening at which the client itself closes, and why (inf, None: never)."""
        end, reason = self.draw_lifetime(rng), "lifetime"
        if self.reconnect_policy == "periodic":
            jitter = self.reconnect_jitter
            seconds = (self.reconnect_seconds or 0.0) * (1 + rng.uniform(-jitter, jitter))
            if seconds < end:
                end, reason = seconds, "reconnect"
        return (end, reason) if math.isfinite(end) else (math.inf, None)

    def silent_close_reason(self, age_seconds: float) -> str:
        """Why the server most likely closed a connection without saying so."""
        max_age = self.max_connection_age_seconds
        if max_age is not None and age_seconds >= SILENT_MAX_AGE_FRACTION * max_age:
            return "max-age"
        return "server-shutdown"


@dataclass
class Tally:
    """Connection and request counts of one load-generating process (or merged: several)."""

    connections_opened: int = 0
    connections_failed: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    closed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))
    requests: int = 0
    requests_failed: int = 0
    requests_by_pod: dict[str, int] = field(default_factory=dict)
    connections_by_pod: dict[str, int] = field(default_factory=dict)
    open_by_pod: dict[str, int] = field(default_factory=dict)
    open_at_stop_by_pod: dict[str, int] | None = None

    def opened(self) -> None:
        self.connections_opened += 1

    def failed_connect(self, error: BaseException) -> None:
        self.connections_failed += 1
        reason = connect_failure(error)
        self.failed_by_reason[reason] = self.failed_by_reason.get(reason, 0) + 1

    def identified(self, pod: str) -> None:
        """The first answer on a connection names the pod it reached."""
        self.connections_by_pod[pod] = self.connections_by_pod.get(pod, 0) + 1
        self.open_by_pod[pod] = self.open_by_pod.get(pod, 0) + 1

    def closed_connection(self, pod: str | None, reason: str) -> None:
        if reason == "end" and self.open_at_stop_by_pod is None:
            self.open_at_stop_by_pod = {k: v for k, v in self.open_by_pod.items() if v}
        self.closed[reason] = self.closed.get(reason, 0) + 1
        if pod is None:
            return
        left = self.open_by_pod.get(pod, 0) - 1
        if left > 0:
            self.open_by_pod[pod] = left
        else:
            self.open_by_pod.pop(pod, None)

    def answered(self, pod: str) -> None:
        self.requests += 1
        self.requests_by_pod[pod] = self.requests_by_pod.get(pod, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        open_at_stop = self.open_at_stop_by_pod
        if open_at_stop is None:
            open_at_stop = {k: v for k, v in self.open_by_pod.items() if v}
        return {
            "connections": {
                "opened": self.connections_opened,
                "failed": self.connections_failed,
                "failed_by_reason": dict(sorted(self.failed_by_reason.items())),
                "closed": dict(self.closed),
                "open": sum(self.open_by_pod.values()),
                "opened_by_pod": dict(sorted(self.connections_by_pod.items())),
                "open_at_stop_by_pod": dict(sorted(open_at_stop.items())),
            },
            "requests": {
                "total": self.requests,
                "failed": self.requests_failed,
                "by_pod": dict(sorted(self.requests_by_pod.items())),
            },
        }


def _add_counts(into: dict[str, int], more: dict[str, int]) -> None:
    for key, value in more.items():
        into[key] = into.get(key, 0) + int(value)


def merge_tallies(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum `Tally.to_dict()` results from several processes (workers) into one."""
    merged = Tally().to_dict()
    for part in parts:
        conns, merged_conns = part["connections"], merged["connections"]
        for key in ("opened", "failed", "open"):
            merged_conns[key] += conns[key]
        for key in ("closed", "opened_by_pod", "open_at_stop_by_pod"):
            _add_counts(merged_conns[key], conns[key])
        _add_counts(merged_conns["failed_by_reason"], conns.get("failed_by_reason", {}))
        for key in ("total", "failed"):
            merged["requests"][key] += part["requests"][key]
        _add_counts(merged["requests"]["by_pod"], part["requests"]["by_pod"])
    for section, key in (("connections", "opened_by_pod"), ("connections", "open_at_stop_by_pod"),
                         ("connections", "failed_by_reason"), ("requests", "by_pod")):
        merged[section][key] = dict(sorted(merged[section][key].items()))
    return merged
