"""`kpbench scale`: the rules for many Services, the config, and real runs on the host's kernel
(iptables, nftables) and, marked `vm`, on the kernel VM's (IPVS too)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from kpbench.cli import main
from kpbench.lab import ipvs_rules, netns, rules
from kpbench.lab.scale import endpoint_change, service_table

from .conftest import EXPERIMENTS, LAB_MARKS

CONFIG = EXPERIMENTS / "lab" / "scale.yaml"
REAL = ["198.18.0.3", "198.18.0.4", "198.18.0.5"]


def test_the_probed_service_is_the_last_rule_and_the_only_one_with_real_pods() -> None:
    table = service_table(300, 3, REAL)
    text = rules.iptables_restore_many(table)
    jumps = [line for line in text.splitlines() if line.startswith("-A KUBE-SERVICES ")]
    assert len(jumps) == 300
    assert table[-1][0].cluster_ip in jumps[-1]
    assert [e.ip for e in table[-1][1]] == REAL
    others = {e.ip for _, endpoints in table[:-1] for e in endpoints}
    assert len(others) == 299 * 3 and all(ip.startswith("198.18.") for ip in others)
    assert not others & set(REAL)
    assert len({s.cluster_ip for s, _ in table}) == 300
    assert text.count("-j DNAT") == 900


def test_partial_sync_rewrites_kube_services_and_only_the_changed_chains() -> None:
    table = service_table(50, 3, REAL)
    changed, service, old, new = endpoint_change(table)
    text = rules.iptables_partial_restore(changed, service, old)
    lines = text.splitlines()
    assert sum(line.startswith("-A KUBE-SERVICES ") for line in lines) == 50
    assert {line.split()[1] for line in lines if line.startswith("-A KUBE-S")} == {
        "KUBE-SERVICES", rules.service_chain(service),
        *(rules.endpoint_chain(service, e) for e in new)}
    stale = rules.endpoint_chain(service, old[-1])
    assert lines.index(f":{stale} - [0:0]") < lines.index(f"-X {stale}")
    change = rules.nft_endpoints_change(service, old, new)
    assert change.count("  chain endpoint-") == 1 and change.count("delete chain") == 1


def test_nftables_and_ipvs_write_every_service_once() -> None:
    table = service_table(40, 3, REAL)
    text = rules.nft_ruleset_many(table)
    assert text.count(" : goto service-") == 40 and text.count("numgen random mod 3") == 40
    sets = ipvs_rules.ipset_restore(table, frozenset(REAL))
    assert sets.count(f"add {ipvs_rules.CLUSTER_IP_SET} ") == 40
    assert sets.count(f"add {ipvs_rules.LOOP_BACK_SET} ") == 3  # only the node's own pods
    assert ipvs_rules.ipvsadm_restore(table, "rr").count(" -m -w 1") == 120
    assert ipvs_rules.bind_addresses(table).count("dev kube-ipvs0") == 40


@pytest.mark.parametrize(("override", "message"), [
    ("endpoints_per_service=0", "endpoints_per_service: must be >= 1"),
    ("host.modes=[ipvs-wrr]", "host.modes[0]: must be one of"),
    ("repeats=0", "repeats: must be >= 1"),
    ("repeats=many", "repeats: "),
    ("host.services=[1]", "host.services: each must be 2.."),
    ("host.servces=[10]", "host.servces: unknown key (did you mean 'services'?)"),
    ("host.services=[20000]", "host.services: 20,000 services of 3 endpoints do not fit"),
])
def test_bad_input_is_one_line_and_exit_2_and_creates_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str) -> None:
    out = tmp_path / "out"
    assert main(["scale", str(CONFIG), "--set", override, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_every_repeat_is_a_whole_sweep_with_the_modes_side_by_side() -> None:
    from kpbench.scale import load

    config = load(CONFIG, ["repeats=2", "host.services=[10, 30]"], only="host")
    points = [(p.repeat, p.services, p.mode) for p in config.points("host")]
    assert points == [(1, 10, "iptables"), (1, 10, "nftables"), (1, 30, "iptables"),
                      (1, 30, "nftables"), (2, 10, "iptables"), (2, 10, "nftables"),
                      (2, 30, "iptables"), (2, 30, "nftables")]
    assert load(CONFIG).repeats == 3  # the documented default, as the shipped config sets it


def test_validate_knows_scale_configs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(CONFIG)]) == 0
    assert "ok (scale:" in capsys.readouterr().out


def _own_namespaces() -> list[str]:
    return [n for n in netns.suite_namespaces() if netns.run_owner(n) == os.getpid()]


def _load(folder: Path) -> tuple[dict, pd.DataFrame]:
    manifest = json.loads((folder / "run.json").read_text())
    rows = [json.loads(p.read_text()) for p in sorted((folder / "points").glob("*.json"))]
    return manifest, pd.DataFrame(rows)


def lab(test: Callable[..., None]) -> Callable[..., None]:
    for mark in LAB_MARKS:
        test = mark(test)
    return test


@lab
def test_host_sweep_measures_iptables_and_nftables_on_the_real_kernel(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["scale", str(CONFIG), "--only", "host", "--out", str(tmp_path),
                 "--set", "host.services=[10, 30]", "--set", "host.connects=30",
                 "--set", "repeats=2"])
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    manifest, points = _load(folder)
    assert manifest["status"] == "COMPLETED"
    assert manifest["placements"]["host"]["kernel"] == os.uname().release
    assert sorted(zip(points["mode"], points["services"], points["repeat"], strict=True)) == [
        (mode, size, repeat) for mode in ("iptables", "nftables") for size in (10, 30)
        for repeat in (1, 2)]
    assert (points["kernel"] == os.uname().release).all()
    for accepted in points["accepted"]:  # the real pods answered through the node's rules
        assert sum(accepted) > 0
    assert (points["sync_seconds"] > 0).all() and (points["incremental_seconds"] > 0).all()
    assert (points["connect_median_us"] > 0).all()
    assert {"measurements.csv", "summary.md", "scale.png"} <= {p.name for p in folder.iterdir()}
    table = pd.read_csv(folder / "measurements.csv")
    assert sorted(table["repeat"]) == [1] * 4 + [2] * 4
    summary = (folder / "summary.md").read_text()
    assert "| host " in summary and " | 2 | " in summary
    assert " [" in summary  # 2 repeats give an interval
    assert not _own_namespaces()


@lab
def test_sigint_keeps_the_points_measured_and_leaves_nothing(tmp_path: Path) -> None:
    before = set(netns.suite_namespaces())
    process = subprocess.Popen(
        [sys.executable, "-m", "kpbench", "scale", str(CONFIG), "--only", "host", "--out",
         str(tmp_path), "--set", "host.services=[10, 10000]", "--set", "host.connects=10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("scale/*/points/00002.json")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    time.sleep(0.5)  # inside the 10,000-service sync
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    manifest, points = _load(Path(stdout.strip().splitlines()[-1]))
    assert manifest["status"] == "INTERRUPTED"
    assert len(points) >= 2 and set(points["services"]) >= {10}
    left = [n for n in set(netns.suite_namespaces()) - before if netns.run_owner(n) is None]
    assert not left, left


@pytest.mark.vm
def test_vm_sweep_measures_every_mode_on_one_stock_kernel(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kpbench import vm

    if os.geteuid() != 0 or vm.preflight():
        pytest.skip(vm.preflight() or "needs root")
    code = main(["scale", str(CONFIG), "--only", "vm", "--out", str(tmp_path),
                 "--set", "vm.services=[10]", "--set", "vm.connects=10",
                 "--set", "repeats=2"])
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    manifest, points = _load(folder)
    assert manifest["placements"]["vm"]["accel"] in ("kvm", "tcg")
    assert set(points["mode"]) == {"iptables", "nftables", "ipvs-rr", "ipvs-lc", "ipvs-sh"}
    assert len(points) == 5 * 1 * 2 and (points["placement"] == "vm").all()
    assert sorted(set(points["repeat"])) == [1, 2]
    assert (points["kernel"] == manifest["placements"]["vm"]["kernel"]).all()
    for accepted in points["accepted"]:
        assert sum(accepted) > 0
    assert not vm.leftover_processes()


# --- over repeats, and the claim judged on them (pure, synthetic rows) ----------------------------


def synthetic_rows(placement: str, mode: str, services: int, connect_us: list[float],
                   sync_s: list[float], incremental_s: list[float]) -> list[dict]:
    """One row per repeat, as the probe writes them (kernel and accel per placement)."""
    kernel, accel = ("6.18.44", "") if placement == "host" else ("6.1.0-57-amd64", "tcg")
    return [{"placement": placement, "kernel": kernel, "accel": accel, "mode": mode,
             "services": services, "endpoints": 3, "connects": 50, "repeat": repeat,
             "sync_seconds": sync, "incremental_seconds": incremental,
             "connect_median_us": connect, "connect_p90_us": connect * 1.5,
             "connect_min_us": connect / 2, "connect_max_us": connect * 3,
             "connect_first_us": connect * 2, "accepted": [20, 15, 15],
             "sync_steps": {"iptables-restore": sync}, "incremental_steps": {"x": incremental}}
            for repeat, (connect, sync, incremental)
            in enumerate(zip(connect_us, sync_s, incremental_s, strict=True), start=1)]


def test_repeats_give_the_mean_its_t_interval_and_the_median() -> None:
    from analysis.scale import aggregate, frame

    points = aggregate(frame(synthetic_rows("vm", "iptables", 100, [10, 12, 20],
                                            [1, 2, 3], [0.5, 0.5, 0.5])))
    row = points.iloc[0]
    assert row["repeats"] == 3
    assert row["connect_median_us"] == pytest.approx(14.0)
    assert row["connect_median_us_median"] == 12.0
    # t(0.975, 2) = 4.303, sd = 5.292, sem = 3.055
    assert row["connect_median_us_low"] == pytest.approx(14.0 - 4.303 * 3.055, abs=0.01)
    assert row["sync_seconds_high"] == pytest.approx(2 + 4.303 / 3 ** 0.5, abs=0.01)
    assert row["incremental_seconds_low"] == row["incremental_seconds_high"] == 0.5
    once = aggregate(frame(synthetic_rows("host", "nftables", 10, [5], [1], [1]))).iloc[0]
    assert once["repeats"] == 1 and pd.isna(once["sync_seconds_low"])  # no interval


BASE = ([500, 510, 520], [8.0, 8.5, 9.0], [20.0, 21.0, 22.0])  # iptables in the VM


@pytest.mark.parametrize(("ipvs", "verdict", "said"), [
    (([300, 305, 310], [4.0, 4.2, 4.4], [10.0, 10.5, 11.0]), "CONFIRMED",
     "connect latency better, full sync better, incremental sync better"),
    (([300, 305, 310], [25.0, 26.0, 27.0], [10.0, 10.5, 11.0]), "REFUTED",
     "connect latency better, full sync worse, incremental sync better"),
    (([400, 510, 620], [4.0, 4.2, 4.4], [10.0, 10.5, 11.0]), "INCONCLUSIVE",
     "connect latency overlaps, full sync better"),
    (([700, 720, 740], [25.0, 26.0, 27.0], [40.0, 44.0, 48.0]), "REFUTED",
     "connect latency worse, full sync worse, incremental sync worse"),
])
def test_ipvs_is_judged_against_iptables_in_the_vm_at_the_largest_common_size(
        ipvs: tuple[list[float], ...], verdict: str, said: str) -> None:
    from analysis.scale import aggregate, frame, scale_verdict

    rows = [*synthetic_rows("vm", "iptables", 300, *BASE),
            *synthetic_rows("vm", "ipvs-rr", 300, *ipvs),
            # only iptables at 1,000 and only on the host at 3,000: neither is compared
            *synthetic_rows("vm", "iptables", 1000, [1, 1, 1], [99, 99, 99], [99, 99, 99]),
            *synthetic_rows("host", "iptables", 3000, [1, 1, 1], [99, 99, 99], [99, 99, 99]),
            *synthetic_rows("host", "ipvs-rr", 3000, [1, 1, 1], [1, 1, 1], [1, 1, 1])]
    points = aggregate(frame(rows))
    found, note = scale_verdict(points, "ipvs-rr")
    assert found == verdict
    assert note.startswith("against iptables in VM 6.1.0-57-amd64 (tcg) at 300 Services: ")
    assert said in note
    assert scale_verdict(points, "iptables")[0] is None
    assert scale_verdict(points, "nftables")[0] is None


def test_without_an_interval_or_a_common_size_the_verdict_is_inconclusive() -> None:
    from analysis.scale import aggregate, frame, scale_verdict

    once = aggregate(frame([*synthetic_rows("vm", "iptables", 300, [500], [9.0], [20.0]),
                            *synthetic_rows("vm", "ipvs-sh", 300, [100], [1.0], [1.0])]))
    verdict, note = scale_verdict(once, "ipvs-sh")
    assert verdict == "INCONCLUSIVE" and "connect latency no interval" in note
    apart = aggregate(frame([*synthetic_rows("vm", "iptables", 300, *BASE),
                             *synthetic_rows("vm", "ipvs-sh", 100, *BASE)]))
    verdict, note = scale_verdict(apart, "ipvs-sh")
    assert verdict == "INCONCLUSIVE" and "not both measured" in note
