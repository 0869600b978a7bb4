"""The backend server as a real process on 127.0.0.1: HTTP keep-alive, gRPC, metrics, shutdown."""

from __future__ import annotations

import http.client
import signal
import subprocess
import time

import grpc
import pytest

from .loopback import PYTHON, REPOSITORY, Processes, scrape, start_server

GRPC_METHOD = "/kpbench.Echo/Hello"



def keep_alive(port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.connect()
    return conn


def get(conn: http.client.HTTPConnection, path: str = "/") -> http.client.HTTPResponse:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return response


def wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_answers_with_pod_name_and_counts_connections(processes: Processes) -> None:
    server = start_server(processes, "pod-a")
    conns = [keep_alive(server.port) for _ in range(5)]
    for conn in conns:
        for _ in range(3):
            response = get(conn)
            assert response.status == 200
            assert response.getheader("X-Kpbench-Pod") == "pod-a"
            assert response.getheader("X-Kpbench-Node") == "node-1"
    body_conn = keep_alive(server.port)
    body_conn.request("GET", "/anything")
    assert body_conn.getresponse().read() == b"pod-a\n"
    # probes and scrapes are not workload connections
    for path in ("/healthz", "/readyz"):
        assert get(keep_alive(server.port), path).status == 200
    metrics = scrape(server.port)
    assert metrics[("kpbench_active_connections", "http")] == 6
    assert metrics[("kpbench_connections_total", "http")] == 6
    assert metrics[("kpbench_requests_total", "http")] == 16
    assert metrics[("kpbench_ready", "")] == 1
    assert ("process_cpu_seconds_total", "") in metrics
    for conn in conns[:4]:
        conn.close()
    wait_for(lambda: scrape(server.port)[("kpbench_active_connections", "http")] == 2)
    assert scrape(server.port)[("kpbench_connections_total", "http")] == 6


def test_max_connection_age_closes_after_the_current_request(processes: Processes) -> None:
    server = start_server(processes, "pod-a", "--max-connection-age-seconds", "0.5")
    conn = keep_alive(server.port)
    first = get(conn)
    assert first.getheader("Connection", "").lower() != "close"
    time.sleep(0.6)
    young = keep_alive(server.port)
    assert get(young).getheader("X-Kpbench-Close") is None
    old = get(conn)
    assert old.status == 200
    assert old.getheader("X-Kpbench-Close") == "max-age"
    assert old.getheader("Connection", "").lower() == "close"
    wait_for(lambda: scrape(server.port)[("kpbench_active_connections", "http")] == 1)
    assert scrape(server.port)[("kpbench_server_closes_total", "max-age")] == 1


def test_sigterm_drains_then_closes_keep_alive_connections(processes: Processes) -> None:
    server = start_server(processes, "pod-a", "--shutdown-drain-seconds", "0.8",
                          "--admin-port", "0")
    admin_port = int(server.info["admin_port"])
    busy, idle = keep_alive(server.port), keep_alive(server.port)
    get(busy)
    get(idle)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(ConnectionRefusedError):
        keep_alive(server.port)  # withdrawn: new connections are refused
    during = get(busy)
    assert during.status == 200
    assert during.getheader("X-Kpbench-Close") == "server-shutdown"
    assert get(keep_alive(admin_port), "/readyz").status == 503
    assert scrape(admin_port)[("kpbench_ready", "")] == 0
    started = time.monotonic()
    assert server.process.wait(timeout=5) == 0
    assert time.monotonic() - started < 4
    # the idle connection was closed by the server: the next request finds it gone
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        get(idle)


def test_cpu_per_request_is_real_cpu(processes: Processes) -> None:
    server = start_server(processes, "pod-a", "--cpu-per-request-millicores", "20")
    before = scrape(server.port)
    conn = keep_alive(server.port)
    for _ in range(20):
        get(conn)
    after = scrape(server.port)
    busy = after[("kpbench_busy_cpu_seconds_total", "")]
    assert 0.38 <= busy <= 0.6
    cpu = after[("process_cpu_seconds_total", "")] - before[("process_cpu_seconds_total", "")]
    assert cpu >= 0.38


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["--port", "-3"], {}, "--port: must be a port"),
    (["--cpu-per-request-millicores", "-1"], {}, "--cpu-per-request-millicores: must be"),
    ([], {"KPBENCH_MAX_CONNECTION_AGE_SECONDS": "0"}, "KPBENCH_MAX_CONNECTION_AGE_SECONDS"),
])
def test_bad_settings_give_one_line(args: list[str], env: dict[str, str], expected: str) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "kpbench.server", "--pod-name", "p", *args], cwd=REPOSITORY,
        env={"PYTHONPATH": str(REPOSITORY), "PATH": "/usr/bin:/bin", **env},
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr


def test_settings_come_from_the_environment(processes: Processes) -> None:
    started = processes.spawn(
        ["-m", "kpbench.server"],
        env={"KPBENCH_POD_NAME": "env-pod", "KPBENCH_NODE_NAME": "env-node",
             "KPBENCH_HOST": "127.0.0.1", "KPBENCH_PORT": "0", "KPBENCH_GRPC_PORT": "off"},
    )
    assert started.stdout is not None
    line = started.stdout.readline()
    assert '"pod": "env-pod"' in line and '"grpc_port": null' in line


def grpc_channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}",
                                 options=[("grpc.use_local_subchannel_pool", 1)])


def test_grpc_answers_and_counts_connections(processes: Processes) -> None:
    server = start_server(processes, "pod-g")
    channels = [grpc_channel(server.grpc_port) for _ in range(3)]
    for channel in channels:
        call = channel.unary_unary(GRPC_METHOD)
        for _ in range(2):
            reply, info = call.with_call(b"", timeout=5)
            assert reply == b"pod-g"
            metadata = dict(info.initial_metadata())
            assert metadata["kpbench-pod"] == "pod-g"
            assert metadata["kpbench-connection"].startswith("ipv4:127.0.0.1:")
    metrics = scrape(server.port)
    assert metrics[("kpbench_active_connections", "grpc")] == 3
    assert metrics[("kpbench_connections_total", "grpc")] == 3
    assert metrics[("kpbench_requests_total", "grpc")] == 6
    assert metrics[("kpbench_active_connections", "http")] == 0
    channels[0].close()
    wait_for(lambda: scrape(server.port)[("kpbench_active_connections", "grpc")] == 2)
    for channel in channels[1:]:
        channel.close()


def test_grpc_max_connection_age_moves_the_channel(processes: Processes) -> None:
    server = start_server(processes, "pod-g", "--max-connection-age-seconds", "0.5")
    channel = grpc_channel(server.grpc_port)
    try:
        call = channel.unary_unary(GRPC_METHOD)
        seen = set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            _, info = call.with_call(b"", timeout=5)
            seen.add(dict(info.initial_metadata())["kpbench-connection"])
            time.sleep(0.1)
        assert 3 <= len(seen) <= 8, seen
        assert scrape(server.port)[("kpbench_connections_total", "grpc")] == len(seen)
    finally:
        channel.close()
