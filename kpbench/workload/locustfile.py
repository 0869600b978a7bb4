"""The kpbench locustfile: `locust -f kpbench/workload/locustfile.py` (or `python -m
kpbench.workload`, which sets all of this up from an experiment file).

The experiment comes from the environment: `KPBENCH_EXPERIMENT_JSON` (a resolved config, as
`python -m kpbench.workload` passes it) or `KPBENCH_CONFIG` (a YAML path) with optional
`KPBENCH_SET` (newline-separated `KEY=VALUE` overrides). `workload.protocol` picks the one user
class this file exposes: `KpbenchHttpUser` or `KpbenchGrpcUser`. An invalid config prints one
line per problem and exits 2.

When the experiment's `load` events change `connections`, this file also defines a load shape that
moves the number of users on that schedule (see `kpbench.workload.plan`).

Extra Locust option: `--kpbench-summary FILE.json`, written by the master (or the local runner)
when Locust quits; in distributed mode each worker's tally reaches the master with its regular
reports and the master sums them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import gevent
import grpc.experimental.gevent
from locust import LoadTestShape, events
from locust.runners import MasterRunner, WorkerRunner

from kpbench.config import ConfigError, Experiment, load, validate
from kpbench.workload import users
from kpbench.workload.plan import SUMMARY_FORMAT, WorkloadPlan, merge_tallies

grpc.experimental.gevent.init_gevent()


def _experiment_from_environment() -> Experiment:
    resolved = os.environ.get("KPBENCH_EXPERIMENT_JSON")
    if resolved:
        return validate(json.loads(resolved))
    path = os.environ.get("KPBENCH_CONFIG")
    if not path:
        raise ConfigError(["KPBENCH_CONFIG: set it to an experiment YAML file"])
    overrides = [line for line in os.environ.get("KPBENCH_SET", "").splitlines() if line.strip()]
    return load(Path(path), overrides)


try:
    PLAN = WorkloadPlan.from_experiment(_experiment_from_environment())
except ConfigError as exc:
    for problem in exc.problems:
        print(f"kpbench: {problem}", file=sys.stderr)
    sys.exit(2)

users.LongConnectionUser.plan = PLAN
if PLAN.protocol == "grpc":
    from kpbench.workload.users import KpbenchGrpcUser  # noqa: F401  (Locust finds it here)
else:
    from kpbench.workload.users import KpbenchHttpUser  # noqa: F401

WORKER_TALLIES: dict[str, dict[str, Any]] = {}
STARTED_AT = time.time()
TEST_STARTED_AT: list[float] = []


@events.test_start.add_listener
def _test_started(**_: Any) -> None:
    TEST_STARTED_AT.append(time.time())
    users.LongConnectionUser.test_started_at = time.monotonic()


if PLAN.connection_changes:

    class KpbenchLoadShape(LoadTestShape):
        """The number of users over time from the experiment's `load` events (master only).

        Locust then ignores `-u`, `-r` and `-t`; the shape ends the test at `--run-time`.
        """

        def tick(self) -> tuple[int, float] | None:
            elapsed = self.get_run_time()
            environment = users.LongConnectionUser.environment_ref
            limit = getattr(environment.parsed_options, "run_time", None)
            if limit and elapsed > limit:
                return None
            return PLAN.users_at(elapsed)


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    parser.add_argument("--kpbench-summary", default="",
                        help="write kpbench's connection/request summary JSON here at exit")


@events.report_to_master.add_listener
def _send_tally(client_id: str, data: dict[str, Any]) -> None:
    data["kpbench"] = users.TALLY.to_dict()


@events.worker_report.add_listener
def _receive_tally(client_id: str, data: dict[str, Any]) -> None:
    if "kpbench" in data:
        WORKER_TALLIES[client_id] = data["kpbench"]


@events.quit.add_listener
def _write_summary(exit_code: int, **_: Any) -> None:
    environment = users.LongConnectionUser.environment_ref
    if environment is None or isinstance(environment.runner, WorkerRunner):
        return
    path = getattr(environment.parsed_options, "kpbench_summary", "")
    if not path:
        return
    if isinstance(environment.runner, MasterRunner):
        tally, role = merge_tallies(list(WORKER_TALLIES.values())), "master"
    else:
        tally, role = users.TALLY.to_dict(), "local"
    total = environment.stats.total
    summary = {
        "format": SUMMARY_FORMAT,
        "role": role,
        "workers": len(WORKER_TALLIES),
        "protocol": PLAN.protocol,
        "host": environment.host,
        "requests_per_second_per_connection": PLAN.requests_per_second,
        "started_at": STARTED_AT,
        "test_started_at": TEST_STARTED_AT[0] if TEST_STARTED_AT else None,
        "finished_at": time.time(),
        **tally,
        "locust": {"requests": total.num_requests, "failures": total.num_failures},
        "exit_code": exit_code,
    }
    target = Path(path)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(summary, indent=2) + "\n")
    temporary.replace(target)


@events.init.add_listener
def _remember_environment(environment: Any, **_: Any) -> None:
    users.LongConnectionUser.environment_ref = environment
    # gevent's timers count from the loop's cached clock, which stands still while start-up
    # blocks (imports take seconds on a slow machine): --run-time's timer, set right after this
    # event, would otherwise expire at once. Bring the clock up to date first.
    gevent.get_hub().loop.update_now()
    if PLAN.connection_changes and not isinstance(environment.runner, WorkerRunner):
        # A headless run with a load shape waits for the shape before Locust installs its own
        # SIGTERM handler, so SIGTERM would kill the process without its CSVs and summary.
        # Stopping the runner ends the shape; Locust then quits as after --run-time.
        gevent.signal_handler(signal.SIGTERM, environment.runner.stop)
