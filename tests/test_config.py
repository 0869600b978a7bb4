"""The experiment config contract."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kpbench import config, scale
from kpbench.config import ConfigError, expand_cells, iter_keys, load, read_yaml, validate

from .conftest import EXPERIMENTS


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate(raw)
    return caught.value.problems


def test_sample_documents_every_key_with_the_defaults() -> None:
    text = (EXPERIMENTS / "_sample.yaml").read_text()
    documented = set(re.findall(r"([a-z_]+):", text))
    missing = {key.split(".")[-1] for key in iter_keys()} - documented
    assert not missing, f"_sample.yaml does not document {sorted(missing)}"
    sample = validate(yaml.safe_load(text))
    defaults = validate({"name": "sample"})
    assert sample == defaults


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("**/*.yaml")), ids=lambda p: p.name)
def test_shipped_experiments_validate(path: Path) -> None:
    if scale.is_scale_config(read_yaml(path)):  # `kpbench scale`, not cells
        assert scale.load(path).points("host")
        return
    assert expand_cells(load(path))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"workload": {"connections": -1}}, "workload.connections: must be >= 0"),
        ({"modes": ["iptables", "ipvs-xx"]}, "modes[1]: must be one of"),
        ({"workload": {"conections": 5}}, "workload.conections: unknown key (did you mean"),
        ({"duration_seconds": 100, "events": [{"at": 100, "action": "rollout"}]},
         "events[0].at: 100 is not before the end"),
        ({"workload": {"lifetime": {"distribution": "exponential", "mean_seconds": 0}}},
         "workload.lifetime.mean_seconds: must be > 0"),
        ({"workload": {"lifetime": {"distribution": "pareto", "mean_seconds": 5}}},
         "workload.lifetime.alpha: required when distribution is pareto"),
        ({"workload": {"reconnect": {"policy": "sometimes"}}},
         "workload.reconnect.policy: must be one of none, periodic or after-requests"),
        ({"workload": {"requests_per_second": -2}}, "workload.requests_per_second: must be > 0"),
        ({"events": [{"at": 5, "action": "scale"}]}, "events[0].replicas: required"),
        ({"backend": {"rollout": {"max_surge": "x"}}}, "backend.rollout.max_surge: must be"),
        ({"seeds": 0}, "seeds: must be >= 1"),
        ({"cluster": {"kube_proxy": {"min_sync_seconds": -1}}},
         "cluster.kube_proxy.min_sync_seconds: must be >= 0"),
        ({"cluster": {"kube_proxy": {"propagation_median_seconds": 0}}},
         "cluster.kube_proxy.propagation_median_seconds: must be > 0"),
        ({"cluster": {"node_cpu_millicores": 0}}, "cluster.node_cpu_millicores: must be > 0"),
        ({"backend": {"readiness_period_seconds": 0}},
         "backend.readiness_period_seconds: must be > 0"),
        ({"backend": {"server_cpu_per_request_millicores": -0.1}},
         "backend.server_cpu_per_request_millicores: must be >= 0"),
        ({"backend": {"hpa": {"max_replicas": 3, "metric_resolution_seconds": 0}}},
         "backend.hpa.metric_resolution_seconds: must be > 0"),
        ({"claims": [{"id": "c", "text": "t", "metric": "nope", "expect": "< 1"}]},
         "claims[0].metric: must be one of"),
    ],
)
def test_invalid_input_names_the_key(raw: dict, expected: str) -> None:
    problems = problems_of({"name": "x", **raw})
    assert any(p.startswith(expected) for p in problems), problems


def test_sweep_over_a_missing_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text("name: e\nsweep: {workload.conections: [1, 2]}\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.problems == ["sweep.workload.conections: no such key"]


def test_sweep_values_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text("name: e\nsweep: {workload.connections: [1, -2]}\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.problems[0].startswith("sweep.workload.connections=-2:")


def test_overrides_and_cells(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text("name: e\nmodes: [iptables, ipvs-rr]\n")
    experiment = load(path, ["seeds=[7, 11]", "sweep={workload.connections: [6, 60]}",
                             "backend.hpa={max_replicas: 9}"])
    assert experiment.seed_list == [7, 11]
    assert experiment.backend.hpa is not None and experiment.backend.hpa.max_replicas == 9
    cells = expand_cells(experiment)
    assert len(cells) == 2 * 2 * 2
    assert len({c.cell_id for c in cells}) == len(cells)
    assert {c.config.workload.connections for c in cells} == {6, 60}
    assert {c.cell_id for c in cells if c.mode == "iptables" and c.seed == 7} == {
        "iptables-connections6-s7", "iptables-connections60-s7"
    }


def test_command_line_changes_are_stated_in_the_description(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text("name: e\ndescription: 3 seeds of iptables.\nmodes: [iptables]\n")
    assert load(path).description == "3 seeds of iptables."
    described = load(path, ["modes=[nftables]"], seeds=10).description
    assert described == ("3 seeds of iptables.\n\nRun with --set modes=[nftables], --seeds 10 "
                         "(the text above describes the file).")
    bare = tmp_path / "bare.yaml"
    bare.write_text("name: e\n")
    assert load(bare, seeds=2).description == (
        "Run with --seeds 2 (the text above describes the file).")


@pytest.mark.parametrize("bad", ["novalue", "=3", "workload.connections=[1"])
def test_malformed_set(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "e.yaml"
    path.write_text("name: e\n")
    with pytest.raises(ConfigError) as caught:
        load(path, [bad])
    assert caught.value.problems[0].startswith("--set ")


def test_rollout_rounding_follows_kubernetes() -> None:
    rollout = config.Rollout()
    assert rollout.resolve(6) == (2, 1)  # 25% of 6 = 1.5: surge rounds up, unavailable down
    assert config.Rollout(max_surge=0, max_unavailable="10%").resolve(5) == (0, 1)  # fencepost


def test_schema_is_json_schema() -> None:
    schema = config.json_schema()
    json.dumps(schema)
    assert schema["additionalProperties"] is False
    assert {"workload", "backend", "events"} <= set(schema["properties"])


def test_sweeps_over_mappings_get_one_line_labels(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text("name: e\nmodes: [ipvs-rr]\nseeds: 1\nsweep:\n  workload.lifetime:\n"
                    "    - {distribution: pareto, mean_seconds: 60, alpha: 1.5}\n"
                    "    - {distribution: fixed, mean_seconds: 60}\n")
    cells = expand_cells(load(path))
    assert [c.config.workload.lifetime.distribution for c in cells] == ["pareto", "fixed"]
    labels = [config.sweep_value_label(c.params["workload.lifetime"]) for c in cells]
    assert labels == ["{distribution: pareto, mean_seconds: 60, alpha: 1.5}",
                      "{distribution: fixed, mean_seconds: 60}"]
    assert config.sweep_value_label(12) == 12
