"""The lab's L7 proxy pods for `workload.proxy: l7`: HAProxy processes (configuration and server
slots: `kpbench.lab.l7`), started in their pods' namespaces, their servers in service set through
the runtime API and read back, checked for exit.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpbench.config import L7_PROXY_REPLICAS, Experiment
from kpbench.lab import l7, netns, rules
from kpbench.lab.netns import Topology
from kpbench.lab.pods import STARTUP_TIMEOUT_SECONDS

L7_SLOTS = 256  # backend pods an L7 proxy can hold at once


@dataclass
class LabProxy:
    name: str
    ip: str
    runtime_socket: Path
    process: subprocess.Popen[bytes]
    log: Any  # the open log file, closed at teardown


class Proxies:
    """The cell's L7 proxy pods (none until `start`)."""

    def __init__(self, cfg: Experiment, topology: Topology, workdir: Path,
                 target_port: int) -> None:
        self.cfg = cfg
        self.topology = topology
        self.workdir = workdir
        self.target_port = target_port
        self.items: list[LabProxy] = []
        self.slots = l7.Slots(L7_SLOTS)

    def start(self) -> None:
        """The L7 proxy pods: HAProxy, its server slots empty until the first sync."""
        for index in range(L7_PROXY_REPLICAS):
            name, node = f"l7-proxy-{index}", index % self.cfg.cluster.nodes
            namespace, ip = self.topology.add_pod(f"x{index}", node)
            config = self.workdir / f"{name}.cfg"
            runtime_socket = self.workdir / f"{name}.sock"
            config.write_text(l7.haproxy_config(self.cfg.workload.protocol, self.target_port,
                                                self.target_port, L7_SLOTS, runtime_socket))
            log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
            process = subprocess.Popen(netns.ns_exec(namespace, ["haproxy", "-db", "-f",
                                                                 str(config)]),
                                       stdout=log, stderr=subprocess.STDOUT)
            self.items.append(LabProxy(name, ip, runtime_socket, process, log))
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        for proxy in self.items:
            while True:
                if proxy.process.poll() is not None:
                    tail = (self.workdir / f"{proxy.name}.log").read_text(errors="replace")
                    raise RuntimeError(f"{proxy.name} (haproxy) exited at start: {tail[-300:]}")
                with contextlib.suppress(OSError):
                    if "Name: HAProxy" in l7.runtime(proxy.runtime_socket, "show info"):
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{proxy.name} (haproxy) not answering after "
                                       f"{STARTUP_TIMEOUT_SECONDS:g} s")
                time.sleep(0.05)

    def endpoints(self) -> list[rules.Endpoint]:
        """The proxy pods as the Service's endpoints."""
        return [rules.Endpoint(proxy.ip, self.target_port) for proxy in self.items]

    def sync(self, endpoints: list[rules.Endpoint]) -> None:
        """Every proxy's servers in service become `endpoints`, through the runtime API."""
        commands = self.slots.update([str(e) for e in endpoints])
        for proxy in self.items:
            for command in commands:
                l7.runtime(proxy.runtime_socket, command)
        if commands:  # HAProxy answers errors in words: check the state it reports instead
            self.read_back(endpoints)

    def read_back(self, endpoints: list[rules.Endpoint]) -> dict[str, Any]:
        """Check every proxy's servers in service are `endpoints`."""
        expected = sorted(str(e) for e in endpoints)
        for proxy in self.items:
            state = l7.runtime(proxy.runtime_socket, f"show servers state {l7.BACKEND}")
            enabled = sorted(l7.enabled_servers(state))
            if enabled != expected:
                raise RuntimeError(f"{proxy.name}: servers in service {enabled}, "
                                   f"expected {expected}")
        return {"l7_proxy": {"software": "haproxy", "replicas": len(self.items),
                             "balance": "roundrobin per request", "servers": len(expected)}}

    def check_alive(self, now: float) -> None:
        """A proxy that exited mid-cell fails the cell."""
        for proxy in self.items:
            if proxy.process.poll() is not None:
                raise RuntimeError(f"{proxy.name} (haproxy) died mid-cell at t={now:.1f} "
                                   f"s with exit code {proxy.process.returncode}")

    def names_by_ip(self) -> dict[str, str]:
        return {proxy.ip: proxy.name for proxy in self.items}

    def close_logs(self) -> None:
        for proxy in self.items:
            proxy.log.close()
