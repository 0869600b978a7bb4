"""`kpbench run --backend kind --dry-run`: everything a kind run would apply, written, nothing run.

The folder `<out>/<experiment>/<run_id>-dry-run/` gets, from the very functions a real run calls:
- `kind/<cluster>.kind.yaml`: each cluster's kind config (`KindCli.create` writes it);
- `kind/metrics-server.yaml`: what is applied to every cluster's kube-system;
- `cells/<cell_id>/backend.yaml` and `cells/<cell_id>/locust.yaml`: every object of the cell's
  namespace, in the two stages the driver applies them (`manifests.cell_stages`);
- `cells/<cell_id>/locust-commands.txt`: the Locust master's and workers' command lines;
- `commands.txt`: the kind and container-engine commands in the order the run would execute them
  (recorded from `KindCli`; temporary paths differ from run to run);
- `dry-run.json`: the resolved config, the image name, clusters and cells (no `run.json`: the
  folder is not a run and no loader or report takes it for one).
Only the experiment is checked (`kind_problems(check_host=False)`): no engine, kind or kernel is
looked at, so it works without Docker.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from kpbench.config import Experiment, expand_cells
from kpbench.kube import manifests
from kpbench.kube.cluster import KindCli
from kpbench.results import atomic_write_bytes, new_run_id

DRY_RUN_FORMAT = "kpbench-kind-dry-run/1"
ENGINE = "docker"


class CommandLog:
    """A `KindCli` runner that records each command line instead of running it."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, command: Sequence[str], timeout: float,
                 env: dict[str, str] | None) -> str:
        prefix = "".join(f"{key}={value} " for key, value in (env or {}).items())
        self.lines.append(prefix + shlex.join(command))
        return ""

    def note(self, text: str) -> None:
        self.lines.append(f"# {text}")


def _yaml(documents: Sequence[dict[str, Any]]) -> bytes:
    return yaml.safe_dump_all(documents, sort_keys=False).encode()


def write_dry_run(experiment: Experiment, runs_dir: Path, keep_cluster: bool = False,
                  run_token: str = "dryrun") -> Path:
    """Write the dry-run folder of `experiment`; its path."""
    folder = runs_dir / experiment.name / f"{new_run_id()}-dry-run"
    kind_dir = folder / "kind"
    kind_dir.mkdir(parents=True)
    log = CommandLog()
    cli = KindCli(ENGINE, log)
    image = manifests.image_tag()
    cells = expand_cells(experiment)
    specs = {cell.cell_id: manifests.ClusterSpec.for_mode(cell.config, cell.mode)
             for cell in cells}
    last_cell = {spec.name: cell_id for cell_id, spec in specs.items()}
    atomic_write_bytes(kind_dir / "metrics-server.yaml",
                       _yaml(manifests.metrics_server_manifests()))
    entries = []
    ready: set[str] = set()
    metrics_waited: set[str] = set()
    for number, cell in enumerate(cells, start=1):
        spec = specs[cell.cell_id]
        kubeconfig = kind_dir / f"{spec.name}.kubeconfig"
        if spec.name not in ready:
            log.note(f"cluster {spec.name} (mode {cell.mode}); reused instead when it exists")
            cli.create(spec, kind_dir, kubeconfig)
            if not ready:
                log.note(f"only when `{ENGINE} image inspect {image}` finds no such image:")
                cli.build_image(image)
            cli.load_image(image, spec.name)
            log.note("apply kind/metrics-server.yaml; read kube-system/kube-proxy's ConfigMap")
            ready.add(spec.name)
        if cell.config.backend.hpa is not None and spec.name not in metrics_waited:
            log.note("wait until metrics.k8s.io reports every node (first cell with an HPA)")
            metrics_waited.add(spec.name)
        namespace = f"kpbench-{run_token}-{number}"
        cell_dir = folder / "cells" / cell.cell_id
        cell_dir.mkdir(parents=True)
        stages = manifests.cell_stages(namespace, cell.config, image, run_token)
        for stage, documents in stages:
            atomic_write_bytes(cell_dir / f"{stage}.yaml", _yaml(documents))
        commands = {"master": manifests.master_command(namespace, cell.config),
                    "worker": manifests.worker_command()}
        atomic_write_bytes(cell_dir / "locust-commands.txt", "".join(
            f"{role}: {shlex.join(command)}\n" for role, command in commands.items()).encode())
        log.note(f"cell {cell.cell_id}: apply cells/{cell.cell_id}/backend.yaml, wait until "
                 f"ready, then cells/{cell.cell_id}/locust.yaml; delete namespace {namespace}")
        if last_cell[spec.name] == cell.cell_id and not keep_cluster:
            cli.delete(spec.name, kubeconfig)
        entries.append({"cell_id": cell.cell_id, "mode": cell.mode, "seed": cell.seed,
                        "params": cell.params, "cluster": spec.name, "namespace": namespace,
                        "files": [f"cells/{cell.cell_id}/{stage}.yaml" for stage, _ in stages]})
    atomic_write_bytes(folder / "commands.txt", ("\n".join(log.lines) + "\n").encode())
    summary = {
        "format": DRY_RUN_FORMAT, "experiment": experiment.name, "backend": "kind",
        "note": "nothing was created or run; the host (engine, kind, kernel) was not checked",
        "config": experiment.model_dump(mode="json"), "image": image,
        "keep_cluster": keep_cluster,
        "clusters": {spec.name: f"kind/{spec.name}.kind.yaml" for spec in specs.values()},
        "cells": entries,
    }
    atomic_write_bytes(folder / "dry-run.json", json.dumps(summary, indent=2).encode())
    return folder
