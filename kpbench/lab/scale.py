"""The scale probe: rule sync time and connect latency through one node, per mode and size.

Runs where the node's kernel is: in this process for the host kernel, or as
`python -m kpbench.lab.scale PLAN_JSON` inside the kernel VM (standard library and pure kpbench
modules only, since every import is slow under emulation), printing one JSON line per point.

Per point (mode, N Services with E endpoints each): a node namespace with one client pod and E
server pods (the lab's `Topology`, 198.18.0.0/15). Services are numbered 1..N (ClusterIPs
198.19.x.y); the last one, whose jump is the last rule of iptables' `KUBE-SERVICES`, is the one
probed and has the E real server pods as endpoints; every other endpoint is an unused address in
198.18.128.0/17 that nothing answers. Measured, in order:
* `sync_seconds`: kube-proxy's full sync from an empty node (`kpbench.lab.rules` for iptables
  and nftables; for IPVS the `kpbench.lab.ipvs_rules` steps), each step the wall time of its
  process as kube-proxy would start it; `sync_steps` holds the steps;
* `connect_us`: the time of `connect()` from the client pod to the probed Service (the SYN
  through the node's rules to a pod, the SYN-ACK back), `connects` times, each closed with a
  reset; `accepted` counts what each server pod accepted, so the rules demonstrably forwarded;
* `incremental_seconds`: the sync after one other Service (the middle one) lost an endpoint
  and gained a new one, as kube-proxy applies it (`rules.iptables_partial_restore`,
  `rules.nft_endpoints_change`; for IPVS the sync's process work: list the IPVS table and
  kube-proxy's sets, change the real servers, restore its own chains), then a few connects
  check that the probed Service still answers.
The node is emptied after each point. Before the first point of a mode, one untimed small sync
loads the kernel modules the mode needs.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kpbench import ipvs
from kpbench.lab import ipvs_rules, netns, rules
from kpbench.lab.rules import Endpoint, Service

MODES = ("iptables", "nftables", "ipvs-rr", "ipvs-lc", "ipvs-sh")
SERVER_PORT = 8080
SERVICE_PORT = 80
CLUSTER_CIDR = "198.18.0.0/16"  # the pods; kube-proxy's local detector
MAX_SERVICES = 250 * 254  # ClusterIPs 198.19.0.1 .. 198.19.249.254 (198.19.255.x: the nodes)
MAX_UNUSED = 127 * 254  # endpoint addresses 198.18.128.1 .. 198.18.254.254
CHECK_CONNECTS = 5
CONNECT_TIMEOUT = 5.0


class ProbeError(RuntimeError):
    """A step of the probe failed; the message names it."""


@dataclass(frozen=True)
class Point:
    mode: str
    services: int
    endpoints: int
    connects: int
    repeat: int = 1  # which of the config's repeats of this (mode, services) this is


# -- pure: the service table -------------------------------------------------------------------

def cluster_ip(index: int) -> str:
    """ClusterIP of service `index` (0-based)."""
    return f"198.19.{index // 254}.{index % 254 + 1}"


def unused_address(index: int) -> str:
    return f"198.18.{128 + index // 254}.{index % 254 + 1}"


def fits(services: int, endpoints: int) -> bool:
    """Whether the unused addresses hold every fake endpoint and the one an endpoint change
    adds."""
    return (services - 1) * endpoints + 1 <= MAX_UNUSED


def service_table(services: int, endpoints: int, real: Sequence[str]
                  ) -> list[tuple[Service, list[Endpoint]]]:
    """N services of `endpoints` endpoints; the last one's endpoints are the `real` pods."""
    if not 1 <= services <= MAX_SERVICES:
        raise ValueError(f"services: must be 1..{MAX_SERVICES}, got {services}")
    if len(real) != endpoints or not fits(services, endpoints):
        raise ValueError(f"endpoints: {endpoints} per service do not fit the address range")
    table = []
    for i in range(services):
        service = Service("scale", f"svc-{i + 1:05d}", "http", cluster_ip(i), SERVICE_PORT)
        addresses = real if i == services - 1 else [unused_address(i * endpoints + j)
                                                    for j in range(endpoints)]
        table.append((service, [Endpoint(a, SERVER_PORT) for a in addresses]))
    return table


def endpoint_change(table: list[tuple[Service, list[Endpoint]]]
                    ) -> tuple[list[tuple[Service, list[Endpoint]]], Service, list[Endpoint],
                               list[Endpoint]]:
    """The table after the middle service's last endpoint was replaced by a fresh address
    (a pod replaced); returns (new table, that service, old endpoints, new endpoints)."""
    index = (len(table) - 1) // 2
    service, old = table[index]
    if index == len(table) - 1:
        raise ValueError("services: at least 2 are needed for an endpoint change")
    fresh = Endpoint(unused_address(MAX_UNUSED - 1), SERVER_PORT)
    new = [*old[:-1], fresh]
    changed = [*table[:index], (service, new), *table[index + 1:]]
    return changed, service, old, new


