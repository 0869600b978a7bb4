"""IPVS as kube-proxy programs it and as the kernel reports it. Pure code, no I/O.

Programming (kubernetes `pkg/proxy/ipvs/proxier.go` and `graceful_termination.go`):
* one virtual server per ClusterIP:port with the configured scheduler; the ClusterIP is bound to
  the dummy device `kube-ipvs0`; `mh` gets the `mh-port` flag (kube-proxy's FlagSourceHash), no
  other scheduler gets a flag (so `sh` hashes the client IP only);
* every ready endpoint is a masquerading real server with weight 1;
* an endpoint that leaves is deleted at once if IPVS holds no connection for it, otherwise it is
  quiesced (weight 0: existing connections keep flowing, no new ones) and deleted by the graceful
  termination manager once its active plus inactive connections reach 0 (it checks every
  `kpbench.dataplane.IPVS_GRACEFUL_CHECK_SECONDS`); an endpoint that comes back while quiesced is
  deleted and added anew;
* per-namespace sysctls: `net.ipv4.vs.conntrack=1` (IPVS connections enter conntrack, so the
  masquerade rules see them), `expire_nodest_conn=1`, `expire_quiescent_template=1`.

The commands are `ipvsadm --restore` lines (one ipvsadm invocation per line); kube-proxy speaks
netlink directly, with the same effect.

Reading: `/proc/net/ip_vs` (services, schedulers, weights and connection counts, what
`ipvsadm -Ln` prints) and `/proc/net/ip_vs_conn` (one line per connection), both with
hexadecimal addresses (`0A600001:0050` = 10.96.0.1:80) as the kernel's seq files print them.
`/proc/net/ip_vs` does not show scheduler flags, so `mh-port` is set but not read back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SYSCTLS = ("net.ipv4.vs.conntrack=1", "net.ipv4.vs.expire_nodest_conn=1",
           "net.ipv4.vs.expire_quiescent_template=1")
DUMMY_DEVICE = "kube-ipvs0"
# The address kube-proxy's CanUseIPVSProxier probes a scheduler with (a TEST-NET-2 address).
PROBE_SERVICE = "198.51.100.0:20000"
ROW_COLUMNS = ["t", "node", "service", "real_server", "pod", "weight", "active_connections",
               "inactive_connections"]


def scheduler_of(mode: str) -> str:
    """kpbench mode -> IPVS scheduler: `ipvs-lc` -> `lc`."""
    if not mode.startswith("ipvs-"):
        raise ValueError(f"{mode} is not an IPVS mode")
    return mode.removeprefix("ipvs-")


def _hex_address(text: str) -> str:
    """`0A600001:0050` -> `10.96.0.1:80` (IPv4; IPv6 is shown as given)."""
    host, _, port = text.rpartition(":")
    if len(host) == 8:
        return f"{ipaddress.IPv4Address(int(host, 16))}:{int(port, 16)}"
    return text


@dataclass
class RealServer:
    address: str
    forward: str
    weight: int
    active: int
    inactive: int


@dataclass
class VirtualService:
    protocol: str
    address: str
    scheduler: str
    flags: str = ""
    real_servers: list[RealServer] = field(default_factory=list)


def parse_ip_vs(text: str) -> list[VirtualService]:
    """`/proc/net/ip_vs` -> virtual services with their real servers."""
    services: list[VirtualService] = []
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] in ("IP", "Prot") or line.startswith("  -> RemoteAddress"):
            continue
        if parts[0] in ("TCP", "UDP", "SCTP", "FWM") and len(parts) >= 3:
            address = _hex_address(parts[1]) if parts[0] != "FWM" else parts[1]
            services.append(VirtualService(parts[0], address, parts[2], " ".join(parts[3:])))
        elif parts[0] == "->" and services and len(parts) >= 6:
            services[-1].real_servers.append(RealServer(
                _hex_address(parts[1]), parts[2], int(parts[3]), int(parts[4]), int(parts[5])))
    return services


@dataclass(frozen=True)
class Connection:
    client: str  # ip:port
    virtual: str  # ip:port
    destination: str  # ip:port
    state: str


def parse_ip_vs_conn(text: str) -> list[Connection]:
    """`/proc/net/ip_vs_conn` -> its connections (IPv4 lines; persistence templates included)."""
    connections = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8 or parts[0] == "Pro" or len(parts[1]) != 8:
            continue
        connections.append(Connection(
            _hex_address(f"{parts[1]}:{parts[2]}"), _hex_address(f"{parts[3]}:{parts[4]}"),
            _hex_address(f"{parts[5]}:{parts[6]}"), parts[7],
        ))
    return connections


def service_rows(t: float, node: str, text: str, service_address: str,
                 pod_by_ip: Mapping[str, str]) -> list[dict[str, object]]:
    """One `ROW_COLUMNS` row per real server of `service_address` in a node's `/proc/net/ip_vs`."""
    rows: list[dict[str, object]] = []
    for service in parse_ip_vs(text):
        if service.address != service_address:
            continue
        for server in service.real_servers:
            rows.append({
                "t": round(t, 6), "node": node, "service": service.address,
                "real_server": server.address,
                "pod": pod_by_ip.get(server.address.rsplit(":", 1)[0], ""),
                "weight": server.weight, "active_connections": server.active,
                "inactive_connections": server.inactive,
            })
    return rows


def _service_flag(protocol: str) -> str:
    return {"tcp": "-t", "udp": "-u", "sctp": "--sctp-service"}[protocol]


def create_service(address: str, scheduler: str, protocol: str = "tcp") -> list[str]:
    """The `ipvsadm --restore` line that adds the virtual server."""
    flags = " -b mh-port" if scheduler == "mh" else ""
    return [f"-A {_service_flag(protocol)} {address} -s {scheduler}{flags}"]


def sync_commands(address: str, current: Sequence[RealServer], ready: Sequence[str],
                  protocol: str = "tcp") -> list[str]:
    """`ipvsadm --restore` lines that take the real servers from `current` to the `ready` ones.

    `ready` holds `ip:port` strings. Mirrors kube-proxy's syncEndpoint and GracefulDeleteRS.
    """
    service = f"{_service_flag(protocol)} {address}"
    by_address = {server.address: server for server in current}
    commands = []
    for endpoint in ready:
        server = by_address.get(endpoint)
        if server is None:
            commands.append(f"-a {service} -r {endpoint} -m -w 1")
        elif server.weight == 0:  # back from graceful termination: delete, then add anew
            commands += [f"-d {service} -r {endpoint}", f"-a {service} -r {endpoint} -m -w 1"]
    wanted = set(ready)
    for server in current:
        if server.address in wanted or server.weight == 0:
            continue  # a quiesced server is the graceful pass's to delete
        if protocol in ("udp", "sctp") or server.active + server.inactive == 0:
            commands.append(f"-d {service} -r {server.address}")
        elif server.weight != 0:
            commands.append(f"-e {service} -r {server.address} -m -w 0")
    return commands


def graceful_deletions(address: str, current: Sequence[RealServer],
                       protocol: str = "tcp") -> list[str]:
    """The graceful termination manager's pass: delete quiesced servers with no connections."""
    service = f"{_service_flag(protocol)} {address}"
    return [f"-d {service} -r {server.address}" for server in current
            if server.weight == 0 and server.active + server.inactive == 0]


def find_service(services: Sequence[VirtualService], address: str) -> VirtualService | None:
    return next((s for s in services if s.address == address), None)
