"""End-to-end on real kind clusters (`nox -s e2e-kind`): two modes, one seed, 90 seconds.

Needs a running Docker (or podman) engine and kind >= v0.27 on PATH (the host checks of kind's
preflight decide the skip, so it never disagrees with a run), and internet access for the node,
metrics-server and HAProxy images. Where they are missing the test is skipped with the reason.
It creates two kind clusters (`kpbench-iptables-*`, `kpbench-nftables-*`), one after the other,
deletes each after its mode, and takes roughly 10-15 minutes (cluster creation dominates).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kpbench.backends import docker_and_kind
from kpbench.results import load_run

from .conftest import REPOSITORY

pytestmark = [pytest.mark.kind, pytest.mark.timeout(3600)]

MODES = ("iptables", "nftables")
EXPERIMENT = """\
name: e2e-kind
modes: [iptables, nftables]
seeds: 1
duration_seconds: 90
sample_seconds: 2.0
cluster: {nodes: 2}
backend: {replicas: 4, termination_grace_seconds: 10}
workload: {clients: 2, connections: 40, requests_per_second: 1.0, ramp_seconds: 10}
events:
  - {at: 40, action: rollout}
"""


def test_two_modes_on_kind(tmp_path: Path) -> None:
    reason = docker_and_kind()
    if reason is not None:
        pytest.skip(f"kind end-to-end test needs Docker (or podman) and kind: {reason}")
    config = tmp_path / "e2e-kind.yaml"
    config.write_text(EXPERIMENT)
    out = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "-m", "kpbench", "run", str(config), "--backend", "kind",
         "--out", str(out), "--no-report"],
        capture_output=True, text=True, cwd=REPOSITORY, timeout=3500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["backend"] == "kind" and manifest["status"] == "COMPLETED"
    assert manifest["versions"]["kind"] and manifest["versions"]["node_image"]
    run = load_run(run_dir)
    for cell in manifest["cells"]:
        assert cell["status"] == "COMPLETED", cell.get("error")
        dataplane = cell["dataplane"]
        assert dataplane["verified"] is True and dataplane["mode"] == cell["mode"]
        assert dataplane["nodes_checked"] == 3  # control plane + 2 workers
        assert dataplane["cluster"]["kube_proxy"]["mode"] == cell["mode"]
        samples = run.samples[run.samples["cell_id"] == cell["cell_id"]]
        assert samples["t"].max() == pytest.approx(90.0)
        end = samples[samples["t"] == samples["t"].max()]
        serving = end[end["ready"] & ~end["terminating"]]
        assert len(serving) == 4
        assert serving["active_connections"].sum() >= 30  # most of the 40 connections held
        events = run.events[run.events["cell_id"] == cell["cell_id"]]
        assert {"rollout_started", "pod_created", "pod_ready", "pod_terminating"} <= set(
            events["event"])
        assert (run_dir / "locust" / cell["cell_id"] / "summary.json").exists()
    assert {c["mode"] for c in manifest["cells"]} == set(MODES)
    used = {c["dataplane"]["cluster"]["cluster"] for c in manifest["cells"]}
    clusters = subprocess.run(["kind", "get", "clusters"], capture_output=True, text=True)
    assert not used & set(clusters.stdout.split()), "clusters left behind without --keep-cluster"
