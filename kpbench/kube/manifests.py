"""Everything the kind and cluster backends send to Docker, kind and Kubernetes, rendered offline.

Templates live in the repository's `manifests/`, which the wheel carries as
`kpbench/manifests/` (so an installed wheel renders them as a source checkout does; Jinja2,
values inserted through `tojson` so that no value can break the YAML): `kind/cluster.yaml.j2`
(the kind cluster per mode),
`app/backend.yaml.j2` (Deployment, Services, HPA), `app/locust.yaml.j2`, `app/l7-proxy.yaml.j2`
(HAProxy for `workload.proxy: l7`, its `haproxy.cfg` from `kpbench.haproxy` as in the lab),
`metrics-server.yaml` and `Dockerfile`.

Sources relied on:
- kind config fields: kubernetes-sigs/kind `pkg/apis/config/v1alpha4/types.go` (Cluster.name,
  nodes[].role/image/labels, networking.kubeProxyMode, kubeadmConfigPatches) and
  `pkg/internal/apis/config/validate.go` (cluster names match `^[a-z0-9.-]+$`; proxy modes
  iptables, ipvs, nftables, none). kind renders kubeadm documents plus a
  `KubeProxyConfiguration` (`kubeproxy.config.k8s.io/v1alpha1`) in
  `pkg/cluster/internal/kubeadm/config.go`: `kubeadm.k8s.io/v1beta3` for node images 1.23-1.35,
  `v1beta4` from 1.36 (kind >= v0.32). A patch applies to a rendered document when its kind
  matches and its apiVersion matches or is omitted (`pkg/internal/patch/resource.go`), and kind
  silently ignores one that matches nothing: the `ClusterConfiguration` patch therefore omits
  apiVersion and keeps v1beta3's `extraArgs` map, which kind >= v0.32 converts into v1beta4's
  `[{name, value}]` list for a patch without apiVersion (`pkg/internal/patch/kubeadm_merge.go`).
- The pinned node image: kubernetes-sigs/kind `pkg/apis/config/defaults/image.go` at tag
  v0.30.0, the default image of that release (Kubernetes 1.34.0, where IPVS mode is still
  supported and not yet deprecated; deprecation starts at 1.35, KEP-5495).
- HPA defaults (`behavior`): Kubernetes docs, horizontal-pod-autoscale.md.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from kpbench import haproxy
from kpbench.config import L7_PROXY_REPLICAS, Experiment
from kpbench.ipvs import scheduler_of
from kpbench.workload.plan import spawn_rate


def _manifests_folder() -> Path:
    """The repository's `manifests/`, or its copy in an installed wheel (`kpbench/manifests`)."""
    installed = Path(str(importlib.resources.files("kpbench"))) / "manifests"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "manifests"


MANIFESTS = _manifests_folder()

NODE_IMAGE = (
    "kindest/node:v1.34.0@sha256:7416a61b42b1662ca6ca89f02028ac133a309a2a30ba309614e8ec94d976dc5a"
)
"""kind v0.30.0's default node image (kubernetes-sigs/kind pkg/apis/config/defaults/image.go)."""
NODE_IMAGE_KIND_RELEASE = "v0.30.0"
KUBERNETES_VERSION = "1.34.0"  # of NODE_IMAGE; manifests are validated against this schema
HAPROXY_IMAGE = "haproxy:2.6.31"  # the official image, pinned by tag (digest not verified offline)
"""HAProxy 2.6 LTS as in the lab (Debian 12's 2.6.12); docker-library/haproxy `versions.json`."""
METRICS_SERVER_IMAGE = "registry.k8s.io/metrics-server/metrics-server:v0.8.1"

HTTP_PORT, GRPC_PORT, ADMIN_PORT, SERVICE_PORT = 8080, 9090, 9102, 80
LOCUST_MASTER_PORT, LOCUST_WEB_PORT = 5557, 8089
PROXY_PORT = 8080
HAPROXY_CONFIG_DIR = "/usr/local/etc/haproxy"  # the official image's default `-f` folder
HAPROXY_RUNTIME_SOCKET = "/var/lib/haproxy/admin.sock"  # owned by the image's `haproxy` user
LOCUST_RUN_TIME_MARGIN_SECONDS = 600  # Locust is stopped by SIGTERM when the cell ends
IMAGE_LOCUSTFILE = "/app/kpbench/workload/locustfile.py"
EXPERIMENT_MOUNT = "/etc/kpbench/experiment.yaml"
RESULTS_DIR = "/results"

