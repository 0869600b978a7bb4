"""HAProxy as the L7 proxy of `workload.proxy: l7`, one configuration for every backend.

The lab runs HAProxy from the distribution (2.6 on Debian 12), kind runs the official image
`haproxy:2.6.x` (`kpbench.kube.manifests.HAPROXY_IMAGE`); both render their `haproxy.cfg` here,
so the two backends cannot drift apart. In HTTP mode (gRPC: HTTP/2 on both sides) HAProxy
chooses a server for every request of a kept-alive client connection, `balance roundrobin`.

Settings shared by every backend (HAProxy 2.6 configuration manual, doc/configuration.txt):
- `nbthread 2`: a fixed number of threads, because each thread keeps its own idle server
  connections and the default is one thread per CPU the process may use. 2 is what the
  published lab runs had (the default on their 2-CPU machine), so their connection counts stay
  comparable and do not depend on the host.
- `timeout client/server/http-keep-alive 1h`: long-lived client connections are never cut by
  the proxy; `timeout connect 1s`.
- `retries 3`, `option redispatch 1`, `retry-on conn-failure empty-response`: a request whose
  pod no longer accepts connections (it exited before the proxy's view was updated) is retried
  on another pod.
- a pool of `SERVER_SLOTS` servers from one `server-template`; which backend pods fill it is
  the only difference between backends:
  - `RuntimeSlots` (lab): every slot starts disabled; the lab fills and empties slots through
    the runtime API (`set server ... addr`, `state ready|maint`) when an endpoint change reaches
    them (`kpbench.control`'s fanout, as a node's kube-proxy would see it) (`kpbench.lab.l7.Slots`);
  - `DnsDiscovery` (kind): HAProxy resolves the headless Service of the backend pods (one A
    record per ready pod) every `DNS_RESOLVE_SECONDS` and fills one slot per address
    (`resolvers` section; `init-addr none`: no slot is used before the first answer).

What the backend pods then hold are the proxies' upstream connections, not the clients':
HAProxy opens server connections as requests need them and keeps idle ones per thread, so a pod
holds at least one connection per proxy and usually a few more (the lab measured 2-6 per pod,
about 4 on average, with 2 proxies x 2 threads at 120 requests/s).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BACKEND = "backend"
SLOT = "pod"
THREADS = 2
SERVER_SLOTS = 256
DNS_RESOLVE_SECONDS = 1
DNS_PAYLOAD_BYTES = 8192  # room for one A record per slot in a UDP answer (default: 512)
RESOLVERS = "cluster"


@dataclass(frozen=True)
class RuntimeSlots:
    """Slots filled through the runtime API (the lab)."""

    target_port: int
    slots: int = SERVER_SLOTS


@dataclass(frozen=True)
class DnsDiscovery:
    """Slots filled from the A records of `hostname` (kind: a headless Service).

    `nameserver` ("ip:port") overrides the nameservers of /etc/resolv.conf.
    """

    hostname: str
    target_port: int
    slots: int = SERVER_SLOTS
    nameserver: str | None = None


def haproxy_config(protocol: str, listen_port: int, runtime_socket: Path | str,
                   servers: RuntimeSlots | DnsDiscovery) -> str:
    """haproxy.cfg for one proxy pod."""
    h2 = " proto h2" if protocol == "grpc" else ""
    lines = [
        "global",
        f"    nbthread {THREADS}",
        f"    stats socket {runtime_socket} mode 600 level admin",
        "defaults",
        "    mode http",
        "    timeout connect 1s",
        "    timeout client 1h",
        "    timeout server 1h",
        "    timeout http-keep-alive 1h",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
    ]
    if isinstance(servers, DnsDiscovery):
        source = (f"    nameserver dns {servers.nameserver}" if servers.nameserver
                  else "    parse-resolv-conf")
        lines += [
            f"resolvers {RESOLVERS}",
            source,
            f"    accepted_payload_size {DNS_PAYLOAD_BYTES}",
            f"    timeout resolve {DNS_RESOLVE_SECONDS}s",
            "    timeout retry 1s",
            f"    hold valid {DNS_RESOLVE_SECONDS}s",
        ]
        template = (f"{servers.hostname}:{servers.target_port} resolvers {RESOLVERS} "
                    "resolve-prefer ipv4 init-addr none")
    else:
        template = f"127.0.0.1:{servers.target_port} disabled"
    lines += [
        "frontend ingress",
        f"    bind :{listen_port}{h2}",
        f"    default_backend {BACKEND}",
        f"backend {BACKEND}",
        "    balance roundrobin",
        f"    server-template {SLOT} 1-{servers.slots} {template}{h2}",
        "",
    ]
    return "\n".join(lines)


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
