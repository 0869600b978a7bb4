"""Helpers for tests that run real kpbench servers, balancers and Locust on 127.0.0.1.

Every process is started through a `Processes` collection whose `stop_all()` runs in a fixture
teardown, so nothing outlives its test even when the test fails.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

REPOSITORY = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@dataclass
class Started:
    process: subprocess.Popen[str]
    info: dict[str, Any]

    @property
    def port(self) -> int:
        return int(self.info["port"])

    @property
    def grpc_port(self) -> int:
        return int(self.info["grpc_port"])


@dataclass
class Processes:
    running: list[subprocess.Popen[str]] = field(default_factory=list)

    def spawn(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY), **kwargs.pop("env", {})}
        process = subprocess.Popen([PYTHON, *args], cwd=REPOSITORY, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
        self.running.append(process)
        return process

    def start(self, args: Sequence[str], timeout: float = 15.0) -> Started:
        """Spawn a process that announces itself with a JSON `listening` line on stdout."""
        process = self.spawn(args)
        assert process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if selector.select(timeout=0.1):
                line = process.stdout.readline()
                if not line:
                    break
                if line.startswith("{"):
                    return Started(process, json.loads(line))
            if process.poll() is not None:
                break
        stderr = process.stderr.read() if process.poll() is not None and process.stderr else ""
        raise AssertionError(f"{args} did not start: {stderr[-2000:]}")

    def stop(self, process: subprocess.Popen[str], timeout: float = 10.0) -> int:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        return int(process.returncode)

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.running):
            self.stop(process, timeout=5.0)
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        self.running.clear()


def start_server(processes: Processes, pod: str, *extra: str, grpc: bool = True) -> Started:
    return processes.start([
        "-m", "kpbench.server", "--pod-name", pod, "--node-name", "node-1", "--host",
        "127.0.0.1", "--port", "0", "--grpc-port", "0" if grpc else "off",
        "--shutdown-drain-seconds", "0.2", *extra,
    ])


def start_balancer(processes: Processes, ports: Sequence[int]) -> Started:
    backends = [arg for port in ports for arg in ("--backend", f"127.0.0.1:{port}")]
    return processes.start(["-m", "kpbench.workload.balancer", "--listen", "127.0.0.1:0",
                            *backends])


def scrape(port: int) -> dict[tuple[str, str], float]:
    """`{(sample name, reason or protocol label or ""): value}` summed over pods."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            key = (sample.name, labels.get("reason", labels.get("protocol", "")))
            values[key] = values.get(key, 0.0) + sample.value
    return values


def write_experiment(path: Path, workload: dict[str, Any], **top: Any) -> Path:
    raw = {"name": "loopback", "duration_seconds": 60, "workload": workload, **top}
    path.write_text(yaml.safe_dump(raw))
    return path


def free_port() -> int:
    """A TCP port free on every interface right now (ZeroMQ binds `*:port`)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])
