"""Preflight of `--backend kind`: everything is checked before anything is created.

All problems are gathered into ONE line (the CLI prints it and exits 2), each saying what to do.
Host checks (`host_problems`, shared with backend `auto`, `kpbench clean` and the end-to-end
test's skip, so that they never disagree with preflight):
- a container engine answers: `docker info` (or `podman info`);
- `kind` >= v0.27.0 is on PATH: the pinned node image was built by kind v0.30.0 with containerd 2,
  whose config (version 3) kind reads only from v0.27.0 on; older kind fails to load an image
  into it with "failed to detect containerd snapshotter" (kubernetes-sigs/kind
  pkg/cluster/nodeutils/util.go parseSnapshotter, v0.26.0 against v0.27.0). kubectl is not
  needed: kpbench talks to the API server through the Python client.
Config checks (`kind_problems`):
- nftables mode needs a node image >= 1.31 (kube-proxy's nftables mode is beta, on by default,
  from 1.31) and a host kernel >= 5.13 (kind nodes share the host kernel; kube-proxy refuses
  older ones: kubernetes pkg/proxy/nftables/supported.go against
  pkg/util/kernel/constants.go `NFTablesKubeProxyKernelVersion`); kind accepts
  `kubeProxyMode: nftables` from v0.23 (pkg/internal/apis/config/validate.go), below v0.27;
- IPVS modes need the host kernel's `ip_vs` and `ip_vs_<scheduler>` modules: kind nodes are
  privileged containers sharing the host kernel (kubernetes-sigs/kind
  pkg/cluster/internal/providers/docker/provision.go mounts /lib/modules read-only). A module
  counts as present when `/sys/module/<name>` exists (loaded) or it is listed in
  `/lib/modules/$(uname -r)/modules.builtin`; otherwise the line suggests `sudo modprobe ...`;
- IPVS mode is deprecated from Kubernetes 1.35 and planned to be disabled in 1.40 (KEP-5495): a
  node image >= 1.40 cannot run IPVS modes;
- inotify limits and free memory against the kind nodes alive at once (one cluster at a time,
  every mode's with `--keep-cluster`): kind's known-issues page ("Pod errors due to too many
  open files") names `fs.inotify.max_user_watches` / `max_user_instances` and their defaults on
  Ubuntu (8192 / 128) as too small for clusters with several nodes and sets 524288 / 512; kpbench
  asks for those values for up to `INOTIFY_NODES` nodes and proportionally more beyond (an
  estimate, not a measurement). Memory: an estimate per node (`NODE_MEMORY_MIB`) plus the memory
  requests of the pods a cell runs at its peak, against `MemAvailable`.
Warnings (printed, recorded in run.json, not fatal): kind is not the release that built the
pinned node image; kind documents using the node image of one's own release, and the warning
names that release's default image.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kpbench.config import Experiment, expand_cells
from kpbench.ipvs import scheduler_of
from kpbench.kube.manifests import (
    NODE_IMAGE,
    NODE_IMAGE_KIND_RELEASE,
    cell_stages,
    metrics_server_manifests,
    node_image_version,
)

KIND_INSTALL = "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
DOCKER_INSTALL = "https://docs.docker.com/engine/install/"
MIN_KIND = (0, 27, 0)
MIN_NODE_FOR_NFTABLES = (1, 31)
MIN_KERNEL_FOR_NFTABLES = (5, 13)
IPVS_DISABLED_FROM = (1, 40)
KIND_DEFAULT_NODE_IMAGES = {  # kubernetes-sigs/kind pkg/apis/config/defaults/image.go per tag
    (0, 27): "kindest/node:v1.32.2@sha256:"
             "f226345927d7e348497136874b6d207e0b32cc52154ad8323129352923a3142f",
    (0, 28): "kindest/node:v1.33.1@sha256:"
             "8d866994839cd096b3590681c55a6fa4a071fdaf33be7b9660e5697d2ed13002",
    (0, 29): "kindest/node:v1.33.1@sha256:"
             "050072256b9a903bd914c0b2866828150cb229cea0efe5892e2b644d5dd3b34f",
    (0, 30): NODE_IMAGE,
    (0, 31): "kindest/node:v1.35.0@sha256:"
             "452d707d4862f52530247495d180205e029056831160e22870e37e3f6c1ac31f",
    (0, 32): "kindest/node:v1.36.1@sha256:"
             "3489c7674813ba5d8b1a9977baea8a6e553784dab7b84759d1014dbd78f7ebd5",
}
KIND_INOTIFY = {"max_user_instances": 512, "max_user_watches": 524288}  # kind's known issues
INOTIFY_NODES = 8  # kind nodes that kind's values are taken to cover (estimate)
NODE_MEMORY_MIB = {"control-plane": 768, "worker": 384}  # a node's own processes (estimate)


def _probe(command: Sequence[str]) -> str | None:
    """stdout of a quick command, or None when it cannot run or fails."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