def summarise(times_us: Sequence[float]) -> dict[str, float]:
    ordered = sorted(times_us)
    return {"median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "min": ordered[0], "max": ordered[-1]}


# -- I/O: the node, the pods, the measurements -------------------------------------------------

class Servers:
    """Listening sockets in the server pods, accepted and closed by one thread."""

    def __init__(self, namespaces: Sequence[str]) -> None:
        self.selector = selectors.DefaultSelector()
        self.accepted = [0] * len(namespaces)
        self.listeners = []
        for index, namespace in enumerate(namespaces):
            with netns.entered(namespace):
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", SERVER_PORT))
            listener.listen(1024)
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ, index)
            self.listeners.append(listener)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            for key, _ in self.selector.select(timeout=0.2):
                try:
                    connection, _ = key.fileobj.accept()  # type: ignore[union-attr]
                except OSError:
                    continue
                connection.close()
                self.accepted[key.data] += 1

    def wait_for(self, total: int, timeout: float = 10.0) -> None:
        """Until `total` connections were accepted in all (the thread may lag the client)."""
        deadline = time.monotonic() + timeout
        while sum(self.accepted) < total and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(timeout=5)
        for listener in self.listeners:
            listener.close()
        self.selector.close()


def connect_times(client_ns: str, address: str, port: int, count: int) -> list[float]:
    """Microseconds of each `connect()`; a failed connect is a ProbeError."""
    linger = struct.pack("ii", 1, 0)  # close with a reset: no TIME_WAIT left behind
    times = []
    with netns.entered(client_ns):
        for _ in range(count):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.settimeout(CONNECT_TIMEOUT)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            started = time.perf_counter_ns()
            try:
                client.connect((address, port))
            except OSError as exc:
                raise ProbeError(f"connect to {address}:{port} failed: {exc}") from None
            finally:
                elapsed = time.perf_counter_ns() - started
                client.close()
            times.append(elapsed / 1000)
    return times


class Node:
    """One node namespace with a client pod and server pods; commands timed in it."""

    def __init__(self, endpoints: int) -> None:
        self.topology = netns.Topology(nodes=1)
        self.servers: Servers | None = None
        try:
            self.topology.create()
            self.client_ns, _ = self.topology.add_pod("c1", 0)
            pods = [self.topology.add_pod(f"p{i + 1}", 0) for i in range(endpoints)]
            self.real = [ip for _, ip in pods]
            self.servers = Servers([ns for ns, _ in pods])
        except BaseException:
            self.close()
            raise

    @property
    def namespace(self) -> str:
        return self.topology.node_ns(0)

    def run(self, argv: Sequence[str], input_text: str | None = None) -> float:
        """Run `argv` in the node; its wall time in seconds (process start included)."""
        started = time.perf_counter()
        done = subprocess.run(netns.ns_exec(self.namespace, argv), input=input_text,
                              capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise ProbeError(f"{' '.join(argv[:3])} in the node: "
                             f"{done.stderr.strip()[:300] or done.returncode}")
        return elapsed

    def close(self) -> None:
        if self.servers is not None:
            self.servers.close()
            self.servers = None
        self.topology.destroy()


Steps = list[tuple[str, list[str], str | None]]


def full_sync(mode: str, table: list[tuple[Service, list[Endpoint]]],
              local: frozenset[str]) -> Steps:
    """The processes of a full sync from an empty node, in order: (step, argv, input)."""
    if mode == "iptables":
        return [("iptables-restore", ["iptables-restore"], rules.iptables_restore_many(table))]
    if mode == "nftables":
        return [("nft", ["nft", "-f", "-"], rules.nft_ruleset_many(table))]
    scheduler = ipvs.scheduler_of(mode)
    return [
        ("bind addresses", ["ip", "-batch", "-"], ipvs_rules.bind_addresses(table)),
        ("ipset restore", ["ipset", "restore"], ipvs_rules.ipset_restore(table, local)),
        ("ipvsadm --restore", ["ipvsadm", "--restore"],
         ipvs_rules.ipvsadm_restore(table, scheduler)),
        ("iptables-restore", ["iptables-restore"], ipvs_rules.iptables_restore(CLUSTER_CIDR)),
    ]


def incremental_sync(mode: str, table: list[tuple[Service, list[Endpoint]]]) -> Steps:
    """The processes of the sync after one service's endpoints changed."""
    changed, service, old, new = endpoint_change(table)
    if mode == "iptables":
        return [("iptables-restore --noflush", ["iptables-restore", "--noflush"],
                 rules.iptables_partial_restore(changed, service, old))]
    if mode == "nftables":
        return [("nft", ["nft", "-f", "-"], rules.nft_endpoints_change(service, old, new))]
    address = f"{service.cluster_ip}:{service.port}"
    return [
        ("ipvsadm --save (list the IPVS table)", ["ipvsadm", "--save", "-n"], None),
        *((f"ipset list {name}", ["ipset", "list", name], None)
          for name, _ in ipvs_rules.SETS),
        ("ipvsadm --restore", ["ipvsadm", "--restore"],
         ipvs_rules.ipvsadm_change(address, old, new)),
        ("iptables-restore --noflush", ["iptables-restore", "--noflush"],
         ipvs_rules.iptables_sync(CLUSTER_CIDR)),
    ]


EMPTY_TABLES = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                ":POSTROUTING ACCEPT [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n"
                ":FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")


