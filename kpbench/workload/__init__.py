"""The Locust long-connection workload (lab and kind alike).

Modules (only `users` and `locustfile` import Locust; import them only inside Locust processes):

- `plan`: `WorkloadPlan` (what a user does, from the experiment config), `Tally` and
  `merge_tallies` (client-side counts), `CLOSE_REASONS`.
- `http1`: a one-socket HTTP/1.1 keep-alive client without hidden retries.
- `users`: `KpbenchHttpUser`, `KpbenchGrpcUser`: one connection / channel per user.
- `locustfile`: for `locust -f`; picks the user class from `workload.protocol`.
- `__main__`: `python -m kpbench.workload --config X.yaml --host URL ...` (see its docstring).
- `balancer`: a small TCP balancer standing in for a Service on loopback (tests, benchmark).
- `bench`: capacity benchmark, `run(console) -> dict[str, float]`.

Summary JSON (`--summary`, format `kpbench-workload-summary/1`)::

    {"format", "role": "local"|"master", "workers", "protocol", "host",
     "requests_per_second_per_connection", "started_at" (process), "test_started_at" (users start
     spawning), "finished_at" (unix s),
     "connections": {"opened", "failed", "failed_by_reason": {"refused", "timed out", "other": n},
                     "open",
                     "closed": {"lifetime", "reconnect", "max-age", "server-shutdown", "reset",
                                "end": n},
                     "opened_by_pod": {pod: n}, "open_at_stop_by_pod": {pod: n}},
     "requests": {"total" (answered), "failed", "by_pod": {pod: n}},
     "locust": {"requests", "failures"} (Locust's own totals, CONNECT entries included),
     "exit_code"}

`connections.opened` counts established connections (HTTP: TCP connect; gRPC: first answered
call on a connection); `failed` counts connects that failed (gRPC: a channel's first call
failing), `failed_by_reason` splits them as the client saw them (`plan.connect_failure`).
`open_at_stop_by_pod` is what the users held when the run ended.
"""
