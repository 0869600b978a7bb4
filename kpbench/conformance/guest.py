"""Carry out a conformance plan on this kernel's IPVS and record what it decided.

Runs as root inside the kernel VM (it changes the network of the machine it runs on: never
run it on a host). One process, standard library and `kpbench.ipvs` only (imports are slow in
an emulated guest). Layout: the root namespace is the director (kube-proxy's node) with every
scenario's VIP on the dummy `kube-ipvs0`; namespace `cli` holds every client address
(198.18.0.0/16), namespace `srv` every real server address (198.19.0.0/17), each listening on
its own socket; both are joined to the director by a veth pair and route through it, so each
connection crosses IPVS in NAT (masquerade) mode, as from a pod through its node.

For every operation the trace records the guest's monotonic time, the result (for a
connection: the real server that accepted it, or `None` when the connect was refused or got
no answer), then the time `/proc/net/ip_vs` was read and the scenario's real servers in list
order with weight, active and inactive counts.

Usage: python -m kpbench.conformance.guest PLAN.json TRACE.json
"""

from __future__ import annotations

import errno
import json
import os
import random
import selectors
import socket
import struct
import subprocess
import sys
import time
from typing import Any

from kpbench import ipvs
from kpbench.conformance.scenarios import (
    CHURN_AFTER_CLOSE,
    PHASES,
    POST_AFTER_CLOSE,
    SERVER_PORT,
    SERVICE_PORT,
)
from kpbench.lab.netns import entered

CONNECT_TIMEOUT = 3.0
SETTLE_TIMEOUT = 5.0


