"""kind clusters, images and node access through the `kind` and `docker` (or `podman`) CLIs.

Commands, as kind documents them (kubernetes-sigs/kind site/content/docs/user/quick-start.md and
pkg/cmd/kind/...): `kind create cluster --name N --config F --kubeconfig K --wait 10m`,
`kind get clusters`, `kind get nodes --name N`, `kind get kubeconfig --name N`,
`kind load image-archive ARCHIVE --name N`, `kind delete cluster --name N --kubeconfig K`.
The kpbench image is built under one fully qualified local name (`localhost/kpbench/kpbench:<hash>`,
what podman would store anyway), saved with `<engine> save` and loaded from the archive for
Docker and podman alike: the nodes' containerd imports it under that very name, which the pods
ask for, and the archive sidesteps `kind load docker-image`'s trouble with Docker's containerd
image store.
Every kind command that writes a kubeconfig is given an explicit `--kubeconfig` path in the run
folder, so the user's kubeconfig and current context are never touched. With podman,
`KIND_EXPERIMENTAL_PROVIDER=podman` is set, as kind's docs say.

Nodes are containers named after the node (`docker exec <node> ...`), which is how the data plane
is read: `cat /proc/net/ip_vs`, `iptables-save`, `nft list table ip kube-proxy`.

Not verifiable on the development machine (no Docker engine, no kind): every command here runs
only in the end-to-end test (`nox -s e2e-kind`); the command lines are unit-tested offline.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from kpbench.kube.manifests import CLUSTER_PREFIX, ClusterSpec, image_context_files

CREATE_TIMEOUT_SECONDS = 900
Runner = Callable[[Sequence[str], float, dict[str, str] | None], str]


class ClusterError(RuntimeError):
    """A kind / Docker command failed; the message ends with the tail of its output."""


def run_command(command: Sequence[str], timeout: float = 120,
                env: dict[str, str] | None = None) -> str:
    """Run, return stdout; raise ClusterError with the stderr tail on failure."""
    environment = dict(os.environ, **env) if env else None
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout,
                              env=environment)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(f"{' '.join(command[:4])}: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-600:]
        raise ClusterError(f"{' '.join(command[:5])} exited {done.returncode}: {tail}")
    return done.stdout


class KindCli:
    """The kind and container-engine commands kpbench uses."""

    def __init__(self, engine: str = "docker", runner: Runner = run_command) -> None:
        self.engine = engine
        self.runner = runner
        self.env = {"KIND_EXPERIMENTAL_PROVIDER": "podman"} if engine == "podman" else None

    def _kind(self, *args: str, timeout: float = 120) -> str:
        return self.runner(["kind", *args], timeout, self.env)

    def clusters(self) -> list[str]:
        return [line.strip() for line in self._kind("get", "clusters").splitlines()
                if line.strip() and not line.startswith("No kind clusters")]

    def kpbench_clusters(self) -> list[str]:
        return [name for name in self.clusters() if name.startswith(CLUSTER_PREFIX)]

    def create(self, spec: ClusterSpec, workdir: Path, kubeconfig: Path) -> None:
        config = workdir / f"{spec.name}.kind.yaml"
        config.write_text(spec.kind_config())
        self._kind("create", "cluster", "--name", spec.name, "--config", str(config),
                   "--kubeconfig", str(kubeconfig), "--wait", "10m",
                   timeout=CREATE_TIMEOUT_SECONDS)
        if kubeconfig.exists():  # written by kind (not by a dry run's recorder)
            kubeconfig.chmod(0o600)

    def write_kubeconfig(self, name: str, kubeconfig: Path) -> None:
        """An existing cluster's kubeconfig, written to `kubeconfig` only."""
        text = self._kind("get", "kubeconfig", "--name", name)
        kubeconfig.write_text(text)
        kubeconfig.chmod(0o600)

    def delete(self, name: str, kubeconfig: Path | None = None) -> None:
        if kubeconfig is not None:
            self._kind("delete", "cluster", "--name", name, "--kubeconfig", str(kubeconfig),
                       timeout=300)
            return
        with tempfile.TemporaryDirectory(prefix="kpbench-kind-") as folder:
            scratch = Path(folder) / "kubeconfig"  # never the user's
            scratch.write_text("")
            self._kind("delete", "cluster", "--name", name, "--kubeconfig", str(scratch),
                       timeout=300)

    def nodes(self, name: str) -> list[str]:
        return sorted(line.strip() for line in self._kind("get", "nodes", "--name", name)
                      .splitlines() if line.strip())

    def load_image(self, image: str, name: str) -> None:
        """`<engine> save` + `kind load image-archive`, for Docker and podman alike."""
        with tempfile.TemporaryDirectory(prefix="kpbench-image-") as folder:
            archive = str(Path(folder) / "image.tar")
            self.runner([self.engine, "save", "-o", archive, image], 600, None)
            self._kind("load", "image-archive", archive, "--name", name, timeout=600)

    def node_exec(self, node: str, command: Sequence[str], timeout: float = 20) -> str:
        return self.runner([self.engine, "exec", node, *command], timeout, None)

    def read_tables(self, node: str, want_ipvs: bool, want_nft: bool) -> dict[str, str]:
        """The text of the node's data-plane tables (missing ones as "")."""
        tables: dict[str, str] = {}
        tables["iptables"] = self._optional(node, ["iptables-save"])
        tables["ip_vs"] = self._optional(node, ["cat", "/proc/net/ip_vs"]) if want_ipvs else ""
        tables["nft"] = (self._optional(node, ["nft", "list", "table", "ip", "kube-proxy"])
                         if want_nft else "")
        return tables

    def read_ip_vs(self, node: str) -> str:
        return self._optional(node, ["cat", "/proc/net/ip_vs"])

    def _optional(self, node: str, command: list[str]) -> str:
        try:
            return self.node_exec(node, command)
        except ClusterError:
            return ""

    def image_exists(self, image: str) -> bool:
        try:
            self.runner([self.engine, "image", "inspect", image], 60, None)
        except ClusterError:
            return False
        return True

    def build_image(self, image: str) -> None:
        """Build the kpbench image from a minimal context (Dockerfile + the package sources)."""
        with tempfile.TemporaryDirectory(prefix="kpbench-image-") as context:
            for name, content in image_context_files().items():
                target = Path(context) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
            self.runner([self.engine, "build", "-t", image, context], 1800, None)
