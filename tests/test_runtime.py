"""The Ray runtime: equivalence with the in-process runner, faults, resume, MLflow, bad input."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from hfedmoe.actors.chaos import ChaosMonkey, random_faults
from hfedmoe.actors.executor import RayExecutor
from hfedmoe.actors.pools import PlacementError, plan_pools
from hfedmoe.cli import main
from hfedmoe.launch import launch
from hfedmoe.platform.budgets.drawing import draw_budgets
from hfedmoe.platform.callbacks import Checkpointer
from hfedmoe.platform.checkpoint import load_checkpoint, new_run_dir
from hfedmoe.platform.config import parse_config
from hfedmoe.platform.engine import run, sample_clients
from hfedmoe.platform.errors import InjectedFault
from hfedmoe.platform.executors import run_in_process
from hfedmoe.platform.records import BatchRouting
from hfedmoe.platform.strategies import Strategy, register
from hfedmoe.tracking.mlflow_run import default_tracking_uri

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]

# configs/tiny.yaml: a tiny random-init Qwen3-MoE, 8 clients, 4 per round, two tiers.
TINY = {
    **yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text()),
    "runtime": {"client_timeout_s": 120},
}


def tiny(tmp_path: Path, **sections) -> object:
    raw = {**TINY, "output_dir": str(tmp_path)}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_config(raw)


def run_simulation(cfg):
    run = run_in_process(cfg)
    return run.history, run.state


def assert_same_run(a_history, a_state, b_history, b_state):
    assert [r.deterministic() for r in a_history.rounds] == [
        r.deterministic() for r in b_history.rounds
    ]
    for layer_a, layer_b in zip(a_state.experts, b_state.experts, strict=True):
        for name in layer_a:
            np.testing.assert_array_equal(layer_a[name], layer_b[name])
    for group in ("shared", "gates"):
        for name, value in getattr(a_state, group).items():
            np.testing.assert_array_equal(value, getattr(b_state, group)[name])


def test_pool_plan_mirrors_budget_shapes():
    fractions = np.array([0.125] * 12 + [0.5] * 4 + [1.0] * 4)
    plans = {p.fraction: p for p in plan_pools(fractions, capacity=4.0, max_actors=100)}
    # 0.125: 60% of 4 CPUs = 2.4 -> 19 actors, capped at its 12 clients; 0.5: 0.8 -> 1;
    # 1.0: 0.8 -> at least 1. Then 12*0.125 + 0.5 + 1 = 3.0 <= 4 fits.
    assert {f: p.actors for f, p in plans.items()} == {0.125: 12, 0.5: 1, 1.0: 1}
    capped = plan_pools(fractions, capacity=4.0, max_actors=5)
    assert sum(p.actors for p in capped) == 5 and all(p.actors >= 1 for p in capped)
    with pytest.raises(PlacementError, match="cluster offers 1"):
        plan_pools(np.array([0.5, 1.0]), capacity=1.0, max_actors=10)


def test_every_ray_get_and_wait_has_a_timeout():
    # A task that never finishes (an actor that fits no bundle) must not hang the driver.
    calls = []
    for path in (REPO / "hfedmoe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "ray"
                and node.func.attr in ("get", "wait")
            ):
                calls.append((path.name, node.lineno, {k.arg for k in node.keywords}))
    assert calls, "no ray.get/ray.wait found: the scan is broken"
    assert [c for c in calls if "timeout" not in c[2]] == []


def test_ray_runner_equals_in_process_runner(ray_address, tmp_path):
    cfg = tiny(tmp_path, tracking={"enabled": False})
    expected_history, expected_state = run_simulation(cfg)
    result = launch(cfg, run_dir=tmp_path / "ray", progress=False)
    assert_same_run(expected_history, expected_state, result.history, result.state)
    assert result.history.rounds[-1].succeeded == 4


@pytest.mark.parametrize(
    "strategy, lora",
    [
        ("hfedmoe", {"lora": {"rank": 4, "aggregate": "product"}, "quantization": "nf4"}),
        ("flex", {"lora": {"rank": 4}}),  # no expert trains: head and attention adapters
    ],
)
def test_lora_runs_on_ray_equal_in_process(ray_address, tmp_path, strategy, lora):
    cfg = tiny(tmp_path, model=lora, federation={"strategy": strategy}, tracking={"enabled": False})
    expected_history, expected_state = run_simulation(cfg)
    result = launch(cfg, run_dir=tmp_path / "ray", progress=False)
    assert_same_run(expected_history, expected_state, result.history, result.state)
    assert set(result.state.experts[0]) == {"lora_A_in", "lora_B_in", "lora_A_out", "lora_B_out"}
    assert result.history.rounds[-1].succeeded == 4


# Budgets that bind: "weak" clients fit a single expert of the 8 a batch may route to,
# "broke" ones not even the frozen model (they fail OOM on every strategy).
BINDING_TIERS = {
    "distribution": "tiers",
    "tiers": [
        {"name": "weak", "proportion": 0.5, "memory_fraction": 0.0, "flops_per_s": 2e11},
        {"name": "strong", "proportion": 0.25, "memory_fraction": 1.5, "flops_per_s": 1e12},
        {"name": "broke", "proportion": 0.25, "memory_fraction": 0.05, "flops_per_s": 1e11},
    ],
}


def binding(tmp_path, federation=None, **sections):
    """tiny.yaml with BINDING_TIERS; the weak tier's fraction is derived from the footprint."""
    from hfedmoe.platform.budgets.cost import full_step_memory_bytes, step_memory_bytes
    from hfedmoe.platform.federation import build_federation

    fed, _ = build_federation(tiny(tmp_path))
    fp, batch = fed.footprint, fed.cfg.federation.batch_size
    weak = (step_memory_bytes(fp, 1, batch) + 1) / full_step_memory_bytes(fp, batch)
    tiers = [dict(t) for t in BINDING_TIERS["tiers"]]
    tiers[0]["memory_fraction"] = weak
    return tiny(
        tmp_path,
        budgets={**BINDING_TIERS, "tiers": tiers},
        federation={"rounds": 3, "clients_per_round": 6, **(federation or {})},
        **sections,
    )


