"""`--backend kind` and `--backend cluster`: real Kubernetes.

KindBackend: one kind cluster per mode, named `kpbench-<mode>-<config hash>` (1 control plane +
`cluster.nodes` workers, `manifests/kind/cluster.yaml.j2`, the node image pinned by
digest), reused across the cells of that mode and across runs with the same hash, and deleted
after the mode's last cell unless `--keep-cluster`, so that only one cluster runs at a time (on
Ctrl-C, the clusters this run created are deleted unless `--keep-cluster`). Its kubeconfig and
kind config are kept in the run folder under `kind/`; the user's kubeconfig and current context
are never touched. After creation (or reuse) the kpbench image is built (only when its sources
changed) under one fully qualified local name and loaded with `kind load image-archive`,
metrics-server is installed, and kube-proxy's ConfigMap is checked against the mode. A cluster
counts as ready only once all of that succeeded: a cell whose setup fails is FAILED with the
cause, and the next cell of the mode tries the setup again. Before the first cell with an HPA,
the metrics API must answer for every node. Each cell then verifies its Service on every node
(`kpbench.kube.driver`).

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
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kpbench.backends.base import CellResult, PreflightError, Progress, Unsupported
from kpbench.config import Cell, Experiment, expand_cells
from kpbench.kube import manifests
from kpbench.kube.api import KubeApi, KubeError, RestKubeApi
from kpbench.kube.cluster import ClusterError, KindCli
from kpbench.kube.driver import KubeCell
from kpbench.kube.preflight import Host, kind_problems, problems_line
from kpbench.kube.verify import DataplaneMismatch, check_config, kpbench_mode, kube_proxy_settings

KUBE_PROXY_CONFIG_MAPS = ("kube-proxy", "kube-proxy-config")
METRICS_SERVER_TIMEOUT_SECONDS = 300.0
POLL_SECONDS = 2.0


class ClusterSetupError(RuntimeError):
    """A kind cluster could not be made ready; the cell fails with the cause."""


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


def dry_run_problems(experiment: Experiment) -> list[str]:
    """What a dry run checks: the experiment only, never the host."""
    return kind_problems(experiment, Host(), check_host=False).problems + workload_problems(
        experiment)


def wait_for_node_metrics(api: KubeApi, timeout: float = METRICS_SERVER_TIMEOUT_SECONDS,
                          clock: Callable[[], float] = time.monotonic,
                          sleep: Callable[[float], None] = time.sleep) -> None:
    """Until `metrics.k8s.io` reports every node: metrics-server answers only after its first
    scrape of each kubelet, and the HPA sees no CPU before that."""
    deadline = clock() + timeout
    missing: list[str] = []
    while True:
        nodes = {n["metadata"]["name"] for n in api.list_objects("Node", "")}
        try:
            reported = {m["metadata"]["name"] for m in api.list_objects("NodeMetrics", "")}
        except KubeError:
            reported = set()
        missing = sorted(nodes - reported)
        if nodes and not missing:
            return
        if clock() > deadline:
            raise ClusterSetupError(f"metrics.k8s.io did not report node(s) "
                                    f"{', '.join(missing) or '(no nodes listed)'} within "
                                    f"{timeout:g} s: metrics-server is not serving")
        sleep(POLL_SECONDS)


def close_api(api: KubeApi | None) -> None:
    """Release the client's connections (RestKubeApi); doubles have nothing to close."""
    close = getattr(api, "close", None)
    if close is not None:
        close()


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
        self.warnings: list[str] = []
        self.driver_options: dict[str, Any] = {}  # tests: a fake clock for KubeCell

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

    def __init__(self, keep_cluster: bool = False, host: Host | None = None,
                 cli: KindCli | None = None,
                 api_factory: Callable[[Path], KubeApi] = RestKubeApi) -> None:
        super().__init__()
        self.keep_cluster = keep_cluster
        self.host = host or Host()
        self.cli = cli
        self.api_factory = api_factory
        self.created: list[str] = []
        self.kubeconfigs: dict[str, Path] = {}  # every cluster this run touched
        self.cluster_info: dict[str, dict[str, Any]] = {}  # clusters fully set up
        self.metrics_ready: set[str] = set()
        self.cells_left: Counter[str] = Counter()  # cluster -> cells still to run
        self.image_built = ""
        self.interrupted = False
        self.scratch: Path | None = None

    def preflight(self, experiment: Experiment) -> None:
        found = kind_problems(experiment, self.host, self.keep_cluster)
        problems = found.problems + workload_problems(experiment)
        if problems:
            raise PreflightError(problems_line("kind", problems))
        self.versions_found = found.versions | (
            {"kind_warnings": found.warnings} if found.warnings else {})
        self.warnings += [w for w in found.warnings if w not in self.warnings]
        if self.cli is None:
            engine = found.versions.get("container_engine", "docker").split()[0]
            self.cli = KindCli(engine)
        for cell in expand_cells(experiment):
            self.cells_left[manifests.ClusterSpec.for_mode(cell.config, cell.mode).name] += 1

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
        """The cluster's kubeconfig once it is fully set up (created or reused, image loaded,
        metrics-server applied, kube-proxy's settings read); ClusterSetupError with the cause."""
        assert self.cli is not None
        if spec.name in self.cluster_info:
            return self.kubeconfigs[spec.name]
        try:
            return self._set_up(spec)
        except (ClusterError, KubeError, DataplaneMismatch) as exc:
            raise ClusterSetupError(f"cluster {spec.name} not ready: {exc}") from exc

    def _set_up(self, spec: manifests.ClusterSpec) -> Path:
        assert self.cli is not None
        workdir = self.workdir()
        kubeconfig = workdir / f"{spec.name}.kubeconfig"
        exists = spec.name in self.cli.clusters()
        reused = exists and spec.name not in self.created
        self.kubeconfigs[spec.name] = kubeconfig
        if exists:  # kept by an earlier run, or created by a cell whose setup failed later
            self.cli.write_kubeconfig(spec.name, kubeconfig)
        else:
            self.created.append(spec.name)
            self.cli.create(spec, workdir, kubeconfig)
        image = self.image()
        if self.image_built != image:
            if not self.cli.image_exists(image):
                self.cli.build_image(image)
            self.image_built = image
        self.cli.load_image(image, spec.name)
        api = self.api_factory(kubeconfig)
        try:
            for document in manifests.metrics_server_manifests():
                api.apply(document)
            settings = read_proxy_settings(api)
        finally:
            close_api(api)
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
            api = self.api_factory(kubeconfig)
            try:
                if cell.config.backend.hpa is not None and spec.name not in self.metrics_ready:
                    wait_for_node_metrics(api, **{k: v for k, v in self.driver_options.items()
                                                  if k in ("clock", "sleep")})
                    self.metrics_ready.add(spec.name)
                driver = KubeCell(cell, api, self.namespace_for(cell), self.image(),
                                  KindNodes(self.cli, spec.name, cell.mode),
                                  run_label=self.run_token, **self.driver_options)
                result = driver.run(progress)
            finally:
                close_api(api)
        except KeyboardInterrupt:
            self.interrupted = True
            raise
        finally:
            self.cell_done(spec.name)
        result.dataplane = {"cluster": info} | result.dataplane
        return result

    def cell_done(self, cluster: str) -> None:
        """After a mode's last cell, its cluster goes (unless --keep-cluster or interrupted)."""
        self.cells_left[cluster] -= 1
        if self.cells_left[cluster] <= 0 and not self.interrupted:
            self.delete_cluster(cluster)

    def delete_cluster(self, name: str) -> None:
        if self.keep_cluster or self.cli is None or name not in self.kubeconfigs:
            return
        with contextlib.suppress(ClusterError):
            self.cli.delete(name, self.kubeconfigs[name])
        self.kubeconfigs.pop(name)
        self.cluster_info.pop(name, None)
        self.metrics_ready.discard(name)

    def close(self) -> None:
        """What is left: on an interrupt the clusters this run created, else every cluster it
        used (unless --keep-cluster)."""
        doomed = self.created if self.interrupted else list(self.kubeconfigs)
        for name in [n for n in doomed if n in self.kubeconfigs]:
            self.delete_cluster(name)


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
                            "can pull from (docker build -f manifests/Dockerfile -t IMAGE "
                            ". && docker push IMAGE)")
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
        close_api(self.api)


__all__ = ["ClusterBackend", "KindBackend"]
