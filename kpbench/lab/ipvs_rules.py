"""What kube-proxy's IPVS mode writes for many ClusterIP services, as batch input. Pure code.

kube-proxy's IPVS proxier (kubernetes `pkg/proxy/ipvs/proxier.go`, syncProxyRules and
writeIptablesRules; `pkg/proxy/ipvs/ipset.go`) keeps, per node:
* every ClusterIP bound to the dummy device `kube-ipvs0` (netlink, one address at a time;
  here one `ip -batch`);
* one IPVS virtual server per ClusterIP:port with masquerading real servers of weight 1
  (netlink; here `ipvsadm --restore`, the lines of `kpbench.ipvs`);
* ipsets instead of per-service iptables rules: `KUBE-CLUSTER-IP` (hash:ip,port, every
  ClusterIP:port), `KUBE-LOOP-BACK` (hash:ip,port,ip, the node's own endpoints, for hairpin
  masquerade) and `KUBE-IPVS-IPS` (hash:ip, every address on kube-ipvs0);
* a small, fixed set of iptables rules that match those sets: `KUBE-SERVICES` marks traffic to
  a ClusterIP from outside the cluster CIDR for masquerade and ACCEPTs the rest,
  `KUBE-POSTROUTING` masquerades hairpin and marked traffic, `KUBE-FORWARD` accepts marked and
  established traffic, `KUBE-IPVS-FILTER` (INPUT) rejects new connections to a kube-ipvs0
  address that is not a service port.
Sets and rules for NodePorts, LoadBalancers and external IPs are left out: no such Service
exists here. kube-proxy adds ipset entries with one `ipset add` process each
(`pkg/util/ipset/ipset.go`, AddEntry, called by syncIPSetEntries for every entry missing from
the kernel); this module writes them as one `ipset restore` batch, so a full sync measured
with it is a lower bound for kube-proxy's own.
"""

from __future__ import annotations

from kpbench import ipvs
from kpbench.lab.rules import MASQUERADE_MARK, Endpoint, ServiceTable

CLUSTER_IP_SET = "KUBE-CLUSTER-IP"
LOOP_BACK_SET = "KUBE-LOOP-BACK"
IPVS_IPS_SET = "KUBE-IPVS-IPS"
SETS = ((CLUSTER_IP_SET, "hash:ip,port"), (LOOP_BACK_SET, "hash:ip,port,ip"),
        (IPVS_IPS_SET, "hash:ip"))
# kube-proxy's defaults for its sets (pkg/util/ipset/ipset.go: DefaultHashSize, DefaultMaxElem).
HASH_SIZE, MAX_ELEM = 1024, 65536


def ipset_restore(table: ServiceTable, local: frozenset[str]) -> str:
    """`ipset restore` input creating kube-proxy's sets with every entry; `local` holds the
    endpoint addresses on this node (the only ones in KUBE-LOOP-BACK)."""
    lines = [f"create {name} {kind} family inet hashsize {HASH_SIZE} maxelem {MAX_ELEM}"
             for name, kind in SETS]
    for service, endpoints in table:
        lines.append(f"add {CLUSTER_IP_SET} {service.cluster_ip},{service.protocol}:"
                     f"{service.port}")
        lines.append(f"add {IPVS_IPS_SET} {service.cluster_ip}")
        lines += [f"add {LOOP_BACK_SET} {loop_back_entry(e, service.protocol)}"
                  for e in endpoints if e.ip in local]
    return "\n".join(lines) + "\n"


def loop_back_entry(endpoint: Endpoint, protocol: str = "tcp") -> str:
    return f"{endpoint.ip},{protocol}:{endpoint.port},{endpoint.ip}"


def kube_chains(cluster_cidr: str) -> tuple[str, str]:
    """kube-proxy's own chains (nat, filter), as it rewrites them on every sync with
    `iptables-restore --noflush`."""
    mark = f"{MASQUERADE_MARK}/{MASQUERADE_MARK}"
    nat = "\n".join([
        ":KUBE-SERVICES - [0:0]", ":KUBE-POSTROUTING - [0:0]", ":KUBE-NODE-PORT - [0:0]",
        ":KUBE-LOAD-BALANCER - [0:0]", ":KUBE-MARK-MASQ - [0:0]",
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQUERADE_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip '
        f'for solving hairpin purpose" -m set --match-set {LOOP_BACK_SET} dst,dst,src '
        "-j MASQUERADE",
        f"-A KUBE-POSTROUTING -m mark ! --mark {mark} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQUERADE_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN",
        '-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for '
        f'masquerade purpose" -m set --match-set {CLUSTER_IP_SET} dst,dst ! -s {cluster_cidr} '
        "-j KUBE-MARK-MASQ",
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
        "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ",
        f"-A KUBE-SERVICES -m set --match-set {CLUSTER_IP_SET} dst,dst -j ACCEPT",
    ])
    filter_chains = "\n".join([
        ":KUBE-FORWARD - [0:0]", ":KUBE-IPVS-FILTER - [0:0]",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {mark} -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A KUBE-IPVS-FILTER -m set --match-set {CLUSTER_IP_SET} dst,dst -j RETURN",
        f"-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set {IPVS_IPS_SET} dst "
        "-j REJECT",
    ])
    return nat, filter_chains


def iptables_restore(cluster_cidr: str) -> str:
    """The IPVS mode's whole nat and filter tables for one node (its chains plus the jumps
    from the built-in chains, which kube-proxy ensures once): the same size for any number
    of services."""
    nat, filter_chains = kube_chains(cluster_cidr)
    return "\n".join([
        "*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]", nat,
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "COMMIT",
        "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        filter_chains,
        '-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER',
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        "COMMIT",
    ]) + "\n"


def iptables_sync(cluster_cidr: str) -> str:
    """What every IPVS sync restores (`--noflush`): kube-proxy's own chains, rewritten."""
    nat, filter_chains = kube_chains(cluster_cidr)
    return "\n".join(["*nat", nat, "COMMIT", "*filter", filter_chains, "COMMIT"]) + "\n"


def bind_addresses(table: ServiceTable) -> str:
    """`ip -batch` input binding every ClusterIP to kube-ipvs0."""
    return "".join(f"address add {service.cluster_ip}/32 dev {ipvs.DUMMY_DEVICE}\n"
                   for service, _ in table)


def ipvsadm_restore(table: ServiceTable, scheduler: str) -> str:
    """`ipvsadm --restore` input: every virtual server with its real servers."""
    lines: list[str] = []
    for service, endpoints in table:
        address = f"{service.cluster_ip}:{service.port}"
        lines += ipvs.create_service(address, scheduler, service.protocol)
        lines += ipvs.sync_commands(address, [], [str(e) for e in endpoints], service.protocol)
    return "\n".join(lines) + "\n"


def ipvsadm_change(address: str, old: list[Endpoint], new: list[Endpoint]) -> str:
    """`ipvsadm --restore` lines of the sync after one service's endpoints changed (the old
    endpoints hold no connection, so a leaving one is deleted at once)."""
    current = [ipvs.RealServer(str(e), "Masq", 1, 0, 0) for e in old]
    return "\n".join(ipvs.sync_commands(address, current, [str(e) for e in new])) + "\n"
