"""The lab's network: namespaces as nodes and pods, veth pairs, a bridge, routes.

Layout (every name starts with the run's prefix `kpb-<6 hex>-`):
  <prefix>br      the bridge `br0`; one port per node and one for the control namespace
  <prefix>ctl     198.19.255.250: where kpbench's scraper and the Locust master run
  <prefix>n<k>    node k (1-based): eth0 198.19.255.<k>/24 on the bridge, forwarding, kube-proxy's
                  rules for the service; a /32 route per local pod, a /24 route per other node
  <prefix>p<i>    backend pod i, <prefix>c<j> client pod j: eth0 198.18.<k>.<host>/32, default
                  route via 198.18.<k>.1 (the node's address on every pod-facing veth)
Addresses come from 198.18.0.0/15 (RFC 2544, benchmarking), ClusterIPs from 198.19.0.0/24. The
root namespace gets no address, route or link: veths are created directly inside their
namespaces, so no lab traffic can reach the host's networks.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from kpbench import proc
from kpbench.addresses import LAST_HOST, PodAddresses, dotted, pod_address

PREFIX = "kpb-"
NAME = re.compile(r"^kpb-[0-9a-f]{6}-")
NODE_NET = "198.19.255"
CONTROL_IP = f"{NODE_NET}.250"
CLUSTER_IP = "198.19.0.10"
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
OWNERS_DIR = Path("/run/kpbench-lab")  # <tag> -> pid of the kpbench process that owns the run


LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")
ROUTE_TYPES = frozenset({"unicast", "local", "broadcast", "multicast", "anycast", "unreachable",
                         "blackhole", "prohibit", "throw", "nat"})


def overlapping(addresses: str, routes: str) -> list[str]:
    """What of `ip -4 -o addr show` and `ip -4 route show table all` overlaps 198.18.0.0/15:
    an address or route inside it, or one covering it (198.16.0.0/12). A default route, and
    the split default 0.0.0.0/1 + 128.0.0.0/1 of VPNs, cover everything and are no claim on it."""
    found = []
    for line in addresses.splitlines():
        words = line.split()
        if "inet" in words[:-1]:
            found += _claims(words[words.index("inet") + 1], line)
    for line in routes.splitlines():
        words = line.split()
        if words and words[0] in ROUTE_TYPES:
            words = words[1:]
        if words:
            found += _claims(words[0], line)
    return found


def _claims(prefix: str, line: str) -> list[str]:
    try:
        network = ipaddress.ip_network(prefix, strict=False)
    except ValueError:  # `default`, an interface name...
        return []
    if network.version != 4 or network.prefixlen < 2 or not network.overlaps(LAB_RANGE):
        return []
    return [" ".join(line.split())]


def range_in_use() -> list[str]:
    """The host's addresses and routes (every table) that overlap 198.18.0.0/15."""
    return overlapping(run("ip", "-4", "-o", "addr", "show"),
                       run("ip", "-4", "route", "show", "table", "all"))


class LabError(RuntimeError):
    """A lab operation failed; the message names the command."""


