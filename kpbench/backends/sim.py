"""`sim`: a discrete-event model of the data planes, the control plane and the clients.

Nothing here is measured: every number is modelled. Virtual time, one heap of
`(time, order, kind, a, b)` holding the cell's plan and its dynamic events, ordered at equal
times by `kpbench.schedule` (the rule every backend follows), and independent random streams per
component spawned from the cell's seed, so a seed always gives the same cell.

Clients: `workload.connections` users, each holding one connection at a time, spread round-robin
over `workload.clients` client pods, which are spread round-robin over the nodes. A user opens its
connection through its node's data plane. If the chosen pod no longer accepts (a stale view) its
kernel resets the connect; if the data plane refuses it, the node answers with an ICMP port
unreachable as far as its per-client rate limit allows (`dataplane.IcmpRateLimit`) and drops the
SYN otherwise, so the client retransmits its SYN (`SYN_RETRANSMITS`, each through the data plane
again) until the connect times out. A reset or refused connect is retried at the next paced
request (1 / requests_per_second later), a timed-out one at once. A connection ends at the first
of: its lifetime, the reconnect policy, the server's max connection age, or its pod shutting down
(the server closes keep-alive connections on SIGTERM, announcing it on the client's next
response, and the client reconnects for the request after that). Requests are not simulated one
by one: a request clock advances at the per-connection rate and each connection's
count is the clock's advance while it was open. Behind the L7 proxy, the proxies hold one
upstream connection per backend pod and spread requests evenly over the pods in their view.
"""

from __future__ import annotations

import functools
import gc
import heapq
import json
import math
import random
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kpbench import control, dataplane, schedule
from kpbench.addresses import PodAddresses, pod_address
from kpbench.backends.base import CellResult, Progress
from kpbench.config import (
    ALL_MODES,
    CLOSE_REASONS,
    L7_PROXY_REPLICAS,
    ROOT_SEED,
    Cell,
    Experiment,
)
from kpbench.schedule import Kind
from kpbench.workload.plan import REQUEST_TIMEOUT_SECONDS

SHUTDOWN_SECONDS = 1.0  # SIGTERM -> connections closed -> process exits (within the grace period)
EPHEMERAL_PORTS = (32768, 60999)
# A client's SYN retransmissions, seconds after its first SYN: TCP_TIMEOUT_INIT (1 s,
# include/net/tcp.h), doubled at each retransmission (net/ipv4/tcp_timer.c), within the
# workload's connect timeout.
SYN_RETRANSMITS = tuple(t for t in (1.0, 3.0, 7.0, 15.0) if t < REQUEST_TIMEOUT_SECONDS)
REFUSED, TIMED_OUT = -1, -2  # `failed` keys of connects that never reached a pod
FAILURE_REASONS = {REFUSED: "refused by data plane",
                   TIMED_OUT: "timed out (refusals beyond the ICMP rate limit)"}
# `user_pod` holds a backend pod's index, NO_CONNECTION, or with `proxy: l7` the code of the
# proxy pod the user is connected to (`proxy_code`).
NO_CONNECTION = -1


def proxy_code(proxy: Any) -> Any:
    """A proxy pod's code in `user_pod` (for an int or an array); also its own inverse."""
    return -2 - proxy


# The dynamic event kinds of kpbench.schedule, as plain ints for the hot loop's heap tuples.
(OPEN, CLOSE, SYNC, READY, DELETED, RAMP, RECONCILE, PUBLISH, UPDATE, APPLY) = (
    int(kind) for kind in (Kind.OPEN, Kind.CLOSE, Kind.SYNC, Kind.READY, Kind.DELETED,
                           Kind.RAMP, Kind.RECONCILE, Kind.PUBLISH, Kind.UPDATE, Kind.APPLY))
RAMP_BATCH = 2048

_REASON = {name: code for code, name in enumerate(CLOSE_REASONS)}


@dataclass
class ConnectionLog:
    """Closed connections, column by column in compact arrays (millions of rows at scale)."""

    conn_id: array = field(default_factory=lambda: array("q"))
    user: array = field(default_factory=lambda: array("q"))
    pod: array = field(default_factory=lambda: array("q"))
    opened_at: array = field(default_factory=lambda: array("d"))
    closed_at: array = field(default_factory=lambda: array("d"))
    reason: array = field(default_factory=lambda: array("b"))
    requests: array = field(default_factory=lambda: array("d"))