PART_OF_LABEL = "app.kubernetes.io/part-of=kpbench"
BACKEND_SELECTOR = "app.kubernetes.io/name=backend"
CLUSTER_PREFIX = "kpbench-"

_environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(MANIFESTS),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,  # YAML, not HTML; values go through `tojson`
)


def _render(template: str, **values: Any) -> str:
    return _environment.get_template(template).render(**values)


def _documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


# -- kind clusters ---------------------------------------------------------------------------------


def proxy_mode_and_scheduler(mode: str) -> tuple[str, str | None]:
    """kpbench mode -> (kube-proxy mode, IPVS scheduler or None): `ipvs-lc` -> ("ipvs", "lc")."""
    if mode.startswith("ipvs-"):
        return "ipvs", scheduler_of(mode)
    return mode, None


def controller_manager_args(experiment: Experiment) -> dict[str, str]:
    """kube-controller-manager flags for HPA settings that differ from Kubernetes' defaults."""
    hpa = experiment.backend.hpa
    args: dict[str, str] = {}
    if hpa is None:
        return args
    if hpa.sync_seconds != 15:
        args["horizontal-pod-autoscaler-sync-period"] = f"{hpa.sync_seconds:g}s"
    if hpa.tolerance != 0.1:
        args["horizontal-pod-autoscaler-tolerance"] = f"{hpa.tolerance:g}"
    if hpa.cpu_initialization_period_seconds != 300:
        args["horizontal-pod-autoscaler-cpu-initialization-period"] = (
            f"{hpa.cpu_initialization_period_seconds:g}s")
    if hpa.initial_readiness_delay_seconds != 30:
        args["horizontal-pod-autoscaler-initial-readiness-delay"] = (
            f"{hpa.initial_readiness_delay_seconds:g}s")
    return args


@dataclass(frozen=True)
class ClusterSpec:
    """What defines a kind cluster: two specs with the same hash can share one cluster."""

    mode: str
    workers: int
    node_image: str
    controller_manager_args: tuple[tuple[str, str], ...] = ()
    min_sync_seconds: float | None = None  # kube-proxy's <mode>.minSyncPeriod; None: default

    @classmethod
    def for_mode(cls, experiment: Experiment, mode: str) -> ClusterSpec:
        return cls(mode, experiment.cluster.nodes, experiment.cluster.node_image or NODE_IMAGE,
                   tuple(sorted(controller_manager_args(experiment).items())),
                   experiment.cluster.kube_proxy.min_sync_seconds)

    @property
    def config_hash(self) -> str:
        parts: list[Any] = [self.mode, self.workers, self.node_image,
                            list(self.controller_manager_args)]
        if self.min_sync_seconds is not None:  # keeps the hashes of earlier clusters
            parts.append(self.min_sync_seconds)
        key = json.dumps(parts)
        return hashlib.sha256(key.encode()).hexdigest()[:8]

    @property
    def name(self) -> str:
        """`kpbench-<mode>-<config hash>`, a valid kind cluster name (`^[a-z0-9.-]+$`)."""
        return f"{CLUSTER_PREFIX}{self.mode}-{self.config_hash}"

    def kind_config(self) -> str:
        proxy_mode, scheduler = proxy_mode_and_scheduler(self.mode)
        return _render(
            "kind/cluster.yaml.j2", name=self.name, mode=self.mode, config_hash=self.config_hash,
            proxy_mode=proxy_mode, scheduler=scheduler, workers=self.workers,
            node_image=self.node_image,
            controller_manager_args=dict(self.controller_manager_args),
            min_sync_period=(None if self.min_sync_seconds is None
                             else f"{self.min_sync_seconds:g}s"),
        )


def node_image_tag(node_image: str) -> str:
    """`kindest/node:v1.34.0@sha256:...` -> `v1.34.0`."""
    return node_image.split("@", 1)[0].rsplit(":", 1)[-1]


