"""The lab's L7 proxy for `workload.proxy: l7`: HAProxy balancing every request (pure parts).

The lab runs HAProxy from the distribution, which needs no image; its configuration is the one
every backend renders (`kpbench.haproxy`: the same settings run in the official image on kind).
Clients reach the proxy pods through the Service's ClusterIP and the node's data plane, as in
Kubernetes; the proxies reach the backend pods directly.

The backend pods live in a fixed pool of `server-template` slots, all disabled at start; the lab
fills and empties them through HAProxy's runtime API (`set server ... addr`, `state ready|maint`)
when an endpoint change reaches them (as a node's kube-proxy would see it), without a reload, so
client connections to the proxy are never cut (on kind HAProxy resolves the headless Service
itself).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kpbench import haproxy
from kpbench.haproxy import BACKEND, SLOT, enabled_servers

__all__ = ["BACKEND", "SLOT", "Slots", "enabled_servers", "haproxy_config", "runtime"]


def haproxy_config(protocol: str, listen_port: int, target_port: int, slots: int,
                   runtime_socket: Path) -> str:
    """haproxy.cfg for one lab proxy pod: every slot disabled until the runtime API fills it."""
    return haproxy.haproxy_config(protocol, listen_port, runtime_socket,
                                  haproxy.RuntimeSlots(target_port, slots))


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
