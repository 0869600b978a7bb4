"""The kind and cluster backends, offline: everything they generate, preflight, and the driver's
logic against an in-memory double of the Kubernetes API (not a cluster: see test_kind_e2e.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kubernetes_validate
import pandas as pd
import pytest
import yaml

from analysis.metrics import cell_metrics
from kpbench import haproxy
from kpbench.backends import PreflightError, docker_and_kind
from kpbench.config import (
    ALL_MODES,
    L7_PROXY_REPLICAS,
    Cell,
    Experiment,
    expand_cells,
    load,
    validate,
)
from kpbench.kube import manifests
from kpbench.kube.backend import (
    ClusterBackend,
    ClusterSetupError,
    KindBackend,
    wait_for_node_metrics,
    workload_problems,
)
from kpbench.kube.cluster import ClusterError, KindCli
from kpbench.kube.driver import RESTARTED_AT, KubeCell, decode_results
from kpbench.kube.preflight import KIND_DEFAULT_NODE_IMAGES, Host, kind_problems
from kpbench.kube.verify import (
    DataplaneMismatch,
    check_node,
    iptables_service_chains,
    kube_proxy_settings,
)
from kpbench.lab import l7
from kpbench.results import SAMPLE_COLUMNS

from .conftest import EXPERIMENTS, REPOSITORY
from .kind_double import FakeClock, FakeNodes, InMemoryKubeDouble
from .test_ipvs import IP_VS

SCHEMA_VERSION = manifests.KUBERNETES_VERSION  # the pinned node image's Kubernetes

# JSON field names of kind's v1alpha4 types (kubernetes-sigs/kind pkg/apis/config/v1alpha4/types.go)
KIND_CLUSTER_FIELDS = {"kind", "apiVersion", "name", "nodes", "networking", "featureGates",
                       "runtimeConfig", "kubeadmConfigPatches", "kubeadmConfigPatchesJSON6902",
                       "containerdConfigPatches", "containerdConfigPatchesJSON6902"}
KIND_NODE_FIELDS = {"role", "image", "labels", "extraMounts", "extraPortMappings",
                    "kubeadmConfigPatches", "kubeadmConfigPatchesJSON6902"}
KIND_NETWORKING_FIELDS = {"ipFamily", "apiServerPort", "apiServerAddress", "podSubnet",
                          "serviceSubnet", "disableDefaultCNI", "kubeProxyMode", "dnsSearch"}


def experiment(**overrides: Any) -> Experiment:
    raw = yaml.safe_load((EXPERIMENTS / "quickstart.yaml").read_text())
    raw.update(overrides)
    return validate(raw)


# -- kind cluster configs ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
def test_kind_config_per_mode_uses_kinds_v1alpha4_fields(mode: str) -> None:
    config = experiment(modes=[mode], cluster={"nodes": 3})
    spec = manifests.ClusterSpec.for_mode(config, mode)
    document = yaml.safe_load(spec.kind_config())
    assert set(document) <= KIND_CLUSTER_FIELDS
    assert document["kind"] == "Cluster" and document["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert re.fullmatch(r"[a-z0-9.-]+", document["name"])  # kind's validNameRE
    assert document["name"] == f"kpbench-{mode}-{spec.config_hash}"
    assert set(document["networking"]) <= KIND_NETWORKING_FIELDS
    proxy_mode = "ipvs" if mode.startswith("ipvs-") else mode
    assert document["networking"]["kubeProxyMode"] == proxy_mode
    roles = [node["role"] for node in document["nodes"]]
    assert roles == ["control-plane", "worker", "worker", "worker"]
    for node in document["nodes"]:
        assert set(node) <= KIND_NODE_FIELDS
        assert re.fullmatch(r"kindest/node:v1\.\d+\.\d+@sha256:[0-9a-f]{64}", node["image"])
    (patch,) = [yaml.safe_load(p) for p in document["kubeadmConfigPatches"]]
    assert patch["apiVersion"] == "kubeproxy.config.k8s.io/v1alpha1"
    assert patch["kind"] == "KubeProxyConfiguration" and patch["mode"] == proxy_mode
    if mode.startswith("ipvs-"):
        assert patch["ipvs"] == {"scheduler": mode.removeprefix("ipvs-")}
    else:
        assert "ipvs" not in patch


def test_cluster_names_hash_what_defines_the_cluster() -> None:
    base = experiment()
    same = manifests.ClusterSpec.for_mode(base, "iptables")
    assert same.name == manifests.ClusterSpec.for_mode(experiment(seeds=1), "iptables").name
    bigger = manifests.ClusterSpec.for_mode(experiment(cluster={"nodes": 4}), "iptables")
    assert bigger.name != same.name
    assert manifests.ClusterSpec.for_mode(base, "ipvs-rr").name.startswith("kpbench-ipvs-rr-")


def kind_renders_cluster_configuration(api_version: str) -> dict[str, Any]:
    """The ClusterConfiguration kind renders (pkg/cluster/internal/kubeadm/config.go), reduced to
    controllerManager.extraArgs in each version's shape: v1beta3 a map, v1beta4 a name/value
    list."""
    args: Any = {"enable-hostpath-provisioner": "true"}
    if api_version.endswith("v1beta4"):
        args = [{"name": k, "value": v} for k, v in args.items()]
    return {"apiVersion": api_version, "kind": "ClusterConfiguration",
            "controllerManager": {"extraArgs": args}}


def apply_kind_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any] | None:
    """kind's documented patch rules (pkg/internal/patch/resource.go, kubeadm_merge.go): a patch
    applies when its kind matches and its apiVersion matches or is omitted, else it is silently
    ignored (None); an extraArgs map in a patch without apiVersion is merged into a v1beta4
    name/value list."""
    if patch["kind"] != target["kind"] or patch.get("apiVersion", target["apiVersion"]) != \
            target["apiVersion"]:
        return None
    merged = json.loads(json.dumps(target))
    extra = patch["controllerManager"]["extraArgs"]
    current = merged["controllerManager"]["extraArgs"]
    if isinstance(current, list):
        assert "apiVersion" not in patch or isinstance(extra, list)
        pairs = extra.items() if isinstance(extra, dict) else [(a["name"], a["value"])
                                                                 for a in extra]
        for name, value in pairs:
            current[:] = [a for a in current if a["name"] != name] + [{"name": name,
                                                                        "value": value}]
    else:
        current.update(extra)
    return merged


@pytest.mark.parametrize("kubeadm_version", ["kubeadm.k8s.io/v1beta3", "kubeadm.k8s.io/v1beta4"])
def test_hpa_settings_reach_the_controller_manager_in_either_kubeadm_version(
        kubeadm_version: str) -> None:
    hpa = {"min_replicas": 2, "max_replicas": 8, "sync_seconds": 5}
    config = experiment(backend={"replicas": 2, "hpa": hpa})
    document = yaml.safe_load(manifests.ClusterSpec.for_mode(config, "iptables").kind_config())
    patches = [yaml.safe_load(p) for p in document["kubeadmConfigPatches"]]
    (patch,) = [p for p in patches if p["kind"] == "ClusterConfiguration"]
    merged = apply_kind_patch(kind_renders_cluster_configuration(kubeadm_version), patch)
    assert merged is not None, f"kind would ignore the patch for {kubeadm_version}"
    args = merged["controllerManager"]["extraArgs"]
    found = args if isinstance(args, dict) else {a["name"]: a["value"] for a in args}
    assert found == {"enable-hostpath-provisioner": "true",
                     "horizontal-pod-autoscaler-sync-period": "5s"}


def test_hpa_settings_patch_the_controller_manager_only_when_not_default() -> None:
    default = experiment(backend={"replicas": 2, "hpa": {"max_replicas": 8}})
    assert len(yaml.safe_load(manifests.ClusterSpec.for_mode(
        default, "iptables").kind_config())["kubeadmConfigPatches"]) == 1


# -- Kubernetes manifests --------------------------------------------------------------------------


VARIANTS = {
    "quickstart": {},
    "grpc-l7-hpa-age": {
        "workload": {"protocol": "grpc", "proxy": "l7", "clients": 4, "connections": 40},
        "backend": {"replicas": 3, "max_connection_age_seconds": 30,
                    "rollout": {"max_surge": 2, "max_unavailable": 0},
                    "hpa": {"min_replicas": 2, "max_replicas": 9,
                            "target_cpu_utilization": 60}},
    },
    "http-l7": {"workload": {"proxy": "l7"}},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_validates_against_the_pinned_kubernetes_schema(variant: str) -> None:
    config = experiment(**VARIANTS[variant])
    documents = manifests.application_manifests("kpbench-abc123-1", config, "kpbench/kpbench:x")
    documents += manifests.metrics_server_manifests()
    documents.append(manifests.namespace_manifest("kpbench-abc123-1", "abc123"))
    for document in documents:
        kubernetes_validate.validate(document, SCHEMA_VERSION, strict=True)
    kinds = [d["kind"] for d in documents]
    assert kinds.count("HorizontalPodAutoscaler") == (1 if config.backend.hpa else 0)
    assert ("l7-proxy" in {d["metadata"]["name"] for d in documents}) == (
        config.workload.proxy == "l7")


def test_the_validator_rejects_a_broken_manifest() -> None:
    (deployment, *_) = manifests.backend_manifests("ns", experiment(), "img")
    deployment["spec"]["replicas"] = "six"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, SCHEMA_VERSION, strict=True)


def test_backend_deployment_carries_the_config() -> None:
    config = experiment(backend={"replicas": 4, "cpu_request_millicores": 250,
                                 "termination_grace_seconds": 12.5,
                                 "rollout": {"max_surge": 1, "max_unavailable": "50%"}})
    deployment, service, headless = manifests.backend_manifests("ns", config, "img:1")
    spec = deployment["spec"]
    assert spec["replicas"] == 4
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": "50%"}
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 13
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["resources"]["requests"]["cpu"] == "250m"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KPBENCH_ADMIN_PORT"] == str(manifests.ADMIN_PORT)
    assert env["KPBENCH_GRPC_PORT"] == "off" and env["KPBENCH_MAX_CONNECTION_AGE_SECONDS"] == "none"
    assert service["spec"]["type"] == "ClusterIP" and headless["spec"]["clusterIP"] == "None"


def test_hpa_is_autoscaling_v2_with_the_configured_behavior() -> None:
    hpa = {"min_replicas": 2, "max_replicas": 9, "target_cpu_utilization": 60,
           "scale_down_stabilization_seconds": 120}
    documents = manifests.backend_manifests("ns", experiment(backend={"hpa": hpa}), "img")
    (autoscaler,) = [d for d in documents if d["kind"] == "HorizontalPodAutoscaler"]
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    spec = autoscaler["spec"]
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 9)
    assert spec["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120


def test_locust_master_and_workers() -> None:
    config = experiment(workload={"clients": 5, "connections": 50, "ramp_seconds": 10})
    documents = manifests.locust_manifests("ns", config, "img")
    by_name = {d["metadata"]["name"]: d for d in documents if d["kind"] != "Service"}
    master = by_name["locust-master"]["spec"]["containers"][0]["command"]
    assert "--autostart" in master and "--headless" not in master
    assert master[master.index("--expect-workers") + 1] == "5"
    assert master[master.index("-u") + 1] == "50" and master[master.index("-r") + 1] == "5"
    assert master[master.index("--host") + 1] == "http://backend.ns.svc.cluster.local:80"
    workers = by_name["locust-worker"]["spec"]
    assert workers["replicas"] == 5
    spread = workers["template"]["spec"]["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["maxSkew"] == 1
    stored = yaml.safe_load(by_name["kpbench-experiment"]["data"]["experiment.yaml"])
    assert validate(stored) == config


def test_metrics_server_is_pinned_and_insecure_tls_for_kind() -> None:
    documents = manifests.metrics_server_manifests()
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == manifests.METRICS_SERVER_IMAGE
    assert "--kubelet-insecure-tls" in container["args"]
    assert {d["kind"] for d in documents} >= {"APIService", "ClusterRole", "ServiceAccount"}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_kind_proxy_is_haproxy_with_the_labs_settings(protocol: str, tmp_path: Path) -> None:
    config = experiment(workload={"proxy": "l7", "protocol": protocol})
    documents = manifests.l7_proxy_manifests("ns1", config)
    kinds = {d["kind"]: d for d in documents}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == manifests.HAPROXY_IMAGE
    assert re.fullmatch(r"haproxy:2\.6\.\d+", manifests.HAPROXY_IMAGE)  # pinned, as in the lab
    assert kinds["Deployment"]["spec"]["replicas"] == L7_PROXY_REPLICAS
    assert not any("envoy" in json.dumps(d).lower() for d in documents)
    text = kinds["ConfigMap"]["data"]["haproxy.cfg"]
    port = manifests.GRPC_PORT if protocol == "grpc" else manifests.HTTP_PORT
    assert (f"server-template pod 1-{haproxy.SERVER_SLOTS} "
            f"backend-pods.ns1.svc.cluster.local:{port} resolvers cluster") in text
    # one configuration source: the lab's file differs only where the servers come from
    lab = l7.haproxy_config(protocol, manifests.PROXY_PORT, port, haproxy.SERVER_SLOTS,
                            Path(manifests.HAPROXY_RUNTIME_SOCKET))
    kind_only = set(text.splitlines()) - set(lab.splitlines())
    lab_only = set(lab.splitlines()) - set(text.splitlines())
    assert all(line.startswith(("resolvers ", "    parse-resolv-conf", "    accepted_payload",
                                "    timeout resolve", "    timeout retry", "    hold valid",
                                "    server-template ")) for line in kind_only), kind_only
    assert [line.split()[0] for line in lab_only] == ["server-template"]
    assert f"    nbthread {haproxy.THREADS}" in text and "    balance roundrobin" in text
    if shutil.which("haproxy"):  # the distribution's HAProxy 2.6, as the pinned image
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(text.replace(manifests.HAPROXY_RUNTIME_SOCKET, str(tmp_path / "s")))
        done = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    mount = container["volumeMounts"][0]
    assert mount["mountPath"] == manifests.HAPROXY_CONFIG_DIR  # the image's default -f folder


def test_a_built_wheel_renders_every_manifest(tmp_path: Path) -> None:
    """A non-editable install (`pip install .`, a wheel) carries the templates as package data."""
    wheels = tmp_path / "dist"
    uv = shutil.which("uv")
    build = ([uv, "build", "--wheel", "--out-dir", str(wheels), str(REPOSITORY)] if uv else
             [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels),
              str(REPOSITORY)])
    done = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = wheels.glob("kpbench-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    script = """
