"""kube-proxy's IPVS programming and the kernel's IPVS tables, offline (pure functions)."""

from __future__ import annotations

import pytest

from kpbench.ipvs import (
    RealServer,
    create_service,
    graceful_deletions,
    parse_ip_vs,
    parse_ip_vs_conn,
    scheduler_of,
    service_rows,
    sync_commands,
)

# /proc/net/ip_vs as the kernel prints it (ip_vs_ctl.c ip_vs_info_seq_show).
IP_VS = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A600001:01BB rr
  -> AC120002:192B      Masq    1      0          0
TCP  0A600050:0050 lc
  -> 0AF40102:1F90      Masq    1      7          2
  -> 0AF40203:1F90      Masq    0      3          0
"""

# /proc/net/ip_vs_conn (ip_vs_conn.c ip_vs_conn_seq_show: "%-3s %08X %04X %08X %04X %08X %04X
# %-11s %7u%s"): client, virtual, destination, state, expiry.
IP_VS_CONN = """Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData
TCP C6120102 D431 C613000A 0050 C6120003 1F90 ESTABLISHED     899
TCP C6120102 D432 C613000A 0050 C6120103 1F90 TIME_WAIT       119
TCP C6120202 0000 C613000A 0050 C6120003 1F90 NONE            359
"""

SERVICE = "198.19.0.10:80"


def server(address: str, weight: int = 1, active: int = 0, inactive: int = 0) -> RealServer:
    return RealServer(address, "Masq", weight, active, inactive)


def test_parse_ip_vs_reads_schedulers_weights_and_counts() -> None:
    services = parse_ip_vs(IP_VS)
    assert [(s.address, s.scheduler) for s in services] == [("10.96.0.1:443", "rr"),
                                                           ("10.96.0.80:80", "lc")]
    assert [(r.address, r.weight, r.active, r.inactive) for r in services[1].real_servers] == [
        ("10.244.1.2:8080", 1, 7, 2), ("10.244.2.3:8080", 0, 3, 0)]


def test_parse_ip_vs_conn_decodes_addresses_and_states() -> None:
    connections = parse_ip_vs_conn(IP_VS_CONN)
    assert [(c.client, c.virtual, c.destination, c.state) for c in connections] == [
        ("198.18.1.2:54321", SERVICE, "198.18.0.3:8080", "ESTABLISHED"),
        ("198.18.1.2:54322", SERVICE, "198.18.1.3:8080", "TIME_WAIT"),
        ("198.18.2.2:0", SERVICE, "198.18.0.3:8080", "NONE"),
    ]


def test_service_rows_name_the_pods_of_one_service() -> None:
    rows = service_rows(2.0, "node-1", IP_VS, "10.96.0.80:80", {"10.244.1.2": "backend-1-a"})
    assert [(r["pod"], r["weight"], r["active_connections"]) for r in rows] == [
        ("backend-1-a", 1, 7), ("", 0, 3)]


def test_the_virtual_server_gets_a_flag_only_for_mh() -> None:
    assert create_service(SERVICE, "sh") == [f"-A -t {SERVICE} -s sh"]
    assert create_service(SERVICE, "mh") == [f"-A -t {SERVICE} -s mh -b mh-port"]
    assert scheduler_of("ipvs-lc") == "lc"
    with pytest.raises(ValueError, match="not an IPVS mode"):
        scheduler_of("iptables")


def test_sync_adds_new_endpoints_with_weight_one_and_masquerade() -> None:
    assert sync_commands(SERVICE, [], ["198.18.0.2:8080", "198.18.1.2:8080"]) == [
        f"-a -t {SERVICE} -r 198.18.0.2:8080 -m -w 1",
        f"-a -t {SERVICE} -r 198.18.1.2:8080 -m -w 1",
    ]
    assert sync_commands(SERVICE, [server("198.18.0.2:8080")], ["198.18.0.2:8080"]) == []


def test_a_leaving_endpoint_is_quiesced_while_it_holds_connections_else_deleted() -> None:
    current = [server("198.18.0.2:8080", active=3), server("198.18.1.2:8080", inactive=1),
               server("198.18.1.3:8080")]
    assert sync_commands(SERVICE, current, []) == [
        f"-e -t {SERVICE} -r 198.18.0.2:8080 -m -w 0",
        f"-e -t {SERVICE} -r 198.18.1.2:8080 -m -w 0",
        f"-d -t {SERVICE} -r 198.18.1.3:8080",
    ]
    # already quiesced: left to the graceful pass, drained or not (as kube-proxy's list does)
    assert sync_commands(SERVICE, [server("198.18.0.2:8080", weight=0, active=1)], []) == []
    assert sync_commands(SERVICE, [server("198.18.0.2:8080", weight=0)], []) == []
    # UDP has no graceful termination
    assert sync_commands(SERVICE, [server("198.18.0.2:8080", active=3)], [], "udp") == [
        f"-d -u {SERVICE} -r 198.18.0.2:8080"]


def test_an_endpoint_back_from_quiescence_is_deleted_and_added_anew() -> None:
    assert sync_commands(SERVICE, [server("198.18.0.2:8080", weight=0, active=2)],
                         ["198.18.0.2:8080"]) == [
        f"-d -t {SERVICE} -r 198.18.0.2:8080", f"-a -t {SERVICE} -r 198.18.0.2:8080 -m -w 1"]


def test_the_graceful_pass_deletes_only_drained_quiesced_servers() -> None:
    current = [server("198.18.0.2:8080", weight=0), server("198.18.0.3:8080", weight=0, active=1),
               server("198.18.0.4:8080", weight=0, inactive=1), server("198.18.0.5:8080")]
    assert graceful_deletions(SERVICE, current) == [f"-d -t {SERVICE} -r 198.18.0.2:8080"]
