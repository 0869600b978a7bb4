"""The lab's IPVS steps against an in-memory stand-in for each node's kernel IPVS table.

This kernel has no ip_vs, so the real path (`test_lab.py`, IPVS tests) skips here. This test
drives the same `LabCell` methods; only the commands' effect on the kernel is emulated: it applies
`ipvsadm --restore` lines to a table and prints `/proc/net/ip_vs` and `/proc/net/ip_vs_conn` in
the kernel's format, so a command the lab should not send, or a table it misreads, fails here.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from kpbench import control
from kpbench.backends.base import Unsupported
from kpbench.config import expand_cells, validate
from kpbench.lab import backend as lab
from kpbench.lab import netns
from kpbench.lab.netns import CLUSTER_IP
from kpbench.lab.pods import LabPod

SERVICE = f"{CLUSTER_IP}:80"


def hex_address(address: str) -> str:
    host, port = address.rsplit(":", 1)
    return f"{int(ipaddress.IPv4Address(host)):08X}:{int(port):04X}"


@dataclass
class NodeIpvs:
    """One namespace's IPVS state: services -> real servers -> [weight, active, inactive]."""

    schedulers: dict[str, str] = field(default_factory=dict)
    servers: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    connections: list[tuple[str, str, str]] = field(default_factory=list)  # client, vs, dest
    dummy: list[str] = field(default_factory=list)
    sysctls: list[str] = field(default_factory=list)

    def restore(self, text: str) -> None:
        for line in text.splitlines():
            args = line.split()
            command, service = args[0], args[2]
            assert args[1] == "-t", line
            if command == "-A":
                assert service not in self.schedulers, f"duplicate virtual server: {line}"
                self.schedulers[service], self.servers[service] = args[4], {}
                continue
            real = args[args.index("-r") + 1]
            table = self.servers[service]  # KeyError: a real server for a missing service
            if command == "-a":
                assert real not in table and args[5:] == ["-m", "-w", "1"], line
                table[real] = [1, 0, 0]
            elif command == "-e":
                assert args[5:7] == ["-m", "-w"], f"edit must keep masquerading: {line}"
                table[real][0] = int(args[7])
            elif command == "-d":
                del table[real]
            else:
                raise AssertionError(f"unexpected ipvsadm command {line}")

    def proc_ip_vs(self) -> str:
        lines = ["IP Virtual Server version 1.2.1 (size=4096)",
                 "Prot LocalAddress:Port Scheduler Flags",
                 "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn"]
        for service, scheduler in self.schedulers.items():
            lines.append(f"TCP  {hex_address(service)} {scheduler}")
            for real, (weight, active, inactive) in self.servers[service].items():
                lines.append(f"  -> {hex_address(real)}      Masq    {weight:<6} {active:<10} "
                             f"{inactive}")
        return "\n".join(lines) + "\n"

    def proc_ip_vs_conn(self) -> str:
        lines = ["Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData"]
        for client, virtual, dest in self.connections:
            c, v, d = (hex_address(a).replace(":", " ") for a in (client, virtual, dest))
            lines.append(f"TCP {c} {v} {d} ESTABLISHED     899")
        return "\n".join(lines) + "\n"


class FakeKernel:
    def __init__(self, dummy_supported: bool = True, schedulers: tuple[str, ...] = ("rr", "lc",
                                                                                   "sh")) -> None:
        self.nodes: dict[str, NodeIpvs] = {}
        self.dummy_supported = dummy_supported
        self.schedulers = schedulers

    def run(self, *args: str, input_text: str | None = None) -> str:
        if args[:3] == ("ip", "netns", "exec"):
            node, command = self.nodes.setdefault(args[3], NodeIpvs()), list(args[4:])
            if command == ["ipvsadm", "--restore"]:
                assert input_text is not None
                scheduler = input_text.split(" -s ")[1].split()[0] if " -s " in input_text else ""
                if scheduler and scheduler not in self.schedulers:
                    raise netns.LabError(
                        "ipvsadm --restore: Scheduler or persistence engine not found")
                node.restore(input_text)
                return ""
            if command[:2] == ["sysctl", "-qw"]:
                node.sysctls += command[2:]
                return ""
            if command == ["cat", "/proc/net/ip_vs"]:
                return node.proc_ip_vs()
            if command == ["cat", "/proc/net/ip_vs_conn"]:
                return node.proc_ip_vs_conn()
            if command[:3] == ["ip", "link", "add"]:
                if not self.dummy_supported:
                    raise netns.LabError("ip link add kube-ipvs0: Unknown device type.")
                node.dummy.append(command[3])
                return ""
            if command[:3] == ["ip", "addr", "add"]:
                node.dummy.append(command[3])
                return ""
        raise AssertionError(f"unexpected command {args}")


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    fake = FakeKernel()
    monkeypatch.setattr(lab.netns, "run", fake.run)
    return fake


