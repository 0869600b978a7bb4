"""The lab's rule text, against names and numbers published by kube-proxy's own tests."""

from __future__ import annotations

from kpbench.lab import rules
from kpbench.lab.backend import parse_conntrack, parse_metrics

SERVICE = rules.Service("ns1", "svc1", "p80", "172.30.0.41", 80)


def test_chain_names_are_kube_proxys() -> None:
    # Values that appear in kube-proxy's iptables and nftables proxier tests.
    assert rules.service_chain(SERVICE) == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert rules.endpoint_chain(SERVICE, rules.Endpoint("10.180.0.1", 80)) == (
        "KUBE-SEP-SXIVWICOYRO3J4NJ"
    )
    assert rules.nft_service_chain(SERVICE) == "service-ULMVA6XW-ns1/svc1/tcp/p80"


def test_iptables_rules_carry_1_over_n_minus_i() -> None:
    endpoints = [rules.Endpoint(f"10.0.0.{i}", 80) for i in range(1, 5)]
    text = rules.iptables_restore(SERVICE, endpoints)
    svc_rules = [line for line in text.splitlines() if line.startswith("-A KUBE-SVC-")]
    assert len(svc_rules) == 4
    assert [r.split("--probability ")[1].split()[0] for r in svc_rules[:3]] == [
        "0.2500000000", "0.3333333333", "0.5000000000"
    ]
    assert "statistic" not in svc_rules[3]
    assert text.count("-j DNAT --to-destination 10.0.0.") == 4
    assert "has no endpoints" not in text
    assert "has no endpoints" in rules.iptables_restore(SERVICE, [])


def test_nft_ruleset_uses_one_numgen_vmap() -> None:
    endpoints = [rules.Endpoint(f"10.0.0.{i}", 80) for i in range(1, 4)]
    text = rules.nft_ruleset(SERVICE, endpoints)
    assert "numgen random mod 3 vmap { 0 : goto endpoint-" in text
    assert text.count("dnat to 10.0.0.") == 3
    assert text.startswith("table ip kube-proxy\ndelete table ip kube-proxy\n")


def test_parse_metrics_sums_protocols() -> None:
    text = (
        'kpbench_active_connections{node="n",pod="p",protocol="http"} 3.0\n'
        'kpbench_active_connections{node="n",pod="p",protocol="grpc"} 2.0\n'
        'kpbench_connections_total{node="n",pod="p",protocol="http"} 7.0\n'
        'kpbench_requests_total{node="n",pod="p",protocol="http"} 70.0\n'
        "process_cpu_seconds_total 1.5\n"
    )
    scrape = parse_metrics(text)
    assert (scrape.active, scrape.connections, scrape.requests, scrape.cpu_seconds) == (
        5, 7, 70, 1.5
    )


def test_parse_conntrack() -> None:
    line = ("tcp      6 431999 ESTABLISHED src=198.18.0.6 dst=198.19.0.10 sport=40000 dport=80 "
            "src=198.18.1.2 dst=198.18.0.6 sport=8080 dport=40000 [ASSURED] mark=0 use=1")
    assert parse_conntrack(line + "\n") == [("198.18.0.6", 40000, "198.18.1.2")]
