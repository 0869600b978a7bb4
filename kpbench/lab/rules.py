"""kube-proxy's rules for one ClusterIP service, as text for `iptables-restore` and `nft -f`.

Pure code. Structure, names and formatting follow kube-proxy's proxiers:
* iptables (pkg/proxy/iptables/proxier.go): nat `PREROUTING/OUTPUT -> KUBE-SERVICES ->
  KUBE-SVC-<hash> -> KUBE-SEP-<hash>`; chain hashes = base32(sha256(servicePortName + protocol
  [+ endpoint]))[:16]; rule i of n carries `-m statistic --mode random --probability 1/(n-i)`
  printed with 10 decimals, the last none; KUBE-SEP marks hairpin traffic for masquerade
  (`--or-mark 0x4000`) and DNATs; KUBE-POSTROUTING masquerades marked packets. With no
  endpoints the filter table REJECTs the service ("has no endpoints").
* nftables (pkg/proxy/nftables/proxier.go): table `kube-proxy`, `services` dispatches through
  the verdict map `service-ips`, the service chain does `numgen random mod n vmap { i : goto
  endpoint-... }`, endpoint chains mark hairpin traffic and `dnat to ip:port`; chain names are
  the first 8 base32 characters of sha256 + `-` + `namespace/name/protocol/port`.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

MASQUERADE_MARK = "0x4000"  # 1 << masqueradeBit (14), kube-proxy's default


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    port_name: str
    cluster_ip: str
    port: int
    protocol: str = "tcp"

    @property
    def port_string(self) -> str:
        """ServicePortName.String(): `namespace/name:port`."""
        return f"{self.namespace}/{self.name}:{self.port_name}"


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def service_chain(service: Service) -> str:
    return "KUBE-SVC-" + _hash16(service.port_string + service.protocol)


def endpoint_chain(service: Service, endpoint: Endpoint) -> str:
    return "KUBE-SEP-" + _hash16(service.port_string + service.protocol + str(endpoint))


def probability(n: int) -> str:
    return f"{1.0 / n:0.10f}"


def iptables_restore(service: Service, endpoints: Sequence[Endpoint]) -> str:
    """A complete nat + filter ruleset for one node, for `iptables-restore` (replaces both)."""
    svc = service_chain(service)
    seps = [endpoint_chain(service, e) for e in endpoints]
    name = service.port_string
    nat = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
    ]
    if endpoints:
        nat.append(f":{svc} - [0:0]")
        nat += [f":{sep} - [0:0]" for sep in seps]
    nat += [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQUERADE_MARK}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQUERADE_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    ]
    if endpoints:
        nat.append(
            f'-A KUBE-SERVICES -m comment --comment "{name} cluster IP" -m {service.protocol} '
            f"-p {service.protocol} -d {service.cluster_ip}/32 --dport {service.port} -j {svc}"
        )
        for i, (endpoint, sep) in enumerate(zip(endpoints, seps, strict=True)):
            statistic = ""
            if i < len(endpoints) - 1:
                chance = probability(len(endpoints) - i)
                statistic = f"-m statistic --mode random --probability {chance} "
            nat.append(
                f'-A {svc} -m comment --comment "{name} -> {endpoint}" {statistic}-j {sep}'
            )
        for endpoint, sep in zip(endpoints, seps, strict=True):
            nat.append(
                f"-A {sep} -m comment --comment {name} -s {endpoint.ip}/32 -j KUBE-MARK-MASQ"
            )
            nat.append(
                f"-A {sep} -m comment --comment {name} -m {service.protocol} -p {service.protocol} "
                f"-j DNAT --to-destination {endpoint}"
            )
    nat.append("COMMIT")
    filter_table = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":KUBE-SERVICES - [0:0]",
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
        "-j KUBE-SERVICES",
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
        "-j KUBE-SERVICES",
    ]
    if not endpoints:
        filter_table.append(
            f'-A KUBE-SERVICES -m comment --comment "{name} has no endpoints" '
            f"-m {service.protocol} -p {service.protocol} -d {service.cluster_ip}/32 "
            f"--dport {service.port} -j REJECT --reject-with icmp-port-unreachable"
        )
    filter_table.append("COMMIT")
    return "\n".join(nat + filter_table) + "\n"


def _nft_base(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:8]


def nft_service_chain(service: Service) -> str:
    base = f"{service.namespace}/{service.name}/{service.protocol}/{service.port_name}"
    return f"service-{_nft_base(base)}-{base}"


def nft_endpoint_chain(service: Service, endpoint: Endpoint) -> str:
    base = (f"{service.namespace}/{service.name}/{service.protocol}/{service.port_name}"
            f"__{endpoint.ip}/{endpoint.port}")
    return f"endpoint-{_nft_base(base)}-{base}"


def nft_ruleset(service: Service, endpoints: Sequence[Endpoint]) -> str:
    """The `kube-proxy` table for one service, replacing the previous one in one transaction."""
    chain = nft_service_chain(service)
    lines = [
        "table ip kube-proxy",
        "delete table ip kube-proxy",
        "table ip kube-proxy {",
        "  chain mark-for-masquerade {",
        f"    meta mark set meta mark or {MASQUERADE_MARK}",
        "  }",
        "  chain masquerading {",
        f"    meta mark & {MASQUERADE_MARK} == 0 return",
        f"    meta mark set meta mark xor {MASQUERADE_MARK}",
        "    masquerade fully-random",
        "  }",
        "  chain nat-prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        "    jump services",
        "  }",
        "  chain nat-output {",
        "    type nat hook output priority -100; policy accept;",
        "    jump services",
        "  }",
        "  chain nat-postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        "    jump masquerading",
        "  }",
        "  chain filter-output {",
        "    type filter hook output priority -110; policy accept;",
        "    ct state new jump service-endpoints-check",
        "  }",
        "  chain filter-forward {",
        "    type filter hook forward priority -110; policy accept;",
        "    ct state new jump service-endpoints-check",
        "  }",
        "  map no-endpoint-services {",
        "    type ipv4_addr . inet_proto . inet_service : verdict",
    ]
    if not endpoints:
        lines.append(
            f"    elements = {{ {service.cluster_ip} . {service.protocol} . {service.port} : "
            "goto reject-chain }"
        )
    lines += [
        "  }",
        "  chain reject-chain {",
        "    reject",
        "  }",
        "  chain service-endpoints-check {",
        "    ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        "  }",
        "  map service-ips {",
        "    type ipv4_addr . inet_proto . inet_service : verdict",
    ]
    if endpoints:
        lines.append(
            f'    elements = {{ {service.cluster_ip} . {service.protocol} . {service.port} : '
            f"goto {chain} }}"
        )
    lines += [
        "  }",
        "  chain services {",
        "    ip daddr . meta l4proto . th dport vmap @service-ips",
        "  }",
    ]
    if endpoints:
        elements = " , ".join(
            f"{i} : goto {nft_endpoint_chain(service, e)}" for i, e in enumerate(endpoints)
        )
        lines += [
            f"  chain {chain} {{",
            f"    numgen random mod {len(endpoints)} vmap {{ {elements} }}",
            "  }",
        ]
        for endpoint in endpoints:
            lines += [
                f"  chain {nft_endpoint_chain(service, endpoint)} {{",
                f"    ip saddr {endpoint.ip} jump mark-for-masquerade",
                f"    meta l4proto {service.protocol} dnat to {endpoint}",
                "  }",
            ]
    lines.append("}")
    return "\n".join(lines) + "\n"
