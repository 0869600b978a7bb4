"""A stock Linux kernel under QEMU that runs one command on the host's own files.

Why: the host kernel may lack a data-plane feature (IPVS here), while the distribution's stock
kernel has it as modules. The guest sees the host's root filesystem read-only over 9p with a
tmpfs overlay on top (so the project's virtualenv, Python and tools run unchanged) and one
read-write 9p folder, mounted at the same absolute path as on the host, where the command's
files and its exit status go. The guest has no network device: only namespaces it makes itself.

Boot: `-kernel` with a tiny initramfs (busybox-static plus the modules that mount 9p and the
overlay, built once per kernel and cached), which mounts everything and `switch_root`s into
`/bin/sh <share>/guest-init.sh`. The kernel console goes to a log file, the command's output
to a second serial port that is streamed line by line, and the guest powers off through sysrq.

Acceleration: KVM only when a short boot probe shows it works (a paravirtualised /dev/kvm can
hang a stock kernel forever), else TCG, which runs guest code 15-100x slower than the host.
No QEMU process outlives its caller: it runs in its own session with a parent-death signal,
and is killed on every exit path; `leftover_processes` finds any that did anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QEMU = "qemu-system-x86_64"
MARKER = "kpbench-vm"  # in QEMU's -name, so leftovers can be recognised
# Modules the initramfs loads, in order, with their dependencies (from `modprobe --show-depends`).
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
ROOT_TAG, SHARE_TAG = "hostroot", "kpbshare"
STATUS_FILE, INIT_FILE, COMMAND_FILE = "exit-status", "guest-init.sh", "command.sh"
KVM_PROBE_SECONDS = 45.0
# Debian package that provides each host requirement.
REQUIREMENTS = {QEMU: "qemu-system-x86", "busybox": "busybox-static", "cpio": "cpio"}


class VmError(RuntimeError):
    """The VM could not be prepared or did not finish; the message says why."""


@dataclass(frozen=True)
class Kernel:
    release: str
    image: Path

    @property
    def modules(self) -> Path:
        return Path("/lib/modules") / self.release


@dataclass(frozen=True)
class VmResult:
    exit_status: int
    accel: str  # "kvm" or "tcg"
    kernel_release: str
    seconds: float
    console_log: str  # the guest kernel's console, for diagnosis


def installed_kernels(boot: Path = Path("/boot"),
                      modules: Path = Path("/lib/modules")) -> list[Kernel]:
    """Stock kernels with their modules installed, newest first."""
    kernels = []
    for image in boot.glob("vmlinuz-*"):
        release = image.name.removeprefix("vmlinuz-")
        if (modules / release / "modules.dep").exists():
            kernels.append(Kernel(release, image))
    return sorted(kernels, key=lambda k: _version_key(k.release), reverse=True)


def _version_key(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release))


def preflight() -> str | None:
    """None when a VM can run here, else one line naming what to install."""
    missing = [package for tool, package in REQUIREMENTS.items() if shutil.which(tool) is None]
    if not installed_kernels():
        missing.append("linux-image-amd64")
    if missing:
        return ("the kernel VM needs Debian packages that are not installed: "
                f"apt-get install {' '.join(missing)}")
    return None


def default_kernel() -> Kernel:
    kernels = installed_kernels()
    if not kernels:
        raise VmError("no stock kernel with modules in /boot: apt-get install linux-image-amd64")
    return kernels[0]


# -- pure parts: what the guest runs and how QEMU is started -----------------------------------

def stage1_script(module_files: Sequence[str]) -> str:
    """The initramfs /init: mount the host root (read-only, overlaid) and the share, switch root."""
    insmods = "\n".join(f"insmod /modules/{Path(m).name}" for m in module_files)
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{insmods}
share=$(sed -n 's/.*kpbench.share=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
mkdir -p /lower /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose {ROOT_TAG} /lower
mount -t tmpfs -o size=256m tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
# /tmp is not covered: the host's (and a project or virtualenv under it) must stay visible;
# the guest's writes there land in the overlay's tmpfs like any other.
for d in run dev/shm; do mount -t tmpfs tmpfs /newroot/$d; done
mkdir -p "/newroot$share"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {SHARE_TAG} "/newroot$share"
exec switch_root /newroot /bin/sh "$share/{INIT_FILE}"
echo "kpbench-vm: switch_root failed" > /dev/ttyS0
echo o > /proc/sysrq-trigger
"""


