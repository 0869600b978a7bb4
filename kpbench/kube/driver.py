"""One cell on real Kubernetes: deploy, verify, run the timeline, sample, collect, clean up.

The kind analogue of `kpbench.lab.backend.LabCell`, with Kubernetes as the control plane and
kube-proxy as the data plane: the driver only triggers events and observes. It talks to the
cluster through the narrow `KubeApi` (`kpbench.kube.api`) and reads node tables through
`NodeTables` (kind: `docker exec`; cluster: none), so the same code runs against the in-memory
double of the offline tests and against a real cluster.

Per cell, in its own namespace:
1. apply the backend (Deployment, Services, HPA) and, for `workload.proxy: l7`, the HAProxy
   proxies (`kpbench.haproxy`, the lab's configuration); wait until every backend pod is ready
   and every proxy has exactly the ready backend pods in service (read from its runtime API);
2. verify the data plane for the cell's Service on every node (`kpbench.kube.verify`);
   a mismatch fails the cell;
3. watch pods and EndpointSlices (threads; each change becomes an event when it is seen, and
   each sample's pod listing is a backstop so no transition is missed);
4. apply Locust (master + one worker per client pod) and wait for the first connection to reach
   a pod: the cell's clock starts there (t = 0), as in the lab and the simulator;
5. run the timeline and the samples in real time, in `kpbench.schedule`'s order (a timeline
   event before the sample at its instant, as in the lab and the simulator): `rollout` patches
   the pod template's `kubectl.kubernetes.io/restartedAt` annotation (what `kubectl rollout
   restart` does), `scale` writes the `scale` subresource, `load` is only recorded (Locust
   follows the experiment's `load` schedule itself: `kpbench.workload.plan`), `kill-pod`
   deletes ready pods with grace period 0. Every `sample_seconds`:
   each backend pod's `/metrics` through the API server's pod proxy (admin port, which stays open
   while a pod terminates), CPU from metrics-server, HPA status, and for IPVS modes each node's
   `/proc/net/ip_vs` (active / inactive connections per real server) beside the pods' counts;
6. stop Locust with SIGTERM (it writes its CSVs and kpbench's summary), copy them out, delete the
   namespace (also on errors and Ctrl-C). The workload's totals of failed connects and of
   connections reset become `connection_failed` / `connection_reset` events (the kernel's tables
   cannot tell why a connection ended, so no per-connection table is kept on this backend).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from kpbench import haproxy, ipvs, schedule
from kpbench.backends.base import CellResult, Progress
from kpbench.config import L7_PROXY_REPLICAS, ROOT_SEED, Cell
from kpbench.kube import manifests
from kpbench.kube.api import KubeApi, KubeError, pod_cpu_millicores
from kpbench.kube.verify import check_node
from kpbench.lab.sampling import CONNECTION_COLUMNS, parse_metrics
from kpbench.schedule import Kind
from kpbench.workload.plan import workload_failures

SETUP_TIMEOUT_SECONDS = 600.0
FIRST_CONNECTION_TIMEOUT_SECONDS = 180.0
LOCUST_STOP_TIMEOUT_SECONDS = 60.0
NAMESPACE_DELETE_TIMEOUT_SECONDS = 180.0
POLL_SECONDS = 1.0
WATCH_TIMEOUT_SECONDS = 30
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
SLICE_SELECTOR = "kubernetes.io/service-name=backend"
STOP_LOCUST = ["python", "-c", "import os, signal; os.kill(1, signal.SIGTERM)"]
LIST_RESULTS = ["sh", "-c", "cd /results && for f in *; do [ -f \"$f\" ] || continue; "
                "printf '%s\\n' \"$f\"; base64 \"$f\" | tr -d '\\n'; echo; done"]
SHOW_SERVERS = ["sh", "-c", f"echo 'show servers state {haproxy.BACKEND}' | "
                f"socat stdio unix-connect:{manifests.HAPROXY_RUNTIME_SOCKET}"]
L7_PROXY_SELECTOR = "app.kubernetes.io/name=l7-proxy"


class NodeTables(Protocol):
    """Read each node's data-plane tables (kind: `docker exec`)."""

    def nodes(self) -> list[str]: ...
    def read(self, node: str, ipvs_only: bool = False) -> dict[str, str]: ...