def node_image_version(node_image: str) -> tuple[int, int] | None:
    """(major, minor) of a kindest/node tag like `v1.34.0`, else None."""
    tag = node_image_tag(node_image).lstrip("v").split(".")
    try:
        return int(tag[0]), int(tag[1])
    except (IndexError, ValueError):
        return None


# -- the application in a namespace ----------------------------------------------------------------


def _int_or_percent(value: int | str) -> int | str:
    return value if isinstance(value, str) else int(value)


def service_host(namespace: str, experiment: Experiment) -> str:
    """The address the Locust workers load: the backend Service, or the L7 proxy's."""
    grpc = experiment.workload.protocol == "grpc"
    if experiment.workload.proxy == "l7":
        name, port = "l7-proxy", SERVICE_PORT
    else:
        name, port = "backend", GRPC_PORT if grpc else SERVICE_PORT
    address = f"{name}.{namespace}.svc.cluster.local:{port}"
    return f"http://{address}" if experiment.workload.protocol == "http" else address


def master_command(namespace: str, experiment: Experiment) -> list[str]:
    """Locust's master, started at once (`--autostart`) with its web API on for inspection; the
    same options as `python -m kpbench.workload --master` otherwise (kpbench.workload.__main__).
    `load` events need nothing from outside: the locustfile follows their schedule."""
    workload = experiment.workload
    users = workload.connections
    run_time = round(experiment.duration_seconds + LOCUST_RUN_TIME_MARGIN_SECONDS)
    return [
        "python", "-m", "locust", "-f", IMAGE_LOCUSTFILE, "--exit-code-on-error", "0",
        "--master", "--master-bind-port", str(LOCUST_MASTER_PORT),
        "--expect-workers", str(workload.clients), "--autostart", "--autoquit", "5",
        "--web-port", str(LOCUST_WEB_PORT), "--only-summary",
        "-u", str(users), "-r", f"{spawn_rate(users, workload.ramp_seconds):g}",
        "-t", f"{run_time}s",
        "--host", service_host(namespace, experiment),
        "--csv", f"{RESULTS_DIR}/locust", "--kpbench-summary", f"{RESULTS_DIR}/summary.json",
    ]


def worker_command() -> list[str]:
    return ["python", "-m", "kpbench.workload", "--config", EXPERIMENT_MOUNT, "--worker",
            "--master-host", "locust-master", "--master-port", str(LOCUST_MASTER_PORT)]


def backend_manifests(namespace: str, experiment: Experiment, image: str) -> list[dict[str, Any]]:
    backend = experiment.backend
    grpc = experiment.workload.protocol == "grpc"
    hpa = None
    if backend.hpa is not None:
        hpa = {
            "min_replicas": backend.hpa.min_replicas, "max_replicas": backend.hpa.max_replicas,
            "target": max(1, round(backend.hpa.target_cpu_utilization)),
            "scale_down_stabilization_seconds": round(
                backend.hpa.scale_down_stabilization_seconds),
        }
    text = _render(
        "app/backend.yaml.j2", namespace=namespace, replicas=backend.replicas, image=image,
        max_surge=_int_or_percent(backend.rollout.max_surge),
        max_unavailable=_int_or_percent(backend.rollout.max_unavailable),
        termination_grace_seconds=math.ceil(backend.termination_grace_seconds),
        http_port=HTTP_PORT, grpc_port=GRPC_PORT, admin_port=ADMIN_PORT,
        grpc_port_value=str(GRPC_PORT) if grpc else "off",
        cpu_per_request=f"{backend.cpu_per_request_millicores:g}",
        shutdown_drain_seconds=f"{min(1.0, backend.termination_grace_seconds):g}",
        max_connection_age=("none" if backend.max_connection_age_seconds is None
                            else f"{backend.max_connection_age_seconds:g}"),
        cpu_request=f"{backend.cpu_request_millicores:g}m",
        readiness_period=max(1, round(backend.readiness_period_seconds)),
        service_port=SERVICE_PORT if not grpc else GRPC_PORT,
        service_port_name="grpc" if grpc else "http",
        target_port=GRPC_PORT if grpc else HTTP_PORT, hpa=hpa,
    )
    return _documents(text)


