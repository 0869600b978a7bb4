"""The kernel VM's agent: runs commands in the guest for the host, one JSON line each way.

Started by `kpbench.vm.Session` as the guest's command. Standard library only (imports are slow
in an emulated guest). It loads the virtio console and network drivers, opens the virtio serial
port named `kpbench.agent`, says `{"ready": true, "kernel": ...}`, then answers each request
`{"argv": [...], "input": str | null, "timeout": s}` with `{"rc", "stdout", "stderr"}` and
`{"read": path, "netns": name | null}` (a file read inside a network namespace without starting
a process, which costs about half a second under emulation) with `{"rc", "stdout"}`, until
`{"exit": true}` or the host goes away.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from io import FileIO
from pathlib import Path

PORT_NAME = "kpbench.agent"


def find_port(name: str, timeout: float = 30.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for port in Path("/sys/class/virtio-ports").glob("vport*"):
            if (port / "name").read_text().strip() == name:
                return Path("/dev") / port.name
        time.sleep(0.1)
    raise SystemExit(f"vm agent: no virtio port named {name}")


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def read_in(path: str, netns: str | None) -> dict:
    own = open("/proc/self/ns/net", "rb")  # noqa: SIM115 - closed below
    try:
        if netns is not None:
            with open(f"/run/netns/{netns}", "rb") as target:
                if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
                    return {"rc": 1, "stdout": "", "stderr": f"setns {netns} failed"}
        with open(path, errors="replace") as f:
            return {"rc": 0, "stdout": f.read(), "stderr": ""}
    except OSError as error:
        return {"rc": 1, "stdout": "", "stderr": str(error)}
    finally:
        _libc.setns(own.fileno(), CLONE_NEWNET)
        own.close()


def answer(request: dict) -> dict:
    if "read" in request:
        return read_in(request["read"], request.get("netns"))
    try:
        done = subprocess.run(request["argv"], input=request.get("input"), capture_output=True,
                              text=True, timeout=request.get("timeout") or None)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"rc": 127, "stdout": "", "stderr": f"{type(error).__name__}: {error}"}
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def send(channel: FileIO, message: dict) -> None:
    """One JSON line to the host. A write to the virtio port may take only part of a large
    reply (e.g. 64 KiB of a /proc/net/ip_vs_conn), so write until all of it is taken."""
    pending = memoryview(json.dumps(message).encode() + b"\n")
    while pending:
        pending = pending[channel.write(pending) or 0:]


def main() -> int:
    for module in ("virtio_console", "virtio_net"):
        subprocess.run(["modprobe", module], check=False)
    port = find_port(PORT_NAME)
    with open(port, "r+b", buffering=0) as channel:
        reader = os.fdopen(os.dup(channel.fileno()), "rb")
        send(channel, {"ready": True, "kernel": os.uname().release})
        for line in reader:
            request = json.loads(line)
            if request.get("exit"):
                break
            send(channel, answer(request))
    return 0


if __name__ == "__main__":
    sys.exit(main())
