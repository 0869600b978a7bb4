"""The kind backend's L7 proxy for real: HAProxy with kpbench's kind configuration, whose server
slots follow the A records of a headless Service, here served by a small DNS responder on
loopback in place of the cluster's DNS. No root, no cluster: HAProxy, two real backend servers
on 127.0.0.2 / 127.0.0.3 and HTTP requests over one kept-alive connection.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kpbench import haproxy
from kpbench.lab import l7

from .loopback import Processes, free_port

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="the L7 proxy tests need haproxy (apt-get install haproxy)")

HOSTNAME = "backend-pods.kpbench-t-1.svc.cluster.local"


class DnsResponder:
    """Answers A queries for one name with `self.addresses` (UDP, loopback); nothing else."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.addresses: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopped.is_set():
            try:
                query, client = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            answer = self.answer(query)
            if answer:
                self.sock.sendto(answer, client)

    def answer(self, query: bytes) -> bytes | None:
        (ident,) = struct.unpack("!H", query[:2])
        labels, offset = [], 12
        while query[offset]:
            length = query[offset]
            labels.append(query[offset + 1:offset + 1 + length].decode())
            offset += 1 + length
        qtype, _ = struct.unpack("!HH", query[offset + 1:offset + 5])
        question = query[12:offset + 5]
        if ".".join(labels).lower() != self.name:
            return struct.pack("!HHHHHH", ident, 0x8183, 1, 0, 0, 0) + question  # NXDOMAIN
        records = b""
        addresses = list(self.addresses) if qtype == 1 else []
        for address in addresses:
            records += struct.pack("!HHHIH", 0xC00C, 1, 1, 5, 4) + socket.inet_aton(address)
        return struct.pack("!HHHHHH", ident, 0x8180, 1, len(addresses), 0, 0) + question + records

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def dns() -> Iterator[DnsResponder]:
    responder = DnsResponder(HOSTNAME)
    try:
        yield responder
    finally:
        responder.stop()


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def requests_served(address: str, port: int) -> float:
    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("kpbench_requests_total{"))


def test_kind_proxy_follows_the_headless_service_records(
        processes: Processes, tmp_path: Path, dns: DnsResponder) -> None:
    port = free_port()
    pods = {"127.0.0.2": "pod-a", "127.0.0.3": "pod-b"}
    for address, pod in pods.items():
        processes.start(["-m", "kpbench.server", "--pod-name", pod, "--node-name", "node-1",
                         "--host", address, "--port", str(port), "--grpc-port", "off",
                         "--shutdown-drain-seconds", "0.2"])
    listen, runtime_socket = free_port(), tmp_path / "admin.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy.haproxy_config(
        "http", listen, runtime_socket,
        haproxy.DnsDiscovery(HOSTNAME, port, slots=8, nameserver=f"127.0.0.1:{dns.port}")))
    dns.addresses = list(pods)
    proxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        def in_service() -> list[str]:
            try:
                state = l7.runtime(runtime_socket, f"show servers state {haproxy.BACKEND}")
            except OSError:
                return []
            return sorted(haproxy.enabled_servers(state))

        both = sorted(f"{address}:{port}" for address in pods)
        assert wait_for(lambda: in_service() == both, 15), in_service()
        connection = http.client.HTTPConnection("127.0.0.1", listen, timeout=5)
        for _ in range(40):  # one kept-alive client connection, requests spread per request
            connection.request("GET", "/")
            response = connection.getresponse()
            response.read()
            assert response.status == 200
        counts = [requests_served(address, port) for address in pods]
        assert counts == [20, 20], counts
        dns.addresses = ["127.0.0.3"]  # pod-a left the Service's ready endpoints
        assert wait_for(lambda: in_service() == [f"127.0.0.3:{port}"], 10), in_service()
        for _ in range(10):
            connection.request("GET", "/")
            response = connection.getresponse()
            response.read()
            assert response.status == 200
        assert [requests_served(address, port) for address in pods] == [20, 30]
        connection.close()
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
