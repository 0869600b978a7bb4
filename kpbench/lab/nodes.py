"""Where the lab's nodes live: the host's kernel, or a stock kernel in the kernel VM.

Everything the lab does to a node (kube-proxy's rules, IPVS, sysctls, reading tables back)
goes through one narrow interface, `NodePlane`: `run(node, argv, input)` and
`read(node, path)`. Pods, the L7 proxies, Locust and the scraper always run on the host, at
native speed; only the nodes move.

`HostNodes`: node k is the host namespace `<prefix>n<k>` (see `kpbench.lab.netns`).

`VmNodes`: node k is the namespace `n<k>` in the guest of a `kpbench.vm.Session`. On the host,
node k's pods hang off a bridge in `<prefix>l<k>` (the node's link), which also holds the tap
device of the guest's NIC k; the guest moves that NIC into `n<k>` with the node's pod-side
address (198.18.<k>.1/24), so every packet from a pod to a ClusterIP crosses the node's own
tables in the guest kernel. The pods of a node share that link (in Kubernetes each pod has a
veth of its own), so the node must not send ICMP redirects: a reply from a pod to a client on
the same node leaves by the interface it came in on, and a redirect would send the pod's next
replies straight to the client, around IPVS's reverse NAT (the client then resets them). The
node sends none and the pods accept none. The nodes reach each other over a bridge inside the guest
(`nodes`, 198.19.255.<k+1>/24, as on the host). The control namespace gets one leg per node
link (198.19.255.250 on each) and every pod a direct route back to it, so that scraping and
Locust's own traffic stay on the host and never load the emulated guest. QEMU runs in
`<prefix>vm`, where it creates the taps before they are moved; the root namespace still gets
nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from kpbench import vm
from kpbench.addresses import PodAddresses
from kpbench.lab import netns
from kpbench.lab.netns import CONTROL_IP, LabError, Topology, node_ip, ns_exec, pod_ip, run

GUEST_NODES_NS = "nodes"


class NodePlane(Protocol):
    """The nodes' kernel: commands and file reads inside node k's network namespace."""

    placement: str  # "host" or "vm"

    def run(self, node: int, argv: Sequence[str], input_text: str | None = None) -> str: ...
    def read(self, node: int, path: str) -> str: ...
    def describe(self) -> dict[str, str]: ...


class HostNodes:
    placement = "host"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def run(self, node: int, argv: Sequence[str], input_text: str | None = None) -> str:
        return netns.run(*ns_exec(self.topology.node_ns(node), argv), input_text=input_text)

    def read(self, node: int, path: str) -> str:
        return self.run(node, ["cat", path])

    def describe(self) -> dict[str, str]:
        return {"placement": "host", "kernel": os.uname().release}


def guest_node_ns(node: int) -> str:
    return f"n{node + 1}"


class VmNodes:
    placement = "vm"

    def __init__(self, session: vm.Session) -> None:
        self.session = session

    def run(self, node: int, argv: Sequence[str], input_text: str | None = None) -> str:
        return self.guest(["ip", "netns", "exec", guest_node_ns(node), *argv], input_text)

    def guest(self, argv: Sequence[str], input_text: str | None = None) -> str:
        done = self.session.run(argv, input_text=input_text)
        if done.rc != 0:
            raise LabError(f"guest: {' '.join(argv[:6])}: {done.stderr.strip() or done.rc}")
        return done.stdout

    def read(self, node: int, path: str) -> str:
        done = self.session.read(path, netns=guest_node_ns(node))
        if done.rc != 0:
            raise LabError(f"guest: read {path} in node {node + 1}: {done.stderr.strip()}")
        return done.stdout

    def describe(self) -> dict[str, str]:
        return {"placement": "vm", "kernel": self.session.kernel.release,
                "accel": self.session.accel}


class VmTopology(Topology):
    """The lab's network with its nodes in the kernel VM (see the module docstring)."""

    def link_ns(self, node: int) -> str:
        return self.ns(f"l{node + 1}")

    @property
    def vm_ns(self) -> str:
        return self.ns("vm")

    def tap(self, node: int) -> str:
        return f"{self.tag}t{node + 1}"

    def create_host_side(self) -> None:
        """Host namespaces: the VM's, one link bridge per node, the control namespace."""
        self.register_owner()
        self.addresses = PodAddresses(self.nodes)
        self._add_namespace(self.vm_ns)
        self._add_namespace(self.control_ns)
        for node in range(self.nodes):
            link = self.link_ns(node)
            self._add_namespace(link)
            run("ip", "-n", link, "link", "add", "br0", "type", "bridge")
            run("ip", "-n", link, "link", "set", "br0", "up")
            leg = f"c{node + 1}"
            run("ip", "link", "add", leg, "netns", self.control_ns, "type", "veth", "peer",
                "name", "ctl", "netns", link)
            run("ip", "-n", link, "link", "set", "ctl", "master", "br0", "up")
            run("ip", "-n", self.control_ns, "addr", "add", f"{CONTROL_IP}/32", "dev", leg)
            run("ip", "-n", self.control_ns, "link", "set", leg, "up")
            run("ip", "-n", self.control_ns, "route", "add", f"198.18.{node}.0/24", "dev", leg)
        run("ip", "-n", self.control_ns, "route", "add", "198.19.0.0/24", "via", pod_ip(0, 1),
            "dev", "c1", "onlink")

    def attach_taps(self) -> None:
        """Move each node's tap (made by QEMU in the VM namespace) onto its link bridge."""
        for node in range(self.nodes):
            tap, link = self.tap(node), self.link_ns(node)
            run("ip", "-n", self.vm_ns, "link", "set", tap, "netns", link)
            run("ip", "-n", link, "link", "set", tap, "master", "br0", "up")

    def guest_script(self) -> str:
        """The shell script that builds the nodes in the guest."""
        lines = ["set -e", "modprobe ip_vs", f"ip netns add {GUEST_NODES_NS}",
                 f"ip -n {GUEST_NODES_NS} link add br0 type bridge",
                 f"ip -n {GUEST_NODES_NS} link set br0 up"]
        for node in range(self.nodes):
            ns = guest_node_ns(node)
            mac = vm.tap_mac(node)
            lines += [
                f"ip netns add {ns}", f"ip -n {ns} link set lo up",
                f"nic=$(grep -l {mac} /sys/class/net/*/address | cut -d/ -f5)",
                f"ip link set $nic netns {ns}",
                f"ip -n {ns} link set $nic name eth1",
                f"ip -n {ns} addr add {pod_ip(node, 1)}/24 dev eth1",
                f"ip -n {ns} link set eth1 up",
                f"ip link add eth0 netns {ns} type veth peer name {ns} netns {GUEST_NODES_NS}",
                f"ip -n {GUEST_NODES_NS} link set {ns} master br0 up",
                f"ip -n {ns} addr add {node_ip(node)}/24 dev eth0",
                f"ip -n {ns} link set eth0 up",
                f"ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1 "
                "net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 "
                "net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.eth1.send_redirects=0",
                f"ip -n {ns} route add {CONTROL_IP}/32 dev eth1",
            ]
        for node in range(self.nodes):
            for other in range(self.nodes):
                if other != node:
                    lines.append(f"ip -n {guest_node_ns(node)} route add 198.18.{other}.0/24 "
                                 f"via {node_ip(other)}")
        return "\n".join(lines) + "\n"

    def add_pod(self, name: str, node: int) -> tuple[str, str]:
        """A pod namespace on `node`'s link bridge; its gateway is the node in the guest."""
        link = self.link_ns(node)
        namespace, ip, veth = self.pod_namespace(name, node, link)
        run("ip", "-n", link, "link", "set", veth, "master", "br0", "up")
        run("ip", "-n", namespace, "route", "add", CONTROL_IP, "dev", "eth0", "scope", "link")
        run("ip", "netns", "exec", namespace, "sysctl", "-qw",
            "net.ipv4.conf.all.accept_redirects=0", "net.ipv4.conf.eth0.accept_redirects=0")
        return namespace, ip

