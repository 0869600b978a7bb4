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
client pod), then run the cell's schedule (`kpbench.schedule`) in real time.

`LabCell` is the composition and the control plane's handlers; each concern has its module:
`kpbench.lab.pods` (server processes), `kpbench.lab.clients` (Locust), `kpbench.lab.sampling`
(samples and connections), `kpbench.lab.kube_proxy` (the Service's rules on every node, IPVS
included), `kpbench.lab.proxies` (the HAProxy pods of `workload.proxy: l7`),
`kpbench.lab.nodes` (where the nodes' kernel runs) and `kpbench.lab.netns` (the namespaces).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kpbench import control, schedule, vm
from kpbench.backends.base import CellResult, PreflightError, Progress, Unsupported
from kpbench.config import ROOT_SEED, Cell, Experiment, expand_cells
from kpbench.lab import netns, rules
from kpbench.lab.clients import Clients
from kpbench.lab.kube_proxy import KubeProxy
from kpbench.lab.netns import CLUSTER_IP, InsideGets, Topology
from kpbench.lab.nodes import HostNodes, VmNodes, VmTopology
from kpbench.lab.pods import GRPC_PORT, HTTP_PORT, STARTUP_TIMEOUT_SECONDS, LabPod, Servers
from kpbench.lab.proxies import Proxies
from kpbench.lab.sampling import Sampler, process_cpu_seconds
from kpbench.schedule import Kind
from kpbench.workload.plan import workload_failures

SERVICE_HTTP_PORT = 80
READY_POLL_SECONDS = 0.2
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


class LabCell:
    """One cell in real time: the composition of its parts and the control plane's handlers."""

    def __init__(self, cell: Cell, placement: str = "host",
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.cell = cell
        self.cfg = cfg = cell.config
        self.clock = clock  # the cell's clock and the loop's sleep (injected in tests)
        self.sleep = sleep
        self.kernel_placement = placement
        self.session: vm.Session | None = None
        streams = np.random.SeedSequence([ROOT_SEED, cell.seed]).spawn(2)
        self.rng_control = random.Random(int(streams[1].generate_state(1)[0]))
        self.rng_kubelet = control.stream(cell.seed, control.STREAM_KUBELET)
        self.rng_ipvs_order = [control.stream(cell.seed, control.STREAM_IPVS_ORDER, node)
                               for node in range(cfg.cluster.nodes)]
        self.fanout: control.EndpointFanout | None = None
        backend = cfg.backend
        self.placement = control.Placement(
            cfg.cluster.nodes,
            control.NodeResources(backend.cpu_request_millicores, control.MEMORY_REQUEST_MIB),
            control.NodeResources(cfg.cluster.node_cpu_millicores, cfg.cluster.node_memory_mib),
        )
        self.surge, self.unavailable = backend.rollout.resolve(backend.replicas)
        self.replicas = backend.replicas
        self.revision = 1
        self.pods: list[LabPod] = []
        self.queue = schedule.EventQueue()
        self.t0 = 0.0
        self.event_rows: list[tuple[float, str, str, str]] = []
        self.reconcile_pending = False
        self.sync_durations: list[float] = []  # writing every node's rules, per endpoint sync
        self.setup_seconds = self.teardown_seconds = 0.0
        hpa = backend.hpa
        self.autoscaler = control.autoscaler(hpa) if hpa else None
        self.metrics_server = control.MetricsServer(hpa.metric_resolution_seconds) if hpa else None
        # the parts
        http = cfg.workload.protocol == "http"
        self.target_port = HTTP_PORT if http else GRPC_PORT
        self.topology = (VmTopology if placement == "vm" else Topology)(cfg.cluster.nodes)
        self.workdir = netns.make_workdir(self.topology.tag)
        self.http = InsideGets(self.topology.control_ns)
        self.servers = Servers(cfg, self.topology, self.workdir, self.http)
        service = rules.Service("kpbench", "backend", cfg.workload.protocol, CLUSTER_IP,
                                SERVICE_HTTP_PORT if http else GRPC_PORT)
        self.kube_proxy = KubeProxy(cell.mode, service, HostNodes(self.topology),
                                    cfg.cluster.nodes)
        self.sampler = Sampler(cfg, self.kube_proxy)
        self.l7 = cfg.workload.proxy == "l7"
        self.proxies = Proxies(cfg, self.topology, self.workdir, self.target_port)
        self.clients = Clients(cfg, self.topology, self.workdir,
                               f"http://{CLUSTER_IP}:{SERVICE_HTTP_PORT}" if http
                               else f"{CLUSTER_IP}:{GRPC_PORT}")

    # -- clock and queue -----------------------------------------------------------------------

    def now(self) -> float:
        return self.clock() - self.t0

    def at(self, t: float, kind: Kind, arg: int = 0) -> None:
        self.queue.at(t, kind, arg)

    def record(self, event: str, pod: LabPod | None = None, **detail: Any) -> None:
        self.event_rows.append((round(self.now(), 3), event, pod.pod.name if pod else "",
                                json.dumps(detail, sort_keys=True) if detail else ""))

    # -- pods: the control plane's decisions; the processes are `self.servers` -----------------

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
        if not lab_pod.pod.live:
            return
        self.servers.start(lab_pod)
        lab_pod.pod.started_at = self.now()
        self.at(lab_pod.pod.started_at + lab_pod.probe_phase, Kind.READY, lab_pod.pod.index)

    def check_ready(self, index: int, planned: float) -> None:
        """The kubelet's readiness probe, every `readiness_period_seconds` from the pod's phase."""
        pod = self.pods[index]
        if not pod.pod.live or pod.process is None:
            return
        self.servers.check_started(pod)
        if self.now() - pod.pod.created_at > STARTUP_TIMEOUT_SECONDS:
            raise RuntimeError(f"{pod.pod.name} not ready after {STARTUP_TIMEOUT_SECONDS:g} s")
        if not self.servers.readyz(pod):
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
        self.servers.stop(pod, killed)
        self.record("pod_killed" if killed else "pod_terminating", pod)
        self.at(self.now() + READY_POLL_SECONDS, Kind.EXITED, pod.pod.index)
        if was_ready:
            self.endpoints_changed(pod.pod.index, added=False)

    def check_exited(self, index: int) -> None:
        """A terminating pod is deleted once its process exited (killed after the grace)."""
        pod = self.pods[index]
        assert pod.pod.terminating_at is not None
        if pod.running:
            if self.now() - pod.pod.terminating_at > self.cfg.backend.termination_grace_seconds:
                self.servers.stop(pod, killed=True)
            self.at(self.now() + READY_POLL_SECONDS, Kind.EXITED, index)
            return
        pod.exited = True
        pod.pod.deleted_at = self.now()
        self.placement.deleted(pod.pod)
        self.record("pod_deleted", pod)
        self.servers.remove(pod)

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

    # -- endpoints: kube-proxy's sync loop per node; its rules are `self.kube_proxy` ----------

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

    def dataplane_endpoints(self) -> list[rules.Endpoint]:
        """What the Service's rules balance over: the backend pods, or the L7 proxy pods."""
        return self.proxies.endpoints() if self.l7 else self.serving()

    def start_fanout(self) -> None:
        """Every node's rules (or the proxies' servers) hold the ready pods; then the fanout."""
        cluster = self.cfg.cluster
        ready = [p.pod.index for p in self.pods if p.pod.ready]
        self.fanout = control.EndpointFanout(
            1 if self.l7 else cluster.nodes, ready,
            control.min_sync_seconds(self.cell.mode, cluster.kube_proxy.min_sync_seconds),
            control.generator(self.cell.seed, control.STREAM_KUBE_PROXY), cluster.propagation,
            lambda endpoints: 0.0,  # a lab sync takes its real time
        )
        view = frozenset(ready)
        for consumer in range(self.fanout.consumers):
            self.apply(consumer, control.NodeSync(0.0, view, view, None))
        if self.l7:  # the Service's endpoints are the proxy pods, for the whole cell
            for node in range(cluster.nodes):
                self.kube_proxy.write(node, self.proxies.endpoints())

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
        """Write one node's rules for `decided.view` (or, behind the L7 proxies, their servers);
        IPVS adds the sync's new endpoints in that node's own order."""
        started = time.monotonic()
        try:
            if self.l7:
                self.proxies.sync(self.endpoints(decided.view))
            elif self.kube_proxy.scheduler is not None:
                order = control.ipvs_insertion_order(decided.view, decided.new,
                                                     self.rng_ipvs_order[consumer])
                self.kube_proxy.write(consumer, [e for i in order for e in self.endpoints([i])])
            else:
                self.kube_proxy.write(consumer, self.endpoints(decided.view))
        finally:
            self.sync_durations.append(time.monotonic() - started)

    def read_back(self) -> dict[str, Any]:
        """Every node's rules (and the proxies' servers) read back and checked."""
        checked = self.kube_proxy.read_back(self.dataplane_endpoints())
        return checked | (self.proxies.read_back(self.serving()) if self.l7 else {})

    def names_by_ip(self) -> dict[str, str]:
        return {p.ip: p.pod.name for p in self.pods} | self.proxies.names_by_ip()

    # -- the planned events' handlers ----------------------------------------------------------

    def sample(self, planned: float) -> None:
        self.check_alive()
        alive = [p for p in self.pods if not p.exited and p.process is not None]
        unanswered = self.sampler.add_metrics(planned, self.now(), alive,
                                              self.servers.metrics(alive))
        if unanswered:  # no row rather than an invented one; the gap is recorded
            self.record("scrape_failed", None, pods=unanswered, sample=planned)
        by_ip = self.names_by_ip()
        self.sampler.read_connections(planned, by_ip)
        if self.kube_proxy.scheduler is not None:
            self.sampler.read_ipvs(planned, by_ip)

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

    def check_alive(self) -> None:
        """A server, proxy or Locust process that exited on its own fails the cell."""
        now = self.now()
        self.servers.check_alive(self.pods, now)
        self.proxies.check_alive(now)
        self.clients.check_alive(now)

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
        self.kube_proxy.nodes = nodes = VmNodes(self.session)
        nodes.guest(["sh", "-c", self.topology.guest_script()])

    def run(self, progress: Progress) -> CellResult:
        try:
            return self._run(progress)
        finally:
            self.teardown()

    def _run(self, progress: Progress) -> CellResult:
        setup_started = time.monotonic()
        self.t0 = self.clock()
        self.create_nodes()
        self.kube_proxy.prepare()
        if self.l7:
            self.proxies.start()
        initial = [self.create_pod(start_now=True) for _ in range(self.replicas)]
        self.queue.clear()  # their probes: they are ready before the cell starts
        self.servers.wait_ready(initial)
        for pod in initial:  # created, started and ready before the cell's clock starts
            pod.pod.created_at = 0.0
            pod.pod.started_at = pod.pod.ready_at = -control.PREEXISTING_SECONDS
        self.start_fanout()
        self.setup_seconds = time.monotonic() - setup_started
        dataplane = self.read_back()
        self.clients.start()
        self.clients.wait_for_first_connection(lambda: self.servers.metrics(initial))
        # The cell's clock starts with the clients' ramp, as in the simulator.
        self.t0 = self.clock()
        # Setup's events, and the initial pods' readiness, belong to the cell's first instant
        # (not to whenever this line runs, a few ms later on a loaded machine).
        self.event_rows = [(0.0, e, n, d) for _, e, n, d in self.event_rows]
        self.event_rows += [(0.0, "pod_ready", pod.pod.name, "") for pod in initial]
        self.run_schedule(progress)
        self.check_alive()
        self.sampler.check_silent(self.pods)
        summary = self.clients.stop()
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
            Kind.IPVS_GRACEFUL: lambda t, _: self.kube_proxy.graceful_pass(),
            Kind.START: lambda t, index: self.start_server(self.pods[index]),
            Kind.READY: lambda t, index: self.check_ready(index, t),
            Kind.EXITED: lambda t, index: self.check_exited(index),
            Kind.RECONCILE: lambda t, _: self.reconcile(),
            Kind.PUBLISH: lambda t, _: self.publish(),
            Kind.UPDATE: lambda t, consumer: self.update(consumer),
            Kind.SYNC: lambda t, consumer: self.sync(consumer),
        }

    def result(self, dataplane: dict[str, Any], summary: dict[str, Any]) -> CellResult:
        events = list(self.event_rows)
        events += [(self.cfg.duration_seconds, "connection_failed", "", json.dumps(detail))
                   for detail in workload_failures(summary)]
        events_frame = pd.DataFrame(events, columns=["t", "event", "pod", "detail"])
        events_frame = events_frame.sort_values("t", kind="stable").reset_index(drop=True)
        artifacts: dict[str, bytes] = {}
        for path in sorted((self.workdir / "locust").glob("*.csv")):
            artifacts[path.name] = path.read_bytes()
        if (self.workdir / "summary.json").exists():
            artifacts["summary.json"] = (self.workdir / "summary.json").read_bytes()
        artifacts |= self.sampler.artifacts()
        lateness = np.asarray(self.sampler.lateness) if self.sampler.lateness else np.zeros(1)
        syncs = np.asarray(self.sync_durations) if self.sync_durations else np.zeros(1)
        dataplane = dataplane | {
            "setup_seconds": round(self.setup_seconds, 3),
            "sample_lateness_ms": {"median": round(float(np.median(lateness)) * 1000, 2),
                                   "max": round(float(lateness.max()) * 1000, 2)},
            "endpoint_sync_ms": {"median": round(float(np.median(syncs)) * 1000, 1),
                                 "max": round(float(syncs.max()) * 1000, 1)},
            "workload": {k: summary.get(k) for k in ("connections", "requests")},
        }
        return CellResult(self.sampler.samples(), events_frame, self.sampler.connections(),
                          dataplane, artifacts)

    def teardown(self) -> None:
        started = time.monotonic()
        try:
            self._teardown()
        finally:
            self.teardown_seconds = time.monotonic() - started

    def _teardown(self) -> None:
        processes = [*self.clients.processes,
                     *(p.process for p in self.pods if p.process is not None),
                     *(x.process for x in self.proxies.items)]
        for process in processes:
            if process.poll() is None:
                process.kill()
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        self.proxies.close_logs()
        self.http.shutdown()
        if self.session is not None:
            self.session.close()
        self.topology.destroy()
        shutil.rmtree(self.workdir, ignore_errors=True)


__all__ = ["LabBackend", "LabCell"]
