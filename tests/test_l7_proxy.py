"""The lab's L7 proxy for real: HAProxy with kpbench's config, real servers, real Locust.

On 127.0.0.1, no root needed: what `workload.proxy: l7` puts between the clients and the pods
in the lab (`kpbench.lab.l7`), driven through HAProxy's runtime API as the lab drives it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpbench.lab import l7

from .loopback import Processes, free_port, scrape, start_server
from .test_workload import run_workload

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="the L7 proxy tests need haproxy (apt-get install haproxy)")


class Proxy:
    def __init__(self, directory: Path, protocol: str, target_port: int) -> None:
        self.port = free_port()
        self.socket = directory / "haproxy.sock"
        config = directory / "haproxy.cfg"
        # The lab's proxies listen on the backend's port; here the servers' ports differ, and the
        # runtime API sets each slot's port.
        config.write_text(l7.haproxy_config(protocol, self.port, target_port, 8, self.socket))
        self.process = subprocess.Popen(["haproxy", "-db", "-f", str(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.slots = l7.Slots(8)
        deadline = time.monotonic() + 10
        while not self.socket.exists() or "Name: HAProxy" not in self.ask("show info"):
            assert self.process.poll() is None and time.monotonic() < deadline, (
                self.process.stderr.read().decode() if self.process.stderr else "")
            time.sleep(0.05)

    def ask(self, command: str) -> str:
        try:
            return l7.runtime(self.socket, command)
        except OSError:
            return ""

    def serve(self, ports: list[int]) -> None:
        for command in self.slots.update([f"127.0.0.1:{port}" for port in ports]):
            self.ask(command)
        enabled = l7.enabled_servers(self.ask(f"show servers state {l7.BACKEND}"))
        assert sorted(enabled) == sorted(f"127.0.0.1:{port}" for port in ports)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[list[Proxy]]:
    proxies: list[Proxy] = []
    try:
        yield proxies
    finally:
        for proxy in proxies:
            proxy.stop()


def requests_by_server(ports: list[int], protocol: str) -> list[float]:
    return [scrape(port)[("kpbench_requests_total", protocol)] for port in ports]


def test_http_requests_of_few_connections_spread_over_every_pod(
        processes: Processes, tmp_path: Path, proxy_factory: list[Proxy]) -> None:
    servers = [start_server(processes, f"pod-{i}", grpc=False) for i in range(3)]
    proxy = Proxy(tmp_path, "http", 8080)
    proxy_factory.append(proxy)
    proxy.serve([s.port for s in servers[:2]])
    metrics = [s.port for s in servers]  # /metrics is on the HTTP port

    def during(_: subprocess.Popen[str]) -> None:
        time.sleep(2.5)
        proxy.serve([s.port for s in servers])  # a new pod: the proxy sends it requests at once

    summary = run_workload(processes, tmp_path, {"connections": 2, "requests_per_second": 20,
                                                 "proxy": "l7"},
                           f"http://127.0.0.1:{proxy.port}", 5, during)
    assert summary["requests"]["failed"] == 0 and summary["connections"]["opened"] == 2
    counts = requests_by_server(metrics, "http")
    # 2 client connections, yet every request is balanced: before the third pod joined, the
    # first two shared ~100 requests evenly; after it, all three take ~50 each
    assert abs(counts[0] - counts[1]) <= 0.1 * max(counts[0], counts[1]), counts
    assert counts[2] >= 0.2 * sum(counts), counts


def test_grpc_calls_spread_and_the_channel_is_one_connection(
        processes: Processes, tmp_path: Path, proxy_factory: list[Proxy]) -> None:
    servers = [start_server(processes, f"pod-{i}") for i in range(3)]
    proxy = Proxy(tmp_path, "grpc", 9090)
    proxy_factory.append(proxy)
    proxy.serve([s.grpc_port for s in servers])
    metrics = [s.port for s in servers]  # /metrics is on the HTTP port
    summary = run_workload(processes, tmp_path, {"connections": 2, "requests_per_second": 20,
                                                 "protocol": "grpc", "proxy": "l7"},
                           f"127.0.0.1:{proxy.port}", 4)
    assert summary["requests"]["failed"] == 0
    # the server-side connection changes under a proxy; that is not a client reconnect
    connections = summary["connections"]
    assert connections["opened"] == 2 and connections["closed"]["end"] == 2
    assert sum(v for k, v in connections["closed"].items() if k != "end") == 0
    counts = requests_by_server(metrics, "grpc")
    assert min(counts) >= 0.25 * sum(counts), counts