def lab_cell(mode: str, pods: int = 3, nodes: int = 2) -> Iterator[lab.LabCell]:
    # endpoint_sync_seconds 0: every node has a change as soon as it is published
    experiment = validate({"name": "ipvs-offline", "modes": [mode], "seeds": 1,
                           "cluster": {"nodes": nodes, "endpoint_sync_seconds": 0},
                           "backend": {"replicas": pods}})
    cell = lab.LabCell(expand_cells(experiment)[0])
    try:
        for index in range(pods):
            pod = control.Pod(index, f"backend-1-{index}", 1, index % 2, 0.0, ready_at=0.0)
            process = subprocess.Popen(["true"])
            process.wait()
            cell.pods.append(LabPod(pod, f"p{index}",
                                        f"198.18.{index % nodes}.{index + 2}", process))
        yield cell
    finally:
        cell.http.shutdown()
        shutil.rmtree(cell.workdir, ignore_errors=True)


@pytest.fixture
def lc_cell() -> Iterator[lab.LabCell]:
    yield from lab_cell("ipvs-lc")


def sync_every_node(cell: lab.LabCell) -> None:
    """What the cell's loop does after an endpoint change: publish, then each node's sync."""
    cell.publish()
    for node in range(cell.cfg.cluster.nodes):
        cell.sync(node)


def test_setup_sync_and_read_back_program_every_node(kernel: FakeKernel,
                                                     lc_cell: lab.LabCell) -> None:
    lc_cell.kube_proxy.prepare()
    lc_cell.start_fanout()
    checked = lc_cell.read_back()
    assert checked["verified"] and checked["nodes_checked"] == 2
    assert checked["example_rules_node_1"][0] == f"TCP {SERVICE} lc"
    for node in kernel.nodes.values():
        if not node.schedulers:
            continue
        assert node.dummy == ["kube-ipvs0", f"{CLUSTER_IP}/32"]
        assert "net.ipv4.vs.conntrack=1" in node.sysctls
        assert sorted(node.servers[SERVICE]) == sorted(f"{p.ip}:8080" for p in lc_cell.pods)


def test_a_terminating_pod_is_quiesced_then_deleted_by_the_graceful_pass(
        kernel: FakeKernel, lc_cell: lab.LabCell) -> None:
    lc_cell.kube_proxy.prepare()
    lc_cell.start_fanout()
    leaving = lc_cell.pods[0]
    address = f"{leaving.ip}:8080"
    for node in kernel.nodes.values():
        if node.schedulers:
            node.servers[SERVICE][address][1] = 2  # two active connections
    leaving.pod.terminating_at = 5.0
    lc_cell.endpoints_changed(leaving.pod.index, added=False)
    sync_every_node(lc_cell)
    assert lc_cell.read_back()["verified"]  # weight-1 servers are exactly the serving pods
    tables = [n.servers[SERVICE] for n in kernel.nodes.values() if n.schedulers]
    assert all(t[address][0] == 0 for t in tables)
    lc_cell.kube_proxy.graceful_pass()
    assert all(address in t for t in tables)  # still holds connections
    for table in tables:
        table[address][1] = 0
    lc_cell.kube_proxy.graceful_pass()
    assert all(address not in t and len(t) == 2 for t in tables)


def test_connections_are_read_from_the_ipvs_connection_table(kernel: FakeKernel,
                                                            lc_cell: lab.LabCell) -> None:
    lc_cell.kube_proxy.prepare()
    lc_cell.start_fanout()
    node_1 = kernel.nodes[lc_cell.topology.node_ns(0)]
    pod = lc_cell.pods[1]
    node_1.connections = [("198.18.0.200:40000", SERVICE, f"{pod.ip}:8080"),
                          ("198.18.0.200:40001", "198.19.0.99:80", f"{pod.ip}:8080")]
    lc_cell.sampler.read_connections(3.0, lc_cell.names_by_ip())
    assert list(lc_cell.sampler.flows) == [(0, "198.18.0.200", 40000, pod.pod.name)]
    lc_cell.sampler.read_ipvs(3.0, lc_cell.names_by_ip())
    rows = [r for r in lc_cell.sampler.ipvs_rows if r["node"] == "node-1"]
    assert {r["pod"] for r in rows} == {p.pod.name for p in lc_cell.pods}


def test_a_missing_scheduler_or_dummy_link_makes_the_cell_unsupported(
        kernel: FakeKernel, lc_cell: lab.LabCell) -> None:
    kernel.schedulers = ("rr",)
    with pytest.raises(Unsupported, match="IPVS scheduler lc is not available"):
        lc_cell.kube_proxy.prepare()
    kernel.dummy_supported = False
    with pytest.raises(Unsupported, match="dummy link type"):
        lc_cell.kube_proxy.prepare()


def test_each_node_adds_its_real_servers_in_its_own_order(kernel: FakeKernel) -> None:
    for cell in lab_cell("ipvs-rr", pods=8, nodes=3):
        cell.kube_proxy.prepare()
        cell.start_fanout()
        orders = [list(kernel.nodes[cell.topology.node_ns(n)].servers[SERVICE])
                  for n in range(3)]
        assert all(sorted(order) == sorted(orders[0]) for order in orders)
        assert len({tuple(order) for order in orders}) > 1