def test_executors_are_bit_identical_where_budgets_bind(ray_address, tmp_path):
    cfg = binding(tmp_path, tracking={"enabled": False})
    expected_history, expected_state = run_simulation(cfg)
    result = launch(cfg, run_dir=tmp_path / "ray", progress=False)
    assert_same_run(expected_history, expected_state, result.history, result.state)
    # The setting exercises budgets: weak clients train 1 expert a step where batches route
    # to more (top-2 of 4 per layer), and broke clients run out of memory.
    weak = [c for c in result.history.clients if c.tier == "weak" and c.failure is None]
    assert weak and all(c.capacity == 1 and c.experts_per_step_max == 1 for c in weak)
    assert sum(r.failed_oom for r in result.history.rounds) > 0
    broke = [c for c in result.history.clients if c.tier == "broke"]
    assert broke and all(c.failure == "oom" for c in broke)


@register
class LowestRouted(Strategy):
    """A strategy added in a test module: train the lowest-numbered routed experts."""

    name = "test_lowest_routed"

    def expert_scores(self, routing: BatchRouting) -> torch.Tensor:
        layers, experts = routing.union.shape
        return -torch.arange(experts, dtype=torch.float32).expand(layers, experts)


def test_a_strategy_defined_in_a_test_module_runs_on_both_executors(ray_address, tmp_path):
    cfg = binding(
        tmp_path,
        federation={"strategy": "test_lowest_routed", "rounds": 2},
        tracking={"enabled": False},
    )
    expected_history, expected_state = run_simulation(cfg)
    result = launch(cfg, run_dir=tmp_path / "ray", progress=False)
    assert_same_run(expected_history, expected_state, result.history, result.state)
    assert result.history.rounds[-1].experts_updated > 0


