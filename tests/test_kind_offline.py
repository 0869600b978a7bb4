"""The kind and cluster backends, offline: everything they generate, preflight, and the driver's
logic against an in-memory double of the Kubernetes API (not a cluster: see test_kind_e2e.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kubernetes_validate
import pandas as pd
import pytest
import yaml

from kpbench.backends import PreflightError
from kpbench.config import ALL_MODES, Cell, Experiment, expand_cells, load, validate
from kpbench.kube import manifests
from kpbench.kube.backend import ClusterBackend, KindBackend, workload_problems
from kpbench.kube.cluster import ClusterError, KindCli
from kpbench.kube.driver import RESTARTED_AT, KubeCell, decode_results
from kpbench.kube.preflight import Host, kind_problems
from kpbench.kube.verify import (
    DataplaneMismatch,
    check_node,
    iptables_service_chains,
    kube_proxy_settings,
)
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


def test_hpa_settings_patch_the_controller_manager_only_when_not_default() -> None:
    hpa = {"min_replicas": 2, "max_replicas": 8, "sync_seconds": 5}
    config = experiment(backend={"replicas": 2, "hpa": hpa})
    document = yaml.safe_load(manifests.ClusterSpec.for_mode(config, "iptables").kind_config())
    patches = [yaml.safe_load(p) for p in document["kubeadmConfigPatches"]]
    assert patches[1]["apiVersion"] == "kubeadm.k8s.io/v1beta3"
    assert patches[1]["controllerManager"]["extraArgs"] == {
        "horizontal-pod-autoscaler-sync-period": "5s"}
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
def test_envoy_config_has_the_fields_it_needs(protocol: str) -> None:
    config = experiment(workload={"proxy": "l7", "protocol": protocol})
    envoy = yaml.safe_load(manifests.envoy_config("ns1", config))
    (listener,) = envoy["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == manifests.ENVOY_PROXY_PORT
    (manager,) = listener["filter_chains"][0]["filters"]
    typed = manager["typed_config"]
    assert typed["@type"].endswith("http_connection_manager.v3.HttpConnectionManager")
    assert typed["http_filters"][-1]["name"] == "envoy.filters.http.router"
    route = typed["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["route"]["cluster"] == "backend"
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "ROUND_ROBIN"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    address = endpoint["address"]["socket_address"]
    assert address["address"] == "backend-pods.ns1.svc.cluster.local"
    assert address["port_value"] == (manifests.GRPC_PORT if protocol == "grpc"
                                     else manifests.HTTP_PORT)
    assert ("typed_extension_protocol_options" in cluster) == (protocol == "grpc")
    assert envoy["admin"]["address"]["socket_address"]["port_value"] == manifests.ENVOY_ADMIN_PORT


def test_dockerfile_and_image_context() -> None:
    files = manifests.image_context_files()
    assert "kpbench/server/__main__.py" in files and "kpbench/workload/locustfile.py" in files
    assert not any(name.startswith(("tests/", ".venv", "results/")) for name in files)
    dockerfile = files["Dockerfile"].decode()
    assert "COPY kpbench /app/kpbench" in dockerfile
    assert manifests.IMAGE_LOCUSTFILE.startswith("/app/kpbench/")
    assert re.fullmatch(r"kpbench/kpbench:[0-9a-f]{12}", manifests.image_tag(files))


# -- preflight -------------------------------------------------------------------------------------


def fake_host(tmp_path: Path, *, engine: bool = True, kind: str | None = "kind v0.30.0 go1.24",
              kubectl: bool = True, modules: Sequence[str] = (), builtin: str = "") -> Host:
    sys_module = tmp_path / "sys-module"
    sys_module.mkdir(exist_ok=True)
    for name in modules:
        (sys_module / name).mkdir()
    builtin_file = tmp_path / "modules.builtin"
    builtin_file.write_text(builtin)
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
                sys_module=sys_module, modules_builtin=builtin_file)


def test_preflight_passes_and_records_versions(tmp_path: Path) -> None:
    host = fake_host(tmp_path, modules=["ip_vs", "ip_vs_rr", "ip_vs_lc", "ip_vs_sh"])
    problems, versions = kind_problems(experiment(), host)
    assert problems == []
    assert versions["kind"].startswith("kind v0.30.0") and versions["kubectl"] == "v1.34.1"
    assert versions["container_engine"] == "docker 28.2.2"
    assert versions["node_image"] == manifests.NODE_IMAGE


@pytest.mark.parametrize(
    ("host_args", "modes", "node_image", "expected"),
    [
        ({"engine": False}, ["iptables"], None, "no Docker or podman engine answers"),
        ({"kind": None}, ["iptables"], None, "`kind` is not on PATH: install kind"),
        ({"kubectl": False}, ["iptables"], None, "`kubectl` is not on PATH"),
        ({"kind": "kind v0.22.0 go1.22"}, ["nftables"], None, "nftables mode needs kind >= v0.23"),
        ({}, ["nftables"], "kindest/node:v1.30.0", "nftables mode needs a node image >= v1.31"),
        ({}, ["ipvs-rr"], "kindest/node:v1.40.0", "disabled from Kubernetes 1.40"),
        ({"modules": ["ip_vs"]}, ["ipvs-lc", "ipvs-sh"], None,
         "run `sudo modprobe ip_vs_lc ip_vs_sh`"),
        ({}, ["ipvs-rr"], None, "run `sudo modprobe ip_vs ip_vs_rr`"),
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


def test_builtin_ipvs_modules_count_as_present(tmp_path: Path) -> None:
    host = fake_host(tmp_path, builtin="kernel/net/netfilter/ipvs/ip_vs.ko\n"
                                       "kernel/net/netfilter/ipvs/ip_vs_rr.ko\n")
    assert kind_problems(experiment(modes=["ipvs-rr"]), host)[0] == []


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
    _, result = run_driver(make_cell("iptables", events), api)
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
    cli.load_image("kpbench/kpbench:abc", spec.name)
    assert runner.commands[-1] == ["kind", "load", "docker-image", "kpbench/kpbench:abc",
                                   "--name", spec.name]
    assert cli.kpbench_clusters() == ["kpbench-iptables-1234abcd"]
    cli.node_exec("kpbench-iptables-1234abcd-worker", ["cat", "/proc/net/ip_vs"])
    assert runner.commands[-1] == ["docker", "exec", "kpbench-iptables-1234abcd-worker", "cat",
                                   "/proc/net/ip_vs"]


@pytest.mark.parametrize(("interrupted", "expected"), [(False, ["a", "b"]), (True, ["a"])])
def test_kind_backend_deletes_clusters_at_close(tmp_path: Path, interrupted: bool,
                                                expected: list[str]) -> None:
    runner = RecordingRunner()
    backend = KindBackend()
    backend.attach(tmp_path)
    backend.cli = KindCli("docker", runner)
    backend.created = ["a"]
    backend.used = {"a": tmp_path / "a", "b": tmp_path / "b"}  # b was reused from a kept run
    backend.interrupted = interrupted
    backend.close()
    deleted = [c[c.index("--name") + 1] for c in runner.commands if c[:2] == ["kind", "delete"]]
    assert deleted == expected
    kept = KindBackend(keep_cluster=True)
    kept.attach(tmp_path)
    kept.cli = KindCli("docker", runner)
    kept.created = ["c"]
    kept.close()
    assert all("c" not in c for c in runner.commands)


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
