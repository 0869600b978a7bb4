"""Properties of the simulator, each against an expectation computed independently."""

from __future__ import annotations

import gc
import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kpbench.addresses import dotted
from kpbench.backends.base import CellResult
from kpbench.backends.sim import SimBackend, Simulation
from kpbench.config import expand_cells, validate


def make_simulation(mode: str, seed: int = 1, **overrides: Any) -> Simulation:
    """A one-cell simulation; `a__b=v` sets the config key a.b."""
    raw: dict[str, Any] = {"name": "t", "modes": [mode], "seeds": [seed]}
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    (cell,) = expand_cells(validate(raw))
    return Simulation(cell)


def simulate(mode: str, seed: int = 1, **overrides: Any) -> CellResult:
    return make_simulation(mode, seed, **overrides).run(lambda t: None)


def end_counts(result: CellResult) -> pd.Series:
    samples = result.samples
    last = samples[samples["t"] == samples["t"].max()]
    serving = last[last["ready"] & ~last["terminating"]]
    return serving.set_index("pod")["active_connections"].sort_index()


def test_iptables_spreads_like_a_uniform_multinomial() -> None:
    pods, connections, seeds = 6, 60, 40
    statistic = 0.0
    for seed in range(1, seeds + 1):
        counts = end_counts(simulate("iptables", seed, duration_seconds=30,
                                     backend__replicas=pods, workload__connections=connections))
        assert counts.sum() == connections
        expected = connections / pods
        statistic += float(((counts - expected) ** 2 / expected).sum())
    # Pearson's statistic summed over independent seeds is chi-square with seeds*(pods-1) d.o.f.
    p_value = stats.chi2.sf(statistic, seeds * (pods - 1))
    assert 0.001 < p_value < 0.999, (statistic, p_value)


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_random_modes_are_not_balanced_with_few_connections(mode: str) -> None:
    spreads = [end_counts(simulate(mode, seed, duration_seconds=30, workload__connections=12))
               for seed in range(1, 11)]
    assert max(int(c.max()) for c in spreads) >= 4  # 2 per pod on average


def test_ipvs_rr_on_one_node_without_churn_balances_exactly() -> None:
    counts = end_counts(simulate("ipvs-rr", cluster__nodes=1, workload__clients=1,
                                 duration_seconds=30, workload__connections=120))
    assert counts.tolist() == [20] * 6


def test_ipvs_sh_with_one_client_pod_uses_one_pod_per_node() -> None:
    result = simulate("ipvs-sh", cluster__nodes=3, workload__clients=3, duration_seconds=30,
                      workload__connections=90)
    connections = result.connections
    assert connections.groupby("client", observed=True)["pod"].nunique().eq(1).all()
    counts = end_counts(result)  # each client pod's 30 on one pod; two may hash to the same
    assert (counts % 30 == 0).all() and counts.sum() == 90 and (counts > 0).sum() <= 3


def test_ipvs_lc_balances_per_node_but_not_across_nodes() -> None:
    # 4 connections per node over 6 pods: each node's lc balances its own (max - min <= 1),
    # but every node breaks ties towards the same pods, which a global lc would not.
    result = simulate("ipvs-lc", cluster__nodes=3, workload__clients=3, duration_seconds=30,
                      workload__connections=12)
    open_at_end = result.connections[result.connections["close_reason"] == "end"]
    per_node = open_at_end.groupby(["node", "pod"], observed=True).size().unstack(fill_value=0)
    per_node = per_node.reindex(columns=end_counts(result).index, fill_value=0)
    assert (per_node.max(axis=1) - per_node.min(axis=1)).max() <= 1
    total = per_node.sum()
    assert total.max() - total.min() >= 2  # a global least-connection would give <= 1


def test_rollout_under_iptables_leaves_earlier_ready_pods_holding_more() -> None:
    rhos = []
    for seed in range(1, 9):
        result = simulate("iptables", seed, duration_seconds=180,
                          events=[{"at": 60, "action": "rollout"}])
        ready = result.events[result.events["event"] == "pod_ready"].groupby("pod")["t"].max()
        counts = end_counts(result)
        rhos.append(stats.spearmanr(ready.reindex(counts.index), counts).statistic)
    assert np.mean(rhos) < -0.3, rhos


