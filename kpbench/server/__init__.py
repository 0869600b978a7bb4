"""The kpbench backend server: one process per backend pod (lab and kind images alike).

Run it with::

    python -m kpbench.server --pod-name NAME --node-name NODE --host 0.0.0.0 --port 8080 \
        --grpc-port 9090 [--admin-port P] [--max-connection-age-seconds S] \
        [--cpu-per-request-millicores M] [--shutdown-drain-seconds D]

Every flag can also come from the environment (`KPBENCH_POD_NAME`, `KPBENCH_NODE_NAME`,
`KPBENCH_HOST`, `KPBENCH_PORT`, `KPBENCH_GRPC_PORT`, `KPBENCH_ADMIN_PORT`,
`KPBENCH_MAX_CONNECTION_AGE_SECONDS`, `KPBENCH_CPU_PER_REQUEST_MILLICORES`,
`KPBENCH_SHUTDOWN_DRAIN_SECONDS`); a flag wins over its variable. `--grpc-port 0` or an empty
value disables gRPC; a bad value prints one line and exits 2.

HTTP/1.1 (aiohttp, keep-alive, no idle timeout to speak of):

- any path but the admin ones answers 200 with the pod name as the body (plus a newline) and in
  the headers `X-Kpbench-Pod` and `X-Kpbench-Node`; that is a *workload request*.
- admin paths: `/metrics` (Prometheus text), `/healthz` (200 while the process runs), `/readyz`
  (200, then 503 from SIGTERM on). Admin requests are not counted, and a connection whose first
  request is an admin path is never counted as a workload connection (so scrapes and probes do
  not show up as connections).
- A connection is counted (opened, active) at its first workload request and uncounted when it
  closes. Clients send their first request as soon as they connect.
- `--max-connection-age-seconds S`: the first response completed on a connection older than S
  carries `Connection: close` and `X-Kpbench-Close: max-age`, and the server closes the connection
  after it (a connection is never cut mid-request, and never closed while idle, so there is no
  race with a request already on the wire).
- `--cpu-per-request-millicores M`: each workload request (HTTP or gRPC) spins the CPU for M
  milliseconds of thread CPU time, so a pod at R requests/s uses R*M millicores, as the sim's HPA
  model assumes.

gRPC (grpcio, asyncio server in the same process): unary method `/kpbench.Echo/Hello` with raw
bytes in and out (no protobuf needed: pass `None` (de)serializers). The reply is the pod name;
initial metadata carries `kpbench-pod`, `kpbench-node` and `kpbench-connection` (the peer address
the server sees, which identifies the HTTP/2 connection). A gRPC connection is counted at its
first call and uncounted when channelz no longer lists it (polled every 0.2 s and at each scrape).
Max connection age uses grpc's own `grpc.max_connection_age_ms` (a GOAWAY; grpc core adds up to
±10% jitter). Channels must set `("grpc.use_local_subchannel_pool", 1)` or grpc shares one
connection among all channels of a process.

Metrics (prometheus-client; labels `pod`, `node`, `protocol` = http|grpc):
`kpbench_active_connections` (gauge), `kpbench_connections_total`, `kpbench_requests_total`,
`kpbench_server_closes_total` (extra label `reason` = max-age|server-shutdown: closes the server
initiated and announced), `kpbench_busy_cpu_seconds_total` (the per-request CPU work),
`kpbench_ready` (1/0), plus the process collector's `process_cpu_seconds_total` etc.

Shutdown on SIGTERM or SIGINT: `/readyz` turns 503 and `kpbench_ready` 0; the workload listener
closes at once (new connections are refused, as for a pod withdrawn from its Service) and gRPC
sends GOAWAY; for `--shutdown-drain-seconds` (default 1.0) every HTTP response carries
`Connection: close` and `X-Kpbench-Close: server-shutdown`; then the remaining keep-alive
connections are closed (idle ones at once, busy ones after their response) and the process exits
0. The `--admin-port` listener, if any, serves only the admin paths and stays open until exit, so
terminating pods can still be scraped.
"""