import json, kpbench
from kpbench.config import load
from kpbench.kube import manifests
config = load(__import__("pathlib").Path(QUICKSTART), ["workload.proxy=l7"])
spec = manifests.ClusterSpec.for_mode(config, "ipvs-lc")
documents = manifests.application_manifests("ns", config, manifests.image_tag())
documents += manifests.metrics_server_manifests()
print(json.dumps({"package": kpbench.__file__, "kind": spec.kind_config(),
                  "documents": documents,
                  "dockerfile": "Dockerfile" in manifests.image_context_files()}))
""".replace("QUICKSTART", repr(str(EXPERIMENTS / "quickstart.yaml")))
    environment = dict(os.environ, PYTHONPATH=str(site))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env=environment, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rendered = json.loads(done.stdout)
    assert Path(rendered["package"]).is_relative_to(site)  # the wheel's copy, not the checkout
    assert yaml.safe_load(rendered["kind"])["networking"]["kubeProxyMode"] == "ipvs"
    assert {"l7-proxy", "backend", "locust-master", "metrics-server"} <= {
        d["metadata"]["name"] for d in rendered["documents"]}
    assert rendered["dockerfile"]


def test_dockerfile_and_image_context() -> None:
    files = manifests.image_context_files()
    assert "kpbench/server/__main__.py" in files and "kpbench/workload/locustfile.py" in files
    assert not any(name.startswith(("tests/", ".venv", "results/")) for name in files)
    dockerfile = files["Dockerfile"].decode()
    assert "COPY kpbench /app/kpbench" in dockerfile
    assert manifests.IMAGE_LOCUSTFILE.startswith("/app/kpbench/")
    assert re.fullmatch(r"localhost/kpbench/kpbench:[0-9a-f]{12}", manifests.image_tag(files))


# -- preflight -------------------------------------------------------------------------------------


ROOMY_MEMINFO = "MemTotal:       32000000 kB\nMemAvailable:   24000000 kB\n"


def fake_host(tmp_path: Path, *, engine: bool = True, kind: str | None = "kind v0.30.0 go1.24",
              kubectl: bool = True, modules: Sequence[str] = (), builtin: str = "",
              kernel: str = "6.1.0-13-amd64", inotify: tuple[int, int] = (512, 524288),
              meminfo: str = ROOMY_MEMINFO) -> Host:
    sys_module = tmp_path / "sys-module"
    sys_module.mkdir(parents=True, exist_ok=True)
    for name in modules:
        (sys_module / name).mkdir()
    builtin_file = tmp_path / "modules.builtin"
    builtin_file.write_text(builtin)
    inotify_dir = tmp_path / "proc-sys" / "fs" / "inotify"
    inotify_dir.mkdir(parents=True, exist_ok=True)
    (inotify_dir / "max_user_instances").write_text(f"{inotify[0]}\n")
    (inotify_dir / "max_user_watches").write_text(f"{inotify[1]}\n")
    (tmp_path / "meminfo").write_text(meminfo)
    on_path = {"docker"} | ({"kind"} if kind else set()) | ({"kubectl"} if kubectl else set())

    def probe(command: Sequence[str]) -> str | None:
        if command[0] == "docker":
            return "28.2.2\n" if engine else None
        if command[0] == "kind":
            return kind
        if command[0] == "kubectl":
            return json.dumps({"clientVersion": {"gitVersion": "v1.34.1"}})
        return None

    return Host(which=lambda name: f"/usr/bin/{name}" if name in on_path else None, probe=probe,
                sys_module=sys_module, modules_builtin=builtin_file,
                kernel_release=lambda: kernel, proc_sys=tmp_path / "proc-sys",
                meminfo=tmp_path / "meminfo")


def test_preflight_passes_and_records_versions(tmp_path: Path) -> None:
    host = fake_host(tmp_path, modules=["ip_vs", "ip_vs_rr", "ip_vs_lc", "ip_vs_sh"])
    problems, warnings, versions = kind_problems(experiment(), host)
    assert problems == [] and warnings == []
    assert versions["kind"].startswith("kind v0.30.0")
    assert versions["container_engine"] == "docker 28.2.2"
    assert versions["node_image"] == manifests.NODE_IMAGE


@pytest.mark.parametrize(
    ("host_args", "modes", "node_image", "expected"),
    [
        ({"engine": False}, ["iptables"], None, "no Docker or podman engine answers"),
        ({"kind": None}, ["iptables"], None, "`kind` is not on PATH: install kind >= v0.27"),
        ({"kind": "kind v0.26.0 go1.23"}, ["iptables"], None,
         "kind >= v0.27.0 is needed, found kind v0.26.0"),
        ({"kind": "kind v0.22.0 go1.22"}, ["nftables"], None, "kind >= v0.27.0 is needed"),
        ({}, ["nftables"], "kindest/node:v1.30.0", "nftables mode needs a node image >= v1.31"),
        ({"kernel": "5.10.0-28-amd64"}, ["nftables"], None,
         "nftables mode needs a host kernel >= 5.13 (kind nodes share it), this one is 5.10.0"),
        ({}, ["ipvs-rr"], "kindest/node:v1.40.0", "disabled from Kubernetes 1.40"),
        ({"modules": ["ip_vs"]}, ["ipvs-lc", "ipvs-sh"], None,
         "run `sudo modprobe ip_vs_lc ip_vs_sh`"),
        ({}, ["ipvs-rr"], None, "run `sudo modprobe ip_vs ip_vs_rr`"),
        ({"inotify": (128, 8192)}, ["iptables"], None,
         "run `sudo sysctl fs.inotify.max_user_instances=512 fs.inotify.max_user_watches=524288`"),
        ({"meminfo": "MemAvailable:    2000000 kB\n"}, ["iptables"], None,
         "GiB of free memory is needed (3 kind nodes and a cell's pods), 1.9 GiB is available"),
    ],
)
def test_preflight_names_each_missing_piece(tmp_path: Path, host_args: dict[str, Any],
                                            modes: list[str], node_image: str | None,
                                            expected: str) -> None:
    config = experiment(modes=modes, cluster={"nodes": 2, "node_image": node_image})
    backend = KindBackend(host=fake_host(tmp_path, **host_args))
    with pytest.raises(PreflightError) as caught:
        backend.preflight(config)
    message = str(caught.value)
    assert message.startswith("--backend kind: ") and expected in message
    assert "\n" not in message


def test_kind_version_policy_every_mode_needs_v0_27(tmp_path: Path) -> None:
    for mode in ALL_MODES:
        host = fake_host(tmp_path / mode, kind="kind v0.26.0 go1.23",
                         modules=["ip_vs", "ip_vs_rr", "ip_vs_lc", "ip_vs_sh", "ip_vs_wlc",
                                  "ip_vs_mh"])
        problems = kind_problems(experiment(modes=[mode]), host).problems
        assert len(problems) == 1 and "kind >= v0.27.0 is needed" in problems[0], mode
    ok = kind_problems(experiment(modes=["iptables"]),
                       fake_host(tmp_path / "ok", kind="kind v0.27.0 go1.23"))
    assert ok.problems == []


@pytest.mark.parametrize(("kind", "image"), [("kind v0.32.0 go1.25", (0, 32)),
                                             ("kind v0.27.0 go1.23", (0, 27)),
                                             ("kind v0.40.1 go1.27", None)])
def test_a_kind_release_other_than_the_pinned_images_warns_and_names_its_own(
        tmp_path: Path, kind: str, image: tuple[int, int] | None) -> None:
    host = fake_host(tmp_path, kind=kind)
    found = kind_problems(experiment(modes=["iptables"]), host)
    assert found.problems == []
    (warning,) = found.warnings
    assert manifests.NODE_IMAGE_KIND_RELEASE in warning and "cluster.node_image" in warning
    if image is not None:
        assert KIND_DEFAULT_NODE_IMAGES[image] in warning
    else:
        assert "its release notes name its own default node image" in warning
    chosen = {"nodes": 2, "node_image": "kindest/node:v1.36.1"}
    own = kind_problems(experiment(modes=["iptables"], cluster=chosen), host)
    assert own.warnings == []  # the user chose the image


def test_keep_cluster_counts_every_modes_nodes_for_inotify(tmp_path: Path) -> None:
    host = fake_host(tmp_path, inotify=(512, 524288))
    config = experiment(modes=["iptables", "nftables"], cluster={"nodes": 4})
    assert kind_problems(config, host).problems == []  # one cluster of 5 nodes at a time
    kept = kind_problems(config, host, keep_cluster=True).problems  # 2 x 5 = 10 nodes
    assert len(kept) == 1 and "10 kind nodes at once" in kept[0]
    assert "fs.inotify.max_user_instances=640" in kept[0]


@pytest.mark.parametrize("host_args", [{}, {"kubectl": False}, {"engine": False},
                                       {"kind": None}, {"kind": "kind v0.26.1 go1.23"}])
def test_auto_and_the_e2e_skip_agree_with_preflight(tmp_path: Path,
                                                    host_args: dict[str, Any]) -> None:
    host = fake_host(tmp_path, **host_args)
    usable = docker_and_kind(host) is None
    assert usable == (kind_problems(experiment(modes=["iptables"]), host).problems == [])
    if host_args == {"kubectl": False}:
        assert usable  # kubectl is not needed: the Python client talks to the API server


def test_builtin_ipvs_modules_count_as_present(tmp_path: Path) -> None:
    host = fake_host(tmp_path, builtin="kernel/net/netfilter/ipvs/ip_vs.ko\n"
                                       "kernel/net/netfilter/ipvs/ip_vs_rr.ko\n")
    assert kind_problems(experiment(modes=["ipvs-rr"]), host).problems == []


def test_load_events_that_change_the_rate_are_refused() -> None:
    config = experiment(events=[{"at": 30, "action": "load", "requests_per_second": 5}])
    assert "requests_per_second" in workload_problems(config)[0]
    assert workload_problems(experiment(events=[{"at": 30, "action": "load",
                                                 "connections": 10}])) == []


def test_kpbench_run_on_kind_without_docker_exits_2_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    environment = dict(os.environ, PATH=str(Path(sys.executable).parent))
    done = subprocess.run(
        [sys.executable, "-m", "kpbench", "run", str(EXPERIMENTS / "quickstart.yaml"),
         "--backend", "kind", "--out", str(out)],
        capture_output=True, text=True, cwd=REPOSITORY, timeout=120, env=environment)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kpbench: --backend kind: ")
    assert "Docker" in lines[0] and "`kind` is not on PATH" in lines[0]
    assert not out.exists()


def test_dry_run_writes_everything_a_kind_run_applies_without_docker(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    environment = dict(os.environ, PATH=str(Path(sys.executable).parent))  # no docker, no kind
    done = subprocess.run(
        [sys.executable, "-m", "kpbench", "run", str(EXPERIMENTS / "quickstart.yaml"),
         "--backend", "kind", "--dry-run", "--out", str(out), "--seeds", "2",
         "--set", "workload.proxy=l7", "--set", "backend.hpa={max_replicas: 9}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert folder.parent.parent == out and folder.name.endswith("-dry-run")
    assert not (folder / "run.json").exists()  # not a run: no loader takes it for one
    summary = json.loads((folder / "dry-run.json").read_text())
    config = Experiment.model_validate(summary["config"])
    cells = expand_cells(config)
    assert [c["cell_id"] for c in summary["cells"]] == [c.cell_id for c in cells]
    for name, path in summary["clusters"].items():
        document = yaml.safe_load((folder / path).read_text())
        assert document["name"] == name and set(document) <= KIND_CLUSTER_FIELDS
    for document in yaml.safe_load_all((folder / "kind" / "metrics-server.yaml").read_text()):
        kubernetes_validate.validate(document, SCHEMA_VERSION, strict=True)
    for entry, cell in zip(summary["cells"], cells, strict=True):
        applied = []
        for stage in ("backend", "locust"):
            documents = list(yaml.safe_load_all(
                (folder / "cells" / entry["cell_id"] / f"{stage}.yaml").read_text()))
            for document in documents:
                kubernetes_validate.validate(document, SCHEMA_VERSION, strict=True)
            applied += documents
        assert {d["kind"] for d in applied} >= {"Namespace", "Deployment", "Service",
                                                 "HorizontalPodAutoscaler", "Pod", "ConfigMap"}
        assert applied == [d for _, stage in manifests.cell_stages(
            entry["namespace"], cell.config, summary["image"], "dryrun") for d in stage]
        commands = (folder / "cells" / entry["cell_id"] / "locust-commands.txt").read_text()
        assert commands.startswith("master: python -m locust -f ") and "\nworker: " in commands
    # the commands: per mode create, load, delete; never two clusters at once
    alive: set[str] = set()
    for line in (folder / "commands.txt").read_text().splitlines():
        words = line.split()
        if words[:3] == ["kind", "create", "cluster"]:
            alive.add(words[4])
            assert len(alive) == 1, alive
        elif words[:3] == ["kind", "delete", "cluster"]:
            alive.remove(words[4])
        elif words[:3] == ["kind", "load", "image-archive"]:
            assert words[-1] in alive
    assert not alive
    assert "wait until metrics.k8s.io reports every node" in (folder / "commands.txt").read_text()


def test_dry_run_is_only_for_kind_and_checks_the_experiment(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "kpbench", "run", str(EXPERIMENTS / "quickstart.yaml"),
            "--dry-run", "--out", str(tmp_path / "runs")]
    sim = subprocess.run([*base, "--backend", "sim"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert sim.returncode == 2 and "--dry-run: only with --backend kind" in sim.stderr
    old = subprocess.run([*base, "--backend", "kind", "--set", "modes=[nftables]", "--set",
                          "cluster.node_image=kindest/node:v1.30.0"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert old.returncode == 2 and "nftables mode needs a node image" in old.stderr
    assert not (tmp_path / "runs").exists()


# -- data-plane parsing ----------------------------------------------------------------------




def test_check_node_accepts_the_right_mode_and_rejects_a_mismatch() -> None:
    seen = check_node("ipvs-lc", "n1", {"ip_vs": IP_VS}, "10.96.0.80:80")
    assert seen["service"]["scheduler"] == "lc"
    with pytest.raises(DataplaneMismatch, match="scheduler rr found, lc requested"):
        check_node("ipvs-lc", "n1", {"ip_vs": IP_VS})
    with pytest.raises(DataplaneMismatch, match="no KUBE-SVC"):
        check_node("iptables", "n1", {"iptables": "", "ip_vs": ""})
    with pytest.raises(DataplaneMismatch, match="IPVS virtual services present"):
        check_node("iptables", "n1", {"iptables": ":KUBE-SVC-X - [0:0]\n", "ip_vs": IP_VS})
    with pytest.raises(DataplaneMismatch, match="nftables"):
        check_node("nftables", "n1", {"nft": "", "iptables": ""})
    assert iptables_service_chains(":KUBE-SVC-A - [0:0]\n-A KUBE-SVC-A -m statistic "
                                   "--mode random --probability 0.5 -j X\n") == {"KUBE-SVC-A": 1}


def test_kube_proxy_config_map_defaults() -> None:
    assert kube_proxy_settings({"data": {"config.conf": "mode: \"\"\n"}}) == {
        "mode": "iptables", "scheduler": ""}
    assert kube_proxy_settings({"data": {"config.conf": "mode: ipvs\nipvs:\n  scheduler: \"\"\n"}}
                               ) == {"mode": "ipvs", "scheduler": "rr"}


# -- the driver against the in-memory double -------------------------------------------------------


def make_cell(mode: str, events: list[dict[str, Any]], **overrides: Any) -> Cell:
    config = experiment(modes=[mode], seeds=1, duration_seconds=20, sample_seconds=1.0,
                        events=events, **overrides)
    return expand_cells(config)[0]


def run_driver(cell: Cell, api: InMemoryKubeDouble, scheduler_shown: str | None = None,
               progress: Any = None) -> tuple[KubeCell, Any]:
    clock = FakeClock()
    driver = KubeCell(cell, api, "kpbench-t-1", "img:1",
                      FakeNodes(api, "kpbench-t-1", cell.mode, scheduler_shown),
                      clock=clock, sleep=clock.sleep, wall_clock=clock.wall)
    return driver, driver.run(progress or (lambda t: None))


def test_driver_runs_the_timeline_through_the_api() -> None:
    events = [{"at": 5, "action": "rollout"}, {"at": 8, "action": "scale", "replicas": 8},
              {"at": 10, "action": "kill-pod", "count": 2},
              {"at": 12, "action": "load", "connections": 60}]
    api = InMemoryKubeDouble()
    cell = make_cell("iptables", events)
    _, result = run_driver(cell, api)
    applied = [(c[1], c[3]) for c in api.calls if c[0] == "apply"]
    assert applied == [(d["kind"], d["metadata"]["name"]) for _, stage in manifests.cell_stages(
        "kpbench-t-1", cell.config, "img:1", "kpbench") for d in stage]  # what a dry run lists
    (patch,) = [c for c in api.calls if c[0] == "patch"]
    assert patch[1:4] == ("Deployment", "kpbench-t-1", "backend")
    assert RESTARTED_AT in patch[4]["spec"]["template"]["metadata"]["annotations"]
    assert ("scale", "kpbench-t-1", "backend", 8) in api.calls
    kills = [c for c in api.calls if c[0] == "delete" and c[1] == "Pod"]
    assert len(kills) == 2 and all(c[4] == 0 for c in kills)
    # Locust follows the load schedule itself: nothing is sent to it
    assert not [c for c in api.calls if c[0] == "proxy" and c[4] == "swarm"]
    names = set(result.events["event"])
    assert {"rollout_started", "scaled", "pod_killed", "load_changed", "pod_created",
            "pod_ready", "pod_deleted", "endpoints_changed", "connection_failed"} <= names
    rollout_t = result.events.loc[result.events["event"] == "rollout_started", "t"].iloc[0]
    assert rollout_t == pytest.approx(5.0, abs=0.5)
    # Namespace removed at the end, Locust stopped before its files were read.
    assert ("delete", "Namespace", "", "kpbench-t-1", None) in api.calls
    execs = [c for c in api.calls if c[0] == "exec"]
    assert [c[2] for c in execs] == ["locust", "collector"]
    assert set(result.artifacts) == {"locust_stats.csv", "summary.json"}
    assert result.dataplane["verified"] and result.dataplane["nodes_checked"] == 3


def test_driver_samples_rows_in_the_results_format() -> None:
    api = InMemoryKubeDouble()
    _, result = run_driver(make_cell("iptables", [{"at": 5, "action": "rollout"}]), api)
    samples = result.samples
    assert list(samples.columns) == SAMPLE_COLUMNS[4:]
    assert sorted(samples["t"].unique()) == [float(t) for t in range(21)]
    first = samples[samples["t"] == 0.0]
    assert len(first) == 6 and first["ready"].all() and (first["created_at"] == 0.0).all()
    assert (samples["active_connections"] == 10).all()
    assert samples["cpu_millicores"].dtype == "float64"
    assert samples["cpu_millicores"].iloc[0] == pytest.approx(25.0)
    late = samples[samples["t"] == 20.0]
    assert len(late) == 6 and (late["created_at"] >= 4.0).all()  # the rolled-out pods
    assert list(result.events.columns) == ["t", "event", "pod", "detail"]
    assert result.connections.empty and "conn_id" in result.connections.columns


def test_driver_samples_the_ipvs_table_beside_the_pods() -> None:
    api = InMemoryKubeDouble(proxy_mode="ipvs", scheduler="lc")
    _, result = run_driver(make_cell("ipvs-lc", []), api)
    table = pd.read_csv(pd.io.common.BytesIO(result.artifacts["ipvs.csv"]))
    assert set(table["node"]) == set(api.node_names)
    assert set(table["pod"]) == set(result.samples["pod"])
    assert (table["active_connections"] == 3).all() and (table["inactive_connections"] == 1).all()
    assert result.dataplane["nodes"][0]["service"]["scheduler"] == "lc"
    assert len(result.dataplane["ipvs_last_sample"]) == 3 * 6


def test_driver_fails_the_cell_on_a_dataplane_mismatch_and_cleans_up() -> None:
    api = InMemoryKubeDouble(proxy_mode="ipvs", scheduler="rr")
    with pytest.raises(DataplaneMismatch, match="rr found, lc requested"):
        run_driver(make_cell("ipvs-lc", []), api, scheduler_shown="rr")
    assert ("delete", "Namespace", "", "kpbench-t-1", None) in api.calls
    assert not any(key[1] == "kpbench-t-1" for key in api.objects)


def test_driver_cleans_up_on_interrupt() -> None:
    api = InMemoryKubeDouble()

    def interrupt(t: float) -> None:
        if t >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_driver(make_cell("iptables", []), api, progress=interrupt)
    assert ("delete", "Namespace", "", "kpbench-t-1", None) in api.calls
    assert not any(key[1] == "kpbench-t-1" for key in api.objects)


def test_decode_results_round_trip() -> None:
    assert decode_results("a.csv\nYSxi\nsummary.json\ne30=\n") == {"a.csv": b"a,b",
                                                                  "summary.json": b"{}"}


# -- backends --------------------------------------------------------------------------------------


class RecordingRunner:
    def __init__(self, clusters: str = "") -> None:
        self.commands: list[list[str]] = []
        self.clusters = clusters

    def __call__(self, command: Sequence[str], timeout: float,
                 env: dict[str, str] | None) -> str:
        self.commands.append(list(command))
        if list(command[:3]) == ["kind", "get", "clusters"]:
            return self.clusters
        if command[0] == "docker" and command[1] == "image":
            raise ClusterError("no such image")
        return ""


def test_kind_cli_command_lines(tmp_path: Path) -> None:
    runner = RecordingRunner("kpbench-iptables-1234abcd\nother\n")
    cli = KindCli("docker", runner)
    spec = manifests.ClusterSpec.for_mode(experiment(), "iptables")
    kubeconfig = tmp_path / "k.kubeconfig"
    kubeconfig.write_text("")
    cli.create(spec, tmp_path, kubeconfig)
    create = runner.commands[-1]
    assert create[:4] == ["kind", "create", "cluster", "--name"]
    assert create[create.index("--kubeconfig") + 1] == str(kubeconfig)
    assert yaml.safe_load(Path(create[create.index("--config") + 1]).read_text())["name"] == \
        spec.name
    cli.delete(spec.name, kubeconfig)
    assert runner.commands[-1] == ["kind", "delete", "cluster", "--name", spec.name,
                                   "--kubeconfig", str(kubeconfig)]
    assert cli.kpbench_clusters() == ["kpbench-iptables-1234abcd"]
    cli.node_exec("kpbench-iptables-1234abcd-worker", ["cat", "/proc/net/ip_vs"])
    assert runner.commands[-1] == ["docker", "exec", "kpbench-iptables-1234abcd-worker", "cat",
                                   "/proc/net/ip_vs"]


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_one_qualified_image_name_built_saved_and_loaded_from_an_archive(
        engine: str, tmp_path: Path) -> None:
    """podman stores `kpbench/kpbench:x` as `localhost/kpbench/kpbench:x` and the nodes' containerd
    reads an unqualified name as `docker.io/...`: one `localhost/` name everywhere."""
    runner = RecordingRunner()
    cli = KindCli(engine, runner)
    image = manifests.image_tag()
    assert image.startswith("localhost/kpbench/kpbench:")
    cli.build_image(image)
    assert runner.commands[-1][:4] == [engine, "build", "-t", image]
    cli.load_image(image, "kpbench-iptables-1")
    save, load_ = runner.commands[-2:]
    assert save[:3] == [engine, "save", "-o"] and save[4] == image
    assert load_ == ["kind", "load", "image-archive", save[3], "--name", "kpbench-iptables-1"]
    pods = [d for d in manifests.application_manifests("ns", experiment(), image)
            if d["kind"] in ("Deployment", "Pod")]
    images = {c["image"] for d in pods for c in (d["spec"].get("template", d)["spec"]
                                                  ["containers"])}
    assert images == {image}


class FakeKind(RecordingRunner):
    """kind + engine CLIs: clusters appear when created; `fail` lists commands to fail once."""

    def __init__(self, fail: Sequence[str] = ()) -> None:
        super().__init__()
        self.existing: list[str] = []
        self.fail = list(fail)

    def __call__(self, command: Sequence[str], timeout: float,
                 env: dict[str, str] | None) -> str:
        self.commands.append(list(command))
        words = " ".join(command)
        for failing in list(self.fail):
            if words.startswith(failing):
                self.fail.remove(failing)
                raise ClusterError(f"{failing} exited 1: failed to detect containerd snapshotter")
        if list(command[:3]) == ["kind", "get", "clusters"]:
            return "\n".join(self.existing)
        if list(command[:3]) == ["kind", "create", "cluster"]:
            self.existing.append(command[4])
        if list(command[:3]) == ["kind", "delete", "cluster"]:
            self.existing.remove(command[4])
        if list(command[:3]) == ["kind", "get", "nodes"]:
            return "worker1\nworker2\nworker3\n"
        return ""


def kind_backend(tmp_path: Path, runner: FakeKind, api: InMemoryKubeDouble,
                 keep_cluster: bool = False) -> KindBackend:
    clock = FakeClock()
    backend = KindBackend(keep_cluster=keep_cluster, host=fake_host(tmp_path),
                          cli=KindCli("docker", runner), api_factory=lambda _: api)
    backend.driver_options = {"clock": clock, "sleep": clock.sleep, "wall_clock": clock.wall}
    backend.attach(tmp_path)
    return backend


def run_cells(backend: KindBackend, config: Experiment,
              monkeypatch: pytest.MonkeyPatch, api: InMemoryKubeDouble) -> list[Any]:
    import kpbench.kube.backend as backend_module

    class Nodes(FakeNodes):  # the double's tables for whichever namespace the cell uses
        def __init__(self, cli: KindCli, cluster: str, mode: str) -> None:
            super().__init__(api, "", mode)

        def ip_vs_text(self) -> str:
            self.namespace = next(ns for (kind, ns, name) in api.objects
                                  if kind == "Deployment" and name == "backend")
            return super().ip_vs_text()

    monkeypatch.setattr(backend_module, "KindNodes", Nodes)
    backend.preflight(config)
    outcomes: list[Any] = []
    for cell in expand_cells(config):
        try:
            outcomes.append(backend.run_cell(cell, lambda t: None))
        except Exception as exc:
            outcomes.append(exc)
    backend.close()
    return outcomes


def test_a_failed_cluster_setup_fails_the_cell_with_its_cause_and_is_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = FakeKind(fail=["kind load image-archive"])
    api = InMemoryKubeDouble()
    backend = kind_backend(tmp_path, runner, api)
    config = experiment(modes=["iptables"], seeds=2, duration_seconds=4, events=[])
    first, second = run_cells(backend, config, monkeypatch, api)
    assert isinstance(first, ClusterSetupError)
    assert "failed to detect containerd snapshotter" in str(first)  # the cause, not a KeyError
    assert not isinstance(second, Exception), second  # the next cell set the cluster up again
    creates = [c for c in runner.commands if c[:3] == ["kind", "create", "cluster"]]
    assert len(creates) == 1  # the cluster the first cell created is reused, not re-created
    assert second.dataplane["cluster"]["cluster"] == creates[0][4]


def test_each_modes_cluster_is_deleted_after_its_last_cell(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = FakeKind()
    api = InMemoryKubeDouble()
    backend = kind_backend(tmp_path, runner, api)
    config = experiment(modes=["iptables", "nftables"], seeds=2, duration_seconds=3, events=[])
    run_cells(backend, config, monkeypatch, api)
    lifecycle = [(c[1], c[4]) for c in runner.commands
                 if c[0] == "kind" and c[1] in ("create", "delete")]
    iptables, nftables = (manifests.ClusterSpec.for_mode(config, m).name
                          for m in ("iptables", "nftables"))
    # never two clusters at once: iptables' goes before nftables' is created
    assert lifecycle == [("create", iptables), ("delete", iptables), ("create", nftables),
                         ("delete", nftables)]
    kept = FakeKind()
    run_cells(kind_backend(tmp_path / "k", kept, InMemoryKubeDouble(), keep_cluster=True),
              experiment(modes=["iptables"], seeds=2, duration_seconds=3, events=[]),
              monkeypatch, InMemoryKubeDouble())
    assert not [c for c in kept.commands if c[:2] == ["kind", "delete"]]


@pytest.mark.parametrize(("interrupted", "expected"), [(False, ["a", "b"]), (True, ["a"])])
def test_kind_backend_deletes_what_is_left_at_close(tmp_path: Path, interrupted: bool,
                                                    expected: list[str]) -> None:
    runner = RecordingRunner()
    backend = KindBackend(cli=KindCli("docker", runner))
    backend.attach(tmp_path)
    backend.created = ["a"]
    backend.kubeconfigs = {"a": tmp_path / "a", "b": tmp_path / "b"}  # b: kept by an earlier run
    backend.interrupted = interrupted
    backend.close()
    deleted = [c[c.index("--name") + 1] for c in runner.commands if c[:2] == ["kind", "delete"]]
    assert deleted == expected
    kept = KindBackend(keep_cluster=True, cli=KindCli("docker", runner))
    kept.attach(tmp_path)
    kept.created = ["c"]
    kept.kubeconfigs = {"c": tmp_path / "c"}
    kept.close()
    assert all("c" not in c for c in runner.commands)


def test_the_first_hpa_cell_waits_for_the_metrics_api_on_every_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = InMemoryKubeDouble(metrics_after=3)
    backend = kind_backend(tmp_path, FakeKind(), api)
    config = experiment(modes=["iptables"], seeds=2, duration_seconds=3, events=[],
                        backend={"replicas": 2, "hpa": {"max_replicas": 4}})
    outcomes = run_cells(backend, config, monkeypatch, api)
    assert not [o for o in outcomes if isinstance(o, Exception)], outcomes
    polls = [i for i, c in enumerate(api.calls) if c == ("list", "NodeMetrics")]
    first_apply = next(i for i, c in enumerate(api.calls)
                       if c[:2] == ("apply", "Deployment") and c[3] == "backend")
    assert len(polls) == 4 and polls[-1] < first_apply  # 3 empty answers, then every node
    silent = InMemoryKubeDouble(metrics_after=10**6)
    clock = FakeClock()
    with pytest.raises(ClusterSetupError, match=r"metrics\.k8s\.io did not report node"):
        wait_for_node_metrics(silent, timeout=30, clock=clock, sleep=clock.sleep)


def test_resets_counted_by_the_workload_reach_the_metric() -> None:
    api = InMemoryKubeDouble()
    _, result = run_driver(make_cell("iptables", []), api)
    resets = result.events[result.events["event"] == "connection_reset"]
    assert json.loads(resets["detail"].iloc[0])["count"] == 3
    events = result.events.assign(cell_id="c1")
    samples = result.samples.assign(cell_id="c1")
    metrics = cell_metrics(samples, events, result.connections.assign(cell_id="c1"),
                           [{"cell_id": "c1", "mode": "iptables", "seed": 1,
                             "status": "COMPLETED"}], 20, None)
    assert metrics["reset_connections"].iloc[0] == 3
    assert metrics["failed_connections"].iloc[0] == 2


def test_the_l7_proxies_are_waited_for_and_recorded() -> None:
    api = InMemoryKubeDouble()
    _, result = run_driver(make_cell("iptables", [], workload={"proxy": "l7"}), api)
    proxy = result.dataplane["l7_proxy"]
    assert proxy["software"] == "haproxy" and proxy["replicas"] == L7_PROXY_REPLICAS
    assert proxy["servers"] == 6 and proxy["threads"] == haproxy.THREADS
    shown = [c for c in api.calls if c[0] == "exec" and c[2] == "haproxy"]
    assert len(shown) == L7_PROXY_REPLICAS
    applied = [c[3] for c in api.calls if c[:2] == ("apply", "Deployment")]
    assert applied.index("l7-proxy") < applied.index("locust-worker")


def test_cluster_backend_reads_the_mode_and_runs_only_its_cells() -> None:
    api = InMemoryKubeDouble(proxy_mode="ipvs", scheduler="")
    backend = ClusterBackend(api=api, image="registry.example/kpbench:1")
    backend.preflight(experiment(modes=["iptables", "ipvs-rr"]))
    assert backend.cluster_mode == "ipvs-rr"
    assert backend.unsupported_reason("ipvs-rr") is None
    reason = backend.unsupported_reason("iptables")
    assert reason is not None and "ipvs-rr" in reason
    assert backend.versions()["cluster_mode"] == "ipvs-rr"
    with pytest.raises(PreflightError, match="not among the experiment's modes"):
        ClusterBackend(api=api, image="x").preflight(experiment(modes=["iptables"]))


def test_cluster_backend_preflight_messages(tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match="needs --kubeconfig PATH"):
        ClusterBackend(image="x").preflight(experiment())
    with pytest.raises(PreflightError, match="set KPBENCH_IMAGE"):
        ClusterBackend(kubeconfig=tmp_path / "nope", image="").preflight(experiment())


def test_cluster_backend_runs_a_cell_on_the_double() -> None:
    api = InMemoryKubeDouble()
    backend = ClusterBackend(api=api, image="img:1")
    config = load(EXPERIMENTS / "quickstart.yaml", ["modes=[iptables]", "seeds=1",
                                                    "duration_seconds=4", "events=[]"])
    backend.preflight(config)
    clock = FakeClock()
    import kpbench.kube.driver as driver_module

    original = driver_module.KubeCell.__init__

    def with_fake_clock(self: KubeCell, *args: Any, **kwargs: Any) -> None:
        original(self, *args, clock=clock, sleep=clock.sleep, wall_clock=clock.wall, **kwargs)

    pytest.MonkeyPatch().setattr(driver_module.KubeCell, "__init__", with_fake_clock)
    try:
        result = backend.run_cell(expand_cells(config)[0], lambda t: None)
    finally:
        driver_module.KubeCell.__init__ = original  # type: ignore[method-assign]
    assert result.dataplane["verified"] is False and result.dataplane["nodes_checked"] == 0
    assert result.dataplane["cluster"]["kube_proxy"]["mode"] == "iptables"
    assert not result.samples.empty


def test_pods_restarted_or_vanished_outside_the_timeline_are_events() -> None:
    api = InMemoryKubeDouble()
    clock = FakeClock()
    driver = KubeCell(make_cell("iptables", []), api, "kpbench-t-1", "img:1", None,
                      clock=clock, sleep=clock.sleep, wall_clock=clock.wall)
    driver.t0 = clock()

    def pod(name: str, restarts: int = 0, deleting: bool = False) -> dict[str, Any]:
        metadata = {"name": name, **({"deletionTimestamp": "x"} if deleting else {})}
        return {"metadata": metadata, "spec": {"nodeName": "worker1"},
                "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready",
                                                                 "status": "True"}],
                           "containerStatuses": [{"name": "server", "restartCount": restarts}]}}

    for name in ("a", "b", "c", "d"):
        driver.observe_pod(pod(name), watched=True)
    driver.observe_pod(pod("a", restarts=1), watched=True)  # crashed, restarted by the kubelet
    driver.observe_pod(pod("b"), deleted=True, watched=True)  # force-deleted by someone else
    driver.observe_pod(pod("c", deleting=True), watched=True)  # a graceful delete (rollout)
    driver.observe_pod(pod("c"), deleted=True, watched=True)
    driver.killed.add("d")  # the timeline's kill-pod
    driver.observe_pod(pod("d"), deleted=True, watched=True)
    incidents = [(event, name) for _, event, name, _ in driver.event_rows
                 if event in ("pod_restarted", "pod_vanished")]
    assert incidents == [("pod_restarted", "a"), ("pod_vanished", "b")]
    driver.teardown()


def test_a_timeline_of_rollout_and_kills_reports_no_incidents() -> None:
    events = [{"at": 5, "action": "rollout"}, {"at": 10, "action": "kill-pod", "count": 2}]
    _, result = run_driver(make_cell("iptables", events), InMemoryKubeDouble())
    assert not set(result.events["event"]) & {"pod_restarted", "pod_vanished"}
