"""A real Locust run (subprocess) against real kpbench servers on 127.0.0.1, HTTP and gRPC.

Locust monkey-patches with gevent, so it only ever runs in child processes here.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kpbench.config import validate
from kpbench.workload.plan import Tally, WorkloadPlan, merge_tallies, workload_failures

from .loopback import (
    PYTHON,
    REPOSITORY,
    Processes,
    Started,
    free_port,
    scrape,
    start_balancer,
    start_server,
    write_experiment,
)


def active(servers: list[Started], protocol: str = "http") -> list[float]:
    return [scrape(server.port)[("kpbench_active_connections", protocol)] for server in servers]


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def stop_busiest(servers: list[Started], protocol: str = "http",
                 timeout: float = 10) -> tuple[int, float]:
    """SIGTERM the server holding the most connections (the balancer picks at random, so any
    one server may hold none); return its index and the connections it held."""
    held = active(servers, protocol)
    victim = max(range(len(servers)), key=held.__getitem__)
    servers[victim].process.send_signal(signal.SIGTERM)
    assert servers[victim].process.wait(timeout=timeout) == 0
    return victim, held[victim]


def run_workload(
    processes: Processes, tmp_path: Path, workload: dict[str, Any], host: str, run_time: float,
    during: Callable[[subprocess.Popen[str]], None] | None = None,
    backend: dict[str, Any] | None = None, extra: tuple[str, ...] = (),
    extra_top: dict[str, Any] | None = None,
) -> dict[str, Any]:
    config = write_experiment(tmp_path / "experiment.yaml", {"ramp_seconds": 0, **workload},
                              **({"backend": backend} if backend else {}), **(extra_top or {}))
    summary = tmp_path / "summary.json"
    process = processes.spawn([
        "-m", "kpbench.workload", "--config", str(config), "--host", host,
        "--run-time", str(run_time), "--summary", str(summary), "--csv",
        str(tmp_path / "locust"), *extra,
    ])
    if during is not None:
        during(process)
    _, stderr = process.communicate(timeout=run_time + 30)
    assert process.returncode == 0, stderr[-3000:]
    assert (tmp_path / "locust_stats.csv").exists()
    result: dict[str, Any] = json.loads(summary.read_text())
    result["_seconds"] = result["finished_at"] - result["test_started_at"]
    return result


def servers_behind_balancer(processes: Processes, count: int, *flags: str, grpc: bool = False
                            ) -> tuple[list[Started], Started]:
    servers = [start_server(processes, f"pod-{i}", *flags) for i in range(count)]
    balancer = start_balancer(processes, [s.grpc_port if grpc else s.port for s in servers])
    return servers, balancer


# -- pure parts ---------------------------------------------------------------------------------


def test_tallies_merge_like_sums() -> None:
    first, second = Tally(), Tally()
    for tally, pod in ((first, "a"), (second, "b"), (second, "a")):
        tally.opened()
        tally.identified(pod)
        tally.answered(pod)
    second.closed_connection("a", "reconnect")
    merged = merge_tallies([first.to_dict(), second.to_dict()])
    assert merged["connections"]["opened"] == 3
    assert merged["connections"]["open"] == 2
    assert merged["connections"]["closed"]["reconnect"] == 1
    assert merged["requests"]["by_pod"] == {"a": 2, "b": 1}
    first.failed_connect(ConnectionRefusedError())
    second.failed_connect(TimeoutError())
    second.failed_connect(ConnectionRefusedError())
    merged = merge_tallies([first.to_dict(), second.to_dict()])
    assert merged["connections"]["failed"] == 3
    assert merged["connections"]["failed_by_reason"] == {"refused": 2, "timed out": 1}


def test_plan_mirrors_the_simulator_draws() -> None:
    import random

    from kpbench.config import validate

    experiment = validate({"name": "x", "workload": {
        "lifetime": {"distribution": "fixed", "mean_seconds": 10},
        "reconnect": {"policy": "periodic", "seconds": 4, "jitter": 0.5}}})
    plan = WorkloadPlan.from_experiment(experiment)
    ends = [plan.client_end(random.Random(seed)) for seed in range(50)]
    assert all(reason == "reconnect" and 2 <= end <= 6 for end, reason in ends)


@pytest.mark.parametrize(("override", "expected"), [
    ("workload.requests_per_second=-1", "workload.requests_per_second: "),
    ("workload.reconnect.policy=sometimes", "workload.reconnect.policy: "),
])
def test_bad_workload_setting_is_one_line(tmp_path: Path, override: str, expected: str) -> None:
    config = write_experiment(tmp_path / "e.yaml", {"connections": 1})
    done = subprocess.run(
        [PYTHON, "-m", "kpbench.workload", "--config", str(config), "--host",
         "http://127.0.0.1:9", "--set", override],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_users_cannot_override_scheduled_connections(tmp_path: Path) -> None:
    config = write_experiment(tmp_path / "e.yaml", {"connections": 4},
                              events=[{"at": 2, "action": "load", "connections": 8}])
    done = subprocess.run(
        [PYTHON, "-m", "kpbench.workload", "--config", str(config), "--host",
         "http://127.0.0.1:9", "--users", "3"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == ("kpbench.workload: --users: the experiment's load events set "
                                   "the connections over time")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_refused_connects_are_counted_as_refused(processes: Processes, tmp_path: Path,
                                                 protocol: str) -> None:
    port = free_port()  # nothing listens: the kernel answers every SYN with a reset
    host = f"http://127.0.0.1:{port}" if protocol == "http" else f"127.0.0.1:{port}"
    summary = run_workload(processes, tmp_path, {"connections": 2, "requests_per_second": 5,
                                                 "protocol": protocol}, host, 2)
    # the whole --run-time (its timer once expired at once after a slow start-up)
    assert summary["_seconds"] >= 1.9, summary["_seconds"]
    failed = summary["connections"]["failed"]
    assert failed >= 2 and summary["connections"]["opened"] == 0
    assert summary["connections"]["failed_by_reason"] == {"refused": failed}
    assert workload_failures(summary) == [
        {"count": failed, "reason": "refused (counted by the workload)"}]


# -- HTTP ---------------------------------------------------------------------------------------


def test_http_connections_match_server_metrics(processes: Processes, tmp_path: Path) -> None:
    servers, balancer = servers_behind_balancer(processes, 3, "--grpc-port", "off")
    users = 30
    held: dict[str, float] = {}

    def during(_: subprocess.Popen[str]) -> None:
        wait_until(lambda: sum(active(servers)) == users)
        held.update({f"pod-{i}": n for i, n in enumerate(active(servers)) if n})

    summary = run_workload(processes, tmp_path, {"connections": users, "requests_per_second": 4},
                           f"http://127.0.0.1:{balancer.port}", 5, during)
    assert summary["connections"]["opened"] == users
    assert summary["connections"]["closed"]["end"] == users
    assert summary["connections"]["open_at_stop_by_pod"] == held
    assert summary["requests"]["failed"] == 0 and summary["connections"]["failed"] == 0
    assert len(held) == 3  # 30 connections spread at random over 3 pods
    for index, server in enumerate(servers):
        metrics = scrape(server.port)
        client_count = summary["requests"]["by_pod"].get(f"pod-{index}", 0)
        # a request in flight when Locust stopped its users is answered but not recorded
        assert 0 <= metrics[("kpbench_requests_total", "http")] - client_count <= users
        assert metrics[("kpbench_connections_total", "http")] == held.get(f"pod-{index}", 0)
        assert metrics[("kpbench_active_connections", "http")] == 0


def test_http_periodic_reconnects_at_the_configured_rate(processes: Processes,
                                                         tmp_path: Path) -> None:
    server = start_server(processes, "pod-0", "--grpc-port", "off")
    users = 10
    summary = run_workload(processes, tmp_path, {
        "connections": users, "requests_per_second": 5,
        "reconnect": {"policy": "periodic", "seconds": 0.5, "jitter": 0.2},
    }, f"http://127.0.0.1:{server.port}", 4)
    expected = users * summary["_seconds"] / 0.5
    reconnects = summary["connections"]["closed"]["reconnect"]
    assert 0.6 * expected <= reconnects <= 1.15 * expected, (reconnects, expected)
    opened = summary["connections"]["opened"]
    assert sum(summary["connections"]["closed"].values()) == opened  # each closed exactly once
    assert opened <= users + reconnects  # at the stop a user holds at most one connection
    assert scrape(server.port)[("kpbench_connections_total", "http")] == opened
    assert summary["requests"]["failed"] == 0


def test_http_after_requests_and_lifetime(processes: Processes, tmp_path: Path) -> None:
    server = start_server(processes, "pod-0", "--grpc-port", "off")
    users, limit = 10, 4
    summary = run_workload(processes, tmp_path, {
        "connections": users, "requests_per_second": 10,
        "reconnect": {"policy": "after-requests", "requests": limit},
        "lifetime": {"distribution": "exponential", "mean_seconds": 1.0},
    }, f"http://127.0.0.1:{server.port}", 4)
    closed = summary["connections"]["closed"]
    requests = summary["requests"]["total"]
    # a connection answers at most `limit` requests, and only a lifetime ends one sooner
    assert summary["connections"]["opened"] >= requests / limit
    assert closed["reconnect"] <= requests / limit
    assert closed["reconnect"] > 0 and closed["lifetime"] > 0
    opened = summary["connections"]["opened"]
    assert sum(closed.values()) == opened  # each connection closed exactly once (`end` included)
    # at the stop a user holds at most one connection (or is between two)
    assert closed["end"] <= users
    assert opened <= users + closed["reconnect"] + closed["lifetime"]
    assert scrape(server.port)[("kpbench_connections_total", "http")] == (
        summary["connections"]["opened"])


def test_http_sigterm_moves_clients_without_failures(processes: Processes,
                                                     tmp_path: Path) -> None:
    servers, balancer = servers_behind_balancer(
        processes, 3, "--grpc-port", "off", "--shutdown-drain-seconds", "0.5")
    users = 30
    stopped: list[tuple[int, float]] = []

    def during(_: subprocess.Popen[str]) -> None:
        wait_until(lambda: sum(active(servers)) == users)
        stopped.append(stop_busiest(servers, timeout=5))
        survivors = [s for i, s in enumerate(servers) if i != stopped[0][0]]
        wait_until(lambda: sum(active(survivors)) == users)

    summary = run_workload(processes, tmp_path, {"connections": users, "requests_per_second": 4},
                           f"http://127.0.0.1:{balancer.port}", 6, during)
    closed = summary["connections"]["closed"]
    victim, held = stopped[0]
    assert held > 0
    assert closed["server-shutdown"] + closed["reset"] == held
    assert summary["requests"]["failed"] <= held * 0.2  # only in-flight ones may fail
    assert summary["connections"]["opened"] == users + held
    assert summary["connections"]["open_at_stop_by_pod"].get(f"pod-{victim}", 0) == 0


def test_http_max_connection_age_is_honoured(processes: Processes, tmp_path: Path) -> None:
    servers, balancer = servers_behind_balancer(
        processes, 2, "--grpc-port", "off", "--max-connection-age-seconds", "0.5")
    users = 10
    summary = run_workload(processes, tmp_path, {"connections": users, "requests_per_second": 10},
                           f"http://127.0.0.1:{balancer.port}", 4,
                           backend={"max_connection_age_seconds": 0.5})
    closes = summary["connections"]["closed"]["max-age"]
    # closed by the first response after 0.5 s, reopened by the next request: a cycle lasts
    # from 0.5 s to 0.5 s + two request intervals, at the request rate the users achieved
    # (below the offered 10/s when the machine is busy); each user's last cycle is cut short
    # by the end of the run and closes as `end`
    achieved = summary["requests"]["total"] / (users * summary["_seconds"])
    assert achieved > 0, f"no request answered in {summary['_seconds']:.1f} s: machine too busy"
    most, longest = (users * summary["_seconds"] / cycle for cycle in (0.5, 0.5 + 2 / achieved))
    least = longest - users
    assert 0.9 * least <= closes <= most, (closes, least, most, achieved)
    server_closes = sum(scrape(s.port)[("kpbench_server_closes_total", "max-age")]
                        for s in servers)
    assert 0 <= server_closes - closes <= users
    assert summary["requests"]["failed"] == 0


def test_distributed_run_merges_worker_tallies(processes: Processes, tmp_path: Path) -> None:
    server = start_server(processes, "pod-0", "--grpc-port", "off")
    config = write_experiment(tmp_path / "experiment.yaml",
                              {"connections": 6, "requests_per_second": 5, "ramp_seconds": 0})
    port = free_port()
    worker = processes.spawn(["-m", "kpbench.workload", "--config", str(config), "--worker",
                              "--master-port", str(port)])
    summary_path = tmp_path / "summary.json"
    master = processes.spawn([
        "-m", "kpbench.workload", "--config", str(config), "--master", "--expect-workers", "1",
        "--master-bind-port", str(port), "--host", f"http://127.0.0.1:{server.port}",
        "--run-time", "4", "--summary", str(summary_path),
    ])
    _, stderr = master.communicate(timeout=40)
    assert master.returncode == 0, stderr[-3000:]
    worker.wait(timeout=15)
    summary = json.loads(summary_path.read_text())
    assert summary["role"] == "master" and summary["workers"] == 1
    assert summary["connections"]["opened"] == 6
    server_requests = scrape(server.port)[("kpbench_requests_total", "http")]
    assert 0 < summary["requests"]["by_pod"]["pod-0"] <= server_requests


# -- gRPC ---------------------------------------------------------------------------------------


def grpc_host(balancer: Started) -> str:
    return f"127.0.0.1:{balancer.port}"


def test_grpc_connections_and_max_age(processes: Processes, tmp_path: Path) -> None:
    servers, balancer = servers_behind_balancer(processes, 2, "--max-connection-age-seconds", "1",
                                                grpc=True)
    users = 10
    # connections turn over every ~1 s here, so no instant is guaranteed to show exactly 10
    summary = run_workload(processes, tmp_path,
                           {"connections": users, "requests_per_second": 5, "protocol": "grpc"},
                           grpc_host(balancer), 5, backend={"max_connection_age_seconds": 1.0})
    assert summary["connections"]["opened"] >= users
    closes = summary["connections"]["closed"]
    # grpc core jitters the age by +-10%, and the GOAWAY is noticed at the next call
    expected = users * summary["_seconds"] / 1.0
    assert 0.5 * expected <= closes["max-age"] <= 1.2 * expected, (closes, expected)
    # a call can race a GOAWAY through the TCP balancer; rare
    assert summary["requests"]["failed"] <= 0.01 * summary["requests"]["total"]
    # the client counts a connection once a call on it is answered; the server counts every
    # accepted one, including those a user's last or failed call opened but never got a reply on
    total = sum(scrape(s.port)[("kpbench_connections_total", "grpc")] for s in servers)
    unanswered = total - summary["connections"]["opened"]
    assert 0 <= unanswered <= users + summary["requests"]["failed"], (total, summary)
    wait_until(lambda: sum(active(servers, "grpc")) == 0, timeout=30)


def test_grpc_sigterm_and_periodic_reconnect(processes: Processes, tmp_path: Path) -> None:
    servers, balancer = servers_behind_balancer(processes, 3, "--shutdown-drain-seconds", "0.5",
                                                grpc=True)
    users = 12
    stopped: list[tuple[int, float]] = []

    def during(_: subprocess.Popen[str]) -> None:
        # >=: a periodic reconnect may overlap its successor for a moment
        wait_until(lambda: sum(active(servers, "grpc")) >= users)
        stopped.append(stop_busiest(servers, "grpc"))

    summary = run_workload(processes, tmp_path, {
        "connections": users, "requests_per_second": 5, "protocol": "grpc",
        "reconnect": {"policy": "periodic", "seconds": 2.0},
    }, grpc_host(balancer), 6, during)
    closed = summary["connections"]["closed"]
    victim, held = stopped[0]
    assert closed["server-shutdown"] + closed["reset"] >= held > 0
    assert closed["reconnect"] > 0
    assert summary["requests"]["failed"] <= held * 0.2
    assert summary["connections"]["open_at_stop_by_pod"].get(f"pod-{victim}", 0) == 0


# -- load events ----------------------------------------------------------------------------------


def test_plan_follows_the_load_schedule() -> None:
    plan = WorkloadPlan.from_experiment(validate({
        "name": "steps", "workload": {"connections": 10, "requests_per_second": 2,
                                      "ramp_seconds": 5},
        "events": [{"at": 30, "action": "load", "connections": 4},
                   {"at": 10, "action": "load", "requests_per_second": 8, "connections": 30}],
    }))
    assert [plan.requests_per_second_at(t) for t in (0, 9.9, 10, 100)] == [2, 2, 8, 8]
    assert plan.request_interval_at(12) == 0.125
    assert plan.users_at(0) == (10, 2.0)  # 10 users over the 5 s ramp
    assert plan.users_at(10) == (30, 4.0)  # +20 over 5 s
    assert plan.users_at(31) == (4, 5.2)  # -26 over 5 s


def test_a_rate_step_reaches_the_servers(processes: Processes, tmp_path: Path) -> None:
    server = start_server(processes, "pod-0", "--grpc-port", "off")
    users, before, after = 10, 2.0, 10.0
    windows: list[float] = []

    def during(_: subprocess.Popen[str]) -> None:
        wait_until(lambda: active([server])[0] == users)
        started = time.monotonic()
        for begin, end in ((0.3, 2.3), (4.0, 6.0)):
            time.sleep(max(0.0, started + begin - time.monotonic()))
            first = scrape(server.port)[("kpbench_requests_total", "http")]
            time.sleep(max(0.0, started + end - time.monotonic()))
            windows.append(scrape(server.port)[("kpbench_requests_total", "http")] - first)

    summary = run_workload(
        processes, tmp_path, {"connections": users, "requests_per_second": before},
        f"http://127.0.0.1:{server.port}", 7, during,
        extra_top={"events": [{"at": 3, "action": "load", "requests_per_second": after}]})
    assert summary["requests"]["failed"] == 0
    # 2 s windows: 40 requests at 2/s per connection before the step, 200 at 10/s after it
    assert 3.0 <= windows[1] / windows[0] <= 7.0, windows


def test_connection_steps_add_and_close_users(processes: Processes, tmp_path: Path) -> None:
    server = start_server(processes, "pod-0", "--grpc-port", "off")
    seen: list[float] = []

    def during(process: subprocess.Popen[str]) -> None:
        for expected in (4, 12, 6):
            wait_until(lambda n=expected: active([server])[0] == n, timeout=8)
            seen.append(active([server])[0])
        time.sleep(1)
        process.send_signal(signal.SIGTERM)  # as the lab stops it, long before --run-time

    summary = run_workload(
        processes, tmp_path, {"connections": 4, "requests_per_second": 2},
        f"http://127.0.0.1:{server.port}", 120, during,
        extra_top={"events": [{"at": 2, "action": "load", "connections": 12},
                              {"at": 4, "action": "load", "connections": 6}]})
    assert seen == [4, 12, 6]
    connections = summary["connections"]
    assert connections["opened"] == 12
    assert connections["closed"]["load-change"] == 6 and connections["closed"]["end"] == 6
    assert summary["requests"]["failed"] == 0
