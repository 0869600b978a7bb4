"""The kernel VM: command line, preflight, and real boots of the stock kernel under QEMU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kpbench import vm

VM_PROBLEM = vm.preflight()
needs_vm = pytest.mark.skipif(VM_PROBLEM is not None, reason=str(VM_PROBLEM))


def test_qemu_gets_no_network_and_a_read_only_root(tmp_path: Path) -> None:
    kernel = vm.Kernel("6.1.0-test", Path("/boot/vmlinuz-6.1.0-test"))
    args = vm.qemu_argv(kernel=kernel, initramfs=tmp_path / "i", share=tmp_path,
                        console_log=tmp_path / "c", accel="tcg", memory_mib=512, cpus=2,
                        name="kpbench-vm-1")
    assert args[args.index("-nic") + 1] == "none" and "-nodefaults" in args
    fsdevs = [args[i + 1] for i, a in enumerate(args) if a == "-fsdev"]
    assert "path=/,readonly=on" in fsdevs[0] and f"path={tmp_path}," in fsdevs[1]
    assert "readonly" not in fsdevs[1]
    assert "kvm" not in " ".join(args)
    assert args[args.index("-accel") + 1].startswith("tcg")


def test_preflight_names_every_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm.shutil, "which", lambda tool: None)
    monkeypatch.setattr(vm, "installed_kernels", lambda: [])
    assert vm.preflight() == ("the kernel VM needs Debian packages that are not installed: "
                              "apt-get install qemu-system-x86 busybox-static cpio "
                              "linux-image-amd64")


def test_kernels_are_ordered_newest_first(tmp_path: Path) -> None:
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for release in ("6.1.0-9-amd64", "6.1.0-57-amd64", "5.10.0-30-amd64", "6.2.0-1-nomodules"):
        (boot / f"vmlinuz-{release}").touch()
        if "nomodules" not in release:
            (modules / release).mkdir(parents=True)
            (modules / release / "modules.dep").touch()
    assert [k.release for k in vm.installed_kernels(boot, modules)] == [
        "6.1.0-57-amd64", "6.1.0-9-amd64", "5.10.0-30-amd64"]  # no modules, not usable


@needs_vm
def test_a_command_runs_in_the_stock_kernel_with_ipvs_and_no_network(tmp_path: Path) -> None:
    lines: list[str] = []
    (tmp_path / "from-the-host").write_text("seen")
    script = ("uname -r; cat from-the-host; echo; "
              "modprobe ip_vs && test -e /proc/net/ip_vs && echo ipvs-ok; "
              "ls /sys/class/net; touch /usr/written-in-guest; exit 3")
    # cwd under /tmp, as a clone or virtualenv there would be: the guest must see it
    result = vm.run(["sh", "-c", script], accel="tcg", timeout=240, on_output=lines.append,
                    cwd=tmp_path)
    assert result.exit_status == 3 and result.accel == "tcg"
    assert lines[0] == result.kernel_release == vm.default_kernel().release
    assert lines[1] == "seen"
    assert "ipvs-ok" in lines
    assert lines[lines.index("ipvs-ok") + 1:] == ["lo"]  # no network device but loopback
    assert not Path("/usr/written-in-guest").exists()  # the host's root is read-only to it
    assert vm.leftover_processes() == []


def _our_qemu(owner: int) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"{vm.MARKER}-{owner}".encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@needs_vm
def test_a_timeout_leaves_no_qemu_behind() -> None:
    with pytest.raises(vm.VmError, match="did not finish within 5 s"):
        vm.run(["sleep", "600"], accel="tcg", timeout=5)
    assert _our_qemu(os.getpid()) == []


@needs_vm
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_a_signalled_caller_leaves_no_qemu_behind(signum: int) -> None:
    caller = subprocess.Popen([sys.executable, "-c", (
        "from kpbench import vm; vm.run(['sleep', '600'], accel='tcg', timeout=600)")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not _our_qemu(caller.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _our_qemu(caller.pid), "QEMU did not start"
    caller.send_signal(signum)
    caller.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _our_qemu(caller.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _our_qemu(caller.pid) == []


@needs_vm
def test_a_session_runs_commands_until_it_is_closed() -> None:
    with vm.Session(accel="tcg", memory_mib=256, cpus=1) as session:
        assert session.run(["uname", "-r"]).stdout.strip() == session.kernel.release
        failed = session.run(["sh", "-c", "echo out; echo err >&2; exit 4"])
        assert (failed.rc, failed.stdout, failed.stderr) == (4, "out\n", "err\n")
        assert session.run(["cat"], input_text="through stdin").stdout == "through stdin"
        assert session.run(["no-such-command"]).rc == 127
        assert session.run(["ip", "netns", "add", "n1"]).rc == 0
        assert session.run(["ip", "netns", "exec", "n1", "modprobe", "ip_vs"]).rc == 0
        read = session.read("/proc/net/ip_vs", netns="n1")
        assert read.rc == 0 and read.stdout.startswith("IP Virtual Server version")
        assert session.read("/proc/net/no-such-file").rc == 1
        big = "x" * 300_000  # more than one write to the virtio port takes (about 64 KiB)
        assert session.run(["cat"], input_text=big).stdout == big
        assert session.run(["sh", "-c", "cat > /tmp/big"], input_text=big).rc == 0
        assert session.read("/tmp/big").stdout == big
        owner = os.getpid()
        assert _our_qemu(owner)
    assert _our_qemu(owner) == []
