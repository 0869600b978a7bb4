"""An in-memory double of `KubeApi` and of kind's node tables, for the offline tests.

It is a DOUBLE, not a cluster: it keeps objects in a dict and plays the controllers crudely
(a Deployment's pods appear ready at once, a rollout replaces every pod at once, a deleted pod is
replaced at once). It exists to test the driver's logic — which calls it makes, what it records,
how it samples and cleans up — and is no substitute for the end-to-end test on kind
(`tests/test_kind_e2e.py`, `nox -s e2e-kind`).
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from kpbench.kube.driver import LIST_RESULTS, SHOW_SERVERS, STOP_LOCUST

SERVICE_IP = "10.96.0.10"


def _labels_match(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeClock:
    """Time that advances only when the driver sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now


class InMemoryKubeDouble:
    """`KubeApi` over dicts; records every mutating call in `calls`."""

    def __init__(self, nodes: int = 3, proxy_mode: str = "iptables", scheduler: str = "",
                 metrics_after: int = 0) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.changes: list[tuple[str, str, dict[str, Any]]] = []
        self.watch_positions: dict[str, int] = {}
        self.lock = threading.RLock()
        self.node_names = [f"worker{i + 1}" for i in range(nodes)]
        self.ip_counter = itertools.count(2)
        self.pod_counter = itertools.count(1)
        self.revision = 1
        self.locust_stopped = False
        self.active_per_pod = 10
        self.metrics_after = metrics_after  # NodeMetrics listings before metrics-server answers
        self.summary = {"connections": {"opened": 12, "failed": 2, "closed": {"reset": 3}}}
        conf = f"mode: {proxy_mode}\n" + (f"ipvs:\n  scheduler: {scheduler}\n" if scheduler else "")
        self.objects[("ConfigMap", "kube-system", "kube-proxy")] = {
            "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
            "data": {"config.conf": conf},
        }

    # -- helpers -----------------------------------------------------------------------------------

    def _change(self, kind: str, change: str, obj: dict[str, Any]) -> None:
        self.changes.append((kind, change, copy.deepcopy(obj)))

    def pods(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        return [o for (k, ns, _), o in self.objects.items() if k == "Pod" and ns == namespace
                and _labels_match(o["metadata"].get("labels", {}), selector)]

    def _new_pod(self, namespace: str, labels: dict[str, str], prefix: str) -> None:
        index = next(self.pod_counter)
        name = f"{prefix}-{self.revision}-{index}"
        pod = {
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels),
                         "creationTimestamp": "2023-11-14T22:13:20Z"},
            "spec": {"nodeName": self.node_names[index % len(self.node_names)]},
            "status": {"phase": "Running", "podIP": f"10.244.0.{next(self.ip_counter)}",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }
        self.objects[("Pod", namespace, name)] = pod
        self._change("Pod", "ADDED", pod)
        self._sync_slice(namespace)

    def _remove_pod(self, namespace: str, name: str, graceful: bool = True) -> None:
        """A graceful delete shows the pod terminating first (deletionTimestamp), as the API
        server does; grace 0 removes it at once."""
        pod = self.objects.pop(("Pod", namespace, name), None)
        if pod is not None:
            if graceful:
                pod["metadata"]["deletionTimestamp"] = "2023-11-14T22:13:30Z"
                self._change("Pod", "MODIFIED", pod)
            self._change("Pod", "DELETED", pod)
            self._sync_slice(namespace)

    def restart_container(self, namespace: str, name: str) -> None:
        """What the kubelet shows after a container crashed and was restarted."""
        with self.lock:
            pod = self.objects[("Pod", namespace, name)]
            pod["status"]["containerStatuses"] = [{"name": "server", "restartCount": 1,
                                                   "state": {"running": {}}}]
            self._change("Pod", "MODIFIED", pod)

    def _sync_slice(self, namespace: str) -> None:
        backends = self.pods(namespace, "app.kubernetes.io/name=backend")
        endpoint_slice = {
            "metadata": {"name": "backend-abcde", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": "backend"}},
            "endpoints": [{"addresses": [p["status"]["podIP"]],
                           "conditions": {"ready": True, "serving": True, "terminating": False}}
                          for p in backends],
        }
        self.objects[("EndpointSlice", namespace, "backend-abcde")] = endpoint_slice
        self._change("EndpointSlice", "MODIFIED", endpoint_slice)

    def _reconcile(self, namespace: str, name: str) -> None:
        deployment = self.objects[("Deployment", namespace, name)]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = ",".join(f"{k}={v}" for k, v in labels.items()
                            if k == "app.kubernetes.io/name")
        current = self.pods(namespace, selector)
        wanted = deployment["spec"].get("replicas", 1)
        for pod in current[wanted:]:
            self._remove_pod(namespace, pod["metadata"]["name"])
        for _ in range(wanted - len(current)):
            self._new_pod(namespace, labels, name)

    # -- KubeApi -----------------------------------------------------------------------------------

    def apply(self, manifest: dict[str, Any]) -> None:
        with self.lock:
            kind, metadata = manifest["kind"], manifest["metadata"]
            namespace = metadata.get("namespace", "")
            self.calls.append(("apply", kind, namespace, metadata["name"]))
            obj = copy.deepcopy(manifest)
            if kind == "Service":
                obj["spec"]["clusterIP"] = SERVICE_IP if metadata["name"] == "backend" else "None"
            self.objects[(kind, namespace, metadata["name"])] = obj
            if kind == "Deployment":
                self._reconcile(namespace, metadata["name"])
            elif kind == "Pod":
                running = [{"name": "locust", "state": {"running": {}}}]
                obj["status"] = {"phase": "Running", "podIP": "10.244.9.9",
                                 "containerStatuses": running}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            if kind == "HorizontalPodAutoscaler" and (kind, namespace, name) in self.objects:
                replicas = self.objects[("Deployment", namespace, "backend")]["spec"]["replicas"]
                return {"status": {"desiredReplicas": replicas}}
            found = self.objects.get((kind, namespace, name))
            return copy.deepcopy(found) if found is not None else None

    def list_objects(self, kind: str, namespace: str,
                     selector: str = "") -> list[dict[str, Any]]:
        with self.lock:
            if kind == "Node":
                return [{"metadata": {"name": name}} for name in ["control-plane",
                                                                  *self.node_names]]
            if kind == "NodeMetrics":
                self.calls.append(("list", "NodeMetrics"))
                if self.metrics_after > 0:
                    self.metrics_after -= 1
                    return []
                return [{"metadata": {"name": name}, "usage": {"cpu": "100m"}}
                        for name in ["control-plane", *self.node_names]]
            if kind == "PodMetrics":
                return [{"metadata": {"name": p["metadata"]["name"]},
                         "containers": [{"name": "server", "usage": {"cpu": "25000000n"}}]}
                        for p in self.pods(namespace, selector)]
            return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items()
                    if k == kind and ns == namespace
                    and _labels_match(o["metadata"].get("labels", {}), selector)]

    def delete(self, kind: str, namespace: str, name: str,
               grace_seconds: int | None = None) -> None:
        with self.lock:
            self.calls.append(("delete", kind, namespace, name, grace_seconds))
            if kind == "Namespace":
                for key in [k for k in self.objects if k[1] == name]:
                    del self.objects[key]
                return
            if kind == "Pod":
                pod = self.objects.get(("Pod", namespace, name))
                self._remove_pod(namespace, name, graceful=grace_seconds != 0)
                if pod is not None and pod["metadata"]["labels"].get(
                        "app.kubernetes.io/name") == "backend":
                    self._reconcile(namespace, "backend")
                return
            self.objects.pop((kind, namespace, name), None)

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        with self.lock:
            self.calls.append(("patch", kind, namespace, name, copy.deepcopy(patch)))
            deployment = self.objects[(kind, namespace, name)]
            annotations = patch["spec"]["template"]["metadata"]["annotations"]
            deployment["spec"]["template"]["metadata"].setdefault("annotations", {}).update(
                annotations)
            self.revision += 1
            for pod in self.pods(namespace, "app.kubernetes.io/name=backend"):
                self._remove_pod(namespace, pod["metadata"]["name"])
            self._reconcile(namespace, name)

    def scale(self, namespace: str, deployment: str, replicas: int) -> None:
        with self.lock:
            self.calls.append(("scale", namespace, deployment, replicas))
            self.objects[("Deployment", namespace, deployment)]["spec"]["replicas"] = replicas
            self._reconcile(namespace, deployment)

    def proxy(self, method: str, namespace: str, pod: str, port: int, path: str,
              form: dict[str, str] | None = None, timeout: float = 5.0) -> str:
        with self.lock:
            self.calls.append(("proxy", method, pod, port, path, form))
            if path == "metrics":
                node = self.objects[("Pod", namespace, pod)]["spec"]["nodeName"]
                labels = f'pod="{pod}",node="{node}",protocol="http"'
                return (f"kpbench_active_connections{{{labels}}} {self.active_per_pod}\n"
                        f"kpbench_connections_total{{{labels}}} {self.active_per_pod}\n"
                        f"kpbench_requests_total{{{labels}}} 100\n")
            return '{"success": true}'

    def exec(self, namespace: str, pod: str, container: str, command: list[str]) -> str:
        with self.lock:
            self.calls.append(("exec", pod, container, tuple(command)))
            if command == STOP_LOCUST:
                master = self.objects[("Pod", namespace, "locust-master")]
                master["status"]["containerStatuses"] = [
                    {"name": "locust", "state": {"terminated": {"exitCode": 0}}}]
                return ""
            if command == SHOW_SERVERS:
                return self.servers_state(namespace)
            if command == LIST_RESULTS:
                files = {"locust_stats.csv": b"Type,Name\n,Aggregated\n",
                         "summary.json": json.dumps(self.summary).encode()}
                return "".join(f"{name}\n{base64.b64encode(content).decode()}\n"
                               for name, content in files.items())
            return ""

    def servers_state(self, namespace: str) -> str:
        """`show servers state backend` of an HAProxy that resolved every backend pod."""
        lines = ["1", "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state "
                 "srv_uweight srv_iweight srv_time_since_last_change srv_check_status "
                 "srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id "
                 "srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port "
                 "srv_check_addr srv_agent_addr srv_agent_port"]
        config = self.objects[("ConfigMap", namespace, "l7-proxy")]["data"]["haproxy.cfg"]
        port = re.search(r"server-template \S+ \S+ \S+:(\d+)", config).group(1)  # type: ignore[union-attr]
        pods = self.pods(namespace, "app.kubernetes.io/name=backend")
        for slot, pod in enumerate(pods, start=1):
            lines.append(f"3 backend {slot} pod{slot} {pod['status']['podIP']} 2 0 1 1 0 1 0 0 "
                         f"8 0 0 0 - {port} - 0 0 - - 0")
        return "\n".join(lines) + "\n"

    def watch(self, kind: str, namespace: str, selector: str,
              timeout_seconds: int) -> Iterator[tuple[str, dict[str, Any]]]:
        with self.lock:
            start = self.watch_positions.get(kind, len(self.changes))
            pending = [(c, o) for k, c, o in self.changes[start:] if k == kind
                       and o["metadata"].get("namespace") == namespace
                       and _labels_match(o["metadata"].get("labels", {}), selector)]
            self.watch_positions[kind] = len(self.changes)
        yield from pending
        time.sleep(0.01)


