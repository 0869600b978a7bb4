"""Capacity benchmark of the real workload and server on this machine (loopback).

1. Connections per Locust worker process: one `python -m kpbench.workload` process (local runner,
   the same code a worker runs) holds N long-lived HTTP connections at 1 request/s each against
   real servers; N steps up until the failure share reaches 1%, the process cannot reach N
   connections, or it delivers under 95% of the offered request rate. The figure is the largest
   N that passed.
2. Server CPU per 1,000 requests: `process_cpu_seconds_total` of the servers divided by the
   requests they answered (with `cpu_per_request_millicores` 0: the server's own cost).
3. The server's own CPU per request where the HPA experiments run it (`OPERATING_POINTS`: 40
   connections at 1 and 3 requests/s, 1 ms burned on purpose per request): the server's CPU
   time minus its idle CPU, per request, minus the 1 ms; and its idle CPU with no connection.
   The model's `backend.server_cpu_per_request_millicores` default comes from here.
4. Server start: from starting the process to its `listening` line (it answers `/readyz` from
   then on), `SERVER_STARTS` times in pairs (two pods of a surge start together), as median and
   the standard deviation of the log; the model's `backend.server_start_*` defaults come from here.

`run(console) -> dict[str, float]`; `python -m kpbench.workload.bench [--steps 1000,2500,5000]`.
Keys: `connections_per_worker`, `server_cpu_ms_per_1000_requests`, per step
`step_<N>_{held,failure_pct,delivered_pct}`, `server_own_cpu_ms_per_request`,
`server_idle_millicores`, `server_start_median_seconds`, `server_start_sigma`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

REPO = Path(__file__).resolve().parents[2]
DEFAULT_STEPS = (1000, 2500, 5000, 7500)
SERVERS = 1
RAMP_SECONDS = 10.0
STEADY_SECONDS = 10.0
OPERATING_POINTS = ((40, 1.0), (40, 3.0))  # (connections, requests/s each), as hpa-scale-out-lab
OPERATING_BURN_MILLICORES = 1.0
IDLE_SECONDS = 10.0
SERVER_STARTS = 20


def _spawn(args: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if 'protocol="grpc"' in name_labels:
            continue
        values[name] = values.get(name, 0.0) + float(value)
    return values


def _start_server(index: int, cpu_per_request_millicores: float = 0.0
                  ) -> tuple[subprocess.Popen[str], int]:
    process = _spawn(["-m", "kpbench.server", "--pod-name", f"bench-{index}", "--host",
                      "127.0.0.1", "--port", "0", "--grpc-port", "off",
                      "--cpu-per-request-millicores", str(cpu_per_request_millicores)])
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("{"):
        _stop(process)
        raise RuntimeError("the server did not start")
    return process, int(json.loads(line)["port"])


def measure_step(connections: int, workdir: Path, requests_per_second: float = 1.0,
                 cpu_per_request_millicores: float = 0.0) -> dict[str, float]:
    """One worker process holding `connections` connections; servers are started fresh."""
    servers = [_start_server(i, cpu_per_request_millicores) for i in range(SERVERS)]
    balancer: subprocess.Popen[str] | None = None
    workload: subprocess.Popen[str] | None = None
    try:
        # Straight to the server: a balancer process would compete with Locust for the CPU.
        target_port = servers[0][1]
        if len(servers) > 1:
            backends = [arg for _, port in servers for arg in ("--backend", f"127.0.0.1:{port}")]
            balancer = _spawn(["-m", "kpbench.workload.balancer", "--listen", "127.0.0.1:0",
                               *backends])
            assert balancer.stdout is not None
            target_port = int(json.loads(balancer.stdout.readline())["port"])
        config = workdir / f"bench-{connections}.yaml"
        config.write_text(json.dumps({
            "name": "bench", "duration_seconds": 3600,
            "workload": {"connections": connections,
                         "requests_per_second": requests_per_second,
                         "ramp_seconds": RAMP_SECONDS},
        }))
        summary = workdir / f"summary-{connections}.json"
        run_time = RAMP_SECONDS + STEADY_SECONDS + 60
        workload = _spawn(["-m", "kpbench.workload", "--config", str(config), "--host",
                           f"http://127.0.0.1:{target_port}", "--run-time", str(run_time),
                           "--summary", str(summary)])
        # the steady window starts once every connection is held (or the ramp clearly failed)
        ramp_deadline = time.monotonic() + RAMP_SECONDS + 20.0
        while time.monotonic() < ramp_deadline:
            if sum(_metrics(port)["kpbench_active_connections"] for _, port in servers) >= (
                    connections):
                break
            time.sleep(0.5)
        time.sleep(2.0)
        before = [_metrics(port) for _, port in servers]
        started = time.monotonic()
        time.sleep(STEADY_SECONDS)
        after = [_metrics(port) for _, port in servers]
        elapsed = time.monotonic() - started
        held = sum(m["kpbench_active_connections"] for m in after)
        answered = sum(a["kpbench_requests_total"] - b["kpbench_requests_total"]
                       for a, b in zip(after, before, strict=True))
        cpu = sum(a["process_cpu_seconds_total"] - b["process_cpu_seconds_total"]
                  for a, b in zip(after, before, strict=True))
        workload.send_signal(signal.SIGTERM)  # Locust writes the summary as it shuts down
        workload.communicate(timeout=60)
        result = json.loads(summary.read_text())
        attempts = result["requests"]["total"] + result["requests"]["failed"] + (
            result["connections"]["failed"])
        failures = result["requests"]["failed"] + result["connections"]["failed"]
        return {
            "held": held,
            "failure_pct": 100.0 * failures / max(attempts, 1),
            "delivered_pct": 100.0 * answered / (connections * requests_per_second * elapsed),
            "cpu_seconds": cpu, "seconds": elapsed, "answered": answered,
            "server_cpu_ms_per_1000": 1000.0 * 1000.0 * cpu / max(answered, 1),
        }
    finally:
        for process in [p for p in (workload, balancer) if p is not None]:
            _stop(process)
        for process, _ in servers:
            _stop(process)


def measure_idle_millicores() -> float:
    """A server's CPU with no connection (timers, the runtime), in millicores."""
    process, port = _start_server(0)
    try:
        time.sleep(2.0)
        before = _metrics(port)["process_cpu_seconds_total"]
        time.sleep(IDLE_SECONDS)
        after = _metrics(port)["process_cpu_seconds_total"]
    finally:
        _stop(process)
    return 1000.0 * (after - before) / IDLE_SECONDS


