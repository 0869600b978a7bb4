"""`kpbench scale`: rule sync time and connect latency per kube-proxy mode as Services grow.

Why a command of its own and not cells of `kpbench run`: a cell runs a workload over time and
records per-pod samples and connections; this experiment has no workload, pods or balance, only
per-(placement, mode, size) timings, so it has its own config (`kind: scale`, validated here)
and results folder, written with the same atomic writes (`kpbench.results`).

Placements: `host` runs `kpbench.lab.scale.probe` in this process on the host's kernel; `vm`
runs the same probe as `python -m kpbench.lab.scale` in the kernel VM (`kpbench.vm`), so every
mode (IPVS too) is measured on one stock kernel. Every row records its kernel release and, in
the VM, its acceleration (`kvm`, or `tcg`: emulated, 15-100x slower than the host).

Every point is measured `repeats` times (the whole sweep once per repeat); each row keeps its
`repeat`, and the summary and figure give the mean over repeats with its 95% t-interval
(`analysis.scale`).

Results: `<out>/<name>/<run_id>/` with `run.json` (config, status, git, versions, host, each
placement's kernel and accel), `points/<n>.json` (each measured point, committed as it ends),
and when the run ends `measurements.csv`, `summary.md` and `scale.png` (`analysis.scale`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from kpbench import signals, vm
from kpbench.config import ConfigError, _problems, _Strict, parse_override, read_yaml, set_dotted
from kpbench.lab import netns
from kpbench.lab.scale import MAX_SERVICES, MAX_UNUSED, ROW_PREFIX, Point, ProbeError, fits, probe
from kpbench.results import (
    atomic_write_bytes,
    atomic_write_json,
    base_versions,
    git_state,
    host_info,
    new_run_id,
    utc_now,
)

ScaleMode = Literal["iptables", "nftables", "ipvs-rr", "ipvs-lc", "ipvs-sh"]
Placement = Literal["host", "vm"]
HOST_TOOLS = {"ip": "iproute2", "iptables-restore": "iptables", "nft": "nftables"}
IPVS_TOOLS = {"ipvsadm": "ipvsadm", "ipset": "ipset"}
ERROR_PREFIX = "kpbench-scale-error "


class Sweep(_Strict):
    """One placement's sweep: every mode at every number of services."""

    modes: list[ScaleMode] = Field(min_length=1)
    services: list[int] = Field(min_length=1)
    connects: int = Field(200, ge=10, le=100_000)

    @field_validator("modes", "services")
    @classmethod
    def _distinct(cls, value: list[Any]) -> list[Any]:
        if len(set(value)) != len(value):
            raise ValueError("must not repeat a value")
        return value

    @field_validator("services")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        for size in value:
            if not 2 <= size <= MAX_SERVICES:
                raise ValueError(f"each must be 2..{MAX_SERVICES} (got {size})")
        return sorted(value)


class ScaleConfig(_Strict):
    kind: Literal["scale"]
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=100)
    description: str = ""
    endpoints_per_service: int = Field(3, ge=1, le=20)
    repeats: int = Field(3, ge=1, le=50)
    host: Sweep | None = None
    vm: Sweep | None = None
    vm_memory_mib: int = Field(2048, ge=512, le=16384)
    vm_timeout_seconds: float = Field(1800, gt=0, le=86_400)

    @model_validator(mode="after")
    def _something(self) -> ScaleConfig:
        if self.host is None and self.vm is None:
            raise ValueError("host: set host, vm or both")
        for key, sweep in (("host", self.host), ("vm", self.vm)):
            if sweep is not None and not fits(max(sweep.services), self.endpoints_per_service):
                raise ValueError(f"{key}.services: {max(sweep.services):,} services of "
                                 f"{self.endpoints_per_service} endpoints do not fit the lab's "
                                 f"unused addresses ({MAX_UNUSED:,})")
        return self

    def points(self, placement: Placement) -> list[Point]:
        """The whole sweep once per repeat; within it size by size, every mode at each size
        (so modes are measured side by side, and a repeat is not measured right after the
        previous one: the machine's load drifting over the run widens the interval instead of
        hiding in it)."""
        sweep = self.host if placement == "host" else self.vm
        if sweep is None:
            return []
        return [Point(mode, size, self.endpoints_per_service, sweep.connects, repeat)
                for repeat in range(1, self.repeats + 1)
                for size in sweep.services for mode in sweep.modes]


def is_scale_config(raw: dict[str, Any]) -> bool:
    return raw.get("kind") == "scale"


def validate(raw: dict[str, Any]) -> ScaleConfig:
    try:
        return ScaleConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_problems(exc, ScaleConfig)) from None


def load(path: Path, overrides: Sequence[str] = (), only: Placement | None = None
         ) -> ScaleConfig:
    """Read, override (`--set`), validate; `only` drops the other placement."""
    raw = read_yaml(path)
    if not is_scale_config(raw):
        raise ConfigError([f"{path}: kind: must be 'scale' (other experiments run with "
                           "`kpbench run`)"])
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value, must_exist=False)
    if only is not None:
        other = "vm" if only == "host" else "host"
        raw.pop(other, None)
        if raw.get(only) is None:
            raise ConfigError([f"--only {only}: {path} has no {only} sweep"])
    return validate(raw)


