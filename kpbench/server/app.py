"""The backend server's implementation; see the package docstring for its contract."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import prometheus_client
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from grpc._cython import cygrpc  # channelz queries: the only way to see grpc's connections

LOG = logging.getLogger("kpbench.server")

POD_HEADER = "X-Kpbench-Pod"
NODE_HEADER = "X-Kpbench-Node"
CLOSE_HEADER = "X-Kpbench-Close"
ADMIN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
GRPC_SERVICE = "kpbench.Echo"
GRPC_METHOD = "Hello"
GRPC_FULL_METHOD = f"/{GRPC_SERVICE}/{GRPC_METHOD}"
GRPC_POLL_SECONDS = 0.2
KEEPALIVE_SECONDS = 24 * 3600.0  # never close an idle long-lived connection on our own

prometheus_client.disable_created_metrics()

ACTIVE_CONNECTIONS = prometheus_client.Gauge(
    "kpbench_active_connections", "Workload connections currently open",
    ["pod", "node", "protocol"],
)
CONNECTIONS = prometheus_client.Counter(
    "kpbench_connections", "Workload connections opened (counted at their first request)",
    ["pod", "node", "protocol"],
)
REQUESTS = prometheus_client.Counter(
    "kpbench_requests", "Workload requests (HTTP) or calls (gRPC) answered",
    ["pod", "node", "protocol"],
)
SERVER_CLOSES = prometheus_client.Counter(
    "kpbench_server_closes", "Connections the server closed with an announced reason",
    ["pod", "node", "protocol", "reason"],
)
BUSY_CPU = prometheus_client.Counter(
    "kpbench_busy_cpu_seconds", "CPU time spent on the per-request work",
    ["pod", "node"],
)
READY = prometheus_client.Gauge("kpbench_ready", "1 while ready, 0 once shutting down",
                                ["pod", "node"])


@dataclass(frozen=True)
class ServerSettings:
    pod_name: str
    node_name: str = ""
    host: str = "0.0.0.0"
    port: int = 8080
    grpc_port: int | None = 9090
    admin_port: int | None = None
    max_connection_age_seconds: float | None = None
    cpu_per_request_millicores: float = 0.0
    shutdown_drain_seconds: float = 1.0


def burn_cpu(milliseconds: float) -> float:
    """Spin until this thread has used `milliseconds` of CPU; returns the CPU seconds used."""
    if milliseconds <= 0:
        return 0.0
    start = time.thread_time()
    goal = start + milliseconds / 1000.0
    spin = 0
    while time.thread_time() < goal:
        for _ in range(200):
            spin = (spin * 31 + 7) & 0xFFFF
    return time.thread_time() - start


@dataclass
class HttpConnection:
    opened_at: float
    counted: bool = False
    closing_reason: str | None = None


class CountingServer(web.Server):
    """aiohttp's low-level server, plus per-connection state for the workload metrics."""

    def __init__(self, app: BackendServer, **kwargs: Any) -> None:
        super().__init__(app.handle_http, **kwargs)
        self.backend = app
        self.state: dict[RequestHandler, HttpConnection] = {}

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.state[handler] = HttpConnection(opened_at=time.monotonic())

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        conn = self.state.pop(handler, None)
        if conn is not None and conn.counted:
            self.backend.http_active.dec()


