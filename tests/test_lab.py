"""The lab backend for real: namespaces, kernel rules, servers and Locust (root only)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from kpbench.addresses import dotted
from kpbench.backends.sim import Simulation
from kpbench.config import expand_cells, load
from kpbench.lab.backend import LabBackend
from kpbench.lab.netns import namespace_pids, run_owner, suite_namespaces
from kpbench.results import load_run

from .conftest import LAB_MARKS, REPOSITORY

pytestmark = LAB_MARKS


def suite_processes() -> list[str]:
    done = subprocess.run(["pgrep", "-af", "kpbench.(server|workload)|haproxy.*kpbench-lab"],
                          capture_output=True, text=True)
    return [line for line in done.stdout.splitlines() if "pgrep" not in line]


def leftovers() -> tuple[set[str], set[str]]:
    """Suite namespaces and processes not owned by a live run (another run may be going on)."""
    live = [n for n in suite_namespaces() if run_owner(n) is not None]
    orphaned = set(suite_namespaces()) - set(live)
    live_pids = {str(pid) for n in live for pid in namespace_pids(n)}
    stray = {line for line in suite_processes() if line.split()[0] not in live_pids}
    return orphaned, stray


@pytest.fixture(autouse=True)
def nothing_left_behind() -> object:
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    namespaces_before, processes_before = leftovers()
    yield
    deadline = time.monotonic() + 10
    while leftovers()[1] - processes_before and time.monotonic() < deadline:
        time.sleep(0.2)  # processes of a removed namespace may take a moment to exit
    namespaces_after, processes_after = leftovers()
    assert namespaces_after <= namespaces_before
    assert processes_after <= processes_before
    links_after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert len(links_after.splitlines()) == len(links_before.splitlines())


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    return path


def lab_output(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """A successful lab run's process, its output captured (not a terminal)."""
    done = subprocess.run(
        [sys.executable, "-m", "kpbench", "run", str(config), "--backend", "lab", "--out",
         str(out), "--no-report", *extra],
        capture_output=True, text=True, cwd=REPOSITORY, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def run_lab(config: Path, out: Path, *extra: str) -> Path:
    return Path(lab_output(config, out, *extra).stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_connections_match_the_clients_and_spread_uniformly(tmp_path: Path, mode: str) -> None:
    pods, connections = 6, 600
    config = write_config(tmp_path, f"""
name: lab-spread
modes: [{mode}]
seeds: 1
duration_seconds: 12
sample_seconds: 1.0
cluster: {{nodes: 2}}
backend: {{replicas: {pods}, cpu_per_request_millicores: 0}}
workload: {{clients: 3, connections: {connections}, ramp_seconds: 4}}
""")
    done = lab_output(config, tmp_path)
    # Without a terminal there is no progress bar: each measured cell gets a line instead.
    assert re.search(rf"^cell 1/1 {mode}-s1: COMPLETED after \d+ s$", done.stderr, re.M), \
        done.stderr
    run = load_run(Path(done.stdout.strip().splitlines()[-1]))
    (cell,) = run.cells
    assert cell["status"] == "COMPLETED" and cell["dataplane"]["verified"]
    last = run.samples[run.samples["t"] == run.samples["t"].max()]
    server_counts = last.set_index("pod")["active_connections"].sort_index()
    held = cell["dataplane"]["workload"]["connections"]["open_at_stop_by_pod"]
    assert server_counts.to_dict() == {pod: held.get(pod, 0) for pod in server_counts.index}
    assert server_counts.sum() == connections
    open_flows = run.connections[run.connections["close_reason"] == "end"]
    assert open_flows.groupby("pod").size().sort_index().to_dict() == server_counts.to_dict()
    # Uniform random choice: the per-pod counts are multinomial(600, 1/6).
    p_value = stats.chisquare(server_counts.to_numpy()).pvalue
    assert p_value > 0.001, server_counts.to_dict()
    # The simulator gives the client pods the addresses the lab gave them (IPVS sh and mh
    # hash them, so the model must see the same ones).
    simulated = Simulation(expand_cells(load(config))[0])
    simulated.run(lambda t: None)
    assert set(run.connections["client"]) == {dotted(a) for a in simulated.client_address}


def test_rollout_and_scale_out_produce_the_expected_pod_events(tmp_path: Path) -> None:
    config = write_config(tmp_path, """
name: lab-events
modes: [iptables]
seeds: 1
duration_seconds: 34
sample_seconds: 1.0
cluster: {nodes: 2}
backend: {replicas: 4, startup_seconds: 2, rollout: {max_surge: 1, max_unavailable: 0}}
workload: {clients: 2, connections: 40, ramp_seconds: 2}
events:
  - {at: 4, action: rollout}
  - {at: 24, action: scale, replicas: 6}
""")
    run = load_run(run_lab(config, tmp_path))
    events = run.events
    created = events[events["event"] == "pod_created"]
    assert len(created) == 4 + 4 + 2
    new = created[created["t"] > 0]["pod"].tolist()
    assert all(p.startswith("backend-2-") for p in new)
    ready = set(events[(events["event"] == "pod_ready") & (events["t"] > 0)]["pod"])
    assert ready == set(new)
    terminated = set(events[events["event"] == "pod_terminating"]["pod"])
    deleted = set(events[events["event"] == "pod_deleted"]["pod"])
    assert terminated == deleted == set(created[created["t"] == 0]["pod"])
    # maxSurge 1 / maxUnavailable 0: never more than 5 live pods during the rollout
    during = run.samples[(run.samples["t"] > 4) & (run.samples["t"] < 24)]
    live = during[~during["terminating"]].groupby("t").size()
    assert live.max() <= 5
    last = run.samples[run.samples["t"] == run.samples["t"].max()]
    assert len(last) == 6 and last["ready"].all()
    assert last["active_connections"].sum() == 40
    locust_files = {p.name for p in (run.path / "locust" / "iptables-s1").iterdir()}
    assert {"locust_stats.csv", "summary.json"} <= locust_files


def workload_running_in_run_of(owner: int) -> bool:
    for namespace in suite_namespaces():
        if run_owner(namespace) != owner:
            continue
        for pid in namespace_pids(namespace):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"kpbench.workload" in command or b"locust" in command:
                return True
    return False


def start_slow_run(tmp_path: Path) -> subprocess.Popen[str]:
    config = write_config(tmp_path, """
name: lab-slow
modes: [iptables, nftables]
seeds: 1
duration_seconds: 600
cluster: {nodes: 2}
backend: {replicas: 2}
workload: {clients: 1, connections: 10, ramp_seconds: 1}
""")
    process = subprocess.Popen(
        [sys.executable, "-m", "kpbench", "run", str(config), "--backend", "lab", "--out",
         str(tmp_path), "--no-report"],
        cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if workload_running_in_run_of(process.pid):
            time.sleep(2)
            return process
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the lab run did not start its workload")


def test_interrupted_run_leaves_nothing_and_says_interrupted(tmp_path: Path) -> None:
    process = start_slow_run(tmp_path)
    assert any(run_owner(n) == process.pid for n in suite_namespaces())
    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 130
    manifest = json.loads((Path(stdout.strip().splitlines()[-1]) / "run.json").read_text())
    assert manifest["status"] == "INTERRUPTED"


def test_clean_after_a_killed_run_removes_everything(tmp_path: Path) -> None:
    process = start_slow_run(tmp_path)
    ours = {n for n in suite_namespaces() if run_owner(n) == process.pid}
    assert ours
    process.kill()
    process.wait()
    assert ours <= set(suite_namespaces()), "a killed run leaves its namespaces for `kpbench clean`"
    done = subprocess.run([sys.executable, "-m", "kpbench", "clean"], capture_output=True,
                          text=True, cwd=REPOSITORY, timeout=60)
    assert done.returncode == 0
    assert "removed" in done.stderr
    assert not ours & set(suite_namespaces())
    deadline = time.monotonic() + 10
    while suite_processes() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_ipvs_cells_are_unsupported_on_a_kernel_without_ipvs(tmp_path: Path) -> None:
    if Path("/proc/net/ip_vs").exists():
        pytest.skip("this kernel has IPVS")
    config = write_config(tmp_path, "name: lab-ipvs\nmodes: [ipvs-rr, ipvs-sh]\nseeds: 1\n"
                                    "duration_seconds: 5\ncluster: {lab_kernel: host}\n")
    run = load_run(run_lab(config, tmp_path))
    assert {c["status"] for c in run.cells} == {"UNSUPPORTED"}
    assert all("lab_kernel is host" in c["error"] and "no IPVS" in c["error"]
               for c in run.cells)


ipvs_missing = LabBackend.placement("auto", "ipvs-rr")[1]
needs_ipvs = pytest.mark.skipif(ipvs_missing is not None,
                                reason=f"lab IPVS modes: {ipvs_missing}")
# Where the host kernel has no IPVS, these cells run their nodes in the kernel VM.
vm_if_needed = pytest.mark.vm if LabBackend.placement("auto", "ipvs-rr")[0] == "vm" else []


@needs_ipvs
@pytest.mark.parametrize("mode", [pytest.param(m, marks=vm_if_needed)
                                  for m in ("ipvs-rr", "ipvs-lc", "ipvs-sh")])
def test_ipvs_modes_spread_as_their_scheduler_does(tmp_path: Path, mode: str) -> None:
    nodes, pods, clients, connections = 2, 6, 4, 120
    config = write_config(tmp_path, f"""
name: lab-ipvs
modes: [{mode}]
seeds: 1
duration_seconds: 10
sample_seconds: 1.0
cluster: {{nodes: {nodes}}}
backend: {{replicas: {pods}, cpu_per_request_millicores: 0}}
workload: {{clients: {clients}, connections: {connections}, ramp_seconds: 3}}
""")
    run = load_run(run_lab(config, tmp_path))
    (cell,) = run.cells
    assert cell["status"] == "COMPLETED" and cell["dataplane"]["verified"], cell
    last = run.samples[run.samples["t"] == run.samples["t"].max()]
    server_counts = last.set_index("pod")["active_connections"].sort_index()
    held = cell["dataplane"]["workload"]["connections"]["open_at_stop_by_pod"]
    assert server_counts.to_dict() == {pod: held.get(pod, 0) for pod in server_counts.index}
    assert server_counts.sum() == connections
    open_flows = run.connections[run.connections["close_reason"] == "end"]
    assert len(open_flows) == connections
    by_node_pod = open_flows.groupby(["node", "pod"]).size()
    if mode in ("ipvs-rr", "ipvs-lc"):
        # no connection closes: each node's cursor / least-connection choice keeps its own
        # destinations within one of each other
        for node, counts in by_node_pod.groupby(level="node"):
            full = counts.reindex([(node, p) for p in server_counts.index], fill_value=0)
            assert full.max() - full.min() <= 1, full.to_dict()
    else:
        # sh without sh-port: every connection of a client pod lands on one backend
        assert (open_flows.groupby("client")["pod"].nunique() == 1).all()
    ipvs_csv = run.path / "locust" / f"{mode}-s1" / "ipvs.csv"
    assert ipvs_csv.exists()


@needs_ipvs
@pytest.mark.slow
@pytest.mark.parametrize("mode", [pytest.param("ipvs-rr", marks=vm_if_needed)])
def test_ipvs_rollout_quiesces_and_then_deletes_old_real_servers(tmp_path: Path,
                                                                 mode: str) -> None:
    config = write_config(tmp_path, """
name: lab-ipvs-rollout
modes: [ipvs-rr]
seeds: 1
duration_seconds: 186
sample_seconds: 2.0
cluster: {nodes: 2}
backend: {replicas: 3, startup_seconds: 2, rollout: {max_surge: 1, max_unavailable: 0}}
workload: {clients: 2, connections: 30, ramp_seconds: 2}
events:
  - {at: 4, action: rollout}
""")
    run = load_run(run_lab(config, tmp_path))
    (cell,) = run.cells
    assert cell["status"] == "COMPLETED", cell
    rows = pd.read_csv(run.path / "locust" / "ipvs-rr-s1" / "ipvs.csv")
    old = set(run.events[(run.events["event"] == "pod_created") & (run.events["t"] == 0)]["pod"])
    quiesced = rows[rows["weight"] == 0]
    assert set(quiesced["pod"]) == old  # every terminating pod, and only those, is quiesced
    # The old servers' connections closed when their pods shut down (by t=20), so at the
    # graceful passes of 60 s and 120 s they still hold inactive (TIME_WAIT, 120 s) entries
    # and stay quiesced; the pass at 180 s deletes them.
    at_130 = rows[(rows["t"] == 130) & rows["pod"].isin(old)]
    assert len(at_130) == 2 * len(old)
    assert (at_130["weight"] == 0).all() and (at_130["active_connections"] == 0).all()
    final = rows[rows["t"] == rows["t"].max()]
    assert not set(final["pod"]) & old and (final["weight"] == 1).all()
    assert final.groupby("node").size().eq(3).all()


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="workload.proxy l7 needs haproxy")
def test_l7_proxy_balances_requests_through_a_rollout(tmp_path: Path) -> None:
    config = write_config(tmp_path, """
name: lab-l7
modes: [iptables]
seeds: 1
duration_seconds: 30
sample_seconds: 1.0
cluster: {nodes: 2}
backend: {replicas: 4, startup_seconds: 2, rollout: {max_surge: 1, max_unavailable: 0}}
workload: {clients: 2, connections: 8, requests_per_second: 5, ramp_seconds: 2, proxy: l7}
events:
  - {at: 4, action: rollout}
""")
    run = load_run(run_lab(config, tmp_path))
    (cell,) = run.cells
    assert cell["status"] == "COMPLETED", cell
    assert cell["dataplane"]["verified"] and cell["dataplane"]["endpoints"] == 2
    assert cell["dataplane"]["l7_proxy"]["servers"] == 4
    # the clients' connections end at the proxy pods, as conntrack saw them
    assert set(run.connections["pod"]) == {"l7-proxy-0", "l7-proxy-1"}
    assert cell["dataplane"]["workload"]["requests"]["failed"] == 0
    # after the rollout every new pod serves its share of requests, although no client
    # reconnected: the last 10 s of requests per pod are within 20% of each other
    samples = run.samples
    end = samples[samples["t"] == samples["t"].max()].set_index("pod")["requests_total"]
    before = samples[samples["t"] == samples["t"].max() - 10].set_index("pod")["requests_total"]
    recent = (end - before.reindex(end.index, fill_value=0)).sort_index()
    new = [pod for pod in recent.index if pod.startswith("backend-2-")]
    assert len(new) == 4 and recent[new].min() >= 0.8 * recent[new].max(), recent.to_dict()


def test_refusals_reach_a_client_only_as_the_kernels_icmp_rate_limit_allows() -> None:
    """`dataplane.IcmpRateLimit` against this host's kernel: kube-proxy's REJECT of a Service
    without endpoints answers one client's connects with ICMP port unreachable at most as the
    per-address token bucket allows (6 at once, then 1/s); the other SYNs are dropped silently."""
    import errno
    import socket

    from kpbench.dataplane import IcmpRateLimit
    from kpbench.lab import rules
    from kpbench.lab.kube_proxy import KubeProxy
    from kpbench.lab.netns import CLUSTER_IP, Topology, entered, run
    from kpbench.lab.nodes import HostNodes

    topology = Topology(1)
    try:
        topology.create()
        client_ns, client_ip = topology.add_pod("icmp-client", 0)
        # The ClusterIP is forwarded (as in a cluster, where the node has a default route), so
        # the filter table's FORWARD jump reaches the REJECT.
        run("ip", "-n", topology.node_ns(0), "route", "add", "198.19.0.0/24", "dev", "eth0")
        service = rules.Service("kpbench", "backend", "http", CLUSTER_IP, 80)
        KubeProxy("iptables", service, HostNodes(topology), 1).write(0, [])
        outcomes: list[tuple[float, bool]] = []  # (seconds since the first connect, refused)
        with entered(client_ns):
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < 3.0:
                with socket.socket() as sock:
                    sock.settimeout(0.1)  # an ICMP answer arrives within milliseconds here
                    code = sock.connect_ex((CLUSTER_IP, 80))
                assert code in (errno.ECONNREFUSED, errno.EAGAIN, errno.ETIMEDOUT), code
                outcomes.append((elapsed, code == errno.ECONNREFUSED))
    finally:
        topology.destroy()
    limit = IcmpRateLimit()
    address = int.from_bytes(socket.inet_aton(client_ip), "big")
    modelled = [limit.allow(address, t) for t, _ in outcomes]
    measured = [refused for _, refused in outcomes]
    assert measured[:6] == [True] * 6 and not measured[6]
    assert len(outcomes) > 20
    # Timing at the bucket's boundaries (jiffies, the 0.1 s attempts) may move one answer.
    assert abs(sum(measured) - sum(modelled)) <= 1, (sum(measured), sum(modelled), outcomes)