def run(*args: str, input_text: str | None = None) -> str:
    done = subprocess.run(args, input=input_text, capture_output=True, text=True)
    if done.returncode != 0:
        raise LabError(f"{' '.join(args[:6])}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def node_ip(node: int) -> str:
    return f"{NODE_NET}.{node + 1}"


def pod_ip(node: int, host: int) -> str:
    return dotted(pod_address(node, host))


@dataclass
class Topology:
    """The lab's namespaces and links, created and removed here; nothing else touches them."""

    nodes: int
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)
    addresses: PodAddresses = field(init=False)

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.tag}-"

    def ns(self, name: str) -> str:
        return self.prefix + name

    @property
    def bridge_ns(self) -> str:
        return self.ns("br")

    @property
    def control_ns(self) -> str:
        return self.ns("ctl")

    def node_ns(self, node: int) -> str:
        return self.ns(f"n{node + 1}")

    def _add_namespace(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def _sysctl(self, namespace: str, *settings: str) -> None:
        run("ip", "netns", "exec", namespace, "sysctl", "-qw", *settings)

    def register_owner(self) -> None:
        """Record this process as the run's owner, so `kpbench clean` leaves the run alone."""
        OWNERS_DIR.mkdir(parents=True, exist_ok=True)
        (OWNERS_DIR / self.tag).write_text(proc.current().to_text() + "\n")

    def create(self) -> None:
        self.register_owner()
        self.addresses = PodAddresses(self.nodes)
        self._add_namespace(self.bridge_ns)
        run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        attach = [(self.control_ns, "ctl", CONTROL_IP)]
        attach += [(self.node_ns(n), f"n{n + 1}", node_ip(n)) for n in range(self.nodes)]
        for namespace, port, address in attach:
            self._add_namespace(namespace)
            run("ip", "link", "add", "eth0", "netns", namespace, "type", "veth", "peer", "name",
                port, "netns", self.bridge_ns)
            run("ip", "-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", namespace, "link", "set", "eth0", "up")
        for node in range(self.nodes):
            namespace = self.node_ns(node)
            self._sysctl(namespace, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                         "net.ipv4.conf.default.rp_filter=0")
            for other in range(self.nodes):
                if other != node:
                    run("ip", "-n", namespace, "route", "add", f"198.18.{other}.0/24", "via",
                        node_ip(other))
            run("ip", "-n", self.control_ns, "route", "add", f"198.18.{node}.0/24", "via",
                node_ip(node))
        # ClusterIPs are answered by the nodes' rules; from the control namespace, via node 1.
        run("ip", "-n", self.control_ns, "route", "add", "198.19.0.0/24", "via", node_ip(0))

    def pod_namespace(self, name: str, node: int, peer_ns: str) -> tuple[str, str, str]:
        """A pod namespace with the next address of `node`, its eth0's peer in `peer_ns`, and
        its default route via the node (198.18.<node>.1); returns (namespace, ip, peer)."""
        host = self.addresses.allocate(node)
        if host > LAST_HOST:
            raise LabError(f"node {node + 1} has no free pod address")
        namespace, ip, veth = self.ns(name), pod_ip(node, host), f"v{name}"
        self._add_namespace(namespace)
        run("ip", "link", "add", "eth0", "netns", namespace, "type", "veth", "peer", "name",
            veth, "netns", peer_ns)
        run("ip", "-n", namespace, "addr", "add", f"{ip}/32", "dev", "eth0")
        run("ip", "-n", namespace, "link", "set", "eth0", "up")
        gateway = pod_ip(node, 1)
        run("ip", "-n", namespace, "route", "add", gateway, "dev", "eth0", "scope", "link")
        run("ip", "-n", namespace, "route", "add", "default", "via", gateway)
        return namespace, ip, veth

    def add_pod(self, name: str, node: int) -> tuple[str, str]:
        """A pod namespace on `node`; returns (namespace, ip)."""
        node_ns = self.node_ns(node)
        namespace, ip, veth = self.pod_namespace(name, node, node_ns)
        gateway = pod_ip(node, 1)
        run("ip", "-n", node_ns, "addr", "add", f"{gateway}/32", "dev", veth)
        run("ip", "-n", node_ns, "link", "set", veth, "up")
        run("ip", "-n", node_ns, "route", "add", f"{ip}/32", "dev", veth)
        return namespace, ip

    def remove_namespace(self, namespace: str) -> None:
        kill_namespace_processes(namespace)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        if namespace in self.namespaces:
            self.namespaces.remove(namespace)

    def destroy(self) -> None:
        kill_processes([p for n in self.namespaces for p in namespace_pids(n)])
        for namespace in reversed(list(self.namespaces)):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self.namespaces.clear()
        (OWNERS_DIR / self.tag).unlink(missing_ok=True)


def namespace_pids(namespace: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


def kill_namespace_processes(namespace: str, grace_seconds: float = 2.0) -> None:
    kill_processes(namespace_pids(namespace), grace_seconds)


def kill_processes(pids: list[int], grace_seconds: float = 2.0) -> None:
    """SIGTERM, wait up to the grace period, then SIGKILL what is left."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.05)
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signum)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def suite_namespaces() -> list[str]:
    """Every namespace this suite created and did not remove (any run)."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    names = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    return [n for n in names if NAME.match(n)]


def run_owner(namespace: str) -> int | None:
    """The live kpbench process that owns `namespace`'s run, if any (a PID that was reused by
    another process since does not count: the identity includes its start time)."""
    return tag_owner(namespace[len(PREFIX):len(PREFIX) + 6])


def tag_owner(tag: str) -> int | None:
    try:
        owner = proc.Identity.from_text((OWNERS_DIR / tag).read_text())
    except OSError:
        return None
    return owner.pid if owner is not None and owner.alive() else None


WORKDIR_PREFIX = "kpbench-lab-"
UNOWNED_GRACE = 3600.0  # a work folder without an owner file (older kpbench) is kept this long


def make_workdir(tag: str) -> Path:
    """A cell's folder of logs and configs, `<tmp>/kpbench-lab-<tag>-*`, marked with its owner
    so that `kpbench clean` can tell a live cell's folder from one a killed run left."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{tag}-"))
    (workdir / "owner").write_text(proc.current().to_text() + "\n")
    return workdir


def workdir_owner(workdir: Path) -> int | None:
    """The live process that owns a lab work folder, if any."""
    try:
        owner = proc.Identity.from_text((workdir / "owner").read_text())
    except OSError:
        return None
    return owner.pid if owner is not None and owner.alive() else None


def suite_workdirs() -> list[Path]:
    return sorted(p for p in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*")
                  if p.is_dir() and not p.is_symlink())


@dataclass
class Leftovers:
    """What `kpbench clean` found of the lab: (item, why) removed and left."""

    removed: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)


def lab_leftovers() -> list[str]:
    """Lab namespaces and work folders that exist (owned or not): what clean would look at."""
    return [*suite_namespaces(), *(str(p) for p in suite_workdirs())]


def clean_all() -> Leftovers:
    """`kpbench clean`: remove every namespace (and so every link, rule, process) and work folder
    the suite left behind; those of runs whose kpbench process is still alive are kept."""
    found = Leftovers()
    namespaces = []
    for namespace in suite_namespaces():
        owner = run_owner(namespace)
        if owner is None:
            namespaces.append(namespace)
        else:
            found.left.append((f"lab namespace {namespace}", f"its run's process {owner} is "
                                                            "alive"))
    kill_processes([p for n in namespaces for p in namespace_pids(n)], grace_seconds=1.0)
    for namespace in namespaces:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        if namespace in suite_namespaces():
            found.left.append((f"lab namespace {namespace}", "ip netns del failed"))
        else:
            found.removed.append((f"lab namespace {namespace}", "its run's process is gone"))
    for owner_file in OWNERS_DIR.glob("*") if OWNERS_DIR.is_dir() else []:
        if not any(n.startswith(f"{PREFIX}{owner_file.name}-") for n in suite_namespaces()):
            owner_file.unlink(missing_ok=True)
    for workdir in suite_workdirs():
        owner = workdir_owner(workdir)
        if owner is not None:
            found.left.append((f"lab folder {workdir}", f"its cell's process {owner} is alive"))
            continue
        if not (workdir / "owner").exists():
            tag = workdir.name[len(WORKDIR_PREFIX):].split("-")[0]
            alive = tag_owner(tag) if re.fullmatch(r"[0-9a-f]{6}", tag) else None
            if alive is not None or time.time() - workdir.stat().st_mtime < UNOWNED_GRACE:
                found.left.append((f"lab folder {workdir}", "no owner recorded and its run may "
                                                            "be alive (under an hour old)"))
                continue
        shutil.rmtree(workdir, ignore_errors=True)
        if workdir.exists():
            found.left.append((f"lab folder {workdir}", "could not be removed"))
        else:
            found.removed.append((f"lab folder {workdir}", "its cell's process is gone"))
    return found


_libc = ctypes.CDLL(None, use_errno=True)
_setns_lock = threading.Lock()


@contextmanager
def entered(namespace: str) -> Iterator[None]:
    """Run the calling thread inside `namespace` (network namespaces are per thread)."""
    with open("/proc/thread-self/ns/net", "rb") as own, open(f"{NETNS_DIR}/{namespace}",
                                                               "rb") as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise LabError(f"setns {namespace}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            _libc.setns(own.fileno(), CLONE_NEWNET)


def enter_permanently(namespace: str) -> None:
    """Move the calling thread into `namespace` for good (a pool thread's initializer)."""
    with open(f"{NETNS_DIR}/{namespace}", "rb") as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise LabError(f"setns {namespace}: {os.strerror(ctypes.get_errno())}")


def ns_exec(namespace: str, command: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", namespace, *command]


class InsideGets:
    """HTTP GETs from inside the lab: a pool of threads that entered `namespace` (the control
    namespace, which reaches every pod); None for a GET that failed."""

    def __init__(self, namespace: str, workers: int = 16) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, initializer=enter_permanently,
                                       initargs=(namespace,))

    def get(self, url: str) -> str | None:
        return self.pool.submit(self._get, url).result()

    def get_all(self, urls: Sequence[str]) -> list[str | None]:
        """Every URL, concurrently, in order."""
        return list(self.pool.map(self._get, urls))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _get(url: str, timeout: float = 2.0) -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return str(response.read().decode())
        except (urllib.error.URLError, OSError, ValueError):
            return None