def measure_server_cost(workdir: Path) -> dict[str, float]:
    """The server's own CPU per request at the HPA experiments' operating points."""
    idle = measure_idle_millicores()
    own = []
    for connections, rate in OPERATING_POINTS:
        step = measure_step(connections, workdir, rate, OPERATING_BURN_MILLICORES)
        busy = step["cpu_seconds"] - idle / 1000.0 * step["seconds"]
        own.append(1000.0 * busy / max(step["answered"], 1) - OPERATING_BURN_MILLICORES)
    return {"server_own_cpu_ms_per_request": round(sum(own) / len(own), 3),
            "server_idle_millicores": round(idle, 2)}


def measure_server_starts(pairs: int = SERVER_STARTS // 2) -> dict[str, float]:
    """Seconds from starting a server process to its `listening` line, two at a time."""
    seconds: list[float] = []
    for _ in range(pairs):
        started = time.monotonic()
        processes = [_spawn(["-m", "kpbench.server", "--pod-name", f"start-{i}", "--host",
                             "127.0.0.1", "--port", "0", "--grpc-port", "off"])
                     for i in range(2)]
        try:
            for process in processes:
                assert process.stdout is not None
                if not process.stdout.readline().startswith("{"):
                    raise RuntimeError("the server did not start")
                seconds.append(time.monotonic() - started)
        finally:
            for process in processes:
                _stop(process)
    logs = [math.log(s) for s in seconds]
    mean = sum(logs) / len(logs)
    sigma = math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1))
    return {"server_start_median_seconds": round(statistics.median(seconds), 3),
            "server_start_sigma": round(sigma, 3)}


def run(console: Console, steps: Sequence[int] = DEFAULT_STEPS) -> dict[str, float]:
    figures: dict[str, float] = {}
    best = 0
    cpu_per_1000: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kpbench-bench-") as tmp:
        for connections in steps:
            step = measure_step(connections, Path(tmp))
            for key in ("held", "failure_pct", "delivered_pct"):
                figures[f"step_{connections}_{key}"] = round(step[key], 2)
            cpu_per_1000.append(step["server_cpu_ms_per_1000"])
            passed = (step["held"] >= connections and step["failure_pct"] < 1.0
                      and step["delivered_pct"] >= 95.0)
            console.print(
                f"{connections:>6} connections: held {step['held']:.0f}, "
                f"failures {step['failure_pct']:.2f}%, delivered {step['delivered_pct']:.1f}% "
                f"of 1 req/s each, server CPU {step['server_cpu_ms_per_1000']:.0f} ms per "
                f"1000 requests -> {'ok' if passed else 'over capacity'}"
            )
            if not passed:
                break
            best = connections
        figures.update(measure_server_cost(Path(tmp)))
    figures.update(measure_server_starts())
    figures["connections_per_worker"] = float(best)
    figures["server_cpu_ms_per_1000_requests"] = round(min(cpu_per_1000), 1)
    console.print(f"one Locust worker process holds {best} connections at 1 request/s "
                  f"(<1% failures); the server uses "
                  f"{figures['server_cpu_ms_per_1000_requests']:.0f} ms CPU per 1000 requests")
    console.print(
        f"the server's own CPU per request at 40 connections x 1-3 requests/s (besides the 1 ms "
        f"burned on purpose): {figures['server_own_cpu_ms_per_request']:.3f} ms, idle "
        f"{figures['server_idle_millicores']:.2f} millicores; a server starts in "
        f"{figures['server_start_median_seconds']:.2f} s median (log sd "
        f"{figures['server_start_sigma']:.2f}), two at a time")
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpbench.workload.bench")
    parser.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)),
                        help="connection counts to try, ascending")
    args = parser.parse_args(argv)
    steps = [int(part) for part in args.steps.split(",") if part.strip()]
    print(json.dumps(run(Console(), steps), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