def sh(*args: str, input_text: str | None = None) -> None:
    done = subprocess.run(args, input=input_text, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


def setup(plan: dict[str, Any]) -> None:
    schedulers = sorted({s["scheduler"] for s in plan["scenarios"]})
    for module in ["ip_vs", "dummy", "veth", *(f"ip_vs_{s}" for s in schedulers)]:
        sh("modprobe", module)
    for setting in (*ipvs.SYSCTLS, "net.ipv4.ip_forward=1"):
        sh("sysctl", "-q", "-w", setting)
    root = ["link add kube-ipvs0 type dummy", "link set kube-ipvs0 up",
            "link add vc0 type veth peer name eth0 netns cli",
            "link add vs0 type veth peer name eth0 netns srv",
            "addr add 198.18.0.1/16 dev vc0", "addr add 198.19.0.1/17 dev vs0",
            "link set vc0 up", "link set vs0 up"]
    root += [f"addr add {s['vip']}/32 dev kube-ipvs0" for s in plan["scenarios"]]
    sh("ip", "netns", "add", "cli")
    sh("ip", "netns", "add", "srv")
    sh("ip", "-batch", "-", input_text="\n".join(root) + "\n")
    for ns, prefix, gateway, key in (("cli", 16, "198.18.0.1", "clients"),
                                     ("srv", 17, "198.19.0.1", "servers")):
        lines = ["link set lo up", "link set eth0 up"]
        lines += [f"addr add {a}/{prefix} dev eth0" for s in plan["scenarios"] for a in s[key]]
        lines.append(f"route add default via {gateway}")
        sh("ip", "-n", ns, "-batch", "-", input_text="\n".join(lines) + "\n")
    restore = [line for s in plan["scenarios"]
               for line in ipvs.create_service(f"{s['vip']}:{SERVICE_PORT}", s["scheduler"])]
    sh("ipvsadm", "--restore", input_text="\n".join(restore) + "\n")


class Scenario:
    """One virtual server, its listeners and held connections."""

    def __init__(self, spec: dict[str, Any], poller: selectors.BaseSelector) -> None:
        self.spec = spec
        self.service = f"{spec['vip']}:{SERVICE_PORT}"
        self.servers = [f"{a}:{SERVER_PORT}" for a in spec["servers"]]
        self.rng = random.Random(spec["guest_seed"])
        self.poller = poller
        self.listeners: dict[str, socket.socket] = {}
        # client "ip:port" -> (client socket, accepted socket, real server "ip:port")
        self.held: dict[str, tuple[socket.socket, socket.socket, str]] = {}
        self.pending: dict[str, tuple[socket.socket, str]] = {}  # accepted, not yet claimed
        self.events: list[dict[str, Any]] = []
        self.dropped = False
        with entered("srv"):
            for address in self.servers:
                host, port = address.rsplit(":", 1)
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((host, int(port)))
                listener.listen(4096)
                listener.setblocking(False)
                self.listeners[address] = listener
                poller.register(listener, selectors.EVENT_READ, (self, address))

    # -- observation -------------------------------------------------------------------------

    def table(self) -> list[list[Any]]:
        return [[r.address, r.weight, r.active, r.inactive] for r in self.current()]

    def record(self, event: dict[str, Any]) -> None:
        event["t_read"] = time.monotonic()
        event["table"] = self.table()
        self.events.append(event)

    def current(self) -> list[ipvs.RealServer]:
        with open("/proc/net/ip_vs") as f:
            service = ipvs.find_service(ipvs.parse_ip_vs(f.read()), self.service)
        return service.real_servers if service else []

    # -- kube-proxy's side -------------------------------------------------------------------

    def restore(self, commands: list[str]) -> None:
        # One batch, real-time priority: the deferred work that expire_nodest_conn queues on a
        # delete must not run before the re-add that follows it (natively it never does).
        if commands:
            sh("chrt", "-f", "50", "ipvsadm", "--restore", input_text="\n".join(commands) + "\n")

    def sync(self, ready: list[int]) -> None:
        t = time.monotonic()
        before = {r.address: r for r in self.current()}
        commands = ipvs.sync_commands(self.service, list(before.values()),
                                      [self.servers[i] for i in ready])
        self.restore(commands)
        event: dict[str, Any] = {"t": t, "op": "sync", "ready": ready, "commands": commands}
        self.record(event)
        # A returning endpoint is deleted and re-added; with expire_nodest_conn the kernel may
        # drop its connections in between (deferred work). Detect it rather than assume not.
        after = {row[0]: row for row in event["table"]}
        for address, server in before.items():
            row = after.get(address)
            if row is not None and server.weight == 0 and row[2] < server.active:
                event["dropped"] = address
                self.dropped = True

    def graceful(self) -> None:
        t = time.monotonic()
        commands = ipvs.graceful_deletions(self.service, self.current())
        self.restore(commands)
        self.record({"t": t, "op": "graceful", "commands": commands})

    # -- connections -------------------------------------------------------------------------

    def connect(self, client: str, port: int) -> None:
        t = time.monotonic()
        key = f"{client}:{port}"
        with entered("cli"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((client, port))
        code = sock.connect_ex((self.spec["vip"], SERVICE_PORT))
        dest: str | None = None
        outcome = "accepted"
        if code not in (0, errno.EINPROGRESS):
            outcome = errno.errorcode.get(code, str(code))
        else:
            outcome = self._await_connect(sock)
        if outcome == "accepted":
            dest = self._await_accept(key)
            if dest is None:
                outcome = "not-accepted"
        if dest is None:
            sock.close()
        else:
            self.held[key] = (sock, self.pending.pop(key)[0], dest)
        self.record({"t": t, "op": "connect", "client": key, "dest": dest, "outcome": outcome})

    def _await_connect(self, sock: socket.socket) -> str:
        poller = selectors.DefaultSelector()
        poller.register(sock, selectors.EVENT_WRITE)
        ready = poller.select(CONNECT_TIMEOUT)
        poller.close()
        if not ready:
            return "timeout"
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return "accepted" if code == 0 else errno.errorcode.get(code, str(code))

    def _await_accept(self, key: str) -> str | None:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while key not in self.pending and time.monotonic() < deadline:
            for selected, _ in self.poller.select(0.2):
                owner, address = selected.data
                conn, peer = selected.fileobj.accept()  # type: ignore[union-attr]
                conn.setblocking(False)
                owner.pending[f"{peer[0]}:{peer[1]}"] = (conn, address)
        entry = self.pending.get(key)
        return entry[1] if entry else None

    def close(self, op: dict[str, Any]) -> None:
        if "server" in op:
            address = self.servers[op["server"]]
            keys = [k for k, (_, _, d) in self.held.items() if d == address]
        else:
            keys = sorted(self.held)
            keys = self.rng.sample(keys, round(len(keys) * op["fraction"]))
        for key in keys:
            self._close_one(key, op["reset"])

    def _close_one(self, key: str, reset: bool) -> None:
        t = time.monotonic()
        client, accepted, dest = self.held.pop(key)
        if reset:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        # Wait until the FIN or RST reached the server: by then it has crossed IPVS.
        accepted.setblocking(True)
        accepted.settimeout(SETTLE_TIMEOUT)
        try:
            while accepted.recv(4096):
                pass
            seen = "eof"
        except ConnectionResetError:
            seen = "reset"
        except TimeoutError:
            seen = "timeout"
        accepted.close()
        self.record({"t": t, "op": "close", "client": key, "dest": dest, "reset": reset,
                     "seen": seen})

    def run(self, op: dict[str, Any]) -> None:
        if op["op"] == "sync":
            self.sync(op["ready"])
        elif op["op"] == "graceful":
            self.graceful()
        elif op["op"] == "connect":
            for client, port in op["clients"]:
                self.connect(self.spec["clients"][client], port)
        elif op["op"] == "close":
            self.close(op)
        else:
            raise ValueError(f"unknown operation {op['op']!r}")


def wait_until(moment: float) -> None:
    while (left := moment - time.monotonic()) > 0:
        time.sleep(min(left, 5.0))


def main(argv: list[str]) -> int:
    plan_path, trace_path = argv
    with open(plan_path) as f:
        plan = json.load(f)
    setup(plan)
    poller = selectors.DefaultSelector()
    scenarios = [Scenario(spec, poller) for spec in plan["scenarios"]]
    phases: dict[str, dict[str, float]] = {}
    close_end = 0.0
    for phase in PHASES:
        if phase == "churn":
            wait_until(close_end + CHURN_AFTER_CLOSE)
        elif phase == "post":
            wait_until(close_end + POST_AFTER_CLOSE)
        start = time.monotonic()
        for scenario in scenarios:
            for op in scenario.spec["phases"][phase]:
                scenario.run(op)
        phases[phase] = {"start": start, "end": time.monotonic()}
        if phase == "close":
            close_end = phases[phase]["end"]
        print(f"phase {phase}: {phases[phase]['end'] - start:.1f} s", flush=True)
    trace = {
        "kernel": os.uname().release, "phases": phases,
        "scenarios": [{"id": s.spec["id"], "events": s.events, "dropped": s.dropped}
                      for s in scenarios],
    }
    partial = f"{trace_path}.tmp"
    with open(partial, "w") as f:
        json.dump(trace, f)
    os.replace(partial, trace_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