def stage2_script(share: Path) -> str:
    """Runs as PID 1 in the host's root: run the command, record its status, power off."""
    return f"""export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ulimit -n 65536
ip link set lo up
stty -F /dev/ttyS1 raw -echo 2>/dev/null
/bin/sh {shlex.quote(str(share / COMMAND_FILE))} </dev/null >/dev/ttyS1 2>&1
echo $? > {shlex.quote(str(share / STATUS_FILE))}
sync
echo o > /proc/sysrq-trigger
while :; do :; done  # until the power-off work runs
"""


def command_script(argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> str:
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
    return f"{exports}cd {shlex.quote(str(cwd))} || exit 125\nexec {shlex.join(argv)}\n"


def qemu_argv(*, kernel: Kernel, initramfs: Path, share: Path, console_log: Path, accel: str,
              memory_mib: int, cpus: int, name: str, agent_socket: Path | None = None,
              taps: Sequence[str] = ()) -> list[str]:
    """QEMU's command line. `agent_socket`: a virtio serial port for `kpbench.vm_agent`;
    `taps`: one virtio NIC per tap device name (created by QEMU in its own namespace), MAC
    `52:54:00:00:00:<index + 1>` so that the guest can tell them apart."""
    accel_args = (["-accel", "kvm", "-cpu", "host"] if accel == "kvm"
                  else ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max"])
    cmdline = f"console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init kpbench.share={share}"
    agent = [] if agent_socket is None else [
        "-chardev", f"socket,id=agent,path={agent_socket},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser",
        "-device", "virtserialport,bus=vser.0,chardev=agent,name=kpbench.agent"]
    nics = [arg for i, tap in enumerate(taps) for arg in (
        "-netdev", f"tap,id=tap{i},ifname={tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=tap{i},mac={tap_mac(i)}")]
    return [
        QEMU, "-name", name, *accel_args, "-m", f"{memory_mib}M", "-smp", str(cpus),
        "-nodefaults", "-display", "none", "-no-reboot", "-nic", "none",
        "-kernel", str(kernel.image), "-initrd", str(initramfs), "-append", cmdline,
        "-fsdev", "local,id=root,path=/,readonly=on,security_model=none,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev=root,mount_tag={ROOT_TAG}",
        "-fsdev", f"local,id=share,path={share},security_model=none,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev=share,mount_tag={SHARE_TAG}",
        "-serial", f"file:{console_log}", "-serial", "stdio",
        *agent, *nics,
    ]


def tap_mac(index: int) -> str:
    return f"52:54:00:00:00:{index + 1:02x}"


# -- I/O: the initramfs, the probe, the run ----------------------------------------------------

def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kpbench" / "vm"


def module_files(kernel: Kernel) -> list[str]:
    """The .ko files of INITRAMFS_MODULES and their dependencies, in load order, once each."""
    files: list[str] = []
    for module in INITRAMFS_MODULES:
        done = subprocess.run(["modprobe", "-S", kernel.release, "--show-depends", module],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise VmError(f"modprobe --show-depends {module} for {kernel.release}: "
                          f"{done.stderr.strip()}")
        for line in done.stdout.splitlines():
            parts = line.split()
            if parts[:1] == ["insmod"] and parts[1] not in files:
                files.append(parts[1])
    return files


def build_initramfs(kernel: Kernel) -> Path:
    """The cached initramfs for `kernel` (busybox + 9p/overlay modules); built on first use."""
    modules = module_files(kernel)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise VmError("busybox is missing: apt-get install busybox-static")
    init = stage1_script(modules)
    key = hashlib.sha256("\n".join([kernel.release, init, *modules]).encode()).hexdigest()[:12]
    target = cache_dir() / f"initramfs-{kernel.release}-{key}.cpio.gz"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kpbench-initramfs-") as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "modules"):
            (root / d).mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        for module in modules:
            data = Path(module).read_bytes()
            name = Path(module).name
            if name.endswith(".ko.xz") or name.endswith(".ko.zst"):
                raise VmError(f"compressed module {name}: busybox insmod cannot load it")
            (root / "modules" / name).write_bytes(data)
        (root / "init").write_text(init)
        (root / "init").chmod(0o755)
        listing = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                                 input=listing, capture_output=True, check=True).stdout
        partial = target.with_suffix(f".tmp{os.getpid()}")
        partial.write_bytes(gzip.compress(archive, compresslevel=6))
        partial.replace(target)
    return target


def _qemu_version() -> str:
    done = subprocess.run([QEMU, "--version"], capture_output=True, text=True)
    return done.stdout.splitlines()[0] if done.stdout else "unknown"


def choose_accel(kernel: Kernel, requested: str = "auto") -> str:
    """`kvm` when /dev/kvm boots this kernel (probed once, result cached), else `tcg`."""
    requested = os.environ.get("KPBENCH_VM_ACCEL", requested)
    if requested in ("kvm", "tcg"):
        return requested
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    key = hashlib.sha256(f"{kernel.release}|{_qemu_version()}|{os.uname().release}".encode())
    cached = cache_dir() / f"kvm-probe-{key.hexdigest()[:12]}.json"
    if cached.exists():
        return str(json.loads(cached.read_text())["accel"])
    try:
        result = run(["true"], kernel=kernel, accel="kvm", timeout=KVM_PROBE_SECONDS,
                     memory_mib=256, cpus=1)
        accel = "kvm" if result.exit_status == 0 else "tcg"
    except VmError:
        accel = "tcg"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({"accel": accel, "kernel": kernel.release}))
    return accel


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _default_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ("PATH", "VIRTUAL_ENV", "PYTHONPATH", "LANG")
            if k in os.environ}


