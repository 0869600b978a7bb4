"""The lab's clients: Locust (`kpbench.workload`), a master in the control namespace and one
worker per client pod, each client pod a namespace on its node. The workload follows the
experiment's own schedule (`kpbench.workload.plan`), so the cell only starts and stops it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kpbench.config import Experiment
from kpbench.lab import netns
from kpbench.lab.netns import CONTROL_IP, Topology
from kpbench.lab.pods import STARTUP_TIMEOUT_SECONDS
from kpbench.lab.sampling import parse_metrics

LOCUST_MASTER_PORT = 5557
LOCUST_RUN_TIME_MARGIN_SECONDS = 600  # Locust is stopped by SIGTERM when the cell ends
MASTER_STOP_SECONDS = 20.0
WORKERS_STOP_SECONDS = 15.0


class Clients:
    """Locust's processes for one cell; `processes[0]` is the master."""

    def __init__(self, cfg: Experiment, topology: Topology, workdir: Path, host: str) -> None:
        self.cfg = cfg
        self.topology = topology
        self.workdir = workdir
        self.host = host  # the Service's address as Locust's --host
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        """The client pods' namespaces, then the master and one worker per client pod."""
        workload = self.cfg.workload
        namespaces = [self.topology.add_pod(f"c{client}", self.cfg.client_node(client))[0]
                      for client in range(workload.clients)]
        config = self.workdir / "experiment.yaml"
        config.write_text(yaml.safe_dump(self.cfg.model_dump(mode="json")))
        base = [sys.executable, "-m", "kpbench.workload", "--config", str(config),
                "--run-time", str(self.cfg.duration_seconds + LOCUST_RUN_TIME_MARGIN_SECONDS)]
        master = [
            *base, "--host", self.host, "--master", "--expect-workers", str(workload.clients),
            "--master-bind-port", str(LOCUST_MASTER_PORT),
            "--csv", str(self.workdir / "locust" / "locust"),
            "--summary", str(self.workdir / "summary.json"),
        ]
        (self.workdir / "locust").mkdir()
        self.spawn(self.topology.control_ns, master, "locust-master.log")
        for index, namespace in enumerate(namespaces):
            worker = [*base, "--worker", "--master-host", CONTROL_IP,
                      "--master-port", str(LOCUST_MASTER_PORT)]
            self.spawn(namespace, worker, f"locust-worker-{index}.log")

    def spawn(self, namespace: str, command: list[str], log_name: str) -> None:
        log = open(self.workdir / log_name, "wb")  # noqa: SIM115 - lives with the process
        self.processes.append(subprocess.Popen(netns.ns_exec(namespace, command), stdout=log,
                                               stderr=subprocess.STDOUT))

    def wait_for_first_connection(self, metrics: Callable[[], list[str | None]]) -> None:
        """Until a backend pod's /metrics (`metrics()`: every pod's) counts a connection."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in self.processes):
                logs = sorted(self.workdir.glob("locust-*.log"))
                tail = logs[0].read_text()[-400:] if logs else ""
                raise RuntimeError(f"Locust exited before the run started: {tail}")
            if any(parse_metrics(t).connections > 0 for t in metrics() if t):
                return
            time.sleep(0.05)
        raise RuntimeError(f"no connection reached a pod within "
                           f"{STARTUP_TIMEOUT_SECONDS:g} s")

    def check_alive(self, now: float) -> None:
        """A Locust process that exited on its own mid-cell fails the cell."""
        for index, process in enumerate(self.processes):
            if process.poll() is not None:
                who, log = (("the Locust master", "locust-master.log") if index == 0 else
                            (f"Locust worker {index - 1}", f"locust-worker-{index - 1}.log"))
                path = self.workdir / log
                tail = path.read_text(errors="replace")[-200:] if path.exists() else ""
                raise RuntimeError(f"{who} died mid-cell at t={now:.1f} s with exit code "
                                   f"{process.returncode}: {' '.join(tail.split())}")

    def stop(self) -> dict[str, Any]:
        """SIGTERM the master first (it writes the summary and stops its workers), then the
        rest; the workload's summary, or {} without one."""
        master = self.processes[0] if self.processes else None
        if master is not None and master.poll() is None:
            master.send_signal(signal.SIGTERM)
            try:
                master.wait(timeout=MASTER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                master.kill()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WORKERS_STOP_SECONDS
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        summary_path = self.workdir / "summary.json"
        if master is not None and summary_path.exists():
            return dict(json.loads(summary_path.read_text()))
        return {}