def prepare(node: Node, mode: str) -> None:
    """What kube-proxy's IPVS proxier sets up once: its sysctls and kube-ipvs0."""
    if mode.startswith("ipvs-"):
        if not os.path.exists("/proc/net/ip_vs"):  # in the kernel VM (the host's is refused)
            node.run(["modprobe", "ip_vs"])
        node.run(["sysctl", "-qw", *ipvs.SYSCTLS])
        node.run(["ip", "link", "add", ipvs.DUMMY_DEVICE, "type", "dummy"])


def empty(node: Node, mode: str) -> None:
    """Remove every rule, IPVS service, set and address the point added."""
    if mode == "nftables":
        node.run(["nft", "delete", "table", "ip", "kube-proxy"])
        return
    node.run(["iptables-restore"], EMPTY_TABLES)
    node.run(["nft", "flush", "ruleset"])
    if mode.startswith("ipvs-"):
        node.run(["ipvsadm", "--clear"])
        node.run(["ip", "link", "del", ipvs.DUMMY_DEVICE])
        for name, _ in ipvs_rules.SETS:
            node.run(["ipset", "destroy", name])


def warm_up(node: Node, mode: str) -> None:
    """One untimed sync of two services, so that the first timed sync of a mode does not
    include the kernel loading its modules (seconds under emulation)."""
    table = service_table(2, len(node.real), node.real)
    prepare(node, mode)
    try:
        run_steps(node, full_sync(mode, table, frozenset(node.real)))
        run_steps(node, incremental_sync(mode, table))
    finally:
        empty(node, mode)


def run_steps(node: Node, steps: Steps) -> tuple[float, dict[str, float]]:
    timed = {name: node.run(argv, text) for name, argv, text in steps}
    return sum(timed.values()), timed


def measure(node: Node, point: Point) -> dict[str, Any]:
    """One point: full sync, connects to the last Service, incremental sync, check."""
    assert node.servers is not None
    table = service_table(point.services, point.endpoints, node.real)
    probed = table[-1][0]
    prepare(node, point.mode)
    try:
        before = list(node.servers.accepted)
        sync_seconds, sync_steps = run_steps(node, full_sync(point.mode, table,
                                                             frozenset(node.real)))
        times = connect_times(node.client_ns, probed.cluster_ip, probed.port, point.connects)
        node.servers.wait_for(sum(before) + point.connects)
        accepted = [a - b for a, b in zip(node.servers.accepted, before, strict=True)]
        incremental_seconds, incremental_steps = run_steps(node,
                                                           incremental_sync(point.mode, table))
        connect_times(node.client_ns, probed.cluster_ip, probed.port, CHECK_CONNECTS)
    finally:
        empty(node, point.mode)
    connect = summarise(times)
    return {
        **asdict(point), "kernel": os.uname().release,
        "sync_seconds": sync_seconds, "sync_steps": sync_steps,
        "incremental_seconds": incremental_seconds, "incremental_steps": incremental_steps,
        "connect_median_us": connect["median"], "connect_p90_us": connect["p90"],
        "connect_min_us": connect["min"], "connect_max_us": connect["max"],
        "connect_first_us": times[0], "accepted": accepted,
    }


def probe(points: Sequence[Point], emit: Callable[[dict[str, Any]], None]) -> None:
    """Measure every point on this kernel, in order; `emit` gets each row as it is done."""
    if not points:
        return
    node = Node(max(p.endpoints for p in points))
    try:
        for mode in dict.fromkeys(p.mode for p in points):
            warm_up(node, mode)
        for point in points:
            if point.endpoints != len(node.real):
                raise ProbeError("every point of one probe needs the same endpoints")
            emit(measure(node, point))
    finally:
        node.close()


ROW_PREFIX = "kpbench-scale-row "


def main(argv: Sequence[str]) -> int:
    """In the VM: `python -m kpbench.lab.scale '[{"mode": ..., ...}, ...]'`."""
    points = [Point(**p) for p in json.loads(argv[0])]

    def emit(row: dict[str, Any]) -> None:
        print(ROW_PREFIX + json.dumps(row), flush=True)

    try:
        probe(points, emit)
    except (ProbeError, netns.LabError) as exc:
        print(f"kpbench-scale-error {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