def hpa_scale_out(reconnect: dict[str, Any]) -> float:
    result = simulate(
        "iptables", duration_seconds=300, backend__replicas=3,
        backend__cpu_per_request_millicores=1.0,
        backend__hpa={"min_replicas": 3, "max_replicas": 12, "target_cpu_utilization": 50},
        workload__reconnect=reconnect,
        events=[{"at": 30, "action": "load", "requests_per_second": 4}],
    )
    assert (result.events["event"] == "hpa_desired").any()
    last = result.samples[result.samples["t"] == result.samples["t"].max()]
    serving = last[last["ready"] & ~last["terminating"]]
    new = serving["created_at"] > 30
    assert new.sum() >= 3, "the HPA should have added pods"
    share = serving.loc[new, "active_connections"].sum() / serving["active_connections"].sum()
    return float(share / new.mean())


def test_hpa_scale_out_without_reconnects_leaves_new_pods_idle() -> None:
    assert hpa_scale_out({"policy": "none"}) < 0.05


def test_hpa_scale_out_with_periodic_reconnects_approaches_a_fair_share() -> None:
    assert hpa_scale_out({"policy": "periodic", "seconds": 30}) > 0.75


def test_same_seed_same_results_and_other_seed_differs() -> None:
    kwargs = {"duration_seconds": 120, "events": [{"at": 40, "action": "rollout"}],
              "workload__lifetime": {"distribution": "exponential", "mean_seconds": 30}}
    first, second = simulate("ipvs-rr", 3, **kwargs), simulate("ipvs-rr", 3, **kwargs)
    pd.testing.assert_frame_equal(first.samples, second.samples)
    pd.testing.assert_frame_equal(first.events, second.events)
    pd.testing.assert_frame_equal(first.connections, second.connections)
    other = simulate("ipvs-rr", 4, **kwargs)
    assert not other.connections["closed_at"].equals(first.connections["closed_at"])


@pytest.mark.parametrize(("replicas", "surge", "unavailable"),
                         [(6, "25%", "25%"), (10, 3, 0), (4, 0, 1), (12, "50%", "10%")])
def test_rollouts_respect_max_surge_and_max_unavailable(
    replicas: int, surge: int | str, unavailable: int | str
) -> None:
    result = simulate("iptables", duration_seconds=200, backend__replicas=replicas,
                      backend__rollout={"max_surge": surge, "max_unavailable": unavailable},
                      events=[{"at": 20, "action": "rollout"}])
    # Kubernetes: maxSurge rounds up, maxUnavailable rounds down (computed here by hand).
    limits = {(6, "25%", "25%"): (2, 1), (10, 3, 0): (3, 0), (4, 0, 1): (0, 1),
              (12, "50%", "10%"): (6, 1)}
    max_surge, max_unavailable = limits[(replicas, surge, unavailable)]
    live, ready = set(), set()
    events = result.events
    for t, group in events.groupby("t", sort=True):
        for event, pod in zip(group["event"], group["pod"], strict=True):
            if event == "pod_created":
                live.add(pod)
            elif event == "pod_ready":
                ready.add(pod)
            elif event in ("pod_terminating", "pod_killed"):
                live.discard(pod)
                ready.discard(pod)
        assert len(live) <= replicas + max_surge, t
        if t > 0:
            assert len(ready) >= replicas - max_unavailable, t
    revisions = {p.split("-")[1] for p in ready}
    assert revisions == {"2"} and len(ready) == replicas, "the rollout should complete"


def test_sh_refuses_connections_of_clients_hashed_to_a_terminating_pod() -> None:
    result = simulate("ipvs-sh", duration_seconds=120, workload__clients=12,
                      events=[{"at": 30, "action": "rollout"}])
    failed = result.events[result.events["event"] == "connection_failed"]
    assert (failed["detail"].str.contains("refused by data plane")).any()


