"""`lab`: real kernel data planes in network namespaces, real servers, real Locust.

What is real: the kernel's iptables / nftables rules or IPVS virtual servers (kube-proxy's
structure, rewritten by each node's sync loop of `kpbench.control`; the nodes on the host's
kernel, or in the kernel VM's where the host lacks a feature, see `kpbench.lab.nodes`),
conntrack (existing connections keep their entries), TCP, the backend server processes and
Locust. What is modelled: the control plane
(Deployment rollout, ReplicaSet choice, HPA) is kpbench's own `kpbench.control`, driven in real
time, fed with each server process's measured CPU.

Per cell: build the topology, start the initial pods and wait until they are ready (they count as
ready at t = 0), write the rules, start Locust (a master in the control namespace, one worker per
client pod), then run the timeline in real time. Every `sample_seconds` each backend pod's
`/metrics` is scraped (from a thread inside the control namespace) and each node's conntrack
table is read for the service's established connections (for IPVS modes `/proc/net/ip_vs_conn`),
which gives `connections.parquet` at sample resolution (`close_reason` is unknown to the kernel
and left empty, except `end`).

With `workload.proxy: l7` the Service's endpoints are L7 proxy pods running HAProxy
(`kpbench.lab.l7`), which send every request to one of the ready backend pods.

IPVS modes follow `kpbench.ipvs`: per node the ClusterIP on the dummy device `kube-ipvs0`, one
virtual server with the mode's scheduler, real servers added, quiesced and deleted as kube-proxy's
graceful termination does. kube-proxy's IPVS-mode iptables/ipset rules (hairpin masquerade,
ClusterIP filtering) are not written: no lab client is a backend pod, so no packet would match.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kpbench import control, ipvs, schedule, vm
from kpbench.backends.base import CellResult, PreflightError, Progress, Unsupported
from kpbench.config import L7_PROXY_REPLICAS, ROOT_SEED, Cell, Experiment, expand_cells
from kpbench.lab import l7, netns, rules
from kpbench.lab.netns import CLUSTER_IP, CONTROL_IP, Topology
from kpbench.lab.nodes import HostNodes, NodePlane, VmNodes, VmTopology
from kpbench.schedule import Kind

HTTP_PORT, GRPC_PORT, ADMIN_PORT, SERVICE_HTTP_PORT = 8080, 9090, 9102, 80
LOCUST_MASTER_PORT = 5557
LOCUST_RUN_TIME_MARGIN_SECONDS = 600  # Locust is stopped by SIGTERM when the cell ends
READY_POLL_SECONDS = 0.2
STARTUP_TIMEOUT_SECONDS = 60.0
L7_SLOTS = 256  # backend pods an L7 proxy can hold at once
VM_MEMORY_MIB = 512  # the guest runs only the nodes' kernel and a small agent
# What the nodes in a TCG guest carried here with under 1% failed connects (`nox -s bench --
# --only vm-lab`, 2 cores); KVM has no such limit.
VM_TCG_MAX_CONNECTIONS = 1000
VM_TCG_MAX_REQUESTS_PER_SECOND = 1000
TOOLS = ("ip", "iptables-restore", "iptables-save", "nft", "conntrack", "sysctl")


def peak_connections(cfg: Experiment) -> int:
    """The most connections a cell's workload holds at once (its `load` events included)."""
    steps = [e.connections for e in cfg.events if e.action == "load" and e.connections]
    return max([cfg.workload.connections, *steps])


def peak_request_rate(cfg: Experiment) -> float:
    """An upper bound of a cell's requests per second: peak connections x peak rate."""
    rates = [e.requests_per_second for e in cfg.events
             if e.action == "load" and e.requests_per_second]
    return peak_connections(cfg) * max([cfg.workload.requests_per_second, *rates])


def needs_kernel_feature(mode: str) -> bool:
    return mode.startswith("ipvs-")


def choose_placement(requested: str, mode: str, host_problem: str | None,
                     vm_problem: str | None) -> tuple[str | None, str | None]:
    """Where a cell's nodes run: (`host` or `vm`, None), or (None, why neither can).

    `auto` takes the host unless the mode needs a feature the host lacks (`host_problem`,
    e.g. no IPVS), then the kernel VM. Pure: the problems are found by the caller."""
    if requested == "host" or (requested == "auto" and not needs_kernel_feature(mode)):
        if needs_kernel_feature(mode) and host_problem:
            return None, f"cluster.lab_kernel is host, but {host_problem}"
        return "host", None
    if requested == "auto" and host_problem is None:
        return "host", None
    if vm_problem is not None:
        prefix = "" if requested == "vm" else f"{host_problem}; and the kernel VM cannot run: "
        return None, prefix + vm_problem
    return "vm", None


def ipvs_unavailable() -> str | None:
    """Why this host cannot run the lab's IPVS modes, or None."""
    if not Path("/proc/net/ip_vs").exists():
        return ("this kernel has no IPVS loaded (/proc/net/ip_vs is absent); the lab does not "
                "load kernel modules itself: `modprobe ip_vs` first where the kernel has it")
    if shutil.which("ipvsadm") is None:
        return "ipvsadm is not installed (apt-get install ipvsadm)"
    return None