def endpoint_address(pod_address: Sequence[int], pod: int) -> tuple[int, int]:
    """A backend pod's (IPv4 address, port) as its endpoint, from the pods' addresses."""
    return pod_address[pod], dataplane.SERVER_PORT


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a cell runs. A large cell holds millions of
    long-lived objects (connections, IPVS entries, planned events), and every full collection
    walks all of them: a fifth of sim-large's time. The simulation makes almost no reference
    cycles (reference counting frees the rest), so nothing accumulates meanwhile."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class SimBackend:
    name = "sim"
    measured = False

    def preflight(self, experiment: Experiment) -> None:
        return None

    def attach(self, run_dir: Path) -> None:
        return None

    def unsupported_reason(self, mode: str) -> str | None:
        return None

    def versions(self) -> dict[str, Any]:
        return {}

    def run_cell(self, cell: Cell, progress: Progress) -> CellResult:
        with cyclic_gc_paused():
            return Simulation(cell).run(progress)

    def close(self) -> None:
        return None


class Simulation:
    """One cell in virtual time."""

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        cfg: Experiment = cell.config
        self.cfg = cfg
        # Workload and control streams depend on the seed only, so every mode sees the same
        # clients and pod placement (common random numbers); the data plane's also on the mode.
        streams = np.random.SeedSequence([ROOT_SEED, cell.seed]).spawn(2)
        seeds = [int(s.generate_state(1)[0]) for s in streams]
        self.rng_workload = random.Random(seeds[0])
        self.rng_control = random.Random(seeds[1])
        mode_key = ALL_MODES.index(cell.mode)
        dataplane_stream = np.random.SeedSequence([ROOT_SEED, cell.seed, 1 + mode_key])
        rng_dataplane = random.Random(int(dataplane_stream.generate_state(1)[0]))
        self.nodes = cfg.cluster.nodes
        self.addresses = PodAddresses(self.nodes)
        self.pod_address: list[int] = []
        # The selectors see the address plan, not this object: a bound method would make a
        # reference cycle that leaves a finished cell's millions of objects to the cyclic GC.
        address_of = functools.partial(endpoint_address, self.pod_address)
        self.selectors = [
            dataplane.make_selector(cell.mode, random.Random(rng_dataplane.getrandbits(64)),
                                    address_of)
            for _ in range(self.nodes)
        ]
        self.icmp_limits = [dataplane.IcmpRateLimit() for _ in range(self.nodes)]
        self.ipvs = cell.mode.startswith("ipvs-")
        self.rng_ipvs_order = [control.stream(cell.seed, control.STREAM_IPVS_ORDER, node)
                               for node in range(self.nodes)]
        self.rng_kubelet = control.stream(cell.seed, control.STREAM_KUBELET)
        backend = cfg.backend
        self.placement = control.Placement(
            self.nodes,
            control.NodeResources(backend.cpu_request_millicores, control.MEMORY_REQUEST_MIB),
            control.NodeResources(cfg.cluster.node_cpu_millicores, cfg.cluster.node_memory_mib),
        )
        self.l7 = cfg.workload.proxy == "l7"
        self.fanout: control.EndpointFanout | None = None
        self.applying: dict[int, control.NodeSync] = {}
        self.surge, self.unavailable = cfg.backend.rollout.resolve(cfg.backend.replicas)
        self.replicas = cfg.backend.replicas
        self.revision = 1
        # (t, order, kind, a, b): `order` is kpbench.schedule's tie-break at equal times; dynamic
        # events count it up from the schedule's first dynamic order.
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = schedule.FIRST_DYNAMIC_ORDER
        self.now = 0.0
        # pods
        self.pods: list[control.Pod] = []
        self.alive: dict[int, None] = {}  # created and not deleted, in creation order
        self.reconcile_pending = False
        self.accepting: list[bool] = []
        self.active: list[int] = []
        self.conns_total: list[int] = []
        self.closed_requests: list[float] = []
        self.open_clock_sum: list[float] = []
        self.users_on: list[set[int]] = []
        # request clock: requests one connection has made since t=0
        self.rps = cfg.workload.requests_per_second
        self.clock_base = 0.0
        self.clock_t = 0.0
        # L7: requests per pod in the proxies' view
        self.proxy_view: tuple[int, ...] = ()
        self.q_clock = 0.0
        self.q_t = 0.0
        self.q_joined: dict[int, float] = {}
        self.connected_users = 0
        # users
        self.user_node: list[int] = []
        self.user_ip: list[int] = []
        self.client_address: list[int] = []  # per client pod, allocated in run()
        self.user_pod: list[int] = []
        self.user_gen: list[int] = []
        self.user_opened: list[float] = []
        self.user_clock: list[float] = []
        self.user_conn: list[int] = []
        self.user_connecting: list[float] = []  # first SYN of the connect under way, or -1
        self.wanted_users = 0
        self.ramps: list[tuple[int, int, float, float]] = []  # (first user, count, began, over)
        self.next_conn_id = 0
        # outputs
        self.event_rows: list[tuple[float, str, str, str]] = []
        self.failed: dict[tuple[int, int], int] = {}  # (sample index, pod or -1) -> count
        self.closed_log = ConnectionLog()
        self.hashes_ports = cell.mode == "ipvs-mh"
        workload, max_age = cfg.workload, cfg.backend.max_connection_age_seconds
        self.connections_end = (
            workload.lifetime.distribution != "infinite"
            or workload.reconnect.policy != "none"
            or (max_age is not None and not self.l7)
        )
        self.sample_chunks: list[dict[str, np.ndarray]] = []
        hpa = cfg.backend.hpa
        self.autoscaler = control.autoscaler(hpa) if hpa else None
        self.metrics_server = control.MetricsServer(hpa.metric_resolution_seconds) if hpa else None

    # -- scheduling ----------------------------------------------------------------------------

    def at(self, t: float, kind: int, a: int = 0, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def record(self, event: str, pod: int | None = None, **detail: Any) -> None:
        name = self.pods[pod].name if pod is not None else ""
        self.event_rows.append(
            (self.now, event, name, json.dumps(detail, sort_keys=True) if detail else "")
        )

    # -- request clocks ------------------------------------------------------------------------

    def request_clock(self, t: float) -> float:
        return self.clock_base + self.rps * (t - self.clock_t)

    def advance_proxy_clock(self, t: float) -> None:
        if self.proxy_view:
            self.q_clock += (t - self.q_t) * self.connected_users * self.rps / len(self.proxy_view)
        self.q_t = t

    # -- pods ----------------------------------------------------------------------------------

    def create_pod(self, ready_now: bool = False) -> int:
        index = len(self.pods)
        node = self.placement.place(self.revision, self.rng_control)
        pod = control.Pod(index, f"backend-{self.revision}-{index:05d}", self.revision, node,
                          self.now, uid=self.rng_kubelet.getrandbits(63))
        self.pods.append(pod)
        self.pod_address.append(pod_address(node, self.addresses.allocate(node)))
        self.alive[index] = None
        self.accepting.append(False)
        self.active.append(0)
        self.conns_total.append(0)
        self.closed_requests.append(0.0)
        self.open_clock_sum.append(0.0)
        self.users_on.append(set())
        self.record("pod_created", index, node=self.node_name(node),
                    revision=self.revision)
        if ready_now:
            pod.started_at = -control.PREEXISTING_SECONDS
            self.pod_ready(index)
            pod.ready_at = -control.PREEXISTING_SECONDS
        else:
            backend, rng = self.cfg.backend, self.rng_kubelet
            pod.started_at = self.now + backend.startup_seconds
            server_up = backend.server_start_median_seconds * math.exp(
                backend.server_start_sigma * rng.gauss(0.0, 1.0))
            phase = rng.uniform(0.0, backend.readiness_period_seconds)
            ready = control.ready_time(pod.started_at, server_up, phase,
                                       backend.readiness_period_seconds)
            self.at(ready, READY, index)
        return index

    def node_name(self, node: int) -> str:
        return f"node-{node + 1}"

    def pod_ready(self, index: int) -> None:
        pod = self.pods[index]
        if not pod.live:
            return
        pod.ready_at = self.now
        self.accepting[index] = True
        self.record("pod_ready", index)
        self.endpoints_changed(index, added=True)
        self.request_reconcile()

    def terminate_pod(self, index: int, killed: bool = False) -> None:
        pod = self.pods[index]
        was_ready = pod.ready
        pod.terminating_at = self.now
        self.placement.terminating(pod)
        self.accepting[index] = False
        reason = "reset" if killed else "server-shutdown"
        self.record("pod_killed" if killed else "pod_terminating", index,
                    connections=self.active[index])
        users = sorted(self.users_on[index])
        self.close_connections(index, users, reason)
        for user in users:
            delay = self.reset_delay() if killed else self.announced_close_delay()
            self.at(self.now + delay, OPEN, user, self.user_gen[user])
        if killed:
            self.pod_deleted(index)
        else:
            grace = min(self.cfg.backend.termination_grace_seconds, SHUTDOWN_SECONDS)
            self.at(self.now + grace, DELETED, index)
        if was_ready:
            self.endpoints_changed(index, added=False)

    def pod_deleted(self, index: int) -> None:
        pod = self.pods[index]
        if pod.deleted_at is not None:
            return
        pod.deleted_at = self.now
        self.placement.deleted(pod)
        self.alive.pop(index, None)
        self.record("pod_deleted", index)

    def request_reconcile(self) -> None:
        """A readiness change reaches the Deployment controller after its watch delay; changes
        meanwhile share that sync (kpbench.control.controller_delay)."""
        if not self.reconcile_pending:
            self.reconcile_pending = True
            self.at(self.now + control.controller_delay(self.rng_control,
                                                        self.cfg.cluster.propagation), RECONCILE)

    def reconcile(self) -> None:
        self.reconcile_pending = False
        while True:
            plan = control.reconcile([self.pods[i] for i in self.alive], self.replicas,
                                     self.revision, self.surge, self.unavailable, self.now)
            if not plan:
                return
            for pod in plan.delete:
                self.terminate_pod(pod.index)
            for _ in range(plan.create):
                self.create_pod()

    def serving(self) -> list[int]:
        # Our server turns unready on SIGTERM, so no terminating pod is "serving": the
        # serving-terminating fallback of kube-proxy would always be empty here.
        return [i for i in self.alive if self.pods[i].ready]

    def endpoints_changed(self, index: int, added: bool) -> None:
        """An endpoint became ready or left: published once per instant (one EndpointSlice
        update), then on its way to every node (kpbench.control.EndpointFanout)."""
        if self.fanout is not None and self.fanout.change(index, added):
            self.at(self.now, PUBLISH)

    def start_fanout(self) -> None:
        """The endpoints at t = 0 are in every node's rules; later changes go through the fanout.
        Consumers: each node's kube-proxy, or with `proxy: l7` the proxies' one view."""
        cluster = self.cfg.cluster
        kube_proxy = cluster.kube_proxy
        serving = self.serving()
        self.fanout = control.EndpointFanout(
            1 if self.l7 else self.nodes, serving,
            control.min_sync_seconds(self.cell.mode, kube_proxy.min_sync_seconds),
            control.generator(self.cell.seed, control.STREAM_KUBE_PROXY), cluster.propagation,
            lambda endpoints: control.sync_duration(endpoints, kube_proxy.sync_base_seconds,
                                                    kube_proxy.sync_seconds_per_endpoint),
        )
        view = frozenset(serving)
        for consumer in range(self.fanout.consumers):
            self.apply(consumer, control.NodeSync(0.0, view, view, None, joined=view))

    def publish(self) -> None:
        assert self.fanout is not None
        for consumer, t in self.fanout.publish(self.now):
            self.at(t, UPDATE, consumer)

    def update(self, consumer: int) -> None:
        assert self.fanout is not None
        start = self.fanout.update(consumer, self.now)
        if start is not None:
            self.at(start, SYNC, consumer)

    def sync(self, consumer: int) -> None:
        assert self.fanout is not None
        decided = self.fanout.sync(consumer, self.now)
        self.applying[consumer] = decided
        self.at(decided.apply_at, APPLY, consumer)
        if decided.next_update is not None:
            self.at(decided.next_update, UPDATE, consumer)

    def apply(self, consumer: int, decided: control.NodeSync) -> None:
        """A sync completes: the node's rules (or the proxies' view) now hold `decided.view`."""
        if not self.l7:
            selector = self.selectors[consumer]
            if self.ipvs:  # each node applies its syncs in order: `joined` is since the last
                added = control.ipvs_new_order(decided.new, self.rng_ipvs_order[consumer])
                added += sorted(decided.joined - decided.new)
                assert isinstance(selector, dataplane.IpvsSelector)
                selector.update(added, decided.left, self.now)
            else:
                selector.sync(list(decided.view), self.now)
            return
        self.advance_proxy_clock(self.now)
        old, new = set(self.proxy_view), decided.view
        for index in old - new:
            self.closed_requests[index] += self.q_clock - self.q_joined.pop(index)
            self.active[index] = 0
        for index in sorted(new - old):
            self.q_joined[index] = self.q_clock
            self.active[index] = L7_PROXY_REPLICAS
            self.conns_total[index] += L7_PROXY_REPLICAS
        self.proxy_view = tuple(sorted(new))

    # -- connections ---------------------------------------------------------------------------

    def add_users(self, count: int, over_seconds: float) -> None:
        first = len(self.user_node)
        for _ in range(count):
            user = len(self.user_node)
            client = user % self.cfg.workload.clients
            node = self.cfg.client_node(client)
            self.user_node.append(node)
            self.user_ip.append(self.client_address[client])
            self.user_pod.append(NO_CONNECTION)
            self.user_gen.append(0)
            self.user_opened.append(0.0)
            self.user_clock.append(0.0)
            self.user_conn.append(-1)
            self.user_connecting.append(-1.0)
        self.wanted_users = len(self.user_node)
        self.ramps.append((first, count, self.now, over_seconds))
        self.at(self.now, RAMP, first, len(self.ramps) - 1)

    def ramp_batch(self, start: int, ramp: int) -> None:
        first, count, began, over = self.ramps[ramp]
        stop = min(first + count, start + RAMP_BATCH)
        for user in range(start, stop):
            offset = over * (user - first) / count if count else 0.0
            self.at(began + offset, OPEN, user, self.user_gen[user])
        if stop < first + count:
            self.at(began + over * (stop - first) / count, RAMP, stop, ramp)

    def open_connection(self, user: int, gen: int) -> None:
        # The hot path of every run: attribute lookups are hoisted on purpose.
        user_pod = self.user_pod
        if (gen != self.user_gen[user] or user >= self.wanted_users
                or user_pod[user] != NO_CONNECTION):
            return
        now = self.now
        if self.l7:
            pod = proxy_code(user % L7_PROXY_REPLICAS)  # clients hold connections to proxies
            self.advance_proxy_clock(now)
            self.connected_users += 1
        else:
            node = self.user_node[user]
            selector = self.selectors[node]
            first_syn = self.user_connecting[user]
            if first_syn >= 0 and now >= first_syn + REQUEST_TIMEOUT_SECONDS:
                self.connect_failed(user, gen, TIMED_OUT, now, retry_at=now)
                return
            port = self.rng_workload.randint(*EPHEMERAL_PORTS) if self.hashes_ports else 0
            chosen = selector.pick(self.user_ip[user], port, now)
            if chosen is None:
                if self.icmp_limits[node].allow(self.user_ip[user], now):
                    self.connect_failed(user, gen, REFUSED, now, retry_at=now + 1.0 / self.rps)
                else:  # the refusal is dropped silently: the client retransmits its SYN
                    self.retransmit_syn(user, gen, now)
                return
            self.user_connecting[user] = -1.0
            if not self.accepting[chosen]:  # the pod's kernel answers with a reset
                self.connect_failed(user, gen, chosen, now, retry_at=now + 1.0 / self.rps)
                return
            pod = chosen
            selector.opened(pod, now)
            self.active[pod] += 1
            self.conns_total[pod] += 1
            self.users_on[pod].add(user)
        clock = self.clock_base + self.rps * (now - self.clock_t)
        user_pod[user] = pod
        self.user_opened[user] = now
        self.user_clock[user] = clock
        self.user_conn[user] = self.next_conn_id
        self.next_conn_id += 1
        if pod >= 0:
            self.open_clock_sum[pod] += clock
        if self.connections_end:
            end, reason = self.connection_end(now)
            if end < self.cfg.duration_seconds:
                self.seq += 1
                heapq.heappush(self.heap, (end, self.seq, CLOSE, user, gen * 8 + _REASON[reason]))

    def connect_failed(self, user: int, gen: int, cause: int, now: float,
                       retry_at: float) -> None:
        """Count a failed connect (`cause`: REFUSED, TIMED_OUT or the pod that reset it) and
        retry at the user's next paced request."""
        self.user_connecting[user] = -1.0
        key = (int(now / self.cfg.sample_seconds), cause)
        self.failed[key] = self.failed.get(key, 0) + 1
        self.at(retry_at, OPEN, user, gen)

    def retransmit_syn(self, user: int, gen: int, now: float) -> None:
        first_syn = self.user_connecting[user]
        if first_syn < 0:
            first_syn = self.user_connecting[user] = now
        due = next((first_syn + t for t in SYN_RETRANSMITS if first_syn + t > now),
                   first_syn + REQUEST_TIMEOUT_SECONDS)
        self.at(due, OPEN, user, gen)

    def connection_end(self, now: float) -> tuple[float, str]:
        workload, rng = self.cfg.workload, self.rng_workload
        end, reason = math.inf, "end"
        lifetime = workload.lifetime
        if lifetime.distribution != "infinite":
            mean = lifetime.mean_seconds or 0.0
            if lifetime.distribution == "fixed":
                duration = mean
            elif lifetime.distribution == "exponential":
                duration = rng.expovariate(1.0 / mean)
            elif lifetime.distribution == "lognormal":
                sigma = lifetime.sigma or 0.0
                duration = rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)
            else:
                alpha = lifetime.alpha or 2.0
                duration = mean * (alpha - 1) / alpha * rng.paretovariate(alpha)
            end, reason = now + duration, "lifetime"
        policy = workload.reconnect
        if policy.policy == "periodic":
            jitter = policy.jitter_fraction
            seconds = (policy.seconds or 0.0) * (1 + rng.uniform(-jitter, jitter))
            if now + seconds < end:
                end, reason = now + seconds, "reconnect"
        elif policy.policy == "after-requests" and now + (policy.requests or 0) / self.rps < end:
            end, reason = now + (policy.requests or 0) / self.rps, "reconnect"
        max_age = self.cfg.backend.max_connection_age_seconds
        if max_age is not None and not self.l7 and now + max_age < end:
            end, reason = now + max_age, "max-age"
        return end, reason

    def close_connection(self, user: int, reason: str) -> None:
        pod = self.user_pod[user]
        if pod < 0:  # a connection to an L7 proxy pod
            self.advance_proxy_clock(self.now)
            self.connected_users -= 1
        self.close_connections(pod, (user,), reason)

    def close_connections(self, pod: int, users: Sequence[int], reason: str) -> None:
        """Close the connections of `users`, all to `pod` (a backend pod, or with `proxy: l7`
        the negative code of the proxy pod; the caller counts those), and log them."""
        now = self.now
        clock = self.clock_base + self.rps * (now - self.clock_t)
        user_clock, user_pod, user_gen = self.user_clock, self.user_pod, self.user_gen
        log = self.closed_log
        log_requests = log.requests.append
        if pod >= 0:
            closed_requests, open_clock_sum = self.closed_requests[pod], self.open_clock_sum[pod]
            users_on, selectors, user_node = self.users_on[pod], self.selectors, self.user_node
            reset = reason == "reset"
            for user in users:
                opened_clock = user_clock[user]
                requests = clock - opened_clock
                closed_requests += requests
                open_clock_sum -= opened_clock
                users_on.discard(user)
                selectors[user_node[user]].closed(pod, now, reset)
                log_requests(requests)
            self.closed_requests[pod], self.open_clock_sum[pod] = closed_requests, open_clock_sum
            self.active[pod] -= len(users)
        else:
            for user in users:
                log_requests(clock - user_clock[user])
        user_conn, user_opened = self.user_conn, self.user_opened
        log.conn_id.extend([user_conn[user] for user in users])
        log.user.extend(users)
        log.pod.extend([pod] * len(users))
        log.opened_at.extend([user_opened[user] for user in users])
        log.closed_at.extend([now if reason != "end" else math.nan] * len(users))
        log.reason.extend([_REASON[reason]] * len(users))
        for user in users:
            user_pod[user] = NO_CONNECTION
            user_gen[user] += 1

    def scheduled_close(self, user: int, tag: int) -> None:
        gen, reason = divmod(tag, 8)
        if gen != self.user_gen[user] or self.user_pod[user] == NO_CONNECTION:
            return
        self.close_connection(user, CLOSE_REASONS[reason])
        # A client-side close reconnects at once; a server-side one as announced_close_delay.
        delay = self.announced_close_delay() if reason == _REASON["max-age"] else 0.0
        self.at(self.now + delay, OPEN, user, self.user_gen[user])

    def announced_close_delay(self) -> float:
        """A server close (shutdown drain, max age) is announced on the client's next response
        (`Connection: close`, within one request interval); the client opens its new connection
        for the request after that, one interval later. Calibrated against the lab."""
        return (1.0 + self.rng_workload.random()) / self.rps

    def reset_delay(self) -> float:
        """A killed pod's connections fail at the client's next request, which reconnects."""
        return self.rng_workload.random() / self.rps

    # -- timeline ------------------------------------------------------------------------------

    def timeline(self, index: int) -> None:
        event = self.cfg.events[index]
        if event.action == "rollout":
            self.revision += 1
            self.record("rollout_started", revision=self.revision)
            self.reconcile()
        elif event.action == "scale":
            assert event.replicas is not None
            self.record("scaled", replicas=event.replicas, previous=self.replicas)
            self.replicas = event.replicas
            self.reconcile()
        elif event.action == "load":
            if event.requests_per_second is not None:
                self.clock_base = self.request_clock(self.now)
                self.clock_t = self.now
                self.advance_proxy_clock(self.now)
                self.rps = event.requests_per_second
            if event.connections is not None:
                self.change_users(event.connections)
            self.record("load_changed", **event.load_change)
        else:
            ready = [i for i in self.alive if self.pods[i].ready]
            for index_ in self.rng_control.sample(ready, min(event.kill_count, len(ready))):
                self.terminate_pod(index_, killed=True)
            self.reconcile()

    def change_users(self, target: int) -> None:
        current = self.wanted_users
        if target > current:
            if target > len(self.user_node):
                self.add_users(target - len(self.user_node), self.cfg.workload.ramp_seconds)
            self.wanted_users = target
        else:
            self.wanted_users = target
            for user in range(target, current):
                if self.user_pod[user] != NO_CONNECTION:
                    self.close_connection(user, "load-change")
                else:
                    self.user_gen[user] += 1
                    self.user_connecting[user] = -1.0

    def hpa_sync(self) -> None:
        assert self.autoscaler is not None and self.metrics_server is not None
        desired, utilization = self.autoscaler.evaluate(
            self.now, self.replicas, (self.pods[i] for i in self.alive),
            self.metrics_server.metrics(), self.cfg.backend.cpu_request_millicores,
        )
        if desired != self.replicas:
            self.record("hpa_desired", replicas=desired, previous=self.replicas,
                        utilization=utilization)
            self.replicas = desired
            self.reconcile()

    def scrape_metrics(self) -> None:
        """metrics-server reads every running pod's cumulative CPU (kpbench.control)."""
        assert self.metrics_server is not None
        idx = np.fromiter(self.alive, dtype=np.int64, count=len(self.alive))
        requests = self.requests_until_now(idx)
        backend, now, pods = self.cfg.backend, self.now, self.pods
        per_request = self.cpu_per_request()
        cpu = {int(i): (r * per_request + backend.server_idle_millicores
                        * (now - (pods[i].started_at or now))) / 1000.0
               for i, r in zip(idx, requests, strict=True)}
        self.metrics_server.scrape(now, (pods[i] for i in cpu), lambda pod: cpu[pod.index])

    def ipvs_graceful_pass(self) -> None:
        """kube-proxy's graceful-termination pass on every node (kpbench.dataplane)."""
        for selector in self.selectors:
            selector.tick(self.now)

    def cpu_per_request(self) -> float:
        """Millicore-seconds per request: the work burned on purpose and the server's own."""
        backend = self.cfg.backend
        return backend.cpu_per_request_millicores + backend.server_cpu_per_request_millicores

    # -- sampling ------------------------------------------------------------------------------

    def requests_until_now(self, idx: np.ndarray) -> np.ndarray:
        """Requests each pod of `idx` has answered so far (fractional: the request clocks)."""
        if self.l7:
            self.advance_proxy_clock(self.now)
            joined = np.array([self.q_joined.get(int(i), np.nan) for i in idx])
            return np.asarray(self.closed_requests)[idx] + np.where(
                ~np.isnan(joined), self.q_clock - np.nan_to_num(joined), 0.0)
        active = np.asarray(self.active, dtype=np.int64)[idx]
        return (np.asarray(self.closed_requests)[idx] + active * self.request_clock(self.now)
                - np.asarray(self.open_clock_sum)[idx])

    def sample(self) -> None:
        idx = np.fromiter(self.alive, dtype=np.int64, count=len(self.alive))
        active = np.asarray(self.active, dtype=np.int64)[idx]
        requests = self.requests_until_now(idx)
        if self.l7:
            share = self.connected_users * self.rps / max(len(self.proxy_view), 1)
            rate = np.where(np.isin(idx, list(self.q_joined)), share, 0.0)
        else:
            rate = active * self.rps
        now, pods = self.now, self.pods
        running = np.fromiter(((pods[i].started_at or now) <= now for i in idx), dtype=bool,
                              count=len(idx))
        self.sample_chunks.append({
            "t": np.full(len(idx), round(now, 6)),
            "pod_index": idx,
            "ready": np.fromiter((pods[i].ready for i in idx), dtype=bool, count=len(idx)),
            "terminating": np.fromiter(
                (pods[i].terminating_at is not None for i in idx), dtype=bool, count=len(idx)
            ),
            "active_connections": active,
            "connections_total": np.asarray(self.conns_total, dtype=np.int64)[idx],
            "requests_total": np.floor(requests + 1e-9).astype(np.int64),
            "cpu_millicores": rate * self.cpu_per_request()
            + np.where(running, self.cfg.backend.server_idle_millicores, 0.0),
        })

    # -- main loop -----------------------------------------------------------------------------

    def run(self, progress: Progress) -> CellResult:
        cfg = self.cfg
        if self.l7:  # the proxy pods are created first, as the lab does
            for index in range(L7_PROXY_REPLICAS):
                self.addresses.allocate(index % self.nodes)
        for _ in range(self.replicas):
            self.create_pod(ready_now=True)
        self.client_address = [pod_address(node, self.addresses.allocate(node)) for node in
                               map(cfg.client_node, range(cfg.workload.clients))]
        self.reconcile_pending = False
        self.heap = [e for e in self.heap if e[2] != RECONCILE]
        self.start_fanout()
        self.add_users(cfg.workload.connections, cfg.workload.ramp_seconds)
        self.heap += self.planned_events()
        heapq.heapify(self.heap)

        def on_sample(a: int, b: int) -> None:
            self.sample()
            progress(self.now)

        by_kind: dict[Kind, Callable[[int, int], None]] = {
            Kind.TIMELINE: lambda a, b: self.timeline(a),
            Kind.SAMPLE: on_sample,
            Kind.HPA_SYNC: lambda a, b: self.hpa_sync(),
            Kind.METRICS_SCRAPE: lambda a, b: self.scrape_metrics(),
            Kind.IPVS_GRACEFUL: lambda a, b: self.ipvs_graceful_pass(),
            Kind.OPEN: self.open_connection,
            Kind.CLOSE: self.scheduled_close,
            Kind.RAMP: self.ramp_batch,
            Kind.READY: lambda a, b: self.pod_ready(a),
            Kind.DELETED: lambda a, b: self.pod_deleted(a),
            Kind.RECONCILE: lambda a, b: self.reconcile(),
            Kind.PUBLISH: lambda a, b: self.publish(),
            Kind.UPDATE: lambda a, b: self.update(a),
            Kind.SYNC: lambda a, b: self.sync(a),
            Kind.APPLY: lambda a, b: self.apply(a, self.applying.pop(a)),
        }
        handlers = [by_kind.get(kind, self.no_handler) for kind in Kind]
        heap, end = self.heap, cfg.duration_seconds
        pop = heapq.heappop
        while heap and heap[0][0] <= end:
            t, _, kind, a, b = pop(heap)
            self.now = t
            handlers[kind](a, b)
        self.now = end
        self.log_open_connections()
        return self.result()

    def log_open_connections(self) -> None:
        """The connections still open at the end, logged as closing for reason "end" with no
        close time, all at once: nothing runs after them, so no other state needs their close."""
        users = np.flatnonzero(np.asarray(self.user_pod, dtype=np.int64) != NO_CONNECTION)
        clock = self.request_clock(self.now)
        log = self.closed_log
        log.conn_id.frombytes(np.asarray(self.user_conn, dtype=np.int64)[users].tobytes())
        log.user.frombytes(users.astype(np.int64).tobytes())
        log.pod.frombytes(np.asarray(self.user_pod, dtype=np.int64)[users].tobytes())
        log.opened_at.frombytes(np.asarray(self.user_opened, dtype=np.float64)[users].tobytes())
        log.closed_at.frombytes(np.full(len(users), math.nan).tobytes())
        log.reason.frombytes(np.full(len(users), _REASON["end"], dtype=np.int8).tobytes())
        log.requests.frombytes((clock - np.asarray(self.user_clock, dtype=np.float64)[users])
                               .tobytes())

    def planned_events(self) -> list[tuple[float, int, int, int, int]]:
        """The cell's plan (kpbench.schedule) as heap entries."""
        return [(p.t, p.order, int(p.kind), p.arg, 0)
                for p in schedule.plan(self.cfg, self.cell.seed, self.cell.mode)]

    @staticmethod
    def no_handler(a: int, b: int) -> None:
        raise AssertionError("the simulator scheduled an event kind it does not handle")

    def result(self) -> CellResult:
        names = np.array([p.name for p in self.pods], dtype=object)
        nodes = np.array([self.node_name(p.node) for p in self.pods], dtype=object)
        created = np.array([p.created_at for p in self.pods])
        if self.sample_chunks:
            columns = {k: np.concatenate([c[k] for c in self.sample_chunks])
                       for k in self.sample_chunks[0]}
        else:
            columns = {}
        pod_index = columns.pop("pod_index", np.array([], dtype=np.int64))
        samples = pd.DataFrame({
            "t": columns.get("t", np.array([], dtype=float)),
            "pod": pd.Categorical(names[pod_index]) if len(pod_index) else [],
            "node": pd.Categorical(nodes[pod_index]) if len(pod_index) else [],
            "created_at": created[pod_index],
            **{k: v for k, v in columns.items() if k != "t"},
        })
        samples["cpu_millicores"] = samples["cpu_millicores"].astype("float64")
        for (index, pod), count in sorted(self.failed.items()):
            self.event_rows.append((
                index * self.cfg.sample_seconds,
                "connection_failed",
                self.pods[pod].name if pod >= 0 else "",
                json.dumps({"count": count,
                            "reason": FAILURE_REASONS.get(pod, "pod not accepting")}),
            ))
        events = pd.DataFrame(self.event_rows, columns=["t", "event", "pod", "detail"])
        events = events.sort_values("t", kind="stable").reset_index(drop=True)
        log = self.closed_log
        pod_codes = np.frombuffer(log.pod, dtype=np.int64)
        users = np.frombuffer(log.user, dtype=np.int64)
        proxy_names = np.array([f"l7-proxy-{i}" for i in range(L7_PROXY_REPLICAS)], dtype=object)
        pod_names = np.where(
            pod_codes >= 0,
            names[np.clip(pod_codes, 0, None)] if len(names) else "",
            proxy_names[np.clip(proxy_code(pod_codes), 0, L7_PROXY_REPLICAS - 1)],
        )
        clients = users % self.cfg.workload.clients
        client_names = np.array([f"client-{c}" for c in range(self.cfg.workload.clients)],
                                dtype=object)
        node_names = np.array([self.node_name(n) for n in range(self.nodes)], dtype=object)
        user_nodes = np.asarray(self.user_node, dtype=np.int64)
        connections = pd.DataFrame({
            "conn_id": np.frombuffer(log.conn_id, dtype=np.int64),
            "client": pd.Categorical(client_names[clients]),
            "node": pd.Categorical(node_names[user_nodes[users]] if len(users) else []),
            "pod": pd.Categorical(pod_names),
            "opened_at": np.frombuffer(log.opened_at, dtype=np.float64),
            "closed_at": np.frombuffer(log.closed_at, dtype=np.float64),
            "close_reason": pd.Categorical.from_codes(
                np.frombuffer(log.reason, dtype=np.int8), categories=pd.Index(CLOSE_REASONS)
            ),
            "requests": np.floor(np.frombuffer(log.requests, dtype=np.float64) + 1e-9).astype(
                np.int64
            ),
        })
        connections = connections.sort_values("conn_id", kind="stable").reset_index(drop=True)
        dataplane_info = {
            "model": self.cell.mode,
            "verified": False,
            "note": "modelled data plane (sim); nothing was read back from a kernel",
        }
        return CellResult(samples, events, connections, dataplane_info)
