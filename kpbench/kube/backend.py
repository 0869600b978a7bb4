"""`--backend kind` and `--backend cluster`: real Kubernetes (design §6.3).

KindBackend: one kind cluster per mode, named `kpbench-<mode>-<config hash>` (1 control plane +
`cluster.nodes` workers, `manifests/kind/cluster.yaml.j2`, the node image pinned by digest), reused
across the cells of that mode and across runs with the same hash, deleted at the end unless
`--keep-cluster` (on Ctrl-C, the clusters this run created are deleted unless `--keep-cluster`).
Its kubeconfig and kind config are kept in the run folder under `kind/`; the user's kubeconfig
and current context are never touched. After creation (or reuse) the kpbench image is built
(only when its sources changed) and loaded with `kind load docker-image`, metrics-server is
installed, and kube-proxy's ConfigMap is checked against the mode; each cell then verifies its
Service on every node (`kpbench.kube.driver`).

ClusterBackend: an existing cluster from `--kubeconfig`; kube-proxy's mode is read from the
cluster (ConfigMap `kube-system/kube-proxy`, or `kube-proxy-config` as on EKS) and recorded; only
cells of that mode run, the others are UNSUPPORTED with the reason. The kpbench image must be
pushed to a registry the cluster can pull from and named in `KPBENCH_IMAGE`. Each cell runs in
its own namespace (`kpbench-<run token>-<n>`), removed at the end of the cell.

What cannot be verified on the development machine (no Docker engine, no kind, no cluster): the
calls into kind, Docker and the API server. They run in `nox -s e2e-kind`; everything they are
given is generated and tested offline.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from kpbench.backends.base import CellResult, PreflightError, Progress, Unsupported
from kpbench.config import Cell, Experiment
from kpbench.kube import manifests
from kpbench.kube.api import KubeApi, KubeError, RestKubeApi
from kpbench.kube.cluster import ClusterError, KindCli
from kpbench.kube.driver import KubeCell
from kpbench.kube.preflight import Host, kind_problems, problems_line
from kpbench.kube.verify import DataplaneMismatch, check_config, kpbench_mode, kube_proxy_settings

KUBE_PROXY_CONFIG_MAPS = ("kube-proxy", "kube-proxy-config")
METRICS_SERVER_TIMEOUT_SECONDS = 300.0


def workload_problems(experiment: Experiment) -> list[str]:
    """Timeline events the real workload cannot carry out."""
    problems = []
    for index, event in enumerate(experiment.events):
        if event.action == "load" and event.requests_per_second is not None:
            problems.append(
                f"events[{index}]: a `load` event can change `connections` on kind/cluster "
                "(through the Locust master), not `requests_per_second`: the workload's rate "
                "per connection is fixed at start")
    return problems


def read_proxy_settings(api: KubeApi) -> dict[str, str]:
    for name in KUBE_PROXY_CONFIG_MAPS:
        config_map = api.get("ConfigMap", "kube-system", name)
        if config_map:
            return kube_proxy_settings(config_map) | {"config_map": f"kube-system/{name}"}
    raise DataplaneMismatch("no kube-proxy ConfigMap in kube-system (looked for "
                            f"{', '.join(KUBE_PROXY_CONFIG_MAPS)})")


class KindNodes:
    """`NodeTables` for a kind cluster: `docker exec` into each node container."""

    def __init__(self, cli: KindCli, cluster: str, mode: str) -> None:
        self.cli = cli
        self.cluster = cluster
        self.mode = mode
        self._nodes: list[str] | None = None

    def nodes(self) -> list[str]:
        if self._nodes is None:
            self._nodes = self.cli.nodes(self.cluster)
        return self._nodes

    def read(self, node: str, ipvs_only: bool = False) -> dict[str, str]:
        if ipvs_only:
            return {"ip_vs": self.cli.read_ip_vs(node)}
        return self.cli.read_tables(node, want_ipvs=True, want_nft=self.mode == "nftables")


class _KubeBackendBase:
    measured = True

    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self.run_token = secrets.token_hex(3)
        self.cell_number = 0
        self.versions_found: dict[str, Any] = {}

    def attach(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def namespace_for(self, cell: Cell) -> str:
        self.cell_number += 1
        return f"kpbench-{self.run_token}-{self.cell_number}"

    def image(self) -> str:
        raise NotImplementedError

    def base_versions(self) -> dict[str, Any]:
        from kpbench.results import package_version

        return {"kubernetes_client": package_version("kubernetes"),
                "locust": package_version("locust"), **self.versions_found}


class KindBackend(_KubeBackendBase):
    name = "kind"

    def __init__(self, keep_cluster: bool = False,
                 host: Host | None = None) -> None:
        super().__init__()
        self.keep_cluster = keep_cluster
        self.host = host or Host()
        self.cli: KindCli | None = None
        self.experiment_name = ""
        self.created: list[str] = []
        self.used: dict[str, Path] = {}  # cluster -> kubeconfig
        self.cluster_info: dict[str, dict[str, Any]] = {}
        self.image_built = ""
        self.interrupted = False
        self.scratch: Path | None = None

    def preflight(self, experiment: Experiment) -> None:
        problems, versions = kind_problems(experiment, self.host)
        problems += workload_problems(experiment)
        if problems:
            raise PreflightError(problems_line("kind", problems))
        self.versions_found = versions
        engine = versions.get("container_engine", "docker").split()[0]
        self.cli = KindCli(engine)
        self.experiment_name = experiment.name

    def unsupported_reason(self, mode: str) -> str | None:
        return None  # every mode's requirements were checked in preflight

    def versions(self) -> dict[str, Any]:
        return self.base_versions() | {"kubernetes": manifests.KUBERNETES_VERSION
                                       if "node_image_source" in self.versions_found else None}

    def image(self) -> str:
        return manifests.image_tag()

    def workdir(self) -> Path:
        """`<run folder>/kind/` once the runner attached the run folder, else a private temp dir."""
        if self.run_dir is not None:
            target = self.run_dir / "kind"
        else:
            if self.scratch is None:
                self.scratch = Path(tempfile.mkdtemp(prefix="kpbench-kind-"))
            target = self.scratch
        target.mkdir(parents=True, exist_ok=True)
        target.chmod(0o700)
        return target

    def ensure_cluster(self, spec: manifests.ClusterSpec) -> Path:
        assert self.cli is not None
        if spec.name in self.used:
            return self.used[spec.name]
        workdir = self.workdir()
        kubeconfig = workdir / f"{spec.name}.kubeconfig"
        if spec.name in self.cli.clusters():
            self.cli.write_kubeconfig(spec.name, kubeconfig)
            reused = True
        else:
            self.created.append(spec.name)
            self.cli.create(spec, workdir, kubeconfig)
            reused = False
        self.used[spec.name] = kubeconfig
        image = self.image()
        if self.image_built != image:
            if not self.cli.image_exists(image):
                self.cli.build_image(image)
            self.image_built = image
        self.cli.load_image(image, spec.name)
        api = RestKubeApi(kubeconfig)
        try:
            for document in manifests.metrics_server_manifests():
                api.apply(document)
            settings = read_proxy_settings(api)
        finally:
            api.close()
        self.cluster_info[spec.name] = {
            "cluster": spec.name, "reused": reused, "node_image": spec.node_image,
            "kind_config": f"{spec.name}.kind.yaml" if not reused else None,
            "kube_proxy": settings, "image": image,
        }
        return kubeconfig

    def run_cell(self, cell: Cell, progress: Progress) -> CellResult:
        assert self.cli is not None, "preflight() first"
        spec = manifests.ClusterSpec.for_mode(cell.config, cell.mode)
        try:
            kubeconfig = self.ensure_cluster(spec)
            info = self.cluster_info[spec.name]
            check_config(cell.mode, info["kube_proxy"])
            api = RestKubeApi(kubeconfig)
            try:
                driver = KubeCell(cell, api, self.namespace_for(cell), self.image(),
                                  KindNodes(self.cli, spec.name, cell.mode),
                                  run_label=self.run_token)
                result = driver.run(progress)
            finally:
                api.close()
        except KeyboardInterrupt:
            self.interrupted = True
            raise
        result.dataplane = {"cluster": info} | result.dataplane
        return result

    def close(self) -> None:
        if self.cli is None or self.keep_cluster:
            return
        doomed = self.created if self.interrupted else list(dict.fromkeys(
            [*self.created, *self.used]))
        for name in doomed:
            with contextlib.suppress(ClusterError):
                self.cli.delete(name, self.used.get(name))


class ClusterBackend(_KubeBackendBase):
    name = "cluster"

    def __init__(self, kubeconfig: Path | None = None, api: KubeApi | None = None,
                 image: str | None = None) -> None:
        super().__init__()
        self.kubeconfig = kubeconfig
        self.api = api
        self.image_name = image if image is not None else os.environ.get("KPBENCH_IMAGE", "")
        self.settings: dict[str, str] | None = None
        self.cluster_mode: str | None = None

    def preflight(self, experiment: Experiment) -> None:
        problems: list[str] = []
        if self.api is None:
            if self.kubeconfig is None:
                problems.append("needs --kubeconfig PATH (the cluster's kubeconfig)")
            elif not self.kubeconfig.is_file():
                problems.append(f"--kubeconfig {self.kubeconfig}: no such file")
        if not self.image_name:
            problems.append("set KPBENCH_IMAGE to the kpbench image in a registry the cluster "
                            "can pull from (docker build -f manifests/Dockerfile -t IMAGE . && "
                            "docker push IMAGE)")
        problems += workload_problems(experiment)
        if problems:
            raise PreflightError(problems_line("cluster", problems))
        if self.api is None:
            assert self.kubeconfig is not None
            try:
                self.api = RestKubeApi(self.kubeconfig)
            except Exception as exc:
                raise PreflightError(f"--backend cluster: cannot load {self.kubeconfig}: "
                                     f"{str(exc).splitlines()[0][:200]}") from None
        try:
            self.settings = read_proxy_settings(self.api)
        except (KubeError, DataplaneMismatch) as exc:
            raise PreflightError(f"--backend cluster: cannot read kube-proxy's mode: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
        self.cluster_mode = kpbench_mode(self.settings)
        self.versions_found = {"cluster_kube_proxy": self.settings,
                               "cluster_mode": self.cluster_mode}
        if self.cluster_mode not in experiment.modes:
            raise PreflightError(
                f"--backend cluster: the cluster runs kube-proxy in {self.cluster_mode}, which "
                f"is not among the experiment's modes ({', '.join(experiment.modes)})")

    def unsupported_reason(self, mode: str) -> str | None:
        if self.cluster_mode is not None and mode != self.cluster_mode:
            return (f"the cluster runs kube-proxy in {self.cluster_mode} (read from its "
                    f"ConfigMap); this cell needs {mode}")
        return None

    def versions(self) -> dict[str, Any]:
        return self.base_versions()

    def image(self) -> str:
        return self.image_name

    def run_cell(self, cell: Cell, progress: Progress) -> CellResult:
        reason = self.unsupported_reason(cell.mode)
        if reason is not None:
            raise Unsupported(reason)
        assert self.api is not None and self.settings is not None, "preflight() first"
        check_config(cell.mode, read_proxy_settings(self.api))
        driver = KubeCell(cell, self.api, self.namespace_for(cell), self.image(), None,
                          run_label=self.run_token)
        result = driver.run(progress)
        result.dataplane = {"cluster": {"kube_proxy": self.settings}} | result.dataplane
        return result

    def close(self) -> None:
        close = getattr(self.api, "close", None)
        if close is not None:
            close()


__all__ = ["ClusterBackend", "KindBackend"]