class LabBackend:
    name = "lab"
    measured = True

    def preflight(self, experiment: Experiment) -> None:
        if os.geteuid() != 0:
            raise PreflightError("--backend lab: needs root (CAP_NET_ADMIN) for network namespaces")
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            raise PreflightError(
                f"--backend lab: missing {', '.join(missing)} "
                "(apt-get install iproute2 iptables nftables conntrack procps ipvsadm)"
            )
        in_use = netns.range_in_use()
        if in_use:
            raise PreflightError(
                "--backend lab: 198.18.0.0/15 is already in use on this host (" + in_use[0]
                + (f", and {len(in_use) - 1} more" if len(in_use) > 1 else "")
                + "); the lab needs it free"
            )
        if experiment.cluster.nodes > 200:
            raise PreflightError("--backend lab: cluster.nodes must be <= 200 in the lab")
        self.check_vm_capacity(experiment)
        if experiment.workload.proxy == "l7" and shutil.which("haproxy") is None:
            raise PreflightError("--backend lab: workload.proxy l7 needs haproxy "
                                 "(apt-get install haproxy)")

    def check_vm_capacity(self, experiment: Experiment) -> None:
        """Refuse what the nodes in an emulated (TCG) kernel VM cannot carry here."""
        cells = [c for c in expand_cells(experiment)
                 if self.placement(c.config.cluster.lab_kernel, c.mode)[0] == "vm"]
        if not cells or vm.choose_accel(vm.default_kernel()) != "tcg":
            return
        rate = max(peak_request_rate(c.config) for c in cells)
        connections = max(peak_connections(c.config) for c in cells)
        if rate > VM_TCG_MAX_REQUESTS_PER_SECOND or connections > VM_TCG_MAX_CONNECTIONS:
            raise PreflightError(
                f"--backend lab: cells with their nodes in the emulated kernel VM (TCG) carry at "
                f"most {VM_TCG_MAX_CONNECTIONS} connections and {VM_TCG_MAX_REQUESTS_PER_SECOND} "
                f"requests/s here (measured by `nox -s bench -- --only vm-lab`); this "
                f"experiment asks for {connections} connections and {rate:g} requests/s")

    def attach(self, run_dir: Path) -> None:
        return None

    def unsupported_reason(self, mode: str) -> str | None:
        return self.placement("auto", mode)[1]

    @staticmethod
    def placement(requested: str, mode: str) -> tuple[str | None, str | None]:
        host_problem = ipvs_unavailable() if needs_kernel_feature(mode) else None
        vm_problem = vm.preflight() if requested == "vm" or host_problem else None
        return choose_placement(requested, mode, host_problem, vm_problem)

    def versions(self) -> dict[str, Any]:
        def first_line(*command: str) -> str | None:
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=10)
            except OSError:
                return None
            return (done.stdout or done.stderr).strip().splitlines()[0] if done.stdout else None

        from kpbench.results import package_version

        return {
            "locust": package_version("locust"),
            "aiohttp": package_version("aiohttp"),
            "grpcio": package_version("grpcio"),
            "iptables": first_line("iptables", "--version"),
            "nft": first_line("nft", "--version"),
            "haproxy": first_line("haproxy", "-v") if shutil.which("haproxy") else None,
            "iproute2": first_line("ip", "-V"),
        }

    def run_cell(self, cell: Cell, progress: Progress) -> CellResult:
        placement, reason = self.placement(cell.config.cluster.lab_kernel, cell.mode)
        if placement is None:
            raise Unsupported(str(reason))
        return LabCell(cell, placement).run(progress)

    def close(self) -> None:
        return None


@dataclass
class LabPod:
    pod: control.Pod
    namespace: str
    ip: str
    process: subprocess.Popen[bytes] | None = None  # started `startup_seconds` after creation
    probe_phase: float = 0.0
    cpu: tuple[float, float] | None = None  # (t, process CPU seconds) at the last scrape
    cpu_millicores: float | None = None
    exited: bool = False


@dataclass
class LabProxy:
    name: str
    ip: str
    runtime_socket: Path
    process: subprocess.Popen[bytes]
    log: Any  # the open log file, closed at teardown


@dataclass
class Scrape:
    active: int = 0
    connections: int = 0
    requests: int = 0
    cpu_seconds: float | None = None


