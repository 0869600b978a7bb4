"""The lab's samples: every `sample_seconds` each backend pod's `/metrics` (connections, requests,
the server process's CPU time) and each node's established connections to the Service (from
conntrack, or in IPVS modes `/proc/net/ip_vs_conn`), which give `connections.parquet` at
sample resolution (the kernel does not know why a connection closed: `close_reason` is empty
except `end`); in IPVS modes each node's real servers with weights and counts (`ipvs.csv`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prometheus_client.parser import text_string_to_metric_families

from kpbench import ipvs
from kpbench.config import Experiment
from kpbench.lab.kube_proxy import KubeProxy
from kpbench.lab.netns import CLUSTER_IP
from kpbench.lab.pods import LabPod

CONNECTION_COLUMNS = ["conn_id", "client", "node", "pod", "opened_at", "closed_at",
                      "close_reason", "requests"]


@dataclass
class Scrape:
    active: int = 0
    connections: int = 0
    requests: int = 0
    cpu_seconds: float | None = None


def parse_metrics(text: str) -> Scrape:
    scrape = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kpbench_active_connections":
                scrape.active += int(sample.value)
            elif sample.name == "kpbench_connections_total":
                scrape.connections += int(sample.value)
            elif sample.name == "kpbench_requests_total":
                scrape.requests += int(sample.value)
            elif sample.name == "process_cpu_seconds_total":
                scrape.cpu_seconds = float(sample.value)
    return scrape


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (what its container's cgroup accounts), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_conntrack(text: str) -> list[tuple[str, int, str]]:
    """(client ip, client port, pod ip) of each established connection to the ClusterIP."""
    flows = []
    for line in text.splitlines():
        sources = [p[4:] for p in line.split() if p.startswith("src=")]
        ports = [p[6:] for p in line.split() if p.startswith("sport=")]
        if len(sources) >= 2 and ports:
            flows.append((sources[0], int(ports[0]), sources[1]))
    return flows


def established_to(text: str, address: str) -> str:
    """The lines of `/proc/net/nf_conntrack` for established TCP connections to `address`
    (what `conntrack -L -p tcp --orig-dst ADDRESS --state ESTABLISHED` prints)."""
    return "\n".join(
        line for line in text.splitlines()
        if " tcp " in f" {line} " and " ESTABLISHED " in line
        and next((p[4:] for p in line.split() if p.startswith("dst=")), None) == address)


class Sampler:
    """One cell's sample rows, connections seen per sample, IPVS rows and scrape gaps."""

    def __init__(self, cfg: Experiment, kube_proxy: KubeProxy) -> None:
        self.cfg = cfg
        self.kube_proxy = kube_proxy
        self.rows: list[dict[str, Any]] = []
        self.flows: dict[tuple[int, str, int, str], list[float]] = {}  # -> [first, last seen]
        self.ipvs_rows: list[dict[str, Any]] = []
        self.unanswered: dict[str, float] = {}  # pod -> first sample its /metrics missed
        self.lateness: list[float] = []

    def add_metrics(self, planned: float, now: float, pods: list[LabPod],
                    texts: list[str | None]) -> list[str]:
        """One sample's rows from the pods' /metrics texts (None: did not answer); returns the
        pods that did not answer (no row rather than an invented one)."""
        self.lateness.append(now - planned)
        unanswered = [p.pod.name for p, text in zip(pods, texts, strict=True) if text is None]
        for pod, text in zip(pods, texts, strict=True):
            if text is None:
                self.unanswered.setdefault(pod.pod.name, planned)
                continue
            self.unanswered.pop(pod.pod.name, None)
            scrape = parse_metrics(text)
            if scrape.cpu_seconds is not None:
                if pod.cpu is not None and now > pod.cpu[0]:
                    used = scrape.cpu_seconds - pod.cpu[1]
                    pod.cpu_millicores = used / (now - pod.cpu[0]) * 1000
                pod.cpu = (now, scrape.cpu_seconds)
            self.rows.append({
                "t": round(planned, 6), "pod": pod.pod.name, "node": f"node-{pod.pod.node + 1}",
                "created_at": pod.pod.created_at, "ready": pod.pod.ready,
                "terminating": pod.pod.terminating_at is not None,
                "active_connections": scrape.active, "connections_total": scrape.connections,
                "requests_total": scrape.requests, "cpu_millicores": pod.cpu_millicores,
            })
        return unanswered

    def check_silent(self, pods: list[LabPod]) -> None:
        """A ready pod whose /metrics stopped answering and never answered again, while it was
        neither terminating nor gone, fails the cell."""
        silent = [p for p in pods if p.pod.name in self.unanswered and p.pod.ready
                  and not p.exited and p.pod.terminating_at is None]
        if silent:
            since = min(self.unanswered[p.pod.name] for p in silent)
            raise RuntimeError(f"{', '.join(p.pod.name for p in silent)} stopped answering "
                               f"/metrics at t={since:g} s and never answered again")

    def established(self, node: int) -> list[tuple[str, int, str]]:
        """(client ip, client port, pod ip) of the service's established connections on `node`:
        from the IPVS connection table in IPVS modes, else from conntrack."""
        kube_proxy, nodes = self.kube_proxy, self.kube_proxy.nodes
        if kube_proxy.scheduler is not None:
            return [(c.client.rsplit(":", 1)[0], int(c.client.rsplit(":", 1)[1]),
                     c.destination.rsplit(":", 1)[0])
                    for c in ipvs.parse_ip_vs_conn(kube_proxy.ip_vs_text(node, "ip_vs_conn"))
                    if c.state == "ESTABLISHED" and c.virtual == kube_proxy.service_address]
        if nodes.placement == "vm":  # a file read: no process started in the emulated guest
            return parse_conntrack(established_to(nodes.read(node, "/proc/net/nf_conntrack"),
                                                  CLUSTER_IP))
        return parse_conntrack(nodes.run(node, [
            "conntrack", "-L", "-p", "tcp", "--orig-dst", CLUSTER_IP, "--state", "ESTABLISHED"]))

    def read_connections(self, t: float, by_ip: dict[str, str]) -> None:
        """Every node's established connections at sample `t` (pods named by `by_ip`)."""
        for node in range(self.kube_proxy.node_count):
            for client_ip, port, pod_ip in self.established(node):
                key = (node, client_ip, port, by_ip.get(pod_ip, pod_ip))
                seen = self.flows.setdefault(key, [t, t])
                seen[1] = t

    def read_ipvs(self, t: float, by_ip: dict[str, str]) -> None:
        """Each node's real servers of the service, with weights and counts, for `ipvs.csv`."""
        kube_proxy = self.kube_proxy
        for node in range(kube_proxy.node_count):
            self.ipvs_rows += ipvs.service_rows(t, f"node-{node + 1}", kube_proxy.ip_vs_text(node),
                                                kube_proxy.service_address, by_ip)

    def samples(self) -> pd.DataFrame:
        samples = pd.DataFrame(self.rows)
        samples["cpu_millicores"] = samples["cpu_millicores"].astype("float64")
        return samples

    def connections(self) -> pd.DataFrame:
        """One row per connection seen: opened at its first sample, closed one sample after its
        last unless it was still there at the last one."""
        last_sample = max((v[1] for v in self.flows.values()), default=0.0)
        rows = []
        for conn_id, ((node, client_ip, _port, pod), (first, last)) in enumerate(
            sorted(self.flows.items(), key=lambda item: (item[1][0], item[0]))
        ):
            still_open = last >= last_sample
            rows.append({
                "conn_id": conn_id, "client": client_ip, "node": f"node-{node + 1}",
                "pod": pod, "opened_at": first,
                "closed_at": math.nan if still_open else last + self.cfg.sample_seconds,
                "close_reason": "end" if still_open else None, "requests": None,
            })
        return pd.DataFrame(rows, columns=CONNECTION_COLUMNS)

    def artifacts(self) -> dict[str, bytes]:
        if not self.ipvs_rows:
            return {}
        return {"ipvs.csv": pd.DataFrame(self.ipvs_rows, columns=ipvs.ROW_COLUMNS).to_csv(
            index=False).encode()}
