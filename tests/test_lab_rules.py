"""The lab's rule text, against names and numbers published by kube-proxy's own tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from kpbench.lab import l7, rules
from kpbench.lab.sampling import parse_conntrack, parse_metrics

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


# -- the L7 proxy (HAProxy) ---------------------------------------------------------------------

# `show servers state backend` of HAProxy 2.6 after two slots were filled and one left empty.
SERVERS_STATE = "\n".join([
    "1",
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
    "srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health "
    "srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord "
    "srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port",
    "3 backend 1 pod1 198.18.0.2 2 4 1 1 0 1 0 0 8 0 0 0 - 8080 - 0 0 - - 0",
    "3 backend 2 pod2 198.18.1.2 2 4 1 1 0 1 0 0 8 0 0 0 - 8080 - 0 0 - - 0",
    "3 backend 3 pod3 127.0.0.1 0 5 1 1 2 1 0 0 8 0 0 0 - 8080 - 0 0 - - 0",
    "",
])


def test_haproxy_config_balances_every_request_over_disabled_slots(tmp_path: Path) -> None:
    text = l7.haproxy_config("grpc", 9090, 9090, 16, tmp_path / "x.sock")
    assert "    mode http" in text and "    balance roundrobin" in text
    assert "    bind :9090 proto h2" in text
    assert "    server-template pod 1-16 127.0.0.1:9090 disabled proto h2" in text
    assert "prefer-last-server" not in text  # would pin a client connection to one server
    assert "proto h2" not in l7.haproxy_config("http", 8080, 8080, 16, tmp_path / "x.sock")


def test_slots_follow_the_ready_endpoints_and_rotate() -> None:
    slots = l7.Slots(4)
    assert slots.update(["198.18.0.2:8080", "198.18.1.2:8080"]) == [
        "set server backend/pod1 addr 198.18.0.2 port 8080", "set server backend/pod1 state ready",
        "set server backend/pod2 addr 198.18.1.2 port 8080", "set server backend/pod2 state ready",
    ]
    # the slot just emptied is not refilled while others are free
    assert slots.update(["198.18.1.2:8080", "198.18.2.2:8080"]) == [
        "set server backend/pod1 state maint",
        "set server backend/pod3 addr 198.18.2.2 port 8080", "set server backend/pod3 state ready",
    ]
    assert slots.assigned == {"198.18.1.2:8080": 2, "198.18.2.2:8080": 3}
    assert slots.update(["198.18.1.2:8080", "198.18.2.2:8080"]) == []
    slots.update(["198.18.1.2:8080", "198.18.2.2:8080", "198.18.3.2:8080", "198.18.3.3:8080"])
    assert sorted(slots.assigned.values()) == [1, 2, 3, 4]  # wrapped around to slot 1
    with pytest.raises(RuntimeError, match="only 4 server slots"):
        slots.update([*slots.assigned, "198.18.3.4:8080"])


def test_servers_in_service_are_read_from_the_runtime_state() -> None:
    assert l7.enabled_servers(SERVERS_STATE) == ["198.18.0.2:8080", "198.18.1.2:8080"]
    assert l7.enabled_servers("1\n") == []