@dataclass
class GrpcConnections:
    """gRPC connections by peer address: counted at the first call, dropped when channelz
    stops listing them."""

    active: Any
    total: Any
    grpc_port: int
    peers: dict[str, float] = field(default_factory=dict)
    server_id: int | None = None

    def saw_call(self, peer: str) -> None:
        if peer not in self.peers:
            self.peers[peer] = time.monotonic()
            self.active.inc()
            self.total.inc()

    def _find_server(self) -> int | None:
        servers = json.loads(cygrpc.channelz_get_servers(0)).get("server", [])
        if len(servers) == 1:  # the usual case; listener names show the requested port (may be 0)
            return int(servers[0]["ref"]["serverId"])
        for server in servers:
            for listen in server.get("listenSocket", []):
                if listen.get("name", "").endswith(f":{self.grpc_port}"):
                    return int(server["ref"]["serverId"])
        return None

    def live_peers(self) -> set[str] | None:
        if self.server_id is None:
            self.server_id = self._find_server()
            if self.server_id is None:
                return None
        peers: set[str] = set()
        start = 0
        while True:
            try:
                page = json.loads(cygrpc.channelz_get_server_sockets(self.server_id, start, 500))
            except ValueError:  # the server is gone (stopped)
                self.server_id = None
                return None
            refs = page.get("socketRef", [])
            for ref in refs:
                peers.add(ref.get("name", "").split(" ", 1)[-1])
            if page.get("end", True) or not refs:
                return peers
            start = max(int(ref["socketId"]) for ref in refs) + 1

    def forget_all(self) -> None:
        for _ in self.peers:
            self.active.dec()
        self.peers.clear()

    def refresh(self) -> None:
        live = self.live_peers()
        if live is None:
            return
        for peer in [p for p in self.peers if p not in live]:
            del self.peers[peer]
            self.active.dec()


class BackendServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        pod, node = settings.pod_name, settings.node_name
        self.http_active = ACTIVE_CONNECTIONS.labels(pod, node, "http")
        self.http_total = CONNECTIONS.labels(pod, node, "http")
        self.http_requests = REQUESTS.labels(pod, node, "http")
        self.grpc_requests = REQUESTS.labels(pod, node, "grpc")
        self.busy_cpu = BUSY_CPU.labels(pod, node)
        self.ready = READY.labels(pod, node)
        self.grpc_connections: GrpcConnections | None = None
        if settings.grpc_port is not None:
            self.grpc_connections = GrpcConnections(
                ACTIVE_CONNECTIONS.labels(pod, node, "grpc"),
                CONNECTIONS.labels(pod, node, "grpc"), settings.grpc_port,
            )
            # make the series exist from the start
            self.grpc_connections.active.set(0)
        self.http_active.set(0)
        self.draining = False
        self.stopped = asyncio.Event()
        self.server = CountingServer(self, keepalive_timeout=KEEPALIVE_SECONDS, access_log=None)
        self.admin_server = web.Server(self.handle_admin, access_log=None)
        self.runners: list[web.ServerRunner] = []
        self.workload_site: web.TCPSite | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.http_port = settings.port
        self.bound_grpc_port: int | None = None
        self.bound_admin_port: int | None = None

    # -- HTTP ----------------------------------------------------------------------------------

    async def handle_admin(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/metrics":
            if self.grpc_connections is not None:
                self.grpc_connections.refresh()
            body = prometheus_client.generate_latest()
            return web.Response(
                body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})
        if request.path == "/healthz":
            return web.Response(text="ok\n")
        if request.path == "/readyz":
            if self.draining:
                return web.Response(status=503, text="shutting down\n")
            return web.Response(text="ready\n")
        return web.Response(status=404, text="admin port serves /metrics /healthz /readyz\n")

    async def handle_http(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path in ADMIN_PATHS:
            return await self.handle_admin(request)
        conn = self.server.state.get(request.protocol)
        if conn is not None and not conn.counted:
            conn.counted = True
            self.http_active.inc()
            self.http_total.inc()
        self.work()
        self.http_requests.inc()
        response = web.Response(
            text=self.settings.pod_name + "\n",
            headers={POD_HEADER: self.settings.pod_name, NODE_HEADER: self.settings.node_name},
        )
        reason = None
        if self.draining:
            reason = "server-shutdown"
        elif (
            conn is not None and self.settings.max_connection_age_seconds is not None
            and time.monotonic() - conn.opened_at >= self.settings.max_connection_age_seconds
        ):
            reason = "max-age"
        if reason is not None and conn is not None and conn.closing_reason is None:
            conn.closing_reason = reason
            response.headers[CLOSE_HEADER] = reason
            response.force_close()
            SERVER_CLOSES.labels(self.settings.pod_name, self.settings.node_name, "http",
                                 reason).inc()
        return response

    def work(self) -> None:
        used = burn_cpu(self.settings.cpu_per_request_millicores)
        if used:
            self.busy_cpu.inc(used)

    # -- gRPC ----------------------------------------------------------------------------------

    async def handle_grpc(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        peer = context.peer()
        if self.grpc_connections is not None:
            self.grpc_connections.saw_call(peer)
        self.work()
        self.grpc_requests.inc()
        await context.send_initial_metadata((
            ("kpbench-pod", self.settings.pod_name),
            ("kpbench-node", self.settings.node_name),
            ("kpbench-connection", peer),
        ))
        return self.settings.pod_name.encode()

    async def start_grpc(self) -> None:
        settings = self.settings
        options: list[tuple[str, Any]] = [("grpc.so_reuseport", 0)]
        if settings.max_connection_age_seconds is not None:
            options += [
                ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
                ("grpc.max_connection_age_grace_ms", 10_000),
            ]
        server = grpc.aio.server(options=options)
        handler = grpc.method_handlers_generic_handler(GRPC_SERVICE, {
            GRPC_METHOD: grpc.unary_unary_rpc_method_handler(self.handle_grpc),
        })
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
        if port == 0:
            raise OSError(f"cannot listen for gRPC on {settings.host}:{settings.grpc_port}")
        await server.start()
        self.grpc_server = server
        self.bound_grpc_port = port
        assert self.grpc_connections is not None
        self.grpc_connections.grpc_port = port

    async def poll_grpc_connections(self) -> None:
        while not self.stopped.is_set():
            if self.grpc_connections is not None and self.grpc_server is not None:
                self.grpc_connections.refresh()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), GRPC_POLL_SECONDS)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        runner = web.ServerRunner(self.server, handle_signals=False)
        await runner.setup()
        self.runners.append(runner)
        self.workload_site = web.TCPSite(runner, settings.host, settings.port,
                                         reuse_address=True)
        await self.workload_site.start()
        if runner.addresses:  # learn a port-0 binding
            self.http_port = runner.addresses[0][1]
        if settings.admin_port is not None:
            admin_runner = web.ServerRunner(self.admin_server, handle_signals=False)
            await admin_runner.setup()
            self.runners.append(admin_runner)
            admin_site = web.TCPSite(admin_runner, settings.host, settings.admin_port,
                                     reuse_address=True)
            await admin_site.start()
            if admin_runner.addresses:
                self.bound_admin_port = admin_runner.addresses[0][1]
        if settings.grpc_port is not None:
            await self.start_grpc()
        self.ready.set(1)

    async def shutdown(self) -> None:
        """SIGTERM: not ready, refuse new connections, drain, close keep-alive connections."""
        if self.draining:
            return
        self.draining = True
        self.ready.set(0)
        LOG.info("shutting down: draining for %.1fs", self.settings.shutdown_drain_seconds)
        if self.workload_site is not None:
            await self.workload_site.stop()
        grpc_stop = None
        if self.grpc_server is not None:
            grpc_stop = asyncio.ensure_future(
                self.grpc_server.stop(self.settings.shutdown_drain_seconds + 1.0)
            )
        await asyncio.sleep(self.settings.shutdown_drain_seconds)
        for handler, conn in list(self.server.state.items()):
            if conn.counted and conn.closing_reason is None:
                conn.closing_reason = "server-shutdown"
                SERVER_CLOSES.labels(self.settings.pod_name, self.settings.node_name, "http",
                                     "server-shutdown").inc()
            handler.close()
        deadline = time.monotonic() + 2.0
        while self.server.state and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if grpc_stop is not None:
            await grpc_stop
            assert self.grpc_connections is not None
            self.grpc_server = None
            self.grpc_connections.forget_all()
        for runner in self.runners:
            await runner.cleanup()
        self.stopped.set()


async def serve(settings: ServerSettings, announce: bool = True) -> None:
    backend = BackendServer(settings)
    await backend.start()
    loop = asyncio.get_running_loop()
    shutdown_task: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if not shutdown_task:
            shutdown_task.append(asyncio.ensure_future(backend.shutdown()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    poller = asyncio.ensure_future(backend.poll_grpc_connections())
    if announce:
        # One machine-readable line so that a parent process learns the ports (0 = any).
        print(json.dumps({"event": "listening", "pod": settings.pod_name,
                          "port": backend.http_port, "grpc_port": backend.bound_grpc_port,
                          "admin_port": backend.bound_admin_port}), flush=True)
    await backend.stopped.wait()
    await poller