def parse_metrics(text: str) -> Scrape:
    scrape = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kpbench_active_connections":
                scrape.active += int(sample.value)
            elif sample.name == "kpbench_connections_total":
                scrape.connections += int(sample.value)
            elif sample.name == "kpbench_requests_total":
                scrape.requests += int(sample.value)
            elif sample.name == "process_cpu_seconds_total":
                scrape.cpu_seconds = float(sample.value)
    return scrape


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (what its container's cgroup accounts), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_conntrack(text: str) -> list[tuple[str, int, str]]:
    """(client ip, client port, pod ip) of each established connection to the ClusterIP."""
    flows = []
    for line in text.splitlines():
        sources = [p[4:] for p in line.split() if p.startswith("src=")]
        ports = [p[6:] for p in line.split() if p.startswith("sport=")]
        if len(sources) >= 2 and ports:
            flows.append((sources[0], int(ports[0]), sources[1]))
    return flows


def established_to(text: str, address: str) -> str:
    """The lines of `/proc/net/nf_conntrack` for established TCP connections to `address`
    (what `conntrack -L -p tcp --orig-dst ADDRESS --state ESTABLISHED` prints)."""
    return "\n".join(
        line for line in text.splitlines()
        if " tcp " in f" {line} " and " ESTABLISHED " in line
        and next((p[4:] for p in line.split() if p.startswith("dst=")), None) == address)


class LabCell:
    """One cell in real time."""

    def __init__(self, cell: Cell, placement: str = "host",
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.cell = cell
        self.clock = clock  # the cell's clock and the loop's sleep (injected in tests)
        self.sleep = sleep
        self.cfg = cell.config
        self.kernel_placement = placement
        self.session: vm.Session | None = None
        streams = np.random.SeedSequence([ROOT_SEED, cell.seed]).spawn(2)
        self.rng_control = random.Random(int(streams[1].generate_state(1)[0]))
        self.rng_kubelet = control.stream(cell.seed, control.STREAM_KUBELET)
        self.rng_ipvs_order = [control.stream(cell.seed, control.STREAM_IPVS_ORDER, node)
                               for node in range(self.cfg.cluster.nodes)]
        self.fanout: control.EndpointFanout | None = None
        backend = self.cfg.backend
        self.placement = control.Placement(
            self.cfg.cluster.nodes,
            control.NodeResources(backend.cpu_request_millicores, control.MEMORY_REQUEST_MIB),
            control.NodeResources(self.cfg.cluster.node_cpu_millicores,
                                  self.cfg.cluster.node_memory_mib),
        )
        self.topology = (VmTopology if placement == "vm" else Topology)(self.cfg.cluster.nodes)
        self.nodes: NodePlane = HostNodes(self.topology)
        self.service = rules.Service(
            "kpbench", "backend", self.cfg.workload.protocol, CLUSTER_IP,
            SERVICE_HTTP_PORT if self.cfg.workload.protocol == "http" else GRPC_PORT,
        )
        self.target_port = HTTP_PORT if self.cfg.workload.protocol == "http" else GRPC_PORT
        self.service_address = f"{CLUSTER_IP}:{self.service.port}"
        self.scheduler = ipvs.scheduler_of(cell.mode) if cell.mode.startswith("ipvs-") else None
        self.ipvs_rows: list[dict[str, Any]] = []
        self.proxies: list[LabProxy] = []
        self.proxy_slots = l7.Slots(L7_SLOTS)
        self.surge, self.unavailable = self.cfg.backend.rollout.resolve(self.cfg.backend.replicas)
        self.replicas = self.cfg.backend.replicas
        self.revision = 1
        self.pods: list[LabPod] = []
        self.queue = schedule.EventQueue()
        self.t0 = 0.0
        self.event_rows: list[tuple[float, str, str, str]] = []
        self.sample_rows: list[dict[str, Any]] = []
        self.flows: dict[tuple[int, str, int, str], list[float]] = {}
        self.reconcile_pending = False
        self.sample_lateness: list[float] = []
        self.sync_durations: list[float] = []  # writing every node's rules, per endpoint sync
        self.unanswered: dict[str, float] = {}  # pod -> first sample its /metrics missed
        self.workdir = netns.make_workdir(self.topology.tag)
        self.locust: list[subprocess.Popen[bytes]] = []
        self.clients: list[tuple[str, str, int]] = []
        hpa = self.cfg.backend.hpa
        self.autoscaler = control.autoscaler(hpa) if hpa else None
        self.metrics_server = control.MetricsServer(hpa.metric_resolution_seconds) if hpa else None
        self.scraper = ThreadPoolExecutor(
            max_workers=16, initializer=netns.enter_permanently,
            initargs=(self.topology.control_ns,),
        )

    # -- clock and queue -----------------------------------------------------------------------

    def now(self) -> float:
        return self.clock() - self.t0

    def at(self, t: float, kind: Kind, arg: int = 0) -> None:
        self.queue.at(t, kind, arg)

    def record(self, event: str, pod: LabPod | None = None, **detail: Any) -> None:
        self.event_rows.append((round(self.now(), 3), event, pod.pod.name if pod else "",
                                json.dumps(detail, sort_keys=True) if detail else ""))

    # -- pods ----------------------------------------------------------------------------------

    def create_pod(self, start_now: bool = False) -> LabPod:
        """A pod on the scheduler's node; its server starts `startup_seconds` later (the
        container's creation and start), probed from its own phase (kpbench.control)."""
        index = len(self.pods)
        node = self.placement.place(self.revision, self.rng_control)
        name = f"backend-{self.revision}-{index:05d}"
        namespace, ip = self.topology.add_pod(f"p{index}", node)
        pod = control.Pod(index, name, self.revision, node, max(self.now(), 0.0),
                          uid=self.rng_kubelet.getrandbits(63))
        lab_pod = LabPod(pod, namespace, ip, probe_phase=self.rng_kubelet.uniform(
            0.0, self.cfg.backend.readiness_period_seconds))
        self.pods.append(lab_pod)
        self.record("pod_created", lab_pod, node=f"node-{node + 1}", revision=self.revision,
                    ip=ip)
        if start_now:
            self.start_server(lab_pod)
        else:
            self.at(pod.created_at + self.cfg.backend.startup_seconds, Kind.START, index)
        return lab_pod

    def start_server(self, lab_pod: LabPod) -> None:
        """The container starts: the server process, probed every readiness period from then."""
        pod, backend = lab_pod.pod, self.cfg.backend
        if not pod.live:
            return
        name, node, ip, namespace = pod.name, pod.node, lab_pod.ip, lab_pod.namespace
        command = [
            sys.executable, "-m", "kpbench.server", "--pod-name", name,
            "--node-name", f"node-{node + 1}", "--host", ip, "--port", str(HTTP_PORT),
            "--grpc-port", str(GRPC_PORT) if self.cfg.workload.protocol == "grpc" else "0",
            "--admin-port", str(ADMIN_PORT),
            "--cpu-per-request-millicores", str(backend.cpu_per_request_millicores),
            "--shutdown-drain-seconds", str(min(1.0, backend.termination_grace_seconds)),
        ]
        if backend.max_connection_age_seconds is not None:
            command += ["--max-connection-age-seconds", str(backend.max_connection_age_seconds)]
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        lab_pod.process = subprocess.Popen(netns.ns_exec(namespace, command), stdout=log,
                                           stderr=subprocess.STDOUT)
        pod.started_at = self.now()
        self.at(pod.started_at + lab_pod.probe_phase, Kind.READY, pod.index)

    def log_tail(self, pod: LabPod) -> str:
        path = self.workdir / f"{pod.pod.name}.log"
        return path.read_text(errors="replace")[-300:] if path.exists() else ""

    def readyz(self, pod: LabPod) -> bool:
        return self.fetch(f"http://{pod.ip}:{ADMIN_PORT}/readyz") is not None

    def fetch(self, url: str) -> str | None:
        """GET from inside the lab (a pool thread in the control namespace); None on failure."""
        return self.scraper.submit(self._get, url).result()

    def scrape_all(self, pods: list[LabPod]) -> list[str | None]:
        """Every pod's /metrics, concurrently, from inside the lab."""
        urls = [f"http://{p.ip}:{ADMIN_PORT}/metrics" for p in pods]
        return list(self.scraper.map(self._get, urls))

    def check_ready(self, index: int, planned: float) -> None:
        """The kubelet's readiness probe, every `readiness_period_seconds` from the pod's phase."""
        pod = self.pods[index]
        if not pod.pod.live or pod.process is None:
            return
        if pod.process.poll() is not None:
            raise RuntimeError(f"{pod.pod.name} exited with {pod.process.returncode} at start: "
                               f"{self.log_tail(pod)}")
        if self.now() - pod.pod.created_at > STARTUP_TIMEOUT_SECONDS:
            raise RuntimeError(f"{pod.pod.name} not ready after {STARTUP_TIMEOUT_SECONDS:g} s")
        if not self.readyz(pod):
            self.at(planned + self.cfg.backend.readiness_period_seconds, Kind.READY, index)
            return
        pod.pod.ready_at = self.now()
        self.record("pod_ready", pod)
        self.endpoints_changed(index, added=True)
        self.request_reconcile()

    def request_reconcile(self) -> None:
        """As the simulator: the Deployment controller syncs after its watch delay."""
        if not self.reconcile_pending:
            self.reconcile_pending = True
            self.at(self.now() + control.controller_delay(self.rng_control,
                                                          self.cfg.cluster.propagation),
                    Kind.RECONCILE)

    def terminate(self, pod: LabPod, killed: bool = False) -> None:
        was_ready = pod.pod.ready
        pod.pod.terminating_at = self.now()
        self.placement.terminating(pod.pod)
        if pod.process is not None:
            pod.process.send_signal(signal.SIGKILL if killed else signal.SIGTERM)
        self.record("pod_killed" if killed else "pod_terminating", pod)
        self.at(self.now() + READY_POLL_SECONDS, Kind.EXITED, pod.pod.index)
        if was_ready:
            self.endpoints_changed(pod.pod.index, added=False)

    def check_exited(self, index: int) -> None:
        pod = self.pods[index]
        assert pod.pod.terminating_at is not None
        if pod.process is not None and pod.process.poll() is None:
            grace = self.cfg.backend.termination_grace_seconds
            if self.now() - pod.pod.terminating_at > grace:
                pod.process.kill()
            self.at(self.now() + READY_POLL_SECONDS, Kind.EXITED, index)
            return
        pod.exited = True
        pod.pod.deleted_at = self.now()
        self.placement.deleted(pod.pod)
        self.record("pod_deleted", pod)
        self.topology.remove_namespace(pod.namespace)

    def reconcile(self) -> None:
        self.reconcile_pending = False
        while True:
            plan = control.reconcile([p.pod for p in self.pods if not p.exited], self.replicas,
                                     self.revision, self.surge, self.unavailable, self.now())
            if not plan:
                return
            for pod in plan.delete:
                self.terminate(self.pods[pod.index])
            for _ in range(plan.create):
                self.create_pod()

    # -- data plane ----------------------------------------------------------------------------

    def endpoints_changed(self, index: int, added: bool) -> None:
        """As the simulator: one version per instant, then per node through kube-proxy's sync
        loop (kpbench.control.EndpointFanout)."""
        if self.fanout is not None and self.fanout.change(index, added):
            self.at(self.now(), Kind.PUBLISH)

    def endpoints(self, pods: Iterable[int]) -> list[rules.Endpoint]:
        return sorted((rules.Endpoint(self.pods[i].ip, self.target_port) for i in pods),
                      key=lambda e: tuple(int(x) for x in e.ip.split(".")))

    def serving(self) -> list[rules.Endpoint]:
        return self.endpoints(p.pod.index for p in self.pods if p.pod.ready)

    def start_fanout(self) -> None:
        """Every node's rules (or the proxies' servers) hold the ready pods; then the fanout."""
        cluster = self.cfg.cluster
        ready = [p.pod.index for p in self.pods if p.pod.ready]
        self.fanout = control.EndpointFanout(
            1 if self.proxies else cluster.nodes, ready,
            control.min_sync_seconds(self.cell.mode, cluster.kube_proxy.min_sync_seconds),
            control.generator(self.cell.seed, control.STREAM_KUBE_PROXY), cluster.propagation,
            lambda endpoints: 0.0,  # a lab sync takes its real time
        )
        view = frozenset(ready)
        for consumer in range(self.fanout.consumers):
            self.apply(consumer, control.NodeSync(0.0, view, view, None))
        if self.proxies:  # the Service's endpoints are the proxy pods, for the whole cell
            for node in range(cluster.nodes):
                self.write_rules(node, self.dataplane_endpoints())

    def publish(self) -> None:
        assert self.fanout is not None
        for consumer, t in self.fanout.publish(self.now()):
            self.at(t, Kind.UPDATE, consumer)

    def update(self, consumer: int) -> None:
        assert self.fanout is not None
        start = self.fanout.update(consumer, self.now())
        if start is not None:
            self.at(start, Kind.SYNC, consumer)

    def sync(self, consumer: int) -> None:
        assert self.fanout is not None
        decided = self.fanout.sync(consumer, self.now())
        self.apply(consumer, decided)
        self.fanout.runners[consumer].run(self.now())  # completed after its real duration
        if decided.next_update is not None:
            self.at(decided.next_update, Kind.UPDATE, consumer)

    def apply(self, consumer: int, decided: control.NodeSync) -> None:
        """Write one node's rules for `decided.view` (or, behind the L7 proxies, their servers)."""
        started = time.monotonic()
        try:
            self._apply(consumer, decided)
        finally:
            self.sync_durations.append(time.monotonic() - started)

    def _apply(self, consumer: int, decided: control.NodeSync) -> None:
        if self.proxies:
            self.sync_proxies(self.endpoints(decided.view))
            return
        if self.scheduler is not None:
            order = control.ipvs_insertion_order(decided.view, decided.new,
                                                 self.rng_ipvs_order[consumer])
            self.write_rules(consumer, [e for i in order for e in self.endpoints([i])])
        else:
            self.write_rules(consumer, self.endpoints(decided.view))

    def write_rules(self, node: int, endpoints: list[rules.Endpoint]) -> None:
        """The node's rules for `endpoints`; IPVS adds the new ones in the list's order."""
        if self.scheduler is not None:
            current = self.ipvs_service(node)
            self.ipvsadm(node, ipvs.sync_commands(
                self.service_address, current.real_servers if current else [],
                [str(e) for e in endpoints]))
        elif self.cell.mode == "iptables":
            self.nodes.run(node, ["iptables-restore"],
                           rules.iptables_restore(self.service, endpoints))
        else:
            self.nodes.run(node, ["nft", "-f", "-"], rules.nft_ruleset(self.service, endpoints))

    def dataplane_endpoints(self) -> list[rules.Endpoint]:
        """What the Service's rules balance over: the backend pods, or the L7 proxy pods."""
        if self.proxies:
            return [rules.Endpoint(proxy.ip, self.target_port) for proxy in self.proxies]
        return self.serving()

    def names_by_ip(self) -> dict[str, str]:
        return {p.ip: p.pod.name for p in self.pods} | {x.ip: x.name for x in self.proxies}

    # -- L7 proxy ------------------------------------------------------------------------------

    def start_proxies(self) -> None:
        """The L7 proxy pods: HAProxy, its server slots empty until the first sync."""
        for index in range(L7_PROXY_REPLICAS):
            name, node = f"l7-proxy-{index}", index % self.cfg.cluster.nodes
            namespace, ip = self.topology.add_pod(f"x{index}", node)
            config = self.workdir / f"{name}.cfg"
            runtime_socket = self.workdir / f"{name}.sock"
            config.write_text(l7.haproxy_config(self.cfg.workload.protocol, self.target_port,
                                                self.target_port, L7_SLOTS, runtime_socket))
            log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
            process = subprocess.Popen(netns.ns_exec(namespace, ["haproxy", "-db", "-f",
                                                                 str(config)]),
                                       stdout=log, stderr=subprocess.STDOUT)
            self.proxies.append(LabProxy(name, ip, runtime_socket, process, log))
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        for proxy in self.proxies:
            while True:
                if proxy.process.poll() is not None:
                    tail = (self.workdir / f"{proxy.name}.log").read_text(errors="replace")
                    raise RuntimeError(f"{proxy.name} (haproxy) exited at start: {tail[-300:]}")
                with contextlib.suppress(OSError):
                    if "Name: HAProxy" in l7.runtime(proxy.runtime_socket, "show info"):
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{proxy.name} (haproxy) not answering after "
                                       f"{STARTUP_TIMEOUT_SECONDS:g} s")
                time.sleep(0.05)

    def sync_proxies(self, endpoints: list[rules.Endpoint]) -> None:
        commands = self.proxy_slots.update([str(e) for e in endpoints])
        for proxy in self.proxies:
            for command in commands:
                l7.runtime(proxy.runtime_socket, command)
        if commands:  # HAProxy answers errors in words: check the state it reports instead
            self.proxy_read_back(endpoints)

    def proxy_read_back(self, endpoints: list[rules.Endpoint]) -> dict[str, Any]:
        """Check every proxy's servers in service are `endpoints`."""
        expected = sorted(str(e) for e in endpoints)
        for proxy in self.proxies:
            state = l7.runtime(proxy.runtime_socket, f"show servers state {l7.BACKEND}")
            enabled = sorted(l7.enabled_servers(state))
            if enabled != expected:
                raise RuntimeError(f"{proxy.name}: servers in service {enabled}, "
                                   f"expected {expected}")
        return {"l7_proxy": {"software": "haproxy", "replicas": len(self.proxies),
                             "balance": "roundrobin per request", "servers": len(expected)}}

    # -- IPVS ----------------------------------------------------------------------------------

    def prepare_ipvs(self) -> None:
        """What kube-proxy's IPVS proxier sets up once per node: sysctls, kube-ipvs0, the service.

        A kernel without the dummy link type or the scheduler's module makes the cell
        UNSUPPORTED with the kernel's words.
        """
        assert self.scheduler is not None
        for node in range(self.cfg.cluster.nodes):
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

    def ipvsadm(self, node: int, commands: list[str]) -> None:
        if commands:
            self.nodes.run(node, ["ipvsadm", "--restore"], "\n".join(commands) + "\n")

    def ip_vs_text(self, node: int, table: str = "ip_vs") -> str:
        return self.nodes.read(node, f"/proc/net/{table}")

    def ipvs_service(self, node: int) -> ipvs.VirtualService | None:
        return ipvs.find_service(ipvs.parse_ip_vs(self.ip_vs_text(node)),
                                 self.service_address)

    def ipvs_graceful_pass(self) -> None:
        """kube-proxy's graceful termination manager: drop quiesced servers without connections."""
        for node in range(self.cfg.cluster.nodes):
            current = self.ipvs_service(node)
            if current is not None:
                self.ipvsadm(node, ipvs.graceful_deletions(self.service_address,
                                                           current.real_servers))

    def read_back(self) -> dict[str, Any]:
        """Read every node's rules back from the kernel and check them against the mode."""
        n = len(self.dataplane_endpoints())
        checked = []
        example: list[str] = []
        for node in range(self.cfg.cluster.nodes):
            if self.scheduler is not None:
                service = self.ipvs_service(node)
                weighted = sorted(rs.address for rs in service.real_servers
                                  if rs.weight > 0) if service else []
                ok = (service is not None and service.scheduler == self.scheduler
                      and weighted == sorted(str(e) for e in self.dataplane_endpoints()))
                seen = [] if service is None else [
                    f"{service.protocol} {service.address} {service.scheduler} {service.flags}"
                    .strip(),
                    *(f"-> {rs.address} {rs.forward} weight {rs.weight}"
                      for rs in service.real_servers)]
            elif self.cell.mode == "iptables":
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
            checked.append(ok)
            if node == 0:
                example = seen[:8]
            if not ok:
                raise RuntimeError(f"node-{node + 1}: the {self.cell.mode} rules read back do "
                                   f"not match {n} endpoints: {seen[:3]}")
        proxy = self.proxy_read_back(self.serving()) if self.proxies else {}
        return {"mode": self.cell.mode, "verified": all(checked), "endpoints": n,
                "kernel": self.nodes.describe(),
                "nodes_checked": len(checked), "example_rules_node_1": example,
                "source": "read back from each node's kernel "
                          "(iptables-save / nft list / /proc/net/ip_vs)", **proxy}

    # -- workload ------------------------------------------------------------------------------

    def start_clients(self) -> None:
        workload = self.cfg.workload
        for client in range(workload.clients):
            node = self.cfg.client_node(client)
            namespace, ip = self.topology.add_pod(f"c{client}", node)
            self.clients.append((namespace, ip, node))
        config = self.workdir / "experiment.yaml"
        config.write_text(yaml.safe_dump(self.cfg.model_dump(mode="json")))
        host = (f"http://{CLUSTER_IP}:{SERVICE_HTTP_PORT}" if workload.protocol == "http"
                else f"{CLUSTER_IP}:{GRPC_PORT}")
        base = [sys.executable, "-m", "kpbench.workload", "--config", str(config),
                "--run-time", str(self.cfg.duration_seconds + LOCUST_RUN_TIME_MARGIN_SECONDS)]
        master = [
            *base, "--host", host, "--master", "--expect-workers", str(workload.clients),
            "--master-bind-port", str(LOCUST_MASTER_PORT),
            "--csv", str(self.workdir / "locust" / "locust"),
            "--summary", str(self.workdir / "summary.json"),
        ]
        (self.workdir / "locust").mkdir()
        log = open(self.workdir / "locust-master.log", "wb")  # noqa: SIM115
        self.locust.append(subprocess.Popen(netns.ns_exec(self.topology.control_ns, master),
                                            stdout=log, stderr=subprocess.STDOUT))
        for index, (namespace, _, _) in enumerate(self.clients):
            worker = [*base, "--worker", "--master-host", CONTROL_IP,
                      "--master-port", str(LOCUST_MASTER_PORT)]
            log = open(self.workdir / f"locust-worker-{index}.log", "wb")  # noqa: SIM115
            self.locust.append(subprocess.Popen(netns.ns_exec(namespace, worker), stdout=log,
                                                stderr=subprocess.STDOUT))

    def wait_for_first_connection(self, pods: list[LabPod]) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in self.locust):
                logs = sorted(self.workdir.glob("locust-*.log"))
                tail = logs[0].read_text()[-400:] if logs else ""
                raise RuntimeError(f"Locust exited before the run started: {tail}")
            texts = self.scrape_all(pods)
            if any(parse_metrics(t).connections > 0 for t in texts if t):
                return
            time.sleep(0.05)
        raise RuntimeError(f"no connection reached a pod within {STARTUP_TIMEOUT_SECONDS:g} s")

    def stop_clients(self) -> dict[str, Any]:
        """SIGTERM the master first (it writes the summary and stops its workers), then the rest."""
        master = self.locust[0] if self.locust else None
        if master is not None and master.poll() is None:
            master.send_signal(signal.SIGTERM)
            try:
                master.wait(timeout=20)
            except subprocess.TimeoutExpired:
                master.kill()
        for process in self.locust:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.locust:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        summary_path = self.workdir / "summary.json"
        if master is not None and summary_path.exists():
            return dict(json.loads(summary_path.read_text()))
        return {}

    # -- sampling ------------------------------------------------------------------------------

    def check_alive(self) -> None:
        """A server, proxy or Locust process that exited on its own fails the cell: its pod
        would otherwise vanish from the samples and read as balance."""
        for pod in self.pods:
            if (pod.pod.terminating_at is None and pod.process is not None
                    and pod.process.poll() is not None):
                raise RuntimeError(f"{pod.pod.name} (backend server) died mid-cell at "
                                   f"t={self.now():.1f} s with exit code "
                                   f"{pod.process.returncode}: {self.log_tail(pod)[-200:]}")
        for proxy in self.proxies:
            if proxy.process.poll() is not None:
                raise RuntimeError(f"{proxy.name} (haproxy) died mid-cell at t={self.now():.1f} "
                                   f"s with exit code {proxy.process.returncode}")
        for index, process in enumerate(self.locust):
            if process.poll() is not None:
                who, log = (("the Locust master", "locust-master.log") if index == 0 else
                            (f"Locust worker {index - 1}", f"locust-worker-{index - 1}.log"))
                path = self.workdir / log
                tail = path.read_text(errors="replace")[-200:] if path.exists() else ""
                raise RuntimeError(f"{who} died mid-cell at t={self.now():.1f} s with exit code "
                                   f"{process.returncode}: {' '.join(tail.split())}")

    def check_silent(self) -> None:
        """A ready pod whose /metrics stopped answering and never answered again, while it was
        neither terminating nor gone, fails the cell."""
        silent = [p for p in self.pods if p.pod.name in self.unanswered and p.pod.ready
                  and not p.exited and p.pod.terminating_at is None]
        if silent:
            since = min(self.unanswered[p.pod.name] for p in silent)
            raise RuntimeError(f"{', '.join(p.pod.name for p in silent)} stopped answering "
                               f"/metrics at t={since:g} s and never answered again")

    def sample(self, planned: float) -> None:
        now = self.now()
        self.sample_lateness.append(now - planned)
        self.check_alive()
        alive = [p for p in self.pods if not p.exited and p.process is not None]
        texts = self.scrape_all(alive)
        unanswered = [p.pod.name for p, text in zip(alive, texts, strict=True) if text is None]
        if unanswered:  # no row rather than an invented one; the gap is recorded
            self.record("scrape_failed", None, pods=unanswered, sample=planned)
        for pod, text in zip(alive, texts, strict=True):
            if text is None:
                self.unanswered.setdefault(pod.pod.name, planned)
            else:
                self.unanswered.pop(pod.pod.name, None)
        for pod, text in zip(alive, texts, strict=True):
            if text is None:
                continue
            scrape = parse_metrics(text)
            if scrape.cpu_seconds is not None:
                if pod.cpu is not None and now > pod.cpu[0]:
                    used = scrape.cpu_seconds - pod.cpu[1]
                    pod.cpu_millicores = used / (now - pod.cpu[0]) * 1000
                pod.cpu = (now, scrape.cpu_seconds)
            self.sample_rows.append({
                "t": round(planned, 6), "pod": pod.pod.name, "node": f"node-{pod.pod.node + 1}",
                "created_at": pod.pod.created_at, "ready": pod.pod.ready,
                "terminating": pod.pod.terminating_at is not None,
                "active_connections": scrape.active, "connections_total": scrape.connections,
                "requests_total": scrape.requests, "cpu_millicores": pod.cpu_millicores,
            })
        self.read_conntrack(planned)
        if self.scheduler is not None:
            self.sample_ipvs(planned)

    @staticmethod
    def _get(url: str, timeout: float = 2.0) -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return str(response.read().decode())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def sample_ipvs(self, t: float) -> None:
        """Each node's real servers of the service, with weights and counts, for `ipvs.csv`."""
        by_ip = self.names_by_ip()
        for node in range(self.cfg.cluster.nodes):
            text = self.ip_vs_text(node)
            self.ipvs_rows += ipvs.service_rows(t, f"node-{node + 1}", text,
                                                self.service_address, by_ip)

    def established(self, node: int) -> list[tuple[str, int, str]]:
        """(client ip, client port, pod ip) of the service's established connections on `node`:
        from the IPVS connection table in IPVS modes, else from conntrack."""
        if self.scheduler is not None:
            return [(c.client.rsplit(":", 1)[0], int(c.client.rsplit(":", 1)[1]),
                     c.destination.rsplit(":", 1)[0])
                    for c in ipvs.parse_ip_vs_conn(self.ip_vs_text(node, "ip_vs_conn"))
                    if c.state == "ESTABLISHED" and c.virtual == self.service_address]
        if self.kernel_placement == "vm":  # a file read: no process started in the emulated guest
            return parse_conntrack(established_to(self.nodes.read(node, "/proc/net/nf_conntrack"),
                                                  CLUSTER_IP))
        return parse_conntrack(self.nodes.run(node, [
            "conntrack", "-L", "-p", "tcp", "--orig-dst", CLUSTER_IP, "--state", "ESTABLISHED"]))

    def read_conntrack(self, t: float) -> None:
        by_ip = self.names_by_ip()
        for node in range(self.cfg.cluster.nodes):
            for client_ip, port, pod_ip in self.established(node):
                key = (node, client_ip, port, by_ip.get(pod_ip, pod_ip))
                seen = self.flows.setdefault(key, [t, t])
                seen[1] = t

    def scrape_cpu(self) -> None:
        """metrics-server's scrape: each running server process's CPU time, from the kernel."""
        assert self.metrics_server is not None
        cpu = {p.pod.index: process_cpu_seconds(p.process.pid) for p in self.pods
               if p.process is not None and not p.exited}
        self.metrics_server.scrape(self.now(), (self.pods[i].pod for i in cpu),
                                   lambda pod: cpu[pod.index])

    def hpa_sync(self) -> None:
        assert self.autoscaler is not None and self.metrics_server is not None
        desired, utilization = self.autoscaler.evaluate(
            self.now(), self.replicas, (p.pod for p in self.pods if not p.exited),
            self.metrics_server.metrics(), self.cfg.backend.cpu_request_millicores,
        )
        if desired != self.replicas:
            self.record("hpa_desired", replicas=desired, previous=self.replicas,
                        utilization=utilization)
            self.replicas = desired
            self.reconcile()

    def timeline(self, index: int) -> None:
        event = self.cfg.events[index]
        if event.action == "rollout":
            self.revision += 1
            self.record("rollout_started", revision=self.revision)
        elif event.action == "scale":
            self.record("scaled", replicas=event.replicas, previous=self.replicas)
            self.replicas = event.replicas or self.replicas
        elif event.action == "load":  # the workload follows the schedule on its own clock
            self.record("load_changed", **event.load_change)
        elif event.action == "kill-pod":
            ready = [p for p in self.pods if p.pod.ready]
            for pod in self.rng_control.sample(ready, min(event.kill_count, len(ready))):
                self.terminate(pod, killed=True)
        self.reconcile()

    # -- the cell ------------------------------------------------------------------------------

    def create_nodes(self) -> None:
        """The topology, with its nodes on the host or in the kernel VM."""
        if not isinstance(self.topology, VmTopology):
            self.topology.create()
            return
        self.topology.create_host_side()
        taps = [self.topology.tap(n) for n in range(self.cfg.cluster.nodes)]
        self.session = vm.Session(taps=taps, netns=self.topology.vm_ns, memory_mib=VM_MEMORY_MIB)
        self.session.start()
        self.topology.attach_taps()
        self.nodes = VmNodes(self.session)
        self.nodes.guest(["sh", "-c", self.topology.guest_script()])

    def run(self, progress: Progress) -> CellResult:
        try:
            return self._run(progress)
        finally:
            self.teardown()

    def _run(self, progress: Progress) -> CellResult:
        self.t0 = self.clock()
        self.create_nodes()
        if self.scheduler is not None:
            self.prepare_ipvs()
        if self.cfg.workload.proxy == "l7":
            self.start_proxies()
        setup_started = time.monotonic()
        initial = [self.create_pod(start_now=True) for _ in range(self.replicas)]
        self.queue.clear()  # their probes: they are ready before the cell starts
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        pending = list(initial)
        while pending:
            for pod in pending:
                assert pod.process is not None
                if pod.process.poll() is not None:
                    raise RuntimeError(f"{pod.pod.name} exited at start: "
                                       f"{self.log_tail(pod)}")
            pending = [p for p in pending if not self.readyz(p)]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} pods not ready after "
                                   f"{STARTUP_TIMEOUT_SECONDS:g} s")
            time.sleep(0.05 if pending else 0)
        for pod in initial:  # created, started and ready before the cell's clock starts
            pod.pod.created_at = 0.0
            pod.pod.started_at = pod.pod.ready_at = -control.PREEXISTING_SECONDS
        self.start_fanout()
        self.setup_seconds = time.monotonic() - setup_started
        dataplane = self.read_back()
        self.start_clients()
        self.wait_for_first_connection(initial)
        # The cell's clock starts with the clients' ramp, as in the simulator.
        self.t0 = self.clock()
        self.event_rows = [(0.0, e, n, d) for _, e, n, d in self.event_rows]
        for pod in initial:
            self.record("pod_ready", pod)
        self.run_schedule(progress)
        self.check_alive()
        self.check_silent()
        summary = self.stop_clients()
        return self.result(dataplane, summary)

    def run_schedule(self, progress: Progress) -> None:
        """The cell's plan and the events it causes, in real time (kpbench.schedule)."""
        self.queue.add_plan(schedule.plan(self.cfg, self.cell.seed, self.cell.mode))
        loop = schedule.RealTimeLoop(self.queue, self.now, self.sleep, max_sleep=0.5)
        loop.run(self.handlers(progress), self.cfg.duration_seconds)

    def handlers(self, progress: Progress) -> dict[Kind, schedule.Handler]:
        def on_sample(t: float, k: int) -> None:
            self.sample(t)
            progress(t)

        return {
            Kind.TIMELINE: lambda t, index: self.timeline(index),
            Kind.SAMPLE: on_sample,
            Kind.HPA_SYNC: lambda t, _: self.hpa_sync(),
            Kind.METRICS_SCRAPE: lambda t, _: self.scrape_cpu(),
            Kind.IPVS_GRACEFUL: lambda t, _: self.ipvs_graceful_pass(),
            Kind.START: lambda t, index: self.start_server(self.pods[index]),
            Kind.READY: lambda t, index: self.check_ready(index, t),
            Kind.EXITED: lambda t, index: self.check_exited(index),
            Kind.RECONCILE: lambda t, _: self.reconcile(),
            Kind.PUBLISH: lambda t, _: self.publish(),
            Kind.UPDATE: lambda t, consumer: self.update(consumer),
            Kind.SYNC: lambda t, consumer: self.sync(consumer),
        }

    def result(self, dataplane: dict[str, Any], summary: dict[str, Any]) -> CellResult:
        samples = pd.DataFrame(self.sample_rows)
        samples["cpu_millicores"] = samples["cpu_millicores"].astype("float64")
        failed = summary.get("connections", {}).get("failed", 0)
        events = list(self.event_rows)
        if failed:
            events.append((self.cfg.duration_seconds, "connection_failed", "",
                           json.dumps({"count": failed, "reason": "counted by the workload"})))
        events_frame = pd.DataFrame(events, columns=["t", "event", "pod", "detail"])
        events_frame = events_frame.sort_values("t", kind="stable").reset_index(drop=True)
        last_sample = max((v[1] for v in self.flows.values()), default=0.0)
        rows = []
        for conn_id, ((node, client_ip, _port, pod), (first, last)) in enumerate(
            sorted(self.flows.items(), key=lambda item: (item[1][0], item[0]))
        ):
            still_open = last >= last_sample
            rows.append({
                "conn_id": conn_id, "client": client_ip, "node": f"node-{node + 1}",
                "pod": pod, "opened_at": first,
                "closed_at": math.nan if still_open else last + self.cfg.sample_seconds,
                "close_reason": "end" if still_open else None, "requests": None,
            })
        connections = pd.DataFrame(rows, columns=["conn_id", "client", "node", "pod",
                                                  "opened_at", "closed_at", "close_reason",
                                                  "requests"])
        artifacts: dict[str, bytes] = {}
        for path in sorted((self.workdir / "locust").glob("*.csv")):
            artifacts[path.name] = path.read_bytes()
        if (self.workdir / "summary.json").exists():
            artifacts["summary.json"] = (self.workdir / "summary.json").read_bytes()
        if self.ipvs_rows:
            artifacts["ipvs.csv"] = pd.DataFrame(self.ipvs_rows, columns=ipvs.ROW_COLUMNS).to_csv(
                index=False).encode()
        lateness = np.asarray(self.sample_lateness) if self.sample_lateness else np.zeros(1)
        syncs = np.asarray(self.sync_durations) if self.sync_durations else np.zeros(1)
        dataplane = dataplane | {
            "setup_seconds": round(self.setup_seconds, 3),
            "sample_lateness_ms": {"median": round(float(np.median(lateness)) * 1000, 2),
                                   "max": round(float(lateness.max()) * 1000, 2)},
            "endpoint_sync_ms": {"median": round(float(np.median(syncs)) * 1000, 1),
                                 "max": round(float(syncs.max()) * 1000, 1)},
            "workload": {k: summary.get(k) for k in ("connections", "requests")},
        }
        return CellResult(samples, events_frame, connections, dataplane, artifacts)

    def teardown(self) -> None:
        started = time.monotonic()
        try:
            self._teardown()
        finally:
            self.teardown_seconds = time.monotonic() - started

    def _teardown(self) -> None:
        processes = [*self.locust, *(p.process for p in self.pods if p.process is not None),
                     *(x.process for x in self.proxies)]
        for process in processes:
            if process.poll() is None:
                process.kill()
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        for proxy in self.proxies:
            proxy.log.close()
        self.scraper.shutdown(wait=False, cancel_futures=True)
        if self.session is not None:
            self.session.close()
        self.topology.destroy()
        shutil.rmtree(self.workdir, ignore_errors=True)


__all__ = ["LabBackend", "parse_conntrack", "parse_metrics"]
