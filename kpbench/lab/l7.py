"""The lab's L7 proxy for `workload.proxy: l7`: HAProxy balancing every request (pure parts).

The kind backend runs Envoy for this; the lab runs HAProxy from the distribution, which needs no
image: in HTTP mode (gRPC: HTTP/2 on both sides) it chooses a server for every request of a
kept-alive client connection, `balance roundrobin`, like Envoy's ROUND_ROBIN. Clients reach the
proxy pods through the Service's ClusterIP and the node's data plane, as in Kubernetes; the
proxies reach the backend pods directly (Envoy in kind resolves the headless Service).

The backend pods live in a fixed pool of `server-template` slots, all disabled at start; the lab
fills and empties them through HAProxy's runtime API (`set server ... addr`, `state ready|maint`)
`endpoint_sync_seconds` after each endpoint change, as Envoy's DNS refresh would, without a
reload, so client connections to the proxy are never cut. A request whose pod no longer accepts
connections (it exited before its slot was emptied) is retried on another pod, up to 3 times.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BACKEND = "backend"
SLOT = "pod"


def haproxy_config(protocol: str, listen_port: int, target_port: int, slots: int,
                   runtime_socket: Path) -> str:
    """haproxy.cfg for one proxy pod."""
    h2 = " proto h2" if protocol == "grpc" else ""
    return "\n".join([
        "global",
        f"    stats socket {runtime_socket} mode 600 level admin",
        "defaults",
        "    mode http",
        "    timeout connect 1s",
        "    timeout client 1h",
        "    timeout server 1h",
        "    timeout http-keep-alive 1h",
        # a pod that stopped listening before its slot was emptied: try another one
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
        "frontend ingress",
        f"    bind :{listen_port}{h2}",
        f"    default_backend {BACKEND}",
        f"backend {BACKEND}",
        "    balance roundrobin",
        f"    server-template {SLOT} 1-{slots} 127.0.0.1:{target_port} disabled{h2}",
        "",
    ])


@dataclass
class Slots:
    """Which backend endpoint (`ip:port`) holds which server slot; the same in every proxy.

    New endpoints take free slots in rotation, so a slot emptied a moment ago is the last one
    reused: HAProxy keeps a server's idle keep-alive connections when it enters maintenance, and
    a slot refilled at once could send requests over connections to the old pod.
    """

    count: int
    assigned: dict[str, int] = field(default_factory=dict)
    cursor: int = 0  # the slot last handed out

    def update(self, ready: Sequence[str]) -> list[str]:
        """Runtime commands that make the slots in service exactly the `ready` endpoints.

        A leaving endpoint's slot goes to maintenance: no new requests, those in flight finish.
        """
        wanted = set(ready)
        commands = [f"set server {BACKEND}/{SLOT}{slot} state maint"
                    for endpoint, slot in self.assigned.items() if endpoint not in wanted]
        self.assigned = {e: slot for e, slot in self.assigned.items() if e in wanted}
        for endpoint in ready:
            if endpoint in self.assigned:
                continue
            slot = self._free_slot()
            ip, port = endpoint.rsplit(":", 1)
            commands += [f"set server {BACKEND}/{SLOT}{slot} addr {ip} port {port}",
                         f"set server {BACKEND}/{SLOT}{slot} state ready"]
            self.assigned[endpoint] = slot
        return commands

    def _free_slot(self) -> int:
        taken = set(self.assigned.values())
        for step in range(1, self.count + 1):
            slot = (self.cursor + step - 1) % self.count + 1
            if slot not in taken:
                self.cursor = slot
                return slot
        raise RuntimeError(f"the L7 proxy has only {self.count} server slots")


def enabled_servers(servers_state: str) -> list[str]:
    """`ip:port` of the slots taking requests, from `show servers state backend`."""
    lines = servers_state.splitlines()
    header = next((line for line in lines if line.startswith("# be_id")), None)
    if header is None:
        return []
    names = header[2:].split()
    enabled = []
    for line in lines:
        if not line.strip() or line.startswith("#") or line.strip().isdigit():
            continue
        row = dict(zip(names, line.split(), strict=False))
        if row.get("srv_op_state") == "2":  # SRV_ST_RUNNING: takes requests
            enabled.append(f"{row['srv_addr']}:{row['srv_port']}")
    return enabled


def runtime(runtime_socket: Path, command: str, timeout: float = 5.0) -> str:
    """One command on HAProxy's runtime API (a Unix socket); its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(runtime_socket))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
