"""`python -m kpbench.workload`: the Locust long-connection workload, headless, from an experiment.

    python -m kpbench.workload --config EXPERIMENT.yaml --host URL [--set KEY=VALUE]...
        [--users N] [--run-time S] [--csv PREFIX] [--summary FILE.json]
        [--master --expect-workers N | --worker --master-host H [--master-port P]]
        [-- EXTRA LOCUST ARGS...]

The config is validated first (`kpbench.config.load`): a bad setting prints one line per problem
naming the key and exits 2 before Locust starts. Defaults: `--users` = `workload.connections`,
`--run-time` = `duration_seconds`, spawn rate = users / `workload.ramp_seconds` (all at once if
0). `--host`: `http://HOST:PORT` for HTTP, `HOST:PORT` (or `grpc://HOST:PORT`) for gRPC. Then the
process becomes `locust -f kpbench/workload/locustfile.py --headless ...` (exec, same pid, so
signals reach Locust). `--csv` is Locust's own CSV output, unmodified; `--summary` is kpbench's
JSON (see `kpbench.workload`). Failed requests do not change the exit code (they are data).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from kpbench.config import ConfigError, load
from kpbench.workload.plan import WorkloadPlan, spawn_rate

EXIT_INVALID = 2
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m kpbench.workload", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="experiment YAML")
    parser.add_argument("--host", default=None, help="target (required unless --worker)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a dotted config key (YAML value)")
    parser.add_argument("--users", type=int, default=None,
                        help="connections (Locust users); default workload.connections")
    parser.add_argument("--run-time", type=float, default=None,
                        help="seconds; default duration_seconds")
    parser.add_argument("--csv", default=None, metavar="PREFIX", help="Locust's CSV files")
    parser.add_argument("--summary", type=Path, default=None, help="kpbench summary JSON")
    role = parser.add_mutually_exclusive_group()
    role.add_argument("--master", action="store_true")
    role.add_argument("--worker", action="store_true")
    parser.add_argument("--expect-workers", type=int, default=1)
    parser.add_argument("--master-host", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=5557)
    parser.add_argument("--master-bind-port", type=int, default=None)
    parser.add_argument("locust_args", nargs="*", help="after --: passed to Locust as is")
    return parser


def locust_command(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The Locust command line and extra environment; raises UsageError / ConfigError."""
    args = build_parser().parse_args(argv)
    experiment = load(args.config, args.overrides)
    workload = experiment.workload
    problems: list[str] = []
    users = workload.connections if args.users is None else args.users
    run_time = experiment.duration_seconds if args.run_time is None else args.run_time
    if users < 0:
        problems.append(f"--users: must be >= 0, got {users}")
    if args.users is not None and WorkloadPlan.from_experiment(experiment).connection_changes:
        problems.append("--users: the experiment's load events set the connections over time")
    if not math.isfinite(run_time) or run_time <= 0:
        problems.append(f"--run-time: must be > 0, got {run_time:g}")
    if args.expect_workers < 1:
        problems.append(f"--expect-workers: must be >= 1, got {args.expect_workers}")
    if not args.worker and not args.host:
        problems.append("--host: required (the Service address to load)")
    if problems:
        raise ConfigError(problems)
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--exit-code-on-error", "0"]
    if args.worker:
        command += ["--worker", "--master-host", args.master_host,
                    "--master-port", str(args.master_port)]
    else:
        command += ["--headless", "--only-summary", "-u", str(users),
                    "-r", f"{spawn_rate(users, workload.ramp_seconds):g}",
                    "-t", f"{max(1, round(run_time))}s",
                    "--host", args.host]
        if args.master:
            command += ["--master", "--expect-workers", str(args.expect_workers)]
            if args.master_bind_port is not None:
                command += ["--master-bind-port", str(args.master_bind_port)]
        if args.csv:
            command += ["--csv", args.csv]
        if args.summary:
            command += ["--kpbench-summary", str(args.summary)]
    if args.host and args.worker:
        command += ["--host", args.host]
    command += args.locust_args
    environment = {"KPBENCH_EXPERIMENT_JSON": experiment.model_dump_json()}
    return command, environment


def main(argv: Sequence[str] | None = None) -> int:
    try:
        command, environment = locust_command(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"kpbench.workload: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"kpbench.workload: {problem}", file=sys.stderr)
        return EXIT_INVALID
    env = {k: v for k, v in os.environ.items() if k not in ("KPBENCH_CONFIG", "KPBENCH_SET")}
    env.update(environment)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)


if __name__ == "__main__":
    sys.exit(main())