def test_killed_client_actor_retries_only_its_lost_clients_on_a_replacement(ray_address, tmp_path):
    # 24 clients a round on one actor per shape: calls of 3 clients. The second client of
    # a call dies with its actor; the first, already streamed back, is kept.
    crowded = {"num_clients": 24, "clients_per_round": 24}
    cfg = tiny(tmp_path, tracking={"enabled": False}, federation=crowded)
    fractions = draw_budgets(cfg.budgets, 24, cfg.seed, 1.0).resource_fraction
    slow = [c for c in _sampled(cfg, 1) if fractions[c] < 1]
    call, victim = slow[:3], slow[1]
    crashing = tiny(
        tmp_path,
        tracking={"enabled": False},
        federation=crowded,
        faults={"crash": [[1, victim]]},
        runtime={"max_actors": 2},
    )
    executor = RayExecutor()
    result = run(crashing, executor, [], tmp_path / "crash")
    [event] = executor.events
    assert event.kind == "client_actor_died"
    assert event.kept == (call[0],) and event.retried == (victim, call[2])
    assert event.new_pid != event.old_pid and event.given_up == ()
    # Nothing is lost and the results are those of a run without the fault.
    expected_history, expected_state = run_simulation(cfg)
    assert_same_run(expected_history, expected_state, result.history, result.state)

    # Out of retries, the client is reported lost and the round goes on without it.
    victim = _sampled(tiny(tmp_path), 1)[1]
    no_retry = tiny(
        tmp_path,
        tracking={"enabled": False},
        faults={"crash": [[1, victim]]},
        runtime={"retries": 0},
    )
    lost = launch(no_retry, run_dir=tmp_path / "lost", progress=False)
    assert lost.history.rounds[1].failed_lost == 1
    assert lost.history.rounds[1].succeeded == 3
    record = next(c for c in lost.history.clients if c.round == 1 and c.client == victim)
    assert record.failure == "lost"


def test_dead_aggregator_is_replaced_and_its_round_rerun(ray_address, tmp_path):
    """With hfedmoe + SCAFFOLD + FedAdam: the driver's server state (moments, c) and the
    clients' variates survive the replacement, and the run equals the in-process one."""
    composed = {"rounds": 3, "client_update": "scaffold", "server_update": "fedadam"}
    cfg = tiny(tmp_path, tracking={"enabled": False}, federation=composed)
    crashing = tiny(
        tmp_path,
        tracking={"enabled": False},
        federation=composed,
        faults={"aggregator_crash": [1]},
    )
    executor = RayExecutor()
    result = run(crashing, executor, [], tmp_path / "aggregator")
    [event] = executor.events
    assert event.kind == "aggregator_died" and event.new_pid != event.old_pid
    assert sorted(event.retried) == sorted(_sampled(cfg, 1))
    expected = run_in_process(cfg)
    assert_same_run(expected.history, expected.state, result.history, result.state)
    assert expected.server_state.keys() == result.server_state.keys()
    for name, value in expected.server_state.items():
        np.testing.assert_array_equal(value, result.server_state[name])
    assert expected.variates.keys() == result.variates.keys()
    for client, variates in expected.variates.items():
        for key, value in variates.items():
            np.testing.assert_array_equal(value, result.variates[client][key])


def test_a_plugin_file_runs_on_ray_as_in_process(ray_address, tmp_path):
    """A --plugin file's strategy and server update travel to the actors by value."""
    from test_optimisation import forget_plugin, write_plugin

    from hfedmoe.platform.plugins import load_plugins

    plugin = write_plugin(tmp_path)
    forget_plugin(plugin)
    try:
        load_plugins([str(plugin)])
        federation = {"strategy": "plugin_lowest_first", "server_update": "plugin_half_step"}
        cfg = tiny(tmp_path, federation=federation, tracking={"enabled": False})
        expected_history, expected_state = run_simulation(cfg)
        result = launch(cfg, run_dir=tmp_path / "ray", progress=False)
        assert_same_run(expected_history, expected_state, result.history, result.state)
        assert result.history.rounds[-1].experts_updated > 0
    finally:
        forget_plugin(plugin)