def preflight(config: ScaleConfig) -> None:
    """Refuse, in one line (exit 2), what cannot run here; nothing is created."""
    from kpbench.backends import PreflightError

    if os.geteuid() != 0:
        raise PreflightError("kpbench scale needs root (network namespaces)")
    tools = dict(HOST_TOOLS)
    if config.vm is not None or (config.host and any(m.startswith("ipvs")
                                                      for m in config.host.modes)):
        tools.update(IPVS_TOOLS)  # the guest runs the host's binaries
    missing = sorted({package for tool, package in tools.items() if shutil.which(tool) is None})
    if missing:
        raise PreflightError(f"kpbench scale needs: apt-get install {' '.join(missing)}")
    if config.host and any(m.startswith("ipvs") for m in config.host.modes) \
            and not Path("/proc/net/ip_vs").exists():
        raise PreflightError("host.modes: the host kernel has no IPVS (ip_vs not loaded); "
                             "measure IPVS in the vm placement")
    in_use = netns.range_in_use()
    if in_use:
        raise PreflightError(f"the lab's range 198.18.0.0/15 is in use on this host: {in_use[0]}")
    if config.vm is not None:
        problem = vm.preflight()
        if problem:
            raise PreflightError(problem)


def tool_version(argv: list[str]) -> str:
    import subprocess

    done = subprocess.run(argv, capture_output=True, text=True)
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


@dataclass
class ScaleFolder:
    """A scale run's folder: run.json at the start and end, one record per measured point."""

    path: Path
    manifest: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def create(cls, out: Path, config: ScaleConfig) -> ScaleFolder:
        run_id = new_run_id()
        path = out / config.name / run_id
        path.mkdir(parents=True, exist_ok=False)
        manifest = {
            "kind": "scale", "run_id": run_id, "experiment": config.name,
            "config": config.model_dump(mode="json"), "status": "RUNNING",
            "started_at": utc_now(), "finished_at": None, "git": git_state(),
            "versions": {**base_versions(),
                         "iptables": tool_version(["iptables", "--version"]),
                         "nft": tool_version(["nft", "--version"])},
            "host": host_info(), "placements": {}, "error": None,
        }
        try:
            (path / "points").mkdir()
            atomic_write_json(path / "run.json", manifest)
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, manifest)

    def commit(self, row: dict[str, Any]) -> None:
        with signals.deferred():
            atomic_write_json(self.path / "points" / f"{len(self.rows) + 1:05d}.json", row)
            self.rows.append(row)

    def finish(self, status: str, error: str | None) -> None:
        from analysis.scale import frame, render

        with signals.deferred():
            self.manifest.update(status=status, error=error, finished_at=utc_now())
            if self.rows:
                table = frame(self.rows)
                atomic_write_bytes(self.path / "measurements.csv",
                                   table.to_csv(index=False).encode())
                for name, content in render(table, self.manifest).items():
                    atomic_write_bytes(self.path / name, content)
            atomic_write_json(self.path / "run.json", self.manifest, replace=True)


@dataclass
class Outcome:
    folder: ScaleFolder
    status: str
    error: str | None = None


def run_host(config: ScaleConfig, commit: Callable[[dict[str, Any]], None],
             placements: dict[str, Any]) -> None:
    placements["host"] = {"kernel": os.uname().release, "load_average": os.getloadavg()}
    probe(config.points("host"),
          lambda row: commit({"placement": "host", "accel": "", **row}))


def run_vm(config: ScaleConfig, commit: Callable[[dict[str, Any]], None],
           placements: dict[str, Any], say: Callable[[str], None]) -> None:
    kernel = vm.default_kernel()
    accel = vm.choose_accel(kernel)
    placements["vm"] = {"kernel": kernel.release, "accel": accel,
                        "load_average": os.getloadavg()}
    errors: list[str] = []
    tail: list[str] = []

    def on_output(line: str) -> None:
        if line.startswith(ROW_PREFIX):
            row = json.loads(line.removeprefix(ROW_PREFIX))
            commit({"placement": "vm", "accel": accel, **row})
            say(f"vm ({kernel.release}, {accel}): {row['mode']} at {row['services']:,} "
                f"services measured (repeat {row['repeat']})")
        elif line.startswith(ERROR_PREFIX):
            errors.append(line.removeprefix(ERROR_PREFIX))
        else:
            tail[:] = [*tail[-4:], line]

    points = json.dumps([asdict(p) for p in config.points("vm")])
    result = vm.run([sys.executable, "-m", "kpbench.lab.scale", points], kernel=kernel,
                    accel=accel, timeout=config.vm_timeout_seconds,
                    memory_mib=config.vm_memory_mib, on_output=on_output)
    placements["vm"]["seconds"] = round(result.seconds, 1)
    if result.exit_status != 0:
        detail = errors[0] if errors else " | ".join(tail) or f"exit {result.exit_status}"
        raise ProbeError(f"in the kernel VM: {detail}")


def run_scale(config: ScaleConfig, out: Path, say: Callable[[str], None]) -> Outcome:
    folder = ScaleFolder.create(out, config)
    placements = folder.manifest["placements"]

    def commit(row: dict[str, Any]) -> None:
        folder.commit(row)
        if row["placement"] == "host":
            say(f"host ({row['kernel']}), repeat {row['repeat']}: {row['mode']} at "
                f"{row['services']:,} services: sync "
                f"{row['sync_seconds']:.3f} s, connect median {row['connect_median_us']:.0f} µs")

    status, error = "COMPLETED", None
    try:
        if config.host is not None:
            run_host(config, commit, placements)
        if config.vm is not None:
            run_vm(config, commit, placements, say)
    except signals.Interrupted as exc:
        status, error = "INTERRUPTED", f"interrupted ({exc})"
    except (ProbeError, netns.LabError, vm.VmError, OSError) as exc:
        status, error = "FAILED", str(exc)
    except BaseException as exc:  # recorded, then reported as an internal error
        folder.finish("FAILED", f"internal error: {exc!r}")
        raise
    folder.finish(status, error)
    return Outcome(folder, status, error)