@dataclass
class PodState:
    name: str
    node: str = ""
    ip: str = ""
    created_at: float = 0.0
    ready: bool = False
    terminating: bool = False
    deleted: bool = False
    ever_ready: bool = False
    restarts: int = 0


def pod_is_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def decode_results(text: str) -> dict[str, bytes]:
    """The output of LIST_RESULTS (name line, base64 line, ...) -> {name: content}."""
    lines = [line.strip() for line in text.splitlines()]
    files: dict[str, bytes] = {}
    for name, encoded in zip(lines[0::2], lines[1::2], strict=False):
        if name:
            files[name] = base64.b64decode(encoded)
    return files


def parse_timestamp(text: str | None) -> float | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class KubeCell:
    """One cell against a cluster, through `KubeApi`."""

    def __init__(self, cell: Cell, api: KubeApi, namespace: str, image: str,
                 node_tables: NodeTables | None, run_label: str = "kpbench",
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.cell = cell
        self.cfg = cell.config
        self.api = api
        self.namespace = namespace
        self.image = image
        self.node_tables = node_tables
        self.run_label = run_label
        self.clock = clock
        self.sleep = sleep
        self.wall_clock = wall_clock
        streams = np.random.SeedSequence([ROOT_SEED, cell.seed]).spawn(2)
        self.rng = random.Random(int(streams[1].generate_state(1)[0]))
        self.t0: float | None = None
        self.wall_t0 = 0.0
        self.pods: dict[str, PodState] = {}
        self.event_rows: list[tuple[float, str, str, str]] = []
        self.sample_rows: list[dict[str, Any]] = []
        self.ipvs_rows: list[dict[str, Any]] = []
        self.slices: dict[str, tuple[int, int, int]] = {}
        self.endpoint_counts: tuple[int, int, int] | None = None
        self.hpa_desired: int | None = None
        self.replicas = self.cfg.backend.replicas
        self.service_address: str | None = None
        self.watch_queue: queue.Queue[tuple[float, str, str, dict[str, Any]]] = queue.Queue()
        self.stop_watching = threading.Event()
        self.watchers: list[threading.Thread] = []
        self.pool = ThreadPoolExecutor(max_workers=16)
        self.sample_lateness: list[float] = []
        self.setup_seconds = 0.0
        self.scrape_failures = 0
        self.l7_proxy: dict[str, Any] = {}
        self.stages = dict(manifests.cell_stages(namespace, self.cfg, image, run_label))
        self.killed: set[str] = set()  # pods the timeline's kill-pod deleted

    # -- time and events ---------------------------------------------------------------------------

    def now(self) -> float:
        return 0.0 if self.t0 is None else self.clock() - self.t0

    def record(self, event: str, pod: str = "", at: float | None = None, **detail: Any) -> None:
        if self.t0 is None:
            return  # setup: the cell's clock has not started
        t = self.now() if at is None else at
        self.event_rows.append((round(t, 3), event, pod,
                                json.dumps(detail, sort_keys=True) if detail else ""))

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = self.clock() + timeout
        while not condition():
            if self.clock() > deadline:
                raise RuntimeError(f"{what}: not within {timeout:g} s")
            self.sleep(POLL_SECONDS)

    # -- pods --------------------------------------------------------------------------------------

    def observe_pod(self, pod: dict[str, Any], deleted: bool = False,
                    seen_at: float | None = None, watched: bool = False) -> None:
        """Update the pod cache from an API object (`watched`: from the watch, which shows each
        change in order); record the transitions it shows, and restarts or disappearances that
        no timeline event caused."""
        metadata = pod.get("metadata") or {}
        name = metadata.get("name", "")
        if not name:
            return
        t = self.now() if seen_at is None or self.t0 is None else max(0.0, seen_at - self.t0)
        state = self.pods.get(name)
        if state is None:
            if deleted:
                return
            created = parse_timestamp(metadata.get("creationTimestamp"))
            created_at = 0.0
            if self.t0 is not None:
                created_at = t  # when the watch (or the listing) first showed it
                if created is not None:  # creationTimestamp (1 s resolution), if plausible
                    relative = created - self.wall_t0
                    if t - 2 * self.cfg.sample_seconds - 1 <= relative <= t:
                        created_at = max(0.0, relative)
            state = PodState(name, created_at=round(created_at, 3))
            self.pods[name] = state
            self.record("pod_created", name, at=t)
        if state.deleted:
            return  # a stale change seen after the pod was gone
        spec, status = pod.get("spec") or {}, pod.get("status") or {}
        if spec.get("nodeName") and not state.node:
            state.node = spec["nodeName"]
        if status.get("podIP"):
            state.ip = status["podIP"]
        ready = pod_is_ready(pod) and not metadata.get("deletionTimestamp")
        if ready and not state.ready:
            self.record("pod_ready", name, at=t, node=state.node)
            state.ever_ready = True
        state.ready = ready and not deleted
        restarts = sum(int(c.get("restartCount") or 0)
                       for c in status.get("containerStatuses") or [])
        if restarts > state.restarts:  # a container restarted: no timeline event does that
            self.record("pod_restarted", name, at=t, restarts=restarts)
            state.restarts = restarts
        if metadata.get("deletionTimestamp") and not state.terminating:
            state.terminating = True
            self.record("pod_terminating", name, at=t)
        if watched and deleted and not state.deleted and not state.terminating \
                and name not in self.killed:  # the watch shows a graceful delete first
            self.record("pod_vanished", name, at=t, reason="deleted at once, not by the timeline")
        if deleted and not state.deleted:
            state.deleted = True
            state.terminating = True
            state.ready = False
            self.record("pod_deleted", name, at=t)

    def observe_slice(self, endpoint_slice: dict[str, Any], deleted: bool = False,
                      seen_at: float | None = None) -> None:
        name = (endpoint_slice.get("metadata") or {}).get("name", "")
        if deleted:
            self.slices.pop(name, None)
        else:
            ready = serving = terminating = 0
            for endpoint in endpoint_slice.get("endpoints") or []:
                conditions = endpoint.get("conditions") or {}
                ready += bool(conditions.get("ready"))
                serving += bool(conditions.get("serving"))
                terminating += bool(conditions.get("terminating"))
            self.slices[name] = (ready, serving, terminating)
        counts = tuple(sum(values) for values in zip(*self.slices.values(), strict=True)) \
            if self.slices else (0, 0, 0)
        if counts != self.endpoint_counts:
            self.endpoint_counts = counts  # type: ignore[assignment]
            at = None if seen_at is None or self.t0 is None else max(0.0, seen_at - self.t0)
            self.record("endpoints_changed", at=at, ready=counts[0], serving=counts[1],
                        terminating=counts[2])

    def list_backend_pods(self) -> list[dict[str, Any]]:
        return self.api.list_objects("Pod", self.namespace, manifests.BACKEND_SELECTOR)

    def refresh_pods(self) -> None:
        """The listing as a backstop to the watch: pods gone from it were deleted."""
        listed = self.list_backend_pods()
        names = set()
        for pod in listed:
            self.observe_pod(pod)
            names.add(pod["metadata"]["name"])
        for name, state in self.pods.items():
            if name not in names and not state.deleted:
                self.observe_pod({"metadata": {"name": name}}, deleted=True)

    def refresh_slices(self) -> None:
        """The EndpointSlice listing as a backstop to the watch."""
        listed = self.api.list_objects("EndpointSlice", self.namespace, SLICE_SELECTOR)
        names = set()
        for endpoint_slice in listed:
            names.add(endpoint_slice["metadata"]["name"])
            self.observe_slice(endpoint_slice)
        for name in [n for n in self.slices if n not in names]:
            self.observe_slice({"metadata": {"name": name}}, deleted=True)

    # -- watches -----------------------------------------------------------------------------------

    def start_watching(self) -> None:
        for kind, selector in (("Pod", manifests.BACKEND_SELECTOR),
                               ("EndpointSlice", SLICE_SELECTOR)):
            thread = threading.Thread(target=self._watch, args=(kind, selector), daemon=True,
                                      name=f"watch-{kind}")
            thread.start()
            self.watchers.append(thread)

    def _watch(self, kind: str, selector: str) -> None:
        while not self.stop_watching.is_set():
            try:
                for change, obj in self.api.watch(kind, self.namespace, selector,
                                                  WATCH_TIMEOUT_SECONDS):
                    self.watch_queue.put((self.clock(), kind, change, obj))
                    if self.stop_watching.is_set():
                        return
            except Exception:  # a broken watch is re-opened; the listing covers the gap
                self.stop_watching.wait(1.0)
            self.stop_watching.wait(0.05)

    def drain_watch(self) -> None:
        while True:
            try:
                seen_at, kind, change, obj = self.watch_queue.get_nowait()
            except queue.Empty:
                return
            if kind == "Pod":
                self.observe_pod(obj, deleted=change == "DELETED", seen_at=seen_at,
                                 watched=True)
            else:
                self.observe_slice(obj, deleted=change == "DELETED", seen_at=seen_at)

    # -- setup -------------------------------------------------------------------------------------

    def ready_backend_pods(self) -> int:
        return sum(1 for pod in self.list_backend_pods()
                   if pod_is_ready(pod) and not pod["metadata"].get("deletionTimestamp"))

    def deploy_backend(self) -> None:
        for document in self.stages["backend"]:
            self.api.apply(document)
        self.wait_until(lambda: self.ready_backend_pods() >= self.replicas,
                        SETUP_TIMEOUT_SECONDS, f"{self.replicas} backend pods ready")
        if self.cfg.workload.proxy == "l7":
            self.wait_until(self.proxies_serve_ready_pods, SETUP_TIMEOUT_SECONDS,
                            "the L7 proxies ready with every ready backend pod in service")

    def proxies_serve_ready_pods(self) -> bool:
        """Every proxy is ready and its servers in service are exactly the ready backend pods
        (HAProxy fills its slots from the headless Service's DNS records)."""
        port = manifests.GRPC_PORT if self.cfg.workload.protocol == "grpc" else manifests.HTTP_PORT
        expected = sorted(f"{p['status']['podIP']}:{port}" for p in self.list_backend_pods()
                          if pod_is_ready(p) and not p["metadata"].get("deletionTimestamp"))
        proxies = [p for p in self.api.list_objects("Pod", self.namespace, L7_PROXY_SELECTOR)
                   if pod_is_ready(p)]
        if len(proxies) < L7_PROXY_REPLICAS:
            return False
        for proxy in proxies:
            try:
                state = self.api.exec(self.namespace, proxy["metadata"]["name"], "haproxy",
                                      SHOW_SERVERS)
            except Exception:  # not answering yet
                return False
            if sorted(haproxy.enabled_servers(state)) != expected:
                return False
        self.l7_proxy = {"software": "haproxy", "image": manifests.HAPROXY_IMAGE,
                         "replicas": len(proxies), "threads": haproxy.THREADS,
                         "balance": "roundrobin per request", "servers": len(expected),
                         "endpoint_updates": "DNS of the headless Service backend-pods, "
                                             f"every {haproxy.DNS_RESOLVE_SECONDS} s"}
        return True

    def verify_dataplane(self) -> dict[str, Any]:
        service = self.api.get("Service", self.namespace, "backend") or {}
        spec = service.get("spec") or {}
        port = (spec.get("ports") or [{}])[0].get("port")
        self.service_address = f"{spec.get('clusterIP')}:{port}"
        result: dict[str, Any] = {"mode": self.cell.mode, "service": self.service_address}
        if self.node_tables is None:
            result |= {"verified": False, "nodes_checked": 0,
                       "note": "no node access on this backend: tables not read"}
            return result
        nodes = self.node_tables.nodes()
        tables = list(self.pool.map(self.node_tables.read, nodes))
        address = self.service_address if self.cell.mode.startswith("ipvs-") else None
        checked = [check_node(self.cell.mode, node, text, address)
                   for node, text in zip(nodes, tables, strict=True)]
        return result | {"verified": True, "nodes_checked": len(checked), "nodes": checked,
                         "source": "read back from each node (docker exec): /proc/net/ip_vs, "
                                   "iptables-save, nft list table ip kube-proxy"}

    def start_locust(self) -> None:
        for document in self.stages["locust"]:
            self.api.apply(document)

        def locust_running() -> bool:
            pods = self.api.list_objects("Pod", self.namespace, "app.kubernetes.io/part-of=kpbench")
            master = [p for p in pods if p["metadata"]["name"] == "locust-master"]
            workers = [p for p in pods if p["metadata"]["name"].startswith("locust-worker")]
            running = [p for p in master + workers
                       if (p.get("status") or {}).get("phase") == "Running"]
            return bool(master) and len(running) >= 1 + self.cfg.workload.clients

        self.wait_until(locust_running, SETUP_TIMEOUT_SECONDS, "Locust master and workers running")

    def wait_for_first_connection(self) -> None:
        def connected() -> bool:
            for pod in self.list_backend_pods():
                text = self.scrape(pod["metadata"]["name"])
                if text is not None and parse_metrics(text).connections > 0:
                    return True
            master = self.api.get("Pod", self.namespace, "locust-master") or {}
            for status in (master.get("status") or {}).get("containerStatuses") or []:
                if status.get("name") == "locust" and "terminated" in (status.get("state") or {}):
                    raise RuntimeError("the Locust master exited before the run started")
            return False

        self.wait_until(connected, FIRST_CONNECTION_TIMEOUT_SECONDS,
                        "a first connection reaching a backend pod")

    # -- sampling ----------------------------------------------------------------------------------

    def scrape(self, pod: str) -> str | None:
        try:
            return self.api.proxy("GET", self.namespace, pod, manifests.ADMIN_PORT, "metrics",
                                  timeout=2.0)
        except KubeError:
            return None

    def sample(self, planned: float) -> None:
        self.sample_lateness.append(self.now() - planned)
        self.drain_watch()
        self.refresh_pods()
        self.refresh_slices()
        alive = [p for p in self.pods.values() if not p.deleted and p.ip]
        texts = list(self.pool.map(lambda p: self.scrape(p.name), alive))
        cpu = pod_cpu_millicores(self.api, self.namespace, manifests.BACKEND_SELECTOR)
        unanswered = [p.name for p, text in zip(alive, texts, strict=True) if text is None]
        if unanswered:  # no row rather than an invented one; the gap is recorded
            self.scrape_failures += len(unanswered)
            self.record("scrape_failed", pods=unanswered, sample=planned)
        for pod, text in zip(alive, texts, strict=True):
            if text is None:
                continue
            scrape = parse_metrics(text)
            self.sample_rows.append({
                "t": round(planned, 6), "pod": pod.name, "node": pod.node,
                "created_at": pod.created_at, "ready": pod.ready,
                "terminating": pod.terminating, "active_connections": scrape.active,
                "connections_total": scrape.connections, "requests_total": scrape.requests,
                "cpu_millicores": cpu.get(pod.name),
            })
        if self.cell.mode.startswith("ipvs-") and self.node_tables is not None:
            self.sample_ipvs(planned)
        if self.cfg.backend.hpa is not None:
            self.sample_hpa()

    def sample_ipvs(self, planned: float) -> None:
        assert self.node_tables is not None
        tables = self.node_tables
        nodes = tables.nodes()
        texts = list(self.pool.map(lambda n: tables.read(n, ipvs_only=True), nodes))
        by_ip = {p.ip: p.name for p in self.pods.values() if p.ip}
        for node, text in zip(nodes, texts, strict=True):
            self.ipvs_rows += ipvs.service_rows(planned, node, text.get("ip_vs", ""),
                                                self.service_address or "", by_ip)

    def sample_hpa(self) -> None:
        hpa = self.api.get("HorizontalPodAutoscaler", self.namespace, "backend") or {}
        status = hpa.get("status") or {}
        desired = status.get("desiredReplicas")
        if desired is None or desired == self.hpa_desired:
            return
        utilization = None
        for metric in status.get("currentMetrics") or []:
            utilization = ((metric.get("resource") or {}).get("current") or {}).get(
                "averageUtilization", utilization)
        self.record("hpa_desired", replicas=desired, previous=self.hpa_desired,
                    utilization=utilization)
        self.hpa_desired = desired

    # -- the timeline ------------------------------------------------------------------------------

    def timeline(self, index: int) -> None:
        event = self.cfg.events[index]
        if event.action == "rollout":
            stamp = dt.datetime.fromtimestamp(self.wall_clock(), dt.UTC).isoformat()
            self.api.patch("Deployment", self.namespace, "backend", {
                "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}})
            self.record("rollout_started", restarted_at=stamp)
        elif event.action == "scale":
            assert event.replicas is not None
            self.api.scale(self.namespace, "backend", event.replicas)
            self.record("scaled", replicas=event.replicas, previous=self.replicas)
            self.replicas = event.replicas
        elif event.action == "load":  # the workload follows the schedule on its own clock
            self.record("load_changed", **event.load_change)
        elif event.action == "kill-pod":
            self.refresh_pods()
            ready = sorted(p.name for p in self.pods.values() if p.ready)
            for name in self.rng.sample(ready, min(event.kill_count, len(ready))):
                self.api.delete("Pod", self.namespace, name, grace_seconds=0)
                self.killed.add(name)
                self.record("pod_killed", name)

    # -- end ---------------------------------------------------------------------------------------

    def stop_locust(self) -> dict[str, bytes]:
        """SIGTERM to Locust's master (it writes CSVs and the summary), then copy them out."""
        with contextlib.suppress(Exception):  # already gone: the files may still be there
            self.api.exec(self.namespace, "locust-master", "locust", STOP_LOCUST)

        def master_done() -> bool:
            master = self.api.get("Pod", self.namespace, "locust-master") or {}
            statuses = (master.get("status") or {}).get("containerStatuses") or []
            return any(s.get("name") == "locust" and "terminated" in (s.get("state") or {})
                       for s in statuses)

        with contextlib.suppress(RuntimeError):
            self.wait_until(master_done, LOCUST_STOP_TIMEOUT_SECONDS, "Locust master exit")
        try:
            return decode_results(self.api.exec(self.namespace, "locust-master", "collector",
                                                LIST_RESULTS))
        except Exception as exc:
            self.record("locust_results_missing", reason=str(exc)[:200])
            return {}

    def delete_namespace(self) -> None:
        with contextlib.suppress(KubeError):
            self.api.delete("Namespace", "", self.namespace)
        deadline = self.clock() + NAMESPACE_DELETE_TIMEOUT_SECONDS
        while self.clock() < deadline:
            try:
                if self.api.get("Namespace", "", self.namespace) is None:
                    return
            except KubeError:
                return
            self.sleep(POLL_SECONDS)

    def teardown(self) -> None:
        self.stop_watching.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.delete_namespace()

    # -- the cell ----------------------------------------------------------------------------------

    def run(self, progress: Progress) -> CellResult:
        try:
            return self._run(progress)
        finally:
            self.teardown()

    def _run(self, progress: Progress) -> CellResult:
        setup_started = self.clock()
        self.deploy_backend()
        dataplane = self.verify_dataplane()
        self.start_watching()
        self.start_locust()
        self.wait_for_first_connection()
        self.setup_seconds = self.clock() - setup_started
        self.drain_watch()
        self.refresh_pods()
        self.t0, self.wall_t0 = self.clock(), self.wall_clock()
        for state in self.pods.values():
            state.created_at = 0.0  # created and ready before the cell's clock starts
            if state.ready:
                self.record("pod_ready", state.name, at=0.0, node=state.node)
        self.run_schedule(progress)
        files = self.stop_locust()
        self.drain_watch()
        return self.result(dataplane, files)

    def run_schedule(self, progress: Progress) -> None:
        """The timeline and the samples in real time (kpbench.schedule; the cluster runs its own
        controllers), reading the watches while waiting and before each timeline event."""
        events = schedule.EventQueue(schedule.plan(self.cfg, self.cell.seed, self.cell.mode,
                                                  modelled_control=False))

        def on_timeline(t: float, index: int) -> None:
            self.drain_watch()
            self.timeline(index)

        def on_sample(t: float, k: int) -> None:
            self.sample(t)
            progress(t)

        loop = schedule.RealTimeLoop(events, self.now, self.sleep, max_sleep=0.25,
                                     waiting=self.drain_watch)
        loop.run({Kind.TIMELINE: on_timeline, Kind.SAMPLE: on_sample}, self.cfg.duration_seconds)

    def result(self, dataplane: dict[str, Any], files: dict[str, bytes]) -> CellResult:
        samples = pd.DataFrame(self.sample_rows, columns=[
            "t", "pod", "node", "created_at", "ready", "terminating", "active_connections",
            "connections_total", "requests_total", "cpu_millicores"])
        samples["cpu_millicores"] = samples["cpu_millicores"].astype("float64")
        summary: dict[str, Any] = {}
        if "summary.json" in files:
            with contextlib.suppress(ValueError):
                summary = dict(json.loads(files["summary.json"]))
        events = list(self.event_rows)
        events += [(self.cfg.duration_seconds, "connection_failed", "", json.dumps(detail))
                   for detail in workload_failures(summary)]
        resets = ((summary.get("connections") or {}).get("closed") or {}).get("reset", 0)
        if resets:
            events.append((self.cfg.duration_seconds, "connection_reset", "", json.dumps(
                {"count": resets, "reason": "counted by the workload"})))
        events_frame = pd.DataFrame(events, columns=["t", "event", "pod", "detail"])
        events_frame = events_frame.sort_values("t", kind="stable").reset_index(drop=True)
        connections = pd.DataFrame(columns=CONNECTION_COLUMNS)
        artifacts = {name: content for name, content in files.items()
                     if name.endswith(".csv") or name == "summary.json"}
        if self.ipvs_rows:
            artifacts["ipvs.csv"] = pd.DataFrame(self.ipvs_rows, columns=ipvs.ROW_COLUMNS).to_csv(
                index=False).encode()
        lateness = np.asarray(self.sample_lateness) if self.sample_lateness else np.zeros(1)
        dataplane = dataplane | {
            "namespace": self.namespace,
            "setup_seconds": round(self.setup_seconds, 3),
            "sample_lateness_ms": {"median": round(float(np.median(lateness)) * 1000, 2),
                                   "max": round(float(lateness.max()) * 1000, 2)},
            "scrape_failures": self.scrape_failures,
            "workload": {k: summary.get(k) for k in ("connections", "requests")},
        }
        if self.l7_proxy:
            dataplane["l7_proxy"] = self.l7_proxy
        if self.ipvs_rows:
            last_t = self.ipvs_rows[-1]["t"]
            dataplane["ipvs_last_sample"] = [
                {k: row[k] for k in ("node", "pod", "weight", "active_connections",
                                     "inactive_connections")}
                for row in self.ipvs_rows if row["t"] == last_t]
        return CellResult(samples, events_frame, connections, dataplane, artifacts)