@dataclass
class Host:
    """What preflight looks at; tests pass their own."""

    which: Callable[[str], str | None] = shutil.which
    probe: Callable[[Sequence[str]], str | None] = _probe
    sys_module: Path = Path("/sys/module")
    modules_builtin: Path = field(
        default_factory=lambda: Path("/lib/modules") / os.uname().release / "modules.builtin")
    kernel_release: Callable[[], str] = lambda: os.uname().release
    proc_sys: Path = Path("/proc/sys")
    meminfo: Path = Path("/proc/meminfo")


class KindPreflight(NamedTuple):
    problems: list[str]  # each with what to do; any problem: exit 2
    warnings: list[str]
    versions: dict[str, Any]


def parse_version(text: str) -> tuple[int, ...] | None:
    """The first `vX.Y.Z` / `X.Y.Z` in `text` as a tuple."""
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(part) for part in match.groups()) if match else None


def container_engine(host: Host) -> tuple[str, str] | None:
    """(engine, server version) of the first engine that answers, Docker before podman."""
    for engine in ("docker", "podman"):
        if host.which(engine) is None:
            continue
        fmt = "{{.ServerVersion}}" if engine == "docker" else "{{.Version.Version}}"
        out = host.probe([engine, "info", "--format", fmt])
        if out is not None:
            return engine, out.strip() or "unknown"
    return None


def kind_version(host: Host) -> str | None:
    out = host.probe(["kind", "version"]) if host.which("kind") else None
    return out.strip() if out else None


def host_problems(host: Host) -> tuple[list[str], dict[str, Any]]:
    """What the host lacks for any kind run (engine, kind >= v0.27), and the versions found."""
    problems: list[str] = []
    versions: dict[str, Any] = {}
    engine = container_engine(host)
    if engine is None:
        problems.append(f"no Docker or podman engine answers (`docker info` fails): start Docker "
                        f"or install it ({DOCKER_INSTALL})")
    else:
        versions["container_engine"] = f"{engine[0]} {engine[1]}"
    kind = kind_version(host)
    if kind is None:
        problems.append(f"`kind` is not on PATH: install kind >= v0.27 ({KIND_INSTALL})")
        return problems, versions
    versions["kind"] = kind
    found = parse_version(kind)
    if found is not None and found < MIN_KIND:
        problems.append(f"kind >= v0.27.0 is needed, found {kind}: older kind cannot load images "
                        f"into nodes with containerd 2 such as the pinned node image (\"failed to "
                        f"detect containerd snapshotter\"); upgrade kind ({KIND_INSTALL})")
    return problems, versions


def release_warning(kind: str | None, node_image: str | None) -> str | None:
    """A warning when kind is not the release that built the pinned node image."""
    found = parse_version(kind) if kind else None
    pinned = parse_version(NODE_IMAGE_KIND_RELEASE)
    if node_image is not None or found is None or pinned is None or found[:2] == pinned[:2]:
        return None
    own = KIND_DEFAULT_NODE_IMAGES.get((found[0], found[1]))
    own_text = (f"its own default node image is {own}" if own else
                "its release notes name its own default node image")
    return (f"kind v{'.'.join(map(str, found))} is not {NODE_IMAGE_KIND_RELEASE}, the release that "
            f"built the pinned node image {NODE_IMAGE.split('@')[0]}; kind recommends the node "
            f"image of its own release: {own_text} (set cluster.node_image to use it)")


def module_present(name: str, host: Host) -> bool:
    if (host.sys_module / name).exists():
        return True
    try:
        builtin = host.modules_builtin.read_text()
    except OSError:
        return False
    return any(line.rsplit("/", 1)[-1] == f"{name}.ko" for line in builtin.splitlines())


def missing_ipvs_modules(modes: Sequence[str], host: Host) -> list[str]:
    schedulers = sorted({scheduler_of(m) for m in modes if m.startswith("ipvs-")})
    if not schedulers:
        return []
    wanted = ["ip_vs", *(f"ip_vs_{s}" for s in schedulers)]
    return [name for name in wanted if not module_present(name, host)]