def test_a_run_under_chaos_ends_where_the_fault_free_run_ends(ray_address, tmp_path):
    """Random actor kills and stalls, crashed, stalled and lost-aggregator rounds, a failed
    driver and a resume: the same final weights and deterministic metrics as without."""
    federation = {"rounds": 5, "num_clients": 12, "clients_per_round": 6}
    cfg = tiny(tmp_path, tracking={"enabled": False}, federation=federation)
    faults = random_faults(cfg, seed=5, crashes=2, hangs=1, aggregator_crashes=1)
    chaotic = tiny(
        tmp_path,
        tracking={"enabled": False},
        federation=federation,
        faults={**faults, "driver_crash": 2},  # after round 2's checkpoint
        runtime={"retries": 10, "client_timeout_s": 8},
    )
    run_dir = new_run_dir(chaotic, tmp_path / "chaos")
    first, second = RayExecutor(), RayExecutor()
    with (
        ChaosMonkey(first, seed=1, mean_interval_s=1.0, max_strikes=3) as monkey_1,
        pytest.raises(InjectedFault, match="driver fails after round 2"),
    ):
        run(chaotic, first, [Checkpointer()], run_dir)
    with ChaosMonkey(second, seed=2, mean_interval_s=1.0, max_strikes=3) as monkey_2:
        result = run(chaotic, second, [Checkpointer()], run_dir, resume=True)

    expected_history, expected_state = run_simulation(cfg)
    assert_same_run(expected_history, expected_state, result.history, result.state)
    # The injected crash and lost aggregator always leave their kind of event (a monkey
    # kill that pre-empts one leaves the same kind); a stall can be pre-empted by a kill.
    events = first.events + second.events
    assert {"client_actor_died", "aggregator_died"} <= {e.kind for e in events}
    assert monkey_1.strikes + monkey_2.strikes  # it struck at least once (P ~ 1 - e^-10)
    assert all(e.given_up == () and e.new_pid != e.old_pid for e in events)


def test_stalled_client_is_timed_out_retried_and_its_actor_replaced(ray_address, tmp_path):
    cfg = tiny(tmp_path, tracking={"enabled": False})
    victim = _sampled(cfg, 0)[0]
    stalling = tiny(
        tmp_path,
        tracking={"enabled": False},
        faults={"hang": [[0, victim]]},
        runtime={"client_timeout_s": 15},
    )
    result = launch(stalling, run_dir=tmp_path / "hang", progress=False)
    # The stalled client's actor was killed at its time limit, the client (and the one
    # queued behind it on that actor) rerun elsewhere: nothing lost, results unchanged.
    assert result.history.rounds[0].wall_seconds > 15
    expected_history, expected_state = run_simulation(cfg)
    assert_same_run(expected_history, expected_state, result.history, result.state)


def _sampled(cfg, round_index):
    fed = cfg.federation
    return sample_clients(fed.num_clients, fed.clients_per_round, cfg.seed, round_index)


def test_non_finite_update_is_rejected_and_counted(ray_address, tmp_path):
    victim = _sampled(tiny(tmp_path), 0)[2]
    cfg = tiny(tmp_path, tracking={"enabled": False}, faults={"corrupt": [[0, victim]]})
    result = launch(cfg, run_dir=tmp_path / "nan", progress=False)
    assert result.history.rounds[0].failed_non_finite == 1
    assert result.history.rounds[0].succeeded == 3
    for arrays in (result.state.shared, result.state.gates, *result.state.experts):
        assert all(np.isfinite(a).all() for a in arrays.values())
    # The global model is exactly what the three good updates make, as in one process.
    expected_history, expected_state = run_simulation(cfg)
    assert_same_run(expected_history, expected_state, result.history, result.state)


