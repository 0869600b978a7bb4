"""Backends: where a cell runs. `auto` picks kind when Docker and kind are usable, else sim."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kpbench.backends.base import Backend, CellResult, PreflightError, Progress, Unsupported

if TYPE_CHECKING:
    from kpbench.kube.preflight import Host

BACKEND_CHOICES = ("auto", "sim", "lab", "kind", "cluster")
NOT_BUILT: dict[str, str] = {}

__all__ = [
    "BACKEND_CHOICES", "Backend", "CellResult", "PreflightError", "Progress", "Unsupported",
    "docker_and_kind", "resolve",
]


def docker_and_kind(host: Host | None = None) -> str | None:
    """None when Docker (or podman) answers and a usable kind is on PATH, else why not: the
    host checks of kind's preflight, so that `auto` never picks a kind that preflight refuses."""
    from kpbench.kube.preflight import Host, host_problems

    problems, _ = host_problems(host or Host())
    return "; ".join(problems) or None


def resolve(
    name: str,
    *,
    keep_cluster: bool = False,
    kubeconfig: Path | None = None,
) -> tuple[Backend, str | None]:
    """The backend for `name`, and a note to show when `auto` chose it.

    `keep_cluster` (kind: keep the clusters after the run), `kubeconfig` (cluster: the existing
    cluster's kubeconfig) come from `kpbench run`'s options.
    """
    note = None
    if name == "auto":
        reason = docker_and_kind()
        if reason is None and "kind" not in NOT_BUILT:
            name = "kind"
            note = "backend auto -> kind (Docker and kind are usable)"
        else:
            why = reason or NOT_BUILT.get("kind", "")
            name = "sim"
            note = f"backend auto -> sim ({why}); sim numbers are modelled, not measured"
    if name in NOT_BUILT:
        raise PreflightError(f"--backend {name}: {NOT_BUILT[name]}")
    if name == "sim":
        from kpbench.backends.sim import SimBackend

        return SimBackend(), note
    if name == "lab":
        from kpbench.lab.backend import LabBackend

        return LabBackend(), note
    if name == "kind":
        from kpbench.kube.backend import KindBackend

        return KindBackend(keep_cluster=keep_cluster), note
    if name == "cluster":
        from kpbench.kube.backend import ClusterBackend

        return ClusterBackend(kubeconfig=kubeconfig), note
    choices = ", ".join(BACKEND_CHOICES)
    raise PreflightError(f"--backend {name}: unknown backend (choose from {choices})")