def kind_problems(experiment: Experiment, host: Host, keep_cluster: bool = False,
                  check_host: bool = True) -> KindPreflight:
    """What is missing for this experiment on kind, each with what to do; warnings; versions.

    `check_host=False` (a dry run) leaves out everything that looks at this machine.
    """
    problems: list[str] = []
    versions: dict[str, Any] = {}
    warnings: list[str] = []
    if check_host:
        problems, versions = host_problems(host)
    node_image = experiment.cluster.node_image or NODE_IMAGE
    node_version = node_image_version(node_image)
    versions["node_image"] = node_image
    if experiment.cluster.node_image is None:
        versions["node_image_source"] = (f"default of kind {NODE_IMAGE_KIND_RELEASE} "
                                         "(pkg/apis/config/defaults/image.go)")
    if check_host:
        warning = release_warning(versions.get("kind"), experiment.cluster.node_image)
        if warning:
            warnings.append(warning)
    if "nftables" in experiment.modes:
        if node_version is not None and node_version < MIN_NODE_FOR_NFTABLES:
            problems.append(f"nftables mode needs a node image >= v1.31, cluster.node_image is "
                            f"{node_image}: use a newer kindest/node image")
        kernel = parse_version(host.kernel_release()) if check_host else None
        if kernel is not None and kernel[:2] < MIN_KERNEL_FOR_NFTABLES:
            problems.append(f"nftables mode needs a host kernel >= 5.13 (kind nodes share it), "
                            f"this one is {host.kernel_release()}: drop nftables or use a newer "
                            "kernel")
    ipvs_modes = [m for m in experiment.modes if m.startswith("ipvs-")]
    if ipvs_modes:
        if node_version is not None and node_version >= IPVS_DISABLED_FROM:
            problems.append(f"IPVS modes are disabled from Kubernetes 1.40 (KEP-5495), "
                            f"cluster.node_image is {node_image}: use a node image <= v1.39 "
                            "or drop the ipvs-* modes")
        missing = missing_ipvs_modules(ipvs_modes, host) if check_host else []
        if missing:
            problems.append(f"IPVS modes need the host kernel modules {', '.join(missing)} "
                            f"(not in /sys/module): run `sudo modprobe {' '.join(missing)}`, "
                            "or drop the ipvs-* modes")
    if check_host:
        problems += resource_problems(experiment, host, keep_cluster)
    return KindPreflight(problems, warnings, versions)


def nodes_at_once(experiment: Experiment, keep_cluster: bool) -> int:
    """kind nodes alive at once: one cluster (1 control plane + workers) per mode with
    `--keep-cluster`, else one cluster at a time (each deleted after its mode's last cell)."""
    clusters = len(experiment.modes) if keep_cluster else 1
    return clusters * (1 + experiment.cluster.nodes)


def memory_mib(quantity: str) -> float:
    """A Kubernetes memory quantity (`64Mi`, `1Gi`, `200M`, `1048576`) in MiB."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor / 2**20
    return float(quantity) / 2**20


def requested_memory_mib(documents: Sequence[dict[str, Any]],
                         replicas: dict[str, int] | None = None) -> float:
    """Sum of the containers' memory requests over Pods and Deployments (x replicas, or the
    count given in `replicas` by Deployment name)."""
    total = 0.0
    for document in documents:
        if document["kind"] == "Pod":
            pod, count = document["spec"], 1
        elif document["kind"] == "Deployment":
            pod = document["spec"]["template"]["spec"]
            count = (replicas or {}).get(document["metadata"]["name"],
                                         document["spec"].get("replicas", 1))
        else:
            continue
        for container in pod.get("containers", []):
            request = ((container.get("resources") or {}).get("requests") or {}).get("memory")
            total += count * memory_mib(str(request)) if request else 0.0
    return total


def peak_backend_pods(experiment: Experiment) -> int:
    """Backend pods at a cell's peak: the most replicas asked for, plus a rollout's surge."""
    backend = experiment.backend
    replicas = max([backend.replicas, *(e.replicas for e in experiment.events if e.replicas)])
    if backend.hpa is not None:
        replicas = max(replicas, backend.hpa.max_replicas)
    surge, _ = backend.rollout.resolve(replicas)
    return replicas + surge


def resource_problems(experiment: Experiment, host: Host, keep_cluster: bool) -> list[str]:
    """inotify limits and free memory against what the kind nodes and a cell's pods need."""
    problems = []
    nodes = nodes_at_once(experiment, keep_cluster)
    scale = max(1.0, nodes / INOTIFY_NODES)
    low = []
    for name, value in KIND_INOTIFY.items():
        try:
            current = int((host.proc_sys / "fs" / "inotify" / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # not Linux (Docker Desktop runs the nodes in its own VM)
        needed = math.ceil(value * scale)
        if current < needed:
            low.append(f"fs.inotify.{name}={needed}")
    if low:
        problems.append(f"{nodes} kind nodes at once need higher inotify limits than this host's "
                        f"(kind's known issue \"too many open files\"): run "
                        f"`sudo sysctl {' '.join(low)}`")
    try:
        meminfo = host.meminfo.read_text()
    except OSError:
        return problems
    match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.MULTILINE)
    if match is None:
        return problems
    available = int(match.group(1)) / 1024
    clusters = len(experiment.modes) if keep_cluster else 1
    memory = clusters * float(NODE_MEMORY_MIB["control-plane"]
                         + experiment.cluster.nodes * NODE_MEMORY_MIB["worker"])
    memory += requested_memory_mib(metrics_server_manifests())
    pods = 0.0
    for cell in expand_cells(experiment):
        documents = [d for _, stage in cell_stages("preflight", cell.config, "image", "")
                     for d in stage]
        pods = max(pods, requested_memory_mib(
            documents, {"backend": peak_backend_pods(cell.config)}))
    memory += pods
    if available < memory:
        problems.append(f"about {memory / 1024:.1f} GiB of free memory is needed ({nodes} kind "
                        f"nodes and a cell's pods), {available / 1024:.1f} GiB is available: "
                        "free memory, or lower cluster.nodes / backend replicas")
    return problems


def problems_line(backend: str, problems: list[str]) -> str:
    return f"--backend {backend}: " + "; ".join(problems)
