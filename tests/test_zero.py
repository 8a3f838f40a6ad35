"""The opt-in DeepSpeed ZeRO client engine, on CPU with a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from hfedmoe.launch import launch
from hfedmoe.platform.budgets.cost import full_step_memory_bytes, step_memory_bytes
from hfedmoe.platform.budgets.drawing import Budget
from hfedmoe.platform.client import LocalTrainer
from hfedmoe.platform.config import ConfigError, TierConfig, parse_config
from hfedmoe.platform.executors import run_in_process
from hfedmoe.platform.federation import build_federation
from hfedmoe.platform.zero import DeepSpeedTrainer

MODEL = yaml.safe_load((Path(__file__).parents[1] / "configs" / "tiny.yaml").read_text())["model"]
AMPLE = {"name": "all", "proportion": 1.0, "memory_fraction": 2.0, "flops_per_s": 1e11}


def run_simulation(cfg):
    run = run_in_process(cfg)
    return run.history, run.state


def config(**federation):
    fed = {
        "strategy": "fedavg_full",
        "rounds": 1,
        "num_clients": 4,
        "clients_per_round": 2,
        "max_local_steps": 2,
        "batch_size": 4,
        "lr": 1e-3,
        **federation,
    }
    return parse_config(
        {
            "seed": 5,
            "threads": 1,
            "data": {"max_length": 24, "max_test_samples": 24},
            "model": MODEL,
            "federation": fed,
            "budgets": {"distribution": "tiers", "tiers": [AMPLE]},
            "tracking": {"enabled": False},
        }
    )


def test_deepspeed_engine_rejects_per_batch_expert_selection():
    with pytest.raises(
        ConfigError, match="engine=deepspeed supports fedavg_full, flex, not hfedmoe"
    ):
        parse_config({"federation": {"engine": "deepspeed", "strategy": "hfedmoe"}})


def test_offload_moves_training_state_off_the_device():
    fed, _ = build_federation(config())
    fp = fed.footprint
    full = [step_memory_bytes(fp, fp.num_experts_total, 4, stage) for stage in (0, 1, 2, 3)]
    assert full[0] == full_step_memory_bytes(fp, 4)
    assert full[0] > full[1] > full[2] > full[3]
    trained = fp.shared_trainable_params + fp.num_experts_total * fp.params_per_expert
    assert full[0] - full[1] == pytest.approx(2 * trained * 4)  # AdamW moments
    assert full[1] - full[2] == pytest.approx(trained * 4)  # gradients


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_update_matches_the_torch_engine(stage):
    cfg = config(engine="deepspeed", zero_stage=stage)
    fed, adapter = build_federation(cfg)
    budget = Budget("all", "synthetic", 1e12, 1e11, 1e7, 1e7, None, 1.0)
    global_state = adapter.state()
    client, shard = 1, fed.shards[1]
    reference, ref_report = LocalTrainer(adapter, fed.train, fed.footprint, cfg).train(
        client, shard, budget, 0, global_state.num_bytes()
    )
    adapter.load_state(global_state)
    zero, zero_report = DeepSpeedTrainer(adapter, fed.train, fed.footprint, cfg).train(
        client, shard, budget, 0, global_state.num_bytes()
    )
    assert zero is not None and zero_report.steps == ref_report.steps == 2
    assert zero_report.loss == pytest.approx(ref_report.loss, rel=1e-5)
    assert zero_report.flops == ref_report.flops
    # Compare what each engine changed (the update), not the weights: the two differ in
    # kernels (ZeRO-3's own linear), reduction order and Adam's arithmetic (DeepSpeed's
    # CPU Adam), so gradients differ by a few fp32 ulps of the terms they sum. Adam divides
    # by sqrt(v) + eps, whose sensitivity to g is at most 1/(4 eps): an element whose
    # gradient sits near eps can move by up to a quarter of lr per step more or less
    # (bound 1), while such elements are rare, so the update as a whole agrees to 1%
    # (bound 2). Both bounds follow from Adam, none from one machine's luck.
    lr, steps = cfg.federation.lr, ref_report.steps
    pairs = [(zero.shared[n], v, global_state.shared[n]) for n, v in reference.shared.items()]
    experts = zip(zero.experts, reference.experts, global_state.experts, strict=True)
    for ours, theirs, layer in experts:
        np.testing.assert_array_equal(ours["index"], theirs["index"])
        pairs += [(ours[n], theirs[n], layer[n][theirs["index"]]) for n in theirs if n != "index"]
    moved = 0.0
    for ours, theirs, initial in pairs:
        ours_step, their_step = ours - initial, theirs - initial
        difference = np.abs(ours_step.astype(np.float64) - their_step)
        assert difference.max() <= steps * lr / 4
        norm = float(np.linalg.norm(their_step))
        assert float(np.linalg.norm(difference)) <= 1e-2 * norm + 1e-12
        moved = max(moved, float(np.abs(their_step).max()))
    assert moved > lr / 2  # the comparison is of trained weights, not of two copies


def with_tiers(cfg, *tiers):
    tiers = [TierConfig(**t) for t in tiers]
    return cfg.model_copy(update={"budgets": cfg.budgets.model_copy(update={"tiers": tiers})})


def test_offload_lets_full_fine_tuning_fit_where_the_torch_engine_fails():
    fed, _ = build_federation(config())
    fp = fed.footprint
    full = full_step_memory_bytes(fp, 4)
    # Between the ZeRO-2 step and the torch step: only offloading fits it.
    cap = (step_memory_bytes(fp, fp.num_experts_total, 4, 2) + full) / 2
    small = {**AMPLE, "name": "small", "memory_fraction": cap / full}
    torch_run, _ = run_simulation(with_tiers(config(), small))
    zero_run, _ = run_simulation(with_tiers(config(engine="deepspeed", zero_stage=2), small))
    assert torch_run.rounds[0].failed_oom == 2
    assert zero_run.rounds[0].failed_oom == 0 and zero_run.rounds[0].succeeded == 2


@pytest.mark.ray
def test_zero_clients_on_ray_each_own_a_world(ray_address, tmp_path):
    cfg = config(engine="deepspeed", zero_stage=2, rounds=2)
    cfg = with_tiers(cfg, {**AMPLE, "proportion": 0.5}, {**AMPLE, "name": "b", "proportion": 0.5,
                                                       "flops_per_s": 1e12})  # fmt: skip
    cfg = cfg.model_copy(update={"output_dir": str(tmp_path)})
    result = launch(cfg, run_dir=tmp_path / "zero", progress=False)
    expected, _ = run_simulation(cfg)
    assert [r.succeeded for r in result.history.rounds] == [2, 2]
    assert [r.train_loss for r in result.history.rounds] == pytest.approx(
        [r.train_loss for r in expected.rounds], rel=1e-5
    )
