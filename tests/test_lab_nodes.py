"""Where the lab's nodes run (host or kernel VM): the pure choices and what they generate."""

from __future__ import annotations

import pytest

from kpbench.lab.backend import choose_placement
from kpbench.lab.nodes import VmTopology
from kpbench.lab.sampling import established_to, parse_conntrack

NO_IPVS = "this kernel has no IPVS loaded"
NO_QEMU = "the kernel VM needs Debian packages that are not installed: apt-get install cpio"


@pytest.mark.parametrize(("requested", "mode", "host", "vm", "expected"), [
    ("auto", "iptables", None, None, ("host", None)),
    ("auto", "iptables", None, NO_QEMU, ("host", None)),
    ("auto", "ipvs-rr", None, None, ("host", None)),  # the host kernel has IPVS: no VM
    ("auto", "ipvs-rr", NO_IPVS, None, ("vm", None)),
    ("auto", "ipvs-lc", NO_IPVS, NO_QEMU, (None, f"{NO_IPVS}; and the kernel VM cannot run: "
                                                  f"{NO_QEMU}")),
    ("host", "ipvs-sh", NO_IPVS, None, (None, f"cluster.lab_kernel is host, but {NO_IPVS}")),
    ("host", "nftables", None, None, ("host", None)),
    ("vm", "iptables", None, None, ("vm", None)),  # forced, to compare with the host
    ("vm", "nftables", None, NO_QEMU, (None, NO_QEMU)),
    ("vm", "ipvs-rr", None, None, ("vm", None)),
])
def test_placement(requested: str, mode: str, host: str | None, vm: str | None,
                   expected: tuple[str | None, str | None]) -> None:
    assert choose_placement(requested, mode, host, vm) == expected


def test_established_connections_from_the_conntrack_proc_file() -> None:
    text = "\n".join([
        "ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.0.2 dst=198.19.0.10 sport=40000 "
        "dport=80 src=198.18.1.3 dst=198.18.0.2 sport=8080 dport=40000 [ASSURED] mark=0 use=1",
        "ipv4     2 tcp      6 119 TIME_WAIT src=198.18.0.2 dst=198.19.0.10 sport=40001 "
        "dport=80 src=198.18.1.4 dst=198.18.0.2 sport=8080 dport=40001 [ASSURED] mark=0 use=1",
        "ipv4     2 tcp      6 431999 ESTABLISHED src=198.19.255.250 dst=198.18.1.3 "
        "sport=50000 dport=9102 src=198.18.1.3 dst=198.19.255.250 sport=9102 dport=50000",
        "ipv4     2 udp      17 29 src=198.18.0.2 dst=198.19.0.10 sport=5353 dport=80 "
        "src=198.18.1.3 dst=198.18.0.2 sport=80 dport=5353 ESTABLISHED",
    ])
    assert parse_conntrack(established_to(text, "198.19.0.10")) == [
        ("198.18.0.2", 40000, "198.18.1.3")]


def test_the_guest_builds_each_node_on_its_own_nic_and_routes_between_nodes() -> None:
    script = VmTopology(2, tag="abcdef").guest_script()
    assert "modprobe ip_vs" in script
    assert "grep -l 52:54:00:00:00:01 " in script and "grep -l 52:54:00:00:00:02 " in script
    assert "ip -n n1 addr add 198.18.0.1/24 dev eth1" in script
    assert "ip -n n2 addr add 198.18.1.1/24 dev eth1" in script
    assert "ip -n n1 route add 198.18.1.0/24 via 198.19.255.2" in script
    assert "ip -n n2 route add 198.18.0.0/24 via 198.19.255.1" in script
    topology = VmTopology(2, tag="abcdef")
    assert [topology.tap(n) for n in range(2)] == ["abcdeft1", "abcdeft2"]
    assert topology.vm_ns == "kpb-abcdef-vm" and topology.link_ns(1) == "kpb-abcdef-l2"


def _experiment(connections: int, rate: float, events: str = "") -> object:
    import yaml

    from kpbench.config import validate

    return validate(yaml.safe_load(f"""
name: vm-capacity
modes: [ipvs-rr, iptables]
workload: {{connections: {connections}, requests_per_second: {rate}}}
{events}
"""))


def test_preflight_refuses_what_an_emulated_guest_cannot_carry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kpbench import vm
    from kpbench.backends.base import PreflightError
    from kpbench.lab import backend

    monkeypatch.setattr(backend.LabBackend, "placement", staticmethod(
        lambda requested, mode: ("vm", None) if mode.startswith("ipvs") else ("host", None)))
    monkeypatch.setattr(vm, "default_kernel", lambda: vm.Kernel("6.1.0-test", vm.Path("/x")))
    monkeypatch.setattr(vm, "choose_accel", lambda kernel, requested="auto": "tcg")
    lab = backend.LabBackend()
    lab.check_vm_capacity(_experiment(backend.VM_TCG_MAX_CONNECTIONS, 1.0))
    with pytest.raises(PreflightError, match="asks for 5000 connections and 5000 requests/s"):
        lab.check_vm_capacity(_experiment(5000, 1.0))
    with pytest.raises(PreflightError, match="asks for 200 connections and 10000 requests/s"):
        lab.check_vm_capacity(_experiment(100, 1.0, "events: [{at: 5, action: load, "
                                                    "connections: 200, requests_per_second: 50}]"))
    monkeypatch.setattr(vm, "choose_accel", lambda kernel, requested="auto": "kvm")
    lab.check_vm_capacity(_experiment(5000, 1.0))  # KVM runs at native speed: no limit