def locust_manifests(namespace: str, experiment: Experiment, image: str) -> list[dict[str, Any]]:
    raw = experiment.model_dump(mode="json")
    text = _render(
        "app/locust.yaml.j2", namespace=namespace, image=image,
        experiment_yaml=yaml.safe_dump(raw, sort_keys=False),
        experiment_json=experiment.model_dump_json(),
        master_command=master_command(namespace, experiment), worker_command=worker_command(),
        master_port=LOCUST_MASTER_PORT, web_port=LOCUST_WEB_PORT,
        clients=experiment.workload.clients,
    )
    return _documents(text)


def backend_pods_host(namespace: str) -> str:
    """The headless Service whose A records are the ready backend pods."""
    return f"backend-pods.{namespace}.svc.cluster.local"


def haproxy_config(namespace: str, experiment: Experiment) -> str:
    """The proxies' haproxy.cfg: the lab's settings, slots filled from the headless Service."""
    protocol = experiment.workload.protocol
    target_port = GRPC_PORT if protocol == "grpc" else HTTP_PORT
    return haproxy.haproxy_config(protocol, PROXY_PORT, HAPROXY_RUNTIME_SOCKET,
                                  haproxy.DnsDiscovery(backend_pods_host(namespace), target_port))


def l7_proxy_manifests(namespace: str, experiment: Experiment) -> list[dict[str, Any]]:
    text = _render(
        "app/l7-proxy.yaml.j2", namespace=namespace,
        haproxy_cfg=haproxy_config(namespace, experiment), haproxy_image=HAPROXY_IMAGE,
        config_dir=HAPROXY_CONFIG_DIR, proxy_port=PROXY_PORT, service_port=SERVICE_PORT,
        proxy_replicas=L7_PROXY_REPLICAS,
    )
    return _documents(text)


def namespace_manifest(namespace: str, run_label: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace,
                         "labels": {"app.kubernetes.io/part-of": "kpbench",
                                    "kpbench.io/run": run_label}}}


def metrics_server_manifests() -> list[dict[str, Any]]:
    return _documents((MANIFESTS / "metrics-server.yaml").read_text())


def cell_stages(namespace: str, experiment: Experiment, image: str,
                run_label: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """One cell's objects in the order the driver applies them: the namespace, the backend and
    (for `workload.proxy: l7`) the proxies first; Locust once they are ready."""
    backend = [namespace_manifest(namespace, run_label),
               *backend_manifests(namespace, experiment, image)]
    if experiment.workload.proxy == "l7":
        backend += l7_proxy_manifests(namespace, experiment)
    return [("backend", backend), ("locust", locust_manifests(namespace, experiment, image))]


def application_manifests(namespace: str, experiment: Experiment,
                          image: str) -> list[dict[str, Any]]:
    """Every object of one cell's namespace but the namespace itself, in the order applied."""
    return [document for _, documents in cell_stages(namespace, experiment, image, "")
            for document in documents if document["kind"] != "Namespace"]


# -- the image -----------------------------------------------------------------------------------


IMAGE_REPOSITORY = "localhost/kpbench/kpbench"
"""One fully qualified local name for Docker and podman alike: podman stores an unqualified
`kpbench/kpbench` as `localhost/kpbench/kpbench`, and containerd on the nodes would read an
unqualified name as `docker.io/...`; with `localhost/` all three agree."""


def image_context_files() -> dict[str, bytes]:
    """The Docker build context: the Dockerfile and the `kpbench` package sources only."""
    package = Path(str(importlib.resources.files("kpbench")))
    files = {"Dockerfile": (MANIFESTS / "Dockerfile").read_bytes()}
    for path in sorted(package.rglob("*.py")):
        files[str(path.relative_to(package.parent))] = path.read_bytes()
    return files


def image_tag(files: dict[str, bytes] | None = None) -> str:
    """`localhost/kpbench/kpbench:<12 hex of the build context>`: rebuilt only when the sources
    change."""
    digest = hashlib.sha256()
    for name, content in sorted((files or image_context_files()).items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return f"{IMAGE_REPOSITORY}:{digest.hexdigest()[:12]}"
