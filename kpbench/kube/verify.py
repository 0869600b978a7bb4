"""Read the data plane back and check it is the mode that was asked for.

Three sources, each parsed here as pure functions (tested offline on sample text):
- the kube-proxy ConfigMap (`kube-system/kube-proxy`, key `config.conf`, a
  `KubeProxyConfiguration`): `mode` ("" means iptables on Linux) and `ipvs.scheduler` ("" means
  rr, kubernetes `pkg/proxy/ipvs/proxier.go` defaultScheduler);
- each node's `/proc/net/ip_vs` (read with `docker exec <node> cat /proc/net/ip_vs`): virtual
  services with their scheduler, and per real server the weight and the active / inactive
  connection counts (what `ipvsadm -Ln` prints). Addresses are hexadecimal there
  (`0A600001:0050` = 10.96.0.1:80), as the kernel's ip_vs_conn/ip_vs_ctl seq files print them;
- each node's `iptables-save` (KUBE-SVC-* chains with `statistic --mode random`) or
  `nft list table ip kube-proxy` (a `numgen random mod N vmap` per service).
"""

from __future__ import annotations

from typing import Any

import yaml

from kpbench.ipvs import parse_ip_vs, scheduler_of


class DataplaneMismatch(RuntimeError):
    """The data plane read back is not the requested mode: the cell fails."""


def kube_proxy_settings(config_map: dict[str, Any] | None) -> dict[str, str]:
    """{"mode", "scheduler"} from the kube-proxy ConfigMap's `config.conf`."""
    if not config_map:
        raise DataplaneMismatch("kube-system/kube-proxy ConfigMap not found")
    data = config_map.get("data") or {}
    text = data.get("config.conf") or data.get("config") or ""
    config = yaml.safe_load(text) or {}
    mode = str(config.get("mode") or "iptables")
    scheduler = str((config.get("ipvs") or {}).get("scheduler") or "rr")
    return {"mode": mode, "scheduler": scheduler if mode == "ipvs" else ""}


def kpbench_mode(settings: dict[str, str]) -> str:
    """{"mode": "ipvs", "scheduler": "lc"} -> "ipvs-lc"."""
    if settings["mode"] == "ipvs":
        return f"ipvs-{settings['scheduler']}"
    return settings["mode"]


def iptables_service_chains(text: str) -> dict[str, int]:
    """KUBE-SVC-* chain -> number of `statistic --mode random` rules, from `iptables-save`."""
    chains: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith(":KUBE-SVC-"):
            chains.setdefault(line[1:].split()[0], 0)
        elif line.startswith("-A KUBE-SVC-") and "--mode random" in line:
            chain = line.split()[1]
            chains[chain] = chains.get(chain, 0) + 1
    return chains


def nft_numgen_rules(text: str) -> list[str]:
    """The `numgen random mod N vmap` lines of kube-proxy's nftables table."""
    return [line.strip() for line in text.splitlines() if "numgen random mod" in line]


def check_node(mode: str, node: str, tables: dict[str, str],
               service_address: str | None = None) -> dict[str, Any]:
    """What one node's tables say, raising DataplaneMismatch if they contradict `mode`.

    `tables` holds the text read from the node: `ip_vs` (/proc/net/ip_vs, may be ""),
    `iptables` (iptables-save) and `nft` (nft list table ip kube-proxy, may be "").
    `service_address` (ClusterIP:port) narrows the IPVS check to the cell's Service.
    """
    seen: dict[str, Any] = {"node": node}
    services = parse_ip_vs(tables.get("ip_vs", ""))
    if mode.startswith("ipvs-"):
        scheduler = scheduler_of(mode)
        if not services:
            raise DataplaneMismatch(f"{node}: no IPVS virtual services in /proc/net/ip_vs "
                                    f"although kube-proxy should run in {mode}")
        relevant = [s for s in services
                    if service_address is None or s.address == service_address]
        if service_address is not None and not relevant:
            raise DataplaneMismatch(f"{node}: the Service {service_address} has no IPVS "
                                    "virtual service")
        wrong = sorted({s.scheduler for s in relevant if s.scheduler != scheduler})
        if wrong:
            raise DataplaneMismatch(f"{node}: IPVS scheduler {', '.join(wrong)} found, "
                                    f"{scheduler} requested")
        seen |= {"ipvs_services": len(services), "schedulers": sorted({s.scheduler
                                                                       for s in services})}
        if service_address is not None:
            seen["service"] = {
                "address": service_address, "scheduler": relevant[0].scheduler,
                "real_servers": [rs.address for rs in relevant[0].real_servers],
            }
    elif mode == "iptables":
        chains = iptables_service_chains(tables.get("iptables", ""))
        if not chains:
            raise DataplaneMismatch(f"{node}: no KUBE-SVC-* chains in iptables-save although "
                                    "kube-proxy should run in iptables mode")
        if services:
            raise DataplaneMismatch(f"{node}: IPVS virtual services present in iptables mode")
        seen |= {"kube_svc_chains": len(chains)}
    elif mode == "nftables":
        rules = nft_numgen_rules(tables.get("nft", ""))
        if "table ip kube-proxy" not in tables.get("nft", ""):
            raise DataplaneMismatch(f"{node}: no nftables table `ip kube-proxy` although "
                                    "kube-proxy should run in nftables mode")
        if iptables_service_chains(tables.get("iptables", "")):
            raise DataplaneMismatch(f"{node}: iptables KUBE-SVC-* chains present in nftables "
                                    "mode")
        seen |= {"numgen_rules": len(rules), "example_rules": rules[:4]}
    else:
        raise DataplaneMismatch(f"unknown mode {mode}")
    return seen


def check_config(mode: str, settings: dict[str, str]) -> None:
    found = kpbench_mode(settings)
    if found != mode:
        raise DataplaneMismatch(f"kube-proxy runs in {found} (ConfigMap), {mode} requested")
