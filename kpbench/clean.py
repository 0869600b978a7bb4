"""`kpbench clean`: remove what killed runs left behind, and say what was removed and what was
left and why.

- the lab's namespaces (with their links, rules and processes) and work folders, unless their
  run's process is alive: needs root, refused (exit 2) without it when there are any;
- temporary files and folders in results folders (`.<name>.<pid>[-<start>].tmp`) whose writing
  process is gone (a PID reused by another process does not count: see `kpbench.proc`);
- kind clusters named `kpbench-*`, when kind and a container engine are usable.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from kpbench.lab.netns import Leftovers
from kpbench.results import temp_owner


class CleanRefused(PermissionError):
    """Clean cannot do what it must (lab leftovers without root): one line, exit 2."""


def results_temp_files(folders: Iterable[Path]) -> Iterator[Path]:
    """Every temporary file or folder under `folders` (not following links)."""
    for folder in folders:
        if not folder.is_dir():
            continue
        for root, dirs, files in os.walk(folder):
            for name in [*files, *dirs]:
                if temp_owner(name) is not None:
                    yield Path(root) / name
            dirs[:] = [d for d in dirs if temp_owner(d) is None]


def clean_results(folders: Iterable[Path], found: Leftovers) -> None:
    for path in results_temp_files(folders):
        owner = temp_owner(path.name)
        assert owner is not None
        if owner.start is None and owner.alive():
            found.left.append((f"temporary {path}", f"process {owner.pid} is alive (an old "
                                                    "temporary name cannot tell a reused PID)"))
            continue
        if owner.alive():
            found.left.append((f"temporary {path}", f"process {owner.pid} is still writing it"))
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            found.left.append((f"temporary {path}", f"could not be removed ({exc.strerror})"))
            continue
        found.removed.append((f"temporary {path}", f"process {owner.pid} that wrote it is gone"))


def clean_lab(found: Leftovers) -> None:
    from kpbench.lab import netns

    try:
        leftovers = netns.lab_leftovers()
    except FileNotFoundError:  # no iproute2: there cannot be lab namespaces
        leftovers = [str(p) for p in netns.suite_workdirs()]
    if not leftovers:
        return
    if os.geteuid() != 0:
        raise CleanRefused(f"clean: {len(leftovers)} lab leftovers (namespaces, work folders) "
                           "need root to be removed; run `kpbench clean` as root")
    lab = netns.clean_all()
    found.removed += lab.removed
    found.left += lab.left


def clean_kind(found: Leftovers) -> None:
    from kpbench.backends import docker_and_kind

    if docker_and_kind() is not None:
        return
    from kpbench.kube.cluster import ClusterError, KindCli
    from kpbench.kube.preflight import Host, container_engine

    engine = container_engine(Host())
    cli = KindCli(engine[0] if engine else "docker")
    try:
        clusters = cli.kpbench_clusters()
    except ClusterError as exc:
        found.left.append(("kind clusters kpbench-*", f"could not be listed: {exc}"))
        return
    for name in clusters:
        try:
            cli.delete(name)
        except ClusterError as exc:
            found.left.append((f"kind cluster {name}", f"could not be deleted: {exc}"))
        else:
            found.removed.append((f"kind cluster {name}", "created by kpbench"))


def clean_vms(found: Leftovers) -> None:
    """Kernel VMs (QEMU) whose kpbench process is gone."""
    from kpbench.vm import kill_leftovers, leftover_processes

    if leftover_processes() and os.geteuid() != 0:
        raise CleanRefused("clean: kernel VMs of killed runs need root to be stopped; run "
                           "`kpbench clean` as root")
    for pid in kill_leftovers():
        found.removed.append((f"kernel VM (QEMU pid {pid})", "its kpbench process is gone"))


def clean(results_folders: Iterable[Path]) -> Leftovers:
    """Everything above; raises CleanRefused before removing anything when it cannot finish."""
    found = Leftovers()
    clean_vms(found)
    clean_lab(found)
    clean_results(results_folders, found)
    clean_kind(found)
    return found
