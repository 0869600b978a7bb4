"""A dead or silent pod in the lab fails the cell instead of reading as balance (root only).

Each test runs one short real lab cell and, once its clock runs, kills (or freezes) one of the
real processes from outside the backend's own control: a backend server, the Locust master.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest

from kpbench.config import expand_cells, validate
from kpbench.lab.backend import LabCell
from kpbench.lab.netns import run_owner, suite_namespaces, suite_workdirs

from .conftest import LAB_MARKS

pytestmark = LAB_MARKS


def lab_cell() -> LabCell:
    experiment = validate({
        "name": "lab-liveness", "modes": ["iptables"], "seeds": 1, "duration_seconds": 8,
        "sample_seconds": 1.0, "cluster": {"nodes": 1},
        "backend": {"replicas": 2, "cpu_per_request_millicores": 0},
        "workload": {"clients": 1, "connections": 4, "ramp_seconds": 1},
    })
    return LabCell(expand_cells(experiment)[0])


def run_with(action: Callable[[LabCell], None], at: float = 3.0) -> str:
    """Run a cell, doing `action` once its clock passes `at`; the error that failed it."""
    cell = lab_cell()
    done = []

    def progress(t: float) -> None:
        if t >= at and not done:
            done.append(t)
            action(cell)

    with pytest.raises(RuntimeError) as failure:
        cell.run(progress)
    assert done, "the action never ran"
    mine = [n for n in suite_namespaces() if n.startswith(cell.topology.prefix)]
    assert not mine and not cell.workdir.exists()
    return str(failure.value)


def test_a_server_killed_mid_cell_fails_the_cell() -> None:
    error = run_with(lambda cell: cell.pods[0].process.send_signal(signal.SIGKILL))
    assert "backend-1-00000 (backend server) died mid-cell" in error


def test_the_locust_master_killed_mid_cell_fails_the_cell() -> None:
    error = run_with(lambda cell: cell.clients.processes[0].send_signal(signal.SIGKILL))
    assert "the Locust master died mid-cell" in error


def test_a_server_that_stops_answering_fails_the_cell() -> None:
    error = run_with(lambda cell: cell.pods[1].process.send_signal(signal.SIGSTOP))
    assert "backend-1-00001 stopped answering /metrics" in error


def test_work_folders_name_their_owner() -> None:
    cell = lab_cell()
    try:
        assert cell.workdir in suite_workdirs()
        assert (cell.workdir / "owner").read_text().split()[0] == str(os.getpid())
    finally:
        cell.teardown()
    assert not any(run_owner(n) == os.getpid() for n in suite_namespaces())
