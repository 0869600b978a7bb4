"""What kube-proxy does to every lab node's kernel for the Service: its rules written (iptables,
nftables, or an IPVS virtual server), IPVS's graceful-termination pass, and the rules read back
and checked against the mode. Through `kpbench.lab.nodes.NodePlane`, so the same code programs
nodes on the host and in the kernel VM.

IPVS modes follow `kpbench.ipvs`: per node the ClusterIP on the dummy device `kube-ipvs0`, one
virtual server with the mode's scheduler, real servers added, quiesced and deleted as kube-proxy's
graceful termination does (pkg/proxy/ipvs/proxier.go, graceful_termination.go). kube-proxy's
IPVS-mode iptables/ipset rules (hairpin masquerade, ClusterIP filtering) are not written: no lab
client is a backend pod, so no packet would match.
"""

from __future__ import annotations

from typing import Any

from kpbench import ipvs
from kpbench.backends.base import Unsupported
from kpbench.lab import netns, rules
from kpbench.lab.netns import CLUSTER_IP
from kpbench.lab.nodes import NodePlane


class KubeProxy:
    """kube-proxy's side of every node's kernel: the Service's rules on each of `node_count`
    nodes, in mode `mode` (when to write them is the cell's, per node's sync loop)."""

    def __init__(self, mode: str, service: rules.Service, nodes: NodePlane,
                 node_count: int) -> None:
        self.mode = mode
        self.service = service
        self.nodes = nodes  # replaced by the kernel VM's once it runs
        self.node_count = node_count
        self.scheduler = ipvs.scheduler_of(mode) if mode.startswith("ipvs-") else None
        self.service_address = f"{CLUSTER_IP}:{service.port}"

    def prepare(self) -> None:
        """What kube-proxy's IPVS proxier sets up once per node: sysctls, kube-ipvs0, the service
        (nothing for iptables and nftables, whose rules carry everything).

        A kernel without the dummy link type or the scheduler's module makes the cell
        UNSUPPORTED with the kernel's words.
        """
        if self.scheduler is None:
            return
        for node in range(self.node_count):
            self.nodes.run(node, ["sysctl", "-qw", *ipvs.SYSCTLS])
            try:
                self.nodes.run(node, ["ip", "link", "add", ipvs.DUMMY_DEVICE, "type", "dummy"])
            except netns.LabError as exc:
                raise Unsupported(f"the lab's IPVS modes need the dummy link type for "
                                  f"{ipvs.DUMMY_DEVICE}: {exc}") from exc
            self.nodes.run(node, ["ip", "addr", "add", f"{CLUSTER_IP}/32", "dev",
                                  ipvs.DUMMY_DEVICE])
            try:
                self.ipvsadm(node, ipvs.create_service(self.service_address, self.scheduler))
            except netns.LabError as exc:
                if "not found" not in str(exc):  # ipvsadm: "Scheduler ... not found"
                    raise
                raise Unsupported(f"IPVS scheduler {self.scheduler} is not available in this "
                                  f"kernel: {exc}") from exc

    def write(self, node: int, endpoints: list[rules.Endpoint]) -> None:
        """The node's rules for `endpoints`; IPVS adds the new ones in the list's order."""
        if self.scheduler is not None:
            current = self.ipvs_service(node)
            self.ipvsadm(node, ipvs.sync_commands(
                self.service_address, current.real_servers if current else [],
                [str(e) for e in endpoints]))
        elif self.mode == "iptables":
            self.nodes.run(node, ["iptables-restore"],
                           rules.iptables_restore(self.service, endpoints))
        else:
            self.nodes.run(node, ["nft", "-f", "-"], rules.nft_ruleset(self.service, endpoints))

    def ipvsadm(self, node: int, commands: list[str]) -> None:
        if commands:
            self.nodes.run(node, ["ipvsadm", "--restore"], "\n".join(commands) + "\n")

    def ip_vs_text(self, node: int, table: str = "ip_vs") -> str:
        return self.nodes.read(node, f"/proc/net/{table}")

    def ipvs_service(self, node: int) -> ipvs.VirtualService | None:
        return ipvs.find_service(ipvs.parse_ip_vs(self.ip_vs_text(node)), self.service_address)

    def graceful_pass(self) -> None:
        """kube-proxy's graceful termination manager: drop quiesced servers without connections."""
        for node in range(self.node_count):
            current = self.ipvs_service(node)
            if current is not None:
                self.ipvsadm(node, ipvs.graceful_deletions(self.service_address,
                                                           current.real_servers))

    def read_back(self, endpoints: list[rules.Endpoint]) -> dict[str, Any]:
        """Every node's rules read back from its kernel and checked to balance over `endpoints`;
        a mismatch fails the cell."""
        n = len(endpoints)
        example: list[str] = []
        for node in range(self.node_count):
            if self.scheduler is not None:
                service = self.ipvs_service(node)
                weighted = sorted(rs.address for rs in service.real_servers
                                  if rs.weight > 0) if service else []
                ok = (service is not None and service.scheduler == self.scheduler
                      and weighted == sorted(str(e) for e in endpoints))
                seen = [] if service is None else [
                    f"{service.protocol} {service.address} {service.scheduler} {service.flags}"
                    .strip(),
                    *(f"-> {rs.address} {rs.forward} weight {rs.weight}"
                      for rs in service.real_servers)]
            elif self.mode == "iptables":
                text = self.nodes.run(node, ["iptables-save", "-t", "nat"])
                seen = [line for line in text.splitlines()
                        if line.startswith(f"-A {rules.service_chain(self.service)} ")]
                found = [float(line.split("--probability ")[1].split()[0])
                         for line in seen if "--probability" in line]
                expected = [1.0 / (n - i) for i in range(n - 1)]
                ok = len(seen) == n and all(abs(a - b) < 1e-6 for a, b in
                                            zip(found, expected, strict=True))
            else:
                text = self.nodes.run(node, ["nft", "list", "table", "ip", "kube-proxy"])
                seen = [line.strip() for line in text.splitlines() if "numgen" in line]
                ok = len(seen) == 1 and f"numgen random mod {n} vmap" in seen[0]
            if node == 0:
                example = seen[:8]
            if not ok:
                raise RuntimeError(f"node-{node + 1}: the {self.mode} rules read back do "
                                   f"not match {n} endpoints: {seen[:3]}")
        return {"mode": self.mode, "verified": True, "endpoints": n,
                "kernel": self.nodes.describe(),
                "nodes_checked": self.node_count, "example_rules_node_1": example,
                "source": "read back from each node's kernel "
                          "(iptables-save / nft list / /proc/net/ip_vs)"}