def test_refused_clients_hear_of_it_only_as_the_icmp_rate_limit_allows() -> None:
    # The only pod is killed at 10 s and its replacement is ready about 40 s later: meanwhile
    # the node REJECTs every connect of the one client pod's 5 users.
    result = simulate("iptables", duration_seconds=90, cluster__nodes=1, backend__replicas=1,
                      backend__startup_seconds=40, workload__clients=1, workload__connections=5,
                      events=[{"at": 10, "action": "kill-pod"}])
    ready = result.events[result.events["event"] == "pod_ready"]["t"].max()
    failed = result.events[result.events["event"] == "connection_failed"]
    counts = failed["detail"].map(json.loads).map(lambda d: (d["reason"], d["count"]))
    refused = sum(n for reason, n in counts if reason == "refused by data plane")
    timed_out = sum(n for reason, n in counts if reason.startswith("timed out"))
    window = ready - 10
    assert 6 + window - 2 <= refused <= 6 + window + 1  # a burst of 6, then one per second
    # the other 4 users time out once per connect timeout (10 s) each
    assert 4 * (window // 10) - 1 <= timed_out <= 5 * (window // 10 + 1)
    # a connect whose last SYN went out before the endpoint was synced still times out
    assert failed["t"].max() <= ready + 10 and len(end_counts(result)) == 1


def test_l7_proxy_balances_requests_per_pod() -> None:
    result = simulate("iptables", duration_seconds=120, workload__proxy="l7",
                      workload__connections=12)
    last = result.samples[result.samples["t"] == 120]
    rates = last["requests_total"] - result.samples[result.samples["t"] == 60][
        "requests_total"].to_numpy()
    assert rates.max() / rates.mean() < 1.05
    # without the proxy, 12 random connections over 6 pods are far from even
    direct = simulate("iptables", duration_seconds=120, workload__connections=12)
    assert end_counts(direct).max() / end_counts(direct).mean() > 1.3


def test_l7_proxy_connections_are_each_logged_and_reconnect() -> None:
    result = simulate("iptables", duration_seconds=60, workload__proxy="l7",
                      workload__connections=30,
                      workload__reconnect={"policy": "periodic", "seconds": 20})
    connections = result.connections
    assert set(connections["pod"]) == {"l7-proxy-0", "l7-proxy-1"}
    ends = connections[connections["close_reason"] == "end"]
    assert len(ends) == 30 and ends["pod"].value_counts().to_dict() == {
        "l7-proxy-0": 15, "l7-proxy-1": 15}
    assert (connections["close_reason"] == "reconnect").sum() >= 30


def test_max_connection_age_closes_connections() -> None:
    result = simulate("iptables", duration_seconds=100, backend__max_connection_age_seconds=20)
    closed = result.connections[result.connections["close_reason"] == "max-age"]
    assert len(closed) > 0
    ages = closed["closed_at"] - closed["opened_at"]
    assert np.allclose(ages, 20)


def test_kill_pod_resets_its_connections_and_is_replaced() -> None:
    result = simulate("iptables", duration_seconds=60, events=[{"at": 20, "action": "kill-pod"}])
    assert (result.connections["close_reason"] == "reset").sum() > 0
    assert (result.events["event"] == "pod_killed").sum() == 1
    assert len(end_counts(result)) == 6


def run_simulation(mode: str, seed: int = 1, **overrides: Any) -> Simulation:
    simulation = make_simulation(mode, seed, **overrides)
    simulation.run(lambda t: None)
    return simulation


def test_each_node_adds_new_ipvs_real_servers_in_its_own_order() -> None:
    simulation = run_simulation("ipvs-rr", cluster__nodes=4, duration_seconds=60,
                                workload__connections=0)
    orders = [selector.list_order() for selector in simulation.selectors]  # type: ignore[attr-defined]
    assert all(sorted(order) == sorted(orders[0]) for order in orders)
    assert len({tuple(order) for order in orders}) > 1


def test_pods_of_one_surge_batch_become_ready_at_different_times() -> None:
    result = simulate("iptables", duration_seconds=40, workload__connections=12,
                      backend__replicas=6, backend__rollout={"max_surge": 6, "max_unavailable": 0},
                      events=[{"at": 5, "action": "rollout"}])
    events = result.events
    created = events[(events["event"] == "pod_created") & (events["t"] >= 5)]
    assert len(created) == 6 and created["t"].nunique() == 1  # one batch
    ready = events[(events["event"] == "pod_ready") & events["pod"].isin(created["pod"])]
    assert len(ready) == 6 and ready["t"].nunique() == 6
    startup = 5.0 + 5.0  # created at 5 s, server process starts 5 s later
    assert ready["t"].min() >= startup and ready["t"].max() < startup + 5.0


def test_each_node_sees_an_endpoint_change_at_its_own_time() -> None:
    simulation = run_simulation("iptables", cluster__nodes=5, duration_seconds=30,
                                workload__connections=0, events=[{"at": 5, "action": "scale",
                                                                  "replicas": 7}])
    fanout = simulation.fanout
    assert fanout is not None and all(view == fanout.views[0] for view in fanout.views)
    runners = [runner.last_completion for runner in fanout.runners]
    assert len(set(runners)) == 5 and all(10.0 < t < 15.0 for t in runners)


def test_hpa_waits_for_metrics_server_windows_before_scaling() -> None:
    result = simulate("iptables", duration_seconds=240, sample_seconds=5.0, cluster__nodes=3,
                      backend__replicas=3, backend__cpu_per_request_millicores=1.0,
                      backend__hpa={"min_replicas": 3, "max_replicas": 12,
                                    "target_cpu_utilization": 50},
                      workload__connections=120,
                      events=[{"at": 60, "action": "load", "requests_per_second": 3}])
    scaled = result.events[result.events["event"] == "hpa_desired"]
    assert len(scaled)
    # the step at 60 s is seen in a full 15 s window only from the scrape after 75 s at best
    first = float(scaled["t"].iloc[0])
    assert 60.0 < first <= 120.0
    detail = pd.Series(scaled["detail"].iloc[0]).str.extract(r'"utilization": (\d+)')[0]
    assert detail.notna().all()  # whole percents


def test_pods_and_clients_get_addresses_in_creation_order_per_node() -> None:
    """As host-local IPAM and the lab: .2 up per node, proxies, initial pods, then clients."""
    for proxy, first_client in (("none", 4), ("l7", 5)):
        cell = expand_cells(validate({
            "name": "addresses", "modes": ["ipvs-sh"], "seeds": 1, "duration_seconds": 2,
            "cluster": {"nodes": 2}, "backend": {"replicas": 4},
            "workload": {"clients": 4, "connections": 8, "proxy": proxy}}))[0]
        simulation = Simulation(cell)
        simulation.run(lambda t: None)
        assert [dotted(a) for a in simulation.client_address] == [
            f"198.18.0.{first_client}", f"198.18.1.{first_client}",
            f"198.18.0.{first_client + 1}", f"198.18.1.{first_client + 1}"]
        initial = sorted(dotted(a) for a in simulation.pod_address[:4])
        assert initial == sorted(f"198.18.{n}.{h}" for n in (0, 1)
                                 for h in (first_client - 2, first_client - 1))


@pytest.mark.parametrize(("connections", "events"), [
    (10, [{"at": 0, "action": "load", "connections": 30}]),  # runs before the first ramp batch
    (3000, [{"at": 1, "action": "load", "connections": 5000}]),  # a ramp while one is going on
])
def test_ramps_that_overlap_open_every_user_once_and_never_in_the_past(
        connections: int, events: list[dict[str, Any]]) -> None:
    result = simulate("iptables", duration_seconds=20, workload__connections=connections,
                      workload__ramp_seconds=4, events=events)
    connections_frame = result.connections
    assert connections_frame["opened_at"].min() >= 0.0
    assert connections_frame["conn_id"].nunique() == len(connections_frame)
    assert end_counts(result).sum() == events[0]["connections"]
    assert connections_frame.groupby("opened_at").size().max() <= connections


def test_a_cell_runs_with_cyclic_gc_paused_and_restores_it_even_when_stopped() -> None:
    (cell,) = expand_cells(validate({"name": "t", "modes": ["ipvs-lc"], "seeds": [1],
                                     "duration_seconds": 10}))
    seen: list[bool] = []
    SimBackend().run_cell(cell, lambda t: seen.append(gc.isenabled()))
    assert seen and not any(seen) and gc.isenabled()

    def interrupt(t: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        SimBackend().run_cell(cell, interrupt)
    assert gc.isenabled()
