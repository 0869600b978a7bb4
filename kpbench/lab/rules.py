"""kube-proxy's rules for ClusterIP services, as text for `iptables-restore` and `nft -f`.

One service (the lab's cells) or many (`kpbench scale`): the `_many` functions write a node's
full sync for a table of services, `iptables_partial_restore` and `nft_endpoints_change` the
sync after one service's endpoints changed.

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


ServiceTable = Sequence[tuple[Service, Sequence[Endpoint]]]


def iptables_restore(service: Service, endpoints: Sequence[Endpoint]) -> str:
    """A complete nat + filter ruleset for one node, for `iptables-restore` (replaces both)."""
    return iptables_restore_many([(service, endpoints)])


NAT_BASE_CHAINS = (":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
                   ":POSTROUTING ACCEPT [0:0]")
NAT_KUBE_CHAINS = (":KUBE-SERVICES - [0:0]", ":KUBE-POSTROUTING - [0:0]",
                   ":KUBE-MARK-MASQ - [0:0]")
FILTER_BASE_CHAINS = (":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]")


def _service_jump(service: Service) -> str:
    return (f'-A KUBE-SERVICES -m comment --comment "{service.port_string} cluster IP" '
            f"-m {service.protocol} -p {service.protocol} -d {service.cluster_ip}/32 "
            f"--dport {service.port} -j {service_chain(service)}")


def _service_chains(service: Service, endpoints: Sequence[Endpoint]) -> tuple[list[str],
                                                                              list[str]]:
    """The declarations and rules of a service's KUBE-SVC chain and its KUBE-SEP chains."""
    svc = service_chain(service)
    seps = [endpoint_chain(service, e) for e in endpoints]
    name = service.port_string
    declarations = [f":{svc} - [0:0]", *(f":{sep} - [0:0]" for sep in seps)]
    chain_rules = []
    for i, (endpoint, sep) in enumerate(zip(endpoints, seps, strict=True)):
        statistic = ""
        if i < len(endpoints) - 1:
            chance = probability(len(endpoints) - i)
            statistic = f"-m statistic --mode random --probability {chance} "
        chain_rules.append(
            f'-A {svc} -m comment --comment "{name} -> {endpoint}" {statistic}-j {sep}')
    for endpoint, sep in zip(endpoints, seps, strict=True):
        chain_rules.append(
            f"-A {sep} -m comment --comment {name} -s {endpoint.ip}/32 -j KUBE-MARK-MASQ")
        chain_rules.append(
            f"-A {sep} -m comment --comment {name} -m {service.protocol} -p {service.protocol} "
            f"-j DNAT --to-destination {endpoint}")
    return declarations, chain_rules


def _no_endpoints_reject(service: Service) -> str:
    return (f'-A KUBE-SERVICES -m comment --comment "{service.port_string} has no endpoints" '
            f"-m {service.protocol} -p {service.protocol} -d {service.cluster_ip}/32 "
            f"--dport {service.port} -j REJECT --reject-with icmp-port-unreachable")


FILTER_JUMPS = (
    '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
    "-j KUBE-SERVICES",
    '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
    "-j KUBE-SERVICES",
)


def iptables_restore_many(table: ServiceTable) -> str:
    """A complete nat + filter ruleset for one node holding every service of `table`, in
    kube-proxy's full-sync layout: each service's `KUBE-SERVICES` jump in table order (so the
    last service's rule is the last one `KUBE-SERVICES` walks), then its chains' rules."""
    nat = ["*nat", *NAT_BASE_CHAINS, *NAT_KUBE_CHAINS]
    service_rules: list[str] = []
    rejects: list[str] = []
    for service, endpoints in table:
        if not endpoints:
            rejects.append(_no_endpoints_reject(service))
            continue
        declarations, chain_rules = _service_chains(service, endpoints)
        nat += declarations
        service_rules += [_service_jump(service), *chain_rules]
    nat += [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQUERADE_MARK}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQUERADE_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        *service_rules,
        "COMMIT",
    ]
    filter_table = ["*filter", *FILTER_BASE_CHAINS, ":KUBE-SERVICES - [0:0]", *FILTER_JUMPS,
                    *rejects, "COMMIT"]
    return "\n".join(nat + filter_table) + "\n"