def _prepare(kernel: Kernel, accel: str, share: Path, argv: Sequence[str],
             env: Mapping[str, str], cwd: Path, *, memory_mib: int, cpus: int,
             agent_socket: Path | None = None, taps: Sequence[str] = ()) -> list[str]:
    """Write the guest's scripts into `share`; QEMU's command line."""
    initramfs = build_initramfs(kernel)
    (share / STATUS_FILE).unlink(missing_ok=True)
    (share / INIT_FILE).write_text(stage2_script(share))
    (share / COMMAND_FILE).write_text(command_script(argv, env, cwd))
    return qemu_argv(kernel=kernel, initramfs=initramfs, share=share,
                     console_log=share / "console.log", accel=accel, memory_mib=memory_mib,
                     cpus=cpus, name=f"{MARKER}-{os.getpid()}", agent_socket=agent_socket,
                     taps=taps)


def _spawn(args: list[str], on_output: Callable[[str], None] | None
           ) -> tuple[subprocess.Popen[bytes], threading.Thread, deque[str]]:
    """Start QEMU in its own session, dying with its caller; its output (the command's, and
    QEMU's own messages) goes line by line to `on_output`, the last lines are kept."""
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=_die_with_parent)
    tail: deque[str] = deque(maxlen=5)

    def pump() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            tail.append(line)
            if on_output is not None:
                on_output(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return process, reader, tail


def run(argv: Sequence[str], *, kernel: Kernel | None = None, accel: str = "auto",
        timeout: float = 600.0, env: Mapping[str, str] | None = None, cwd: Path | None = None,
        share: Path | None = None, memory_mib: int = 512, cpus: int = 2,
        on_output: Callable[[str], None] | None = None) -> VmResult:
    """Boot `kernel`, run `argv` in it as root, stream its output lines, return its status.

    `share` is a host folder the guest sees read-write at the same path (a temporary one is
    made and removed when None). `env` is the command's whole environment (PATH and friends
    when None: the caller's PATH, VIRTUAL_ENV and PYTHONPATH); `cwd` defaults to the caller's.
    """
    problem = preflight()
    if problem:
        raise VmError(problem)
    kernel = kernel or default_kernel()
    accel = choose_accel(kernel, accel) if accel == "auto" else accel
    own_share = share is None
    share = Path(tempfile.mkdtemp(prefix="kpbench-vm-")) if share is None else share.resolve()
    started = time.monotonic()
    try:
        args = _prepare(kernel, accel, share, argv, _default_env() if env is None else env,
                        cwd or Path.cwd(), memory_mib=memory_mib, cpus=cpus)
        _boot(args, timeout, on_output)
        console = share / "console.log"
        log = console.read_text(errors="replace") if console.exists() else ""
        status_file = share / STATUS_FILE
        if not status_file.exists():
            tail = " | ".join(log.strip().splitlines()[-3:])
            raise VmError(f"the guest ended without the command's exit status ({tail})")
        status = int(status_file.read_text().strip() or "1")
        return VmResult(status, accel, kernel.release, time.monotonic() - started, log)
    finally:
        if own_share:
            shutil.rmtree(share, ignore_errors=True)


def _boot(args: list[str], timeout: float, on_output: Callable[[str], None] | None) -> None:
    process, reader, tail = _spawn(args, on_output)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VmError(f"the VM did not finish within {timeout:.0f} s") from None
    finally:
        _kill(process)
        reader.join(timeout=5)
    if process.returncode != 0:
        raise VmError(f"{QEMU} exited with {process.returncode}: "
                      f"{tail[-1] if tail else 'no message'}")


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def leftover_processes() -> list[int]:
    """PIDs of this suite's QEMU processes whose kpbench process is gone."""
    leftovers = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in cmdline:
            match = re.fullmatch(rf"{MARKER}-(\d+)".encode(), arg)
            if match and not Path(f"/proc/{int(match.group(1))}").exists():
                leftovers.append(int(proc.name))
    return leftovers


def kill_leftovers() -> list[int]:
    pids = leftover_processes()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


@dataclass(frozen=True)
class Completed:
    rc: int
    stdout: str
    stderr: str


class Session:
    """A kernel VM that stays up while the host runs commands in it (`kpbench.vm_agent`).

    `taps` become virtio NICs (see `qemu_argv`); QEMU creates them in `netns` (a namespace the
    caller made; the root namespace when None), where the caller can move them on. Commands
    run one at a time, as root in the guest's root namespace. Leaving the `with` block, an
    error or a signal stops the VM; no QEMU process outlives its caller.
    """

    def __init__(self, *, kernel: Kernel | None = None, accel: str = "auto",
                 memory_mib: int = 512, cpus: int = 2, taps: Sequence[str] = (),
                 netns: str | None = None, boot_timeout: float = 240.0,
                 on_output: Callable[[str], None] | None = None) -> None:
        self.kernel = kernel or default_kernel()
        self.accel = choose_accel(self.kernel, accel) if accel == "auto" else accel
        self._options = (memory_mib, cpus, tuple(taps), netns, boot_timeout, on_output)
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._reader: Any = None
        self._share: Path | None = None
        self.boot_seconds = 0.0

    def __enter__(self) -> Session:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        problem = preflight()
        if problem:
            raise VmError(problem)
        memory_mib, cpus, taps, netns, boot_timeout, on_output = self._options
        self._share = share = Path(tempfile.mkdtemp(prefix="kpbench-vm-"))
        socket_path = share / "agent.sock"
        args = _prepare(self.kernel, self.accel, share, [sys.executable, "-m", "kpbench.vm_agent"],
                        _default_env(), Path(__file__).resolve().parents[1],
                        memory_mib=memory_mib, cpus=cpus, agent_socket=socket_path, taps=taps)
        if netns is not None:
            args = ["ip", "netns", "exec", netns, *args]
        started = time.monotonic()
        self._process = _spawn(args, on_output)[0]
        deadline = started + boot_timeout
        while not socket_path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise VmError(f"QEMU did not open its agent socket within {boot_timeout:.0f} s")
            time.sleep(0.05)
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        channel.connect(str(socket_path))
        channel.settimeout(max(deadline - time.monotonic(), 1.0))
        self._channel, self._reader = channel, channel.makefile("rb")
        hello = self._receive(f"the guest's agent did not start within {boot_timeout:.0f} s")
        if not hello.get("ready"):
            raise VmError(f"the guest's agent said {hello}")
        self.boot_seconds = time.monotonic() - started

    def _check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            log = self.console_log()
            tail = " | ".join(log.strip().splitlines()[-3:])
            raise VmError(f"the VM stopped (QEMU exit {self._process.returncode}; {tail})")

    def _receive(self, timeout_message: str) -> dict[str, Any]:
        try:
            line = self._reader.readline()
        except TimeoutError:
            raise VmError(timeout_message) from None
        if not line:
            self._check_alive()
            raise VmError("the guest's agent closed its channel")
        return dict(json.loads(line))

    def run(self, argv: Sequence[str], input_text: str | None = None,
            timeout: float = 120.0) -> Completed:
        """Run `argv` in the guest and wait for it; never raises for a non-zero exit."""
        if self._channel is None:
            raise VmError("the VM is not running")
        request = {"argv": list(argv), "input": input_text, "timeout": timeout}
        self._channel.settimeout(timeout + 30.0)
        self._channel.sendall(json.dumps(request).encode() + b"\n")
        reply = self._receive(f"no answer from the guest within {timeout + 30:.0f} s "
                              f"for {shlex.join(argv)[:80]}")
        return Completed(int(reply["rc"]), str(reply["stdout"]), str(reply["stderr"]))

    def read(self, path: str, netns: str | None = None, timeout: float = 60.0) -> Completed:
        """Read a file in the guest, inside network namespace `netns` (no process started)."""
        if self._channel is None:
            raise VmError("the VM is not running")
        self._channel.settimeout(timeout)
        self._channel.sendall(json.dumps({"read": path, "netns": netns}).encode() + b"\n")
        reply = self._receive(f"no answer from the guest within {timeout:.0f} s reading {path}")
        return Completed(int(reply["rc"]), str(reply["stdout"]), str(reply.get("stderr", "")))

    def console_log(self) -> str:
        path = self._share / "console.log" if self._share else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def close(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(OSError):
                self._channel.sendall(b'{"exit": true}\n')
            self._channel.close()
            self._channel = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=20)
            _kill(self._process)
            self._process = None
        if self._share is not None:
            shutil.rmtree(self._share, ignore_errors=True)
            self._share = None
