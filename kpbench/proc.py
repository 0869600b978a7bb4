"""Who owns a run, a temp file or a lab: a process identity that survives PID reuse.

A PID alone cannot tell a live kpbench process from an unrelated one that got the same PID later
(after a reboot, or once PIDs wrap around). The identity adds the process's start time in clock
ticks since boot (field 22 of `/proc/<pid>/stat`, see proc(5)) and the boot id
(`/proc/sys/kernel/random/boot_id`): a process is the owner only while all three match.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot; None if it has exited (or is a
    zombie, which has exited too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may contain spaces and ')'
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return int(fields[19])


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Identity:
    pid: int
    start: int | None
    boot: str = ""
    host: str = ""

    def alive(self) -> bool:
        """True while this very process runs; False once it has exited or its PID is reused.

        An identity recorded on another host (or without a start time) cannot be checked: it
        counts as alive only if recorded on this host in this boot with a live PID.
        """
        if self.host and self.host != socket.gethostname():
            return False
        if self.boot and self.boot != boot_id():
            return False
        current = start_ticks(self.pid)
        if current is None:
            return False
        return self.start is None or current == self.start

    def to_text(self) -> str:
        return f"{self.pid} {self.start if self.start is not None else '-'} {self.boot}".strip()

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "start_ticks": self.start, "boot_id": self.boot,
                "host": self.host}

    @classmethod
    def from_text(cls, text: str) -> Identity | None:
        """`pid start boot` as written by `to_text`; a lone `pid` (older files) is accepted."""
        parts = text.split()
        try:
            pid = int(parts[0])
            start = int(parts[1]) if len(parts) > 1 and parts[1] != "-" else None
        except (IndexError, ValueError):
            return None
        return cls(pid, start, parts[2] if len(parts) > 2 else "")

    @classmethod
    def from_json(cls, data: object) -> Identity | None:
        if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
            return None
        start = data.get("start_ticks")
        return cls(data["pid"], start if isinstance(start, int) else None,
                   str(data.get("boot_id") or ""), str(data.get("host") or ""))


def current() -> Identity:
    pid = os.getpid()
    return Identity(pid, start_ticks(pid), boot_id(), socket.gethostname())
