"""Preflight of `--backend kind`: everything is checked before anything is created.

All problems are gathered into ONE line (the CLI prints it and exits 2), each saying what to do:
- a container engine answers: `docker info` (or `podman info`);
- `kind` and `kubectl` are on PATH; their versions are recorded in run.json;
- nftables mode needs kind >= v0.23.0 (kind added `kubeProxyMode: nftables` in v0.23.0) and a
  node image >= 1.31 (kube-proxy's nftables mode is beta, on by default, from 1.31);
- IPVS modes need the host kernel's `ip_vs` and `ip_vs_<scheduler>` modules: kind nodes are
  privileged containers sharing the host kernel (kubernetes-sigs/kind
  pkg/cluster/internal/providers/docker/provision.go mounts /lib/modules read-only). A module
  counts as present when `/sys/module/<name>` exists (loaded) or it is listed in
  `/lib/modules/$(uname -r)/modules.builtin`; otherwise the line suggests `sudo modprobe ...`;
- IPVS mode is deprecated from Kubernetes 1.35 and planned to be disabled in 1.40 (KEP-5495): a
  node image >= 1.40 cannot run IPVS modes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpbench.config import Experiment
from kpbench.ipvs import scheduler_of
from kpbench.kube.manifests import NODE_IMAGE, NODE_IMAGE_KIND_RELEASE, node_image_version

KIND_INSTALL = "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
KUBECTL_INSTALL = "https://kubernetes.io/docs/tasks/tools/"
DOCKER_INSTALL = "https://docs.docker.com/engine/install/"
MIN_KIND_FOR_NFTABLES = (0, 23, 0)
MIN_NODE_FOR_NFTABLES = (1, 31)
IPVS_DISABLED_FROM = (1, 40)


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


def kubectl_version(host: Host) -> str | None:
    if host.which("kubectl") is None:
        return None
    out = host.probe(["kubectl", "version", "--client", "-o", "json"])
    if out is None:
        return None
    try:
        return str(json.loads(out)["clientVersion"]["gitVersion"])
    except (ValueError, KeyError, TypeError):
        return out.strip().splitlines()[0] if out.strip() else None


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


def kind_problems(experiment: Experiment, host: Host) -> tuple[list[str], dict[str, Any]]:
    """(what is missing, each with what to do; versions found)."""
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
        problems.append(f"`kind` is not on PATH: install kind >= v0.23 ({KIND_INSTALL})")
    else:
        versions["kind"] = kind
    kubectl = kubectl_version(host)
    if kubectl is None:
        problems.append(f"`kubectl` is not on PATH: install it ({KUBECTL_INSTALL})")
    else:
        versions["kubectl"] = kubectl
    node_image = experiment.cluster.node_image or NODE_IMAGE
    node_version = node_image_version(node_image)
    versions["node_image"] = node_image
    if experiment.cluster.node_image is None:
        versions["node_image_source"] = (f"default of kind {NODE_IMAGE_KIND_RELEASE} "
                                         "(pkg/apis/config/defaults/image.go)")
    if "nftables" in experiment.modes:
        kind_semver = parse_version(kind) if kind else None
        if kind_semver is not None and kind_semver < MIN_KIND_FOR_NFTABLES:
            problems.append(f"nftables mode needs kind >= v0.23.0, found {kind}: upgrade kind "
                            f"({KIND_INSTALL})")
        if node_version is not None and node_version < MIN_NODE_FOR_NFTABLES:
            problems.append(f"nftables mode needs a node image >= v1.31, cluster.node_image is "
                            f"{node_image}: use a newer kindest/node image")
    ipvs_modes = [m for m in experiment.modes if m.startswith("ipvs-")]
    if ipvs_modes:
        if node_version is not None and node_version >= IPVS_DISABLED_FROM:
            problems.append(f"IPVS modes are disabled from Kubernetes 1.40 (KEP-5495), "
                            f"cluster.node_image is {node_image}: use a node image <= v1.39 "
                            "or drop the ipvs-* modes")
        missing = missing_ipvs_modules(ipvs_modes, host)
        if missing:
            problems.append(f"IPVS modes need the host kernel modules {', '.join(missing)} "
                            f"(not in /sys/module): run `sudo modprobe {' '.join(missing)}`, "
                            "or drop the ipvs-* modes")
    return problems, versions


def problems_line(backend: str, problems: list[str]) -> str:
    return f"--backend {backend}: " + "; ".join(problems)