@pytest.mark.parametrize("executor", ["ray", "in_process"])
def test_killed_driver_resumes_to_the_uninterrupted_result(ray_address, tmp_path, executor):
    """Ray: the driver dies (SIGKILL). In process: SIGTERM, and MLflow records KILLED."""
    in_process = executor == "in_process"
    cfg = tiny(tmp_path, federation={"rounds": 3}, tracking={"enabled": in_process})
    config_file = tmp_path / "resume.yaml"
    raw = cfg.model_dump(mode="json")
    raw["runtime"]["address"] = ray_address
    config_file.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "hfedmoe.cli", "run", str(config_file),
               "--run-dir", str(run_dir), "--no-progress"]  # fmt: skip
    command += ["--in-process"] if in_process else []
    driver = subprocess.Popen(
        command, start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    latest = run_dir / "checkpoints" / "LATEST"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if latest.is_file() and latest.read_text().strip() == "round-00000":
            break
        time.sleep(0.05)
    assert driver.poll() is None, "the driver finished before it could be killed"
    # The driver and nothing else: its own session.
    os.killpg(driver.pid, signal.SIGTERM if in_process else signal.SIGKILL)
    driver.wait(timeout=60)
    assert latest.read_text().strip() in ("round-00000", "round-00001")
    done = load_checkpoint(run_dir).history.rounds
    if in_process:
        client = MlflowClient(default_tracking_uri(run_dir))
        [killed] = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert killed.info.status == "KILLED"

    resumed = launch(resume=run_dir, progress=False, in_process=in_process)
    # The checkpointed rounds come back as they were (a rerun would re-measure their time).
    kept = resumed.history.rounds[: len(done)]
    assert [r.wall_seconds for r in kept] == [r.wall_seconds for r in done]
    if in_process:  # the same MLflow run continued and finished
        [finished] = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert finished.info.run_id == killed.info.run_id
        assert finished.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(finished.info.run_id, "accuracy")]
        assert sorted(set(steps)) == [0, 1, 2]
    whole = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    uninterrupted = launch(whole, run_dir=tmp_path / "whole", progress=False)
    assert_same_run(uninterrupted.history, uninterrupted.state, resumed.history, resumed.state)


def test_cli_run_on_the_default_config_logs_a_complete_mlflow_run(ray_address, tmp_path, capsys):
    run_dir = tmp_path / "default"
    code = main(
        [
            "run",
            str(REPO / "configs" / "default.yaml"),
            "--run-dir", str(run_dir),
            "--no-progress",
            "--set", "federation.rounds=2",
            "--set", "federation.clients_per_round=2",
            "--set", "federation.max_local_steps=2",
            "--set", "data.max_test_samples=48",
        ]
    )  # fmt: skip
    assert code == 0
    assert "final accuracy" in capsys.readouterr().out
    client = MlflowClient(default_tracking_uri(run_dir))
    [experiment] = [e for e in client.search_experiments() if e.name == "hfedmoe"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["federation.strategy"] == "hfedmoe"
    assert run.data.params["model.kind"] == "upcycled"
    assert run.data.params["federation.rounds"] == "2"
    accuracy = client.get_metric_history(run.info.run_id, "accuracy")
    assert sorted(m.step for m in accuracy) == [0, 1]
    assert all(0.0 <= m.value <= 1.0 for m in accuracy)
    assert "final_accuracy" in run.data.metrics and "client_failures" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "config.yaml",
        "learning_curves.png",
        "expert_usage.png",
        "expert_usage_by_group.png",
        "selected_vs_budget.png",
        "rounds.json",
        "split.json",
        "budgets.json",
    } <= artifacts


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("budgets.tiers=[{name: a, proportion: 1.0, memory_fraction: -1, flops_per_s: 1}]",
         "memory_fraction"),
        ("hfedmoe.tau=1.5", "hfedmoe.tau"),
        ("federation.clients_per_round=50", "clients_per_round"),
        ("model.kind=gpt5", "model.kind"),
        ("federation.strategy=fedprox", "federation.strategy"),
        ("budgets.tiers=[{name: a, proportion: 1.0, device: jetson_nano_typo}]",
         "jetson_nano_typo"),
        ("faults.crash=[[0, 99999]]", "faults.crash"),
    ],
)  # fmt: skip
def test_bad_configs_fail_before_anything_starts(tmp_path, capsys, override, message):
    code = main(["run", str(REPO / "configs" / "default.yaml"), "--set", override,
                 "--run-dir", str(tmp_path / "bad")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "bad").exists()


def test_missing_data_path_names_the_field(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(["run", str(REPO / "configs" / "default.yaml"), "--set", "data.source=ag_news",
                 "--set", f"data.path={missing}", "--run-dir", str(tmp_path / "r")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "data.path" in err and "does not exist" in err
