"""The lab's backend pods as processes: the real server (`kpbench.server`) in each pod's
namespace, started, probed on `/readyz`, signalled, checked for exit, and its log.

What happens when (which pod, its start and probe times, its end) is the control plane's,
`kpbench.lab.backend.LabCell`'s; this module only does it to the processes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kpbench import control
from kpbench.config import Experiment
from kpbench.lab import netns
from kpbench.lab.netns import InsideGets, Topology

HTTP_PORT, GRPC_PORT, ADMIN_PORT = 8080, 9090, 9102
STARTUP_TIMEOUT_SECONDS = 60.0


@dataclass
class LabPod:
    pod: control.Pod
    namespace: str
    ip: str
    process: subprocess.Popen[bytes] | None = None  # started `startup_seconds` after creation
    probe_phase: float = 0.0
    cpu: tuple[float, float] | None = None  # (t, process CPU seconds) at the last scrape
    cpu_millicores: float | None = None
    exited: bool = False

    @property
    def running(self) -> bool:
        """Its server process was started and has not exited."""
        return self.process is not None and self.process.poll() is None


class Servers:
    """The backend server processes of one cell."""

    def __init__(self, cfg: Experiment, topology: Topology, workdir: Path,
                 http: InsideGets) -> None:
        self.cfg = cfg
        self.topology = topology
        self.workdir = workdir
        self.http = http

    def command(self, lab_pod: LabPod) -> list[str]:
        pod, backend = lab_pod.pod, self.cfg.backend
        command = [
            sys.executable, "-m", "kpbench.server", "--pod-name", pod.name,
            "--node-name", f"node-{pod.node + 1}", "--host", lab_pod.ip, "--port", str(HTTP_PORT),
            "--grpc-port", str(GRPC_PORT) if self.cfg.workload.protocol == "grpc" else "0",
            "--admin-port", str(ADMIN_PORT),
            "--cpu-per-request-millicores", str(backend.cpu_per_request_millicores),
            "--shutdown-drain-seconds", str(min(1.0, backend.termination_grace_seconds)),
        ]
        if backend.max_connection_age_seconds is not None:
            command += ["--max-connection-age-seconds", str(backend.max_connection_age_seconds)]
        return command

    def start(self, lab_pod: LabPod) -> None:
        """The container starts: the server process in the pod's namespace, logging to a file."""
        log = open(self.workdir / f"{lab_pod.pod.name}.log", "wb")  # noqa: SIM115 - lives with the process
        lab_pod.process = subprocess.Popen(netns.ns_exec(lab_pod.namespace,
                                                         self.command(lab_pod)),
                                           stdout=log, stderr=subprocess.STDOUT)

    def log_tail(self, lab_pod: LabPod) -> str:
        path = self.workdir / f"{lab_pod.pod.name}.log"
        return path.read_text(errors="replace")[-300:] if path.exists() else ""

    def readyz(self, lab_pod: LabPod) -> bool:
        return self.http.get(f"http://{lab_pod.ip}:{ADMIN_PORT}/readyz") is not None

    def metrics(self, pods: list[LabPod]) -> list[str | None]:
        """Every pod's /metrics, concurrently, from inside the lab; None where it did not answer."""
        return self.http.get_all([f"http://{p.ip}:{ADMIN_PORT}/metrics" for p in pods])

    def check_started(self, lab_pod: LabPod) -> None:
        """A server that exited while starting fails the cell, with its log."""
        assert lab_pod.process is not None
        if lab_pod.process.poll() is not None:
            raise RuntimeError(f"{lab_pod.pod.name} exited with {lab_pod.process.returncode} at "
                               f"start: {self.log_tail(lab_pod)}")

    def wait_ready(self, pods: list[LabPod]) -> None:
        """Until every pod answers /readyz (the cell's initial pods, before its clock starts)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        pending = list(pods)
        while pending:
            for pod in pending:
                self.check_started(pod)
            pending = [p for p in pending if not self.readyz(p)]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} pods not ready after "
                                   f"{STARTUP_TIMEOUT_SECONDS:g} s")
            time.sleep(0.05 if pending else 0)

    def stop(self, lab_pod: LabPod, killed: bool = False) -> None:
        """SIGTERM (the server drains, then exits), or SIGKILL for a killed pod."""
        if lab_pod.process is not None:
            lab_pod.process.send_signal(signal.SIGKILL if killed else signal.SIGTERM)

    def check_alive(self, pods: list[LabPod], now: float) -> None:
        """A server that exited on its own (its pod not terminating) fails the cell: its pod
        would otherwise vanish from the samples and read as balance."""
        for pod in pods:
            if pod.pod.terminating_at is None and pod.process is not None \
                    and pod.process.poll() is not None:
                raise RuntimeError(f"{pod.pod.name} (backend server) died mid-cell at "
                                   f"t={now:.1f} s with exit code {pod.process.returncode}: "
                                   f"{self.log_tail(pod)[-200:]}")

    def remove(self, lab_pod: LabPod) -> None:
        """The pod is gone: its namespace too."""
        self.topology.remove_namespace(lab_pod.namespace)