def iptables_partial_restore(table: ServiceTable, changed: Service,
                             old_endpoints: Sequence[Endpoint]) -> str:
    """The `iptables-restore --noflush` input of kube-proxy's partial sync after `changed`'s
    endpoints went from `old_endpoints` to those in `table` (pkg/proxy/iptables/proxier.go,
    syncProxyRules with MinimizeIPTablesRestore, GA in 1.28: `KUBE-SERVICES` is rewritten in
    full on every sync, only the chains of changed services are declared and written, and
    chains no longer used are declared (flushed) and deleted with `-X`). The filter table's
    `KUBE-SERVICES` is rewritten as well."""
    new_endpoints = next(e for s, e in table if s == changed)
    nat = ["*nat", ":KUBE-SERVICES - [0:0]"]
    jumps: list[str] = []
    rejects: list[str] = []
    for service, endpoints in table:
        if endpoints:
            jumps.append(_service_jump(service))
        else:
            rejects.append(_no_endpoints_reject(service))
    changed_rules: list[str] = []
    if new_endpoints:
        declarations, changed_rules = _service_chains(changed, new_endpoints)
        nat += declarations
    kept = {endpoint_chain(changed, e) for e in new_endpoints}
    stale = [endpoint_chain(changed, e) for e in old_endpoints
             if endpoint_chain(changed, e) not in kept]
    if not new_endpoints and old_endpoints:
        stale.insert(0, service_chain(changed))
    nat += [f":{chain} - [0:0]" for chain in stale]  # flushed, so that -X can delete them
    nat += [*jumps, *changed_rules, *(f"-X {chain}" for chain in stale), "COMMIT"]
    filter_table = ["*filter", ":KUBE-SERVICES - [0:0]", *rejects, "COMMIT"]
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
    return nft_ruleset_many([(service, endpoints)])


def _nft_key(service: Service) -> str:
    return f"{service.cluster_ip} . {service.protocol} . {service.port}"


def _nft_service_chain(service: Service, endpoints: Sequence[Endpoint]) -> list[str]:
    """The service chain: one `numgen random mod n vmap` over its endpoint chains."""
    elements = " , ".join(
        f"{i} : goto {nft_endpoint_chain(service, e)}" for i, e in enumerate(endpoints))
    return [f"  chain {nft_service_chain(service)} {{",
            f"    numgen random mod {len(endpoints)} vmap {{ {elements} }}",
            "  }"]


def _nft_endpoint_chain(service: Service, endpoint: Endpoint) -> list[str]:
    return [f"  chain {nft_endpoint_chain(service, endpoint)} {{",
            f"    ip saddr {endpoint.ip} jump mark-for-masquerade",
            f"    meta l4proto {service.protocol} dnat to {endpoint}",
            "  }"]


def _nft_elements(entries: list[str]) -> list[str]:
    return [f"    elements = {{ {' , '.join(entries)} }}"] if entries else []


def nft_ruleset_many(table: ServiceTable) -> str:
    """The `kube-proxy` table holding every service of `table`, replacing the previous one in
    one transaction: `services` finds a service through the verdict map `service-ips` (one
    hash lookup however many services there are)."""
    with_endpoints = [(s, e) for s, e in table if e]
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
        *_nft_elements([f"{_nft_key(s)} : goto reject-chain" for s, e in table if not e]),
        "  }",
        "  chain reject-chain {",
        "    reject",
        "  }",
        "  chain service-endpoints-check {",
        "    ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        "  }",
        "  map service-ips {",
        "    type ipv4_addr . inet_proto . inet_service : verdict",
        *_nft_elements([f"{_nft_key(s)} : goto {nft_service_chain(s)}"
                        for s, _ in with_endpoints]),
        "  }",
        "  chain services {",
        "    ip daddr . meta l4proto . th dport vmap @service-ips",
        "  }",
    ]
    for service, endpoints in with_endpoints:
        lines += _nft_service_chain(service, endpoints)
        for endpoint in endpoints:
            lines += _nft_endpoint_chain(service, endpoint)
    lines.append("}")
    return "\n".join(lines) + "\n"


def nft_endpoints_change(service: Service, old_endpoints: Sequence[Endpoint],
                         new_endpoints: Sequence[Endpoint]) -> str:
    """The `nft -f` transaction of kube-proxy's sync after one service's endpoints changed
    (pkg/proxy/nftables/proxier.go, syncProxyRules: unchanged services are left alone, the
    changed service's chain is flushed and rewritten, endpoint chains of new endpoints are
    added and stale ones deleted; kept endpoint chains are not touched). Both endpoint lists
    must be non-empty (a service that gains or loses its last endpoint also moves between the
    verdict maps)."""
    kept, old = set(new_endpoints), set(old_endpoints)
    lines = ["table ip kube-proxy {"]
    for endpoint in new_endpoints:
        if endpoint not in old:
            lines += _nft_endpoint_chain(service, endpoint)
    lines += ["}", f"flush chain ip kube-proxy {nft_service_chain(service)}",
              "table ip kube-proxy {", *_nft_service_chain(service, new_endpoints), "}"]
    lines += [f"delete chain ip kube-proxy {nft_endpoint_chain(service, e)}"
              for e in old_endpoints if e not in kept]
    return "\n".join(lines) + "\n"