class FakeNodes:
    """`NodeTables` with canned kernel tables for the double's pods."""

    def __init__(self, api: InMemoryKubeDouble, namespace: str, mode: str,
                 scheduler_shown: str | None = None) -> None:
        self.api = api
        self.namespace = namespace
        self.mode = mode
        self.scheduler_shown = scheduler_shown

    def nodes(self) -> list[str]:
        return list(self.api.node_names)

    def ip_vs_text(self) -> str:
        scheduler = self.scheduler_shown or self.mode.removeprefix("ipvs-")
        lines = ["IP Virtual Server version 1.2.1 (size=4096)",
                 "Prot LocalAddress:Port Scheduler Flags",
                 "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn",
                 f"TCP  0A60000A:0050 {scheduler}"]
        for pod in self.api.pods(self.namespace, "app.kubernetes.io/name=backend"):
            address = pod["status"]["podIP"].split(".")
            hexed = "".join(f"{int(part):02X}" for part in address)
            lines.append(f"  -> {hexed}:1F90      Masq    1      3          1")
        return "\n".join(lines) + "\n"

    def read(self, node: str, ipvs_only: bool = False) -> dict[str, str]:
        if self.mode.startswith("ipvs-"):
            return {"ip_vs": self.ip_vs_text(), "iptables": "", "nft": ""}
        if self.mode == "nftables":
            return {"ip_vs": "", "iptables": "", "nft": (
                "table ip kube-proxy {\n  chain service-X {\n"
                "    numgen random mod 6 vmap { 0 : goto endpoint-A }\n  }\n}\n")}
        return {"ip_vs": "", "nft": "", "iptables": (
            ":KUBE-SVC-ABCDEF0123456789 - [0:0]\n"
            "-A KUBE-SVC-ABCDEF0123456789 -m statistic --mode random --probability 0.5 "
            "-j KUBE-SEP-1\n")}
