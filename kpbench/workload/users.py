"""Locust users that each hold exactly one long-lived connection (HTTP/1.1) or channel (gRPC).

Importing this module imports Locust (which monkey-patches the process with gevent): import it
only in a Locust process (`kpbench/workload/locustfile.py`), never in a test runner.

Each user paces its requests at `workload.requests_per_second`, or the rate the experiment's
`load` events set by then on the test's clock (no catch-up bursts when late), and ends its
connection as `kpbench.workload.plan` describes. After a client-side end (lifetime, periodic
reconnect) the user reconnects at once and sends a request on the new connection right away (so
the server counts it at once), then paces from there. A failed connect is retried at the next
paced request. Nothing is retried silently: a request that fails is reported failed and
its connection closed with reason `reset`.

Locust statistics: every request is a `GET /` (HTTP) or `grpc /kpbench.Echo/Hello` entry with
`context={"pod": ...}`; every HTTP connect is a `CONNECT connect` entry (failed connects show up
as its failures). The per-process `TALLY` counts opens, closes by reason, failures and requests
per pod; the locustfile ships it to the master.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

import grpc
from locust import User, task
from locust.runners import STATE_CLEANUP, STATE_STOPPED, STATE_STOPPING

from kpbench.workload.http1 import ConnectionLost, Http1Connection
from kpbench.workload.plan import CLOSE_REASONS, REQUEST_TIMEOUT_SECONDS, Tally, WorkloadPlan

POD_HEADER = "x-kpbench-pod"
CLOSE_HEADER = "x-kpbench-close"
GRPC_METHOD = "/kpbench.Echo/Hello"

TALLY = Tally()


@dataclass
class HeldConnection:
    opened_at: float
    end_at: float
    end_reason: str | None
    counted: bool = False  # reported as opened (HTTP: at connect; gRPC: at its first answer)
    pod: str | None = None
    key: str | None = None  # gRPC: the connection as the server names it
    requests: int = 0


class LongConnectionUser(User):
    """Common pacing and connection lifecycle; subclasses provide the transport."""

    abstract = True
    plan: ClassVar[WorkloadPlan]
    environment_ref: ClassVar[Any] = None  # the Locust Environment, set by the locustfile
    test_started_at: ClassVar[float] = time.monotonic()  # t = 0 of `load` events; locustfile

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.rng = random.Random()
        self.held: HeldConnection | None = None
        self.next_request_at = time.monotonic()

    # -- transport hooks -----------------------------------------------------------------------

    def connect(self) -> bool:
        raise NotImplementedError

    def disconnect(self) -> None:
        raise NotImplementedError

    def peer_state(self) -> str | None:
        return None

    def exchange(self) -> None:
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------------------------

    def wait_time(self) -> float:
        due = self.next_request_at
        if self.held is not None:
            due = min(due, self.held.end_at)
        return max(0.0, due - time.monotonic())

    def new_held(self, now: float) -> HeldConnection:
        duration, reason = self.plan.client_end(self.rng)
        return HeldConnection(opened_at=now, end_at=now + duration, end_reason=reason)

    def end_connection(self, reason: str) -> None:
        held = self.held
        if held is None:
            return
        self.held = None
        if held.counted:
            TALLY.closed_connection(held.pod, reason)
        self.disconnect()

    @task
    def step(self) -> None:
        now = time.monotonic()
        held = self.held
        if held is not None and now >= held.end_at:
            self.end_connection(held.end_reason or "lifetime")
            self.next_request_at = now
        if now >= self.next_request_at:
            interval = self.plan.request_interval_at(now - self.test_started_at)
            self.next_request_at = max(self.next_request_at + interval, now)
            self.request()

    def request(self) -> None:
        held = self.held
        if held is not None:
            limit = self.plan.request_limit
            if limit is not None and held.requests >= limit:
                self.end_connection("reconnect")
            else:
                state = self.peer_state()
                if state == "eof":
                    self.end_connection(
                        self.plan.silent_close_reason(time.monotonic() - held.opened_at))
                elif state is not None:
                    self.end_connection("reset")
        if self.held is None and not self.connect():
            return
        self.exchange()

    def on_stop(self) -> None:
        stopping = self.environment.runner is None or self.environment.runner.state in (
            STATE_CLEANUP, STATE_STOPPING, STATE_STOPPED)
        self.end_connection("end" if stopping else "load-change")

    def fire(self, request_type: str, name: str, started: float, perf_start: float,
             length: int, exception: BaseException | None, pod: str | None = None) -> None:
        self.environment.events.request.fire(
            request_type=request_type, name=name,
            response_time=(time.perf_counter() - perf_start) * 1000.0,
            response_length=length, exception=exception, context={"pod": pod},
            response=None, start_time=started, url=None,
        )


def _host_port(host: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(host if "://" in host else f"tcp://{host}")
    if not parts.hostname:
        raise ValueError(f"--host {host!r}: expected HOST:PORT or a URL")
    return parts.hostname, parts.port or default_port


class KpbenchHttpUser(LongConnectionUser):
    """One HTTP/1.1 keep-alive connection at a time (`kpbench.workload.http1`)."""

    host = "http://127.0.0.1:8080"
    path = "/"

    def on_start(self) -> None:
        self.target = _host_port(self.host or "", 80)
        self.http: Http1Connection | None = None

    def connect(self) -> bool:
        started, perf_start = time.time(), time.perf_counter()
        try:
            self.http = Http1Connection(*self.target, timeout=REQUEST_TIMEOUT_SECONDS)
        except OSError as exc:
            TALLY.failed_connect(exc)
            self.fire("CONNECT", "connect", started, perf_start, 0, exc)
            return False
        self.fire("CONNECT", "connect", started, perf_start, 0, None)
        TALLY.opened()
        self.held = self.new_held(time.monotonic())
        self.held.counted = True
        return True

    def disconnect(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None

    def peer_state(self) -> str | None:
        return None if self.http is None else self.http.peer_state()

    def exchange(self) -> None:
        held, http = self.held, self.http
        assert held is not None and http is not None
        started, perf_start = time.time(), time.perf_counter()
        try:
            response = http.get(self.path)
        except ConnectionLost as exc:
            TALLY.requests_failed += 1
            self.fire("GET", self.path, started, perf_start, 0, exc)
            self.end_connection("reset")
            return
        pod = response.headers.get(POD_HEADER, "")
        if held.pod is None:
            held.pod = pod
            TALLY.identified(pod)
        held.requests += 1
        if response.status == 200:
            TALLY.answered(pod)
            self.fire("GET", self.path, started, perf_start, len(response.body), None, pod)
        else:
            TALLY.requests_failed += 1
            self.fire("GET", self.path, started, perf_start, len(response.body),
                      RuntimeError(f"HTTP {response.status} from {pod or 'unknown pod'}"), pod)
        if not response.keep_alive:
            announced = response.headers.get(CLOSE_HEADER, "")
            reason = announced if announced in CLOSE_REASONS else (
                self.plan.silent_close_reason(time.monotonic() - held.opened_at))
            self.end_connection(reason)


class KpbenchGrpcUser(LongConnectionUser):
    """One gRPC channel (one HTTP/2 connection) at a time, unary calls with raw bytes.

    A channel reconnects by itself after the server closes its connection (GOAWAY); the user
    notices from the connection id the server reports and records a close and an open. Behind
    an L7 proxy the server's connection is the proxy's, not the user's, so the id says nothing
    about the user's connection and is not followed.
    """

    host = "127.0.0.1:9090"

    def on_start(self) -> None:
        host, port = _host_port(self.host or "", 9090)
        self.target = f"{host}:{port}"
        self.channel: grpc.Channel | None = None
        self.call: Any = None

    def connect(self) -> bool:
        self.channel = grpc.insecure_channel(self.target, options=[
            ("grpc.use_local_subchannel_pool", 1),  # else channels share one connection
            ("grpc.enable_retries", 0),
        ])
        self.call = self.channel.unary_unary(GRPC_METHOD)
        self.held = self.new_held(time.monotonic())
        return True

    def disconnect(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def exchange(self) -> None:
        held = self.held
        assert held is not None and self.call is not None
        started, perf_start = time.time(), time.perf_counter()
        try:
            reply, call = self.call.with_call(b"", timeout=REQUEST_TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            TALLY.requests_failed += 1
            self.fire("grpc", GRPC_METHOD, started, perf_start, 0, exc)
            if not held.counted:
                TALLY.failed_connect(exc)
            self.end_connection("reset")
            return
        metadata = dict(call.initial_metadata() or ())
        pod = str(metadata.get("kpbench-pod", ""))
        key = str(metadata.get("kpbench-connection", ""))
        now = time.monotonic()
        if held.counted and key != held.key and self.plan.proxy == "none":
            TALLY.closed_connection(held.pod, self.plan.silent_close_reason(now - held.opened_at))
            fresh = self.new_held(now)
            held.opened_at, held.end_at, held.end_reason = fresh.opened_at, fresh.end_at, (
                fresh.end_reason)
            held.counted, held.requests, held.pod = False, 0, None
        if not held.counted:
            held.counted, held.key, held.pod = True, key, pod
            TALLY.opened()
            TALLY.identified(pod)
        held.requests += 1
        TALLY.answered(pod)
        self.fire("grpc", GRPC_METHOD, started, perf_start, len(reply), None, pod)

