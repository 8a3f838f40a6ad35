"""The in-process federation: learning on real data, modelled OOM, determinism, strategies."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import yaml

from hfedmoe.platform.budgets.cost import full_step_memory_bytes, step_memory_bytes
from hfedmoe.platform.config import parse_config
from hfedmoe.platform.engine import sample_clients
from hfedmoe.platform.executors import run_in_process
from hfedmoe.platform.federation import build_federation
from hfedmoe.platform.strategies import STRATEGIES


def run_simulation(cfg):
    run = run_in_process(cfg)
    return run.history, run.state


REPO = Path(__file__).resolve().parents[1]

TIGHT_TIERS = [
    # 0.55 of the full step leaves room for a few experts but not for all of them.
    {"name": "weak", "proportion": 0.5, "memory_fraction": 0.55, "flops_per_s": 2e11},
    {"name": "strong", "proportion": 0.5, "memory_fraction": 1.5, "flops_per_s": 1e12},
]
TINY_MODEL = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["model"]


@functools.cache
def weak_fraction(experts: int = 3, batch_size: int = 4) -> float:
    """A memory cap that fits exactly `experts` experts of the tiny model.

    In a tiny model the (frozen) word embeddings dominate memory, so a round fraction of
    the full step would not separate the strategies; derive it from the footprint.
    """
    fed, _ = build_federation(
        parse_config(
            {
                "data": {"max_length": 24},
                "model": TINY_MODEL,
                "federation": {"batch_size": batch_size},
            }
        )
    )
    fp = fed.footprint
    return (step_memory_bytes(fp, experts, batch_size) + 1) / full_step_memory_bytes(fp, batch_size)


def tiny_config(**federation):
    fed = {
        "strategy": "hfedmoe",
        "rounds": 2,
        "num_clients": 6,
        "clients_per_round": 4,
        "max_local_steps": 2,
        "batch_size": 4,
        "lr": 1e-3,
    }
    fed.update(federation)
    return parse_config(
        {
            "seed": 7,
            "data": {"max_length": 24, "max_test_samples": 40},
            "model": TINY_MODEL,
            "federation": fed,
            "hfedmoe": {"tau": 0.2},
            "budgets": {
                "distribution": "tiers",
                "tiers": [
                    {**TIGHT_TIERS[0], "memory_fraction": weak_fraction()},
                    TIGHT_TIERS[1],
                ],
            },
        }
    )


@pytest.mark.slow
def test_federation_learns_bbc_news():
    """Upcycled pretrained MiniLM, 5-class BBC News, Dirichlet label skew, mixed budgets."""
    cfg = parse_config(
        {
            "seed": 0,
            "data": {"max_length": 64, "max_test_samples": 200, "partition": {"alpha": 1.0}},
            "model": {"kind": "upcycled", "num_experts": 8, "top_k": 2},
            "federation": {
                "strategy": "hfedmoe",
                "rounds": 4,
                "num_clients": 10,
                "clients_per_round": 4,
                "max_local_steps": 4,
                "batch_size": 8,
                "lr": 1e-4,
                # The test reads only the final accuracy: evaluating the last round alone
                # (eval leaves training untouched) saves three passes over the test set.
                "eval_every": 4,
            },
            "hfedmoe": {"tau": 0.1},
            "budgets": {"distribution": "tiers", "tiers": TIGHT_TIERS},
        }
    )
    history, _ = run_simulation(cfg)
    accuracy = history.final_accuracy()
    assert accuracy > 0.6, f"accuracy {accuracy:.3f} after {cfg.federation.rounds} rounds"
    # Weak clients trained within their budget instead of failing.
    assert sum(r.failed_oom for r in history.rounds) == 0
    weak = [c for c in history.clients if c.tier == "weak"]
    assert weak and all(c.experts_per_step_max <= c.capacity < 48 for c in weak)


def test_budget_unaware_fedavg_loses_clients_to_oom_and_hfedmoe_does_not():
    full, _ = run_simulation(tiny_config(strategy="fedavg_full", rounds=1))
    ours, _ = run_simulation(tiny_config(strategy="hfedmoe", rounds=1))
    weak_sampled = sum(1 for c in full.clients if c.tier == "weak")
    assert weak_sampled > 0
    assert full.rounds[0].failed_oom == weak_sampled
    assert all(c.failure == "oom" for c in full.clients if c.tier == "weak")
    assert ours.rounds[0].failed_oom == 0
    assert ours.rounds[0].succeeded == ours.rounds[0].sampled
    for c in ours.clients:
        assert c.experts_per_step_max <= c.capacity
        assert c.capacity == 3 if c.tier == "weak" else c.capacity == 8
    # The modelled step memory decides: training everything needs more than training C.
    weak_full = [c.memory_bytes for c in full.clients if c.tier == "weak"]
    weak_ours = [c.memory_bytes for c in ours.clients if c.tier == "weak"]
    assert weak_ours and min(weak_full) > max(weak_ours) > 0
    assert all(c.measured_peak_bytes is None for c in full.clients)  # measured on GPUs only


def test_same_seed_gives_identical_metrics_and_weights():
    cfg = tiny_config()
    first, state_a = run_simulation(cfg)
    second, state_b = run_simulation(cfg)
    assert [r.deterministic() for r in first.rounds] == [r.deterministic() for r in second.rounds]
    for a, b in zip(state_a.experts, state_b.experts, strict=True):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    for name in state_a.shared:
        np.testing.assert_array_equal(state_a.shared[name], state_b.shared[name])
    other, _ = run_simulation(cfg.model_copy(update={"seed": 8}))
    assert [r.train_loss for r in other.rounds] != [r.train_loss for r in first.rounds]


@pytest.mark.parametrize("name", sorted(n for n in STRATEGIES if not n.startswith("test_")))
def test_every_strategy_runs_within_its_rules(name):
    history, _ = run_simulation(tiny_config(strategy=name, rounds=1))
    metrics = history.rounds[0]
    assert metrics.accuracy is not None and 0.0 <= metrics.accuracy <= 1.0
    ok = [c for c in history.clients if c.failure is None]
    assert all(0.0 <= c.admitted_share <= 1.0 and c.routed_per_step > 0 for c in ok)
    if name == "flex":
        assert all(c.experts_trained == 0 for c in ok) and metrics.experts_updated == 0
        assert metrics.admitted_share == 0.0
    elif name == "fedavg_full":
        assert metrics.failed_oom > 0
    elif name == "moe_all_routed":  # every routed expert, when the union fits
        assert ok and all(c.admitted_share == 1.0 for c in ok)
        assert all(c.experts_per_step_max <= c.step_limit for c in ok)
    else:
        assert ok and all(c.experts_per_step_max <= c.step_limit for c in ok)
        assert metrics.experts_updated > 0


@pytest.mark.parametrize("name", sorted(n for n in STRATEGIES if not n.startswith("test_")))
def test_every_strategy_trains_lora_adapters(name):
    cfg = tiny_config(strategy=name, rounds=1)
    lora = {"rank": 8, "aggregate": "product" if name == "hfedmoe" else "factors"}
    raw = cfg.model_dump()
    raw["model"]["lora"] = lora
    history, state = run_simulation(parse_config(raw))
    assert set(state.experts[0]) == {"lora_A_in", "lora_B_in", "lora_A_out", "lora_B_out"}
    metrics = history.rounds[0]
    assert metrics.accuracy is not None and 0.0 <= metrics.accuracy <= 1.0
    ok = [c for c in history.clients if c.failure is None]
    assert ok and all(c.experts_per_step_max <= c.step_limit for c in ok)
    assert (metrics.experts_updated == 0) == (name == "flex")


def test_per_layer_budget_bounds_every_layer_of_every_step():
    cfg = tiny_config(rounds=1)
    cfg = cfg.model_copy(
        update={"hfedmoe": cfg.hfedmoe.model_copy(update={"budget_scope": "per_layer"})}
    )
    history, _ = run_simulation(cfg)
    ok = [c for c in history.clients if c.failure is None]
    # The weak tier fits 3 experts in all: 1 per layer of the 2 MoE layers, so 2 a step.
    weak = [c for c in ok if c.tier == "weak"]
    assert weak and all(c.capacity == 1 and c.step_limit == 2 for c in weak)
    assert all(0 < c.experts_per_step_max <= c.step_limit for c in ok)


def test_round_deadline_drops_late_clients_and_keeps_the_model():
    cfg = tiny_config(rounds=1, round_deadline_s=1e-9)
    history, state = run_simulation(cfg)
    metrics = history.rounds[0]
    assert metrics.failed_deadline == metrics.sampled and metrics.experts_updated == 0
    assert metrics.round_seconds == pytest.approx(1e-9)
    initial = build_federation(cfg)[1].state()
    for name, value in initial.shared.items():
        np.testing.assert_array_equal(state.shared[name], value)
    for layer, arrays in enumerate(initial.experts):
        for name, value in arrays.items():
            np.testing.assert_array_equal(state.experts[layer][name], value)


def test_client_sampling_is_seeded_and_without_replacement():
    a = sample_clients(100_000, 100, seed=3, round_index=5)
    assert len(set(a)) == 100 and max(a) < 100_000
    assert a == sample_clients(100_000, 100, seed=3, round_index=5)
    assert a != sample_clients(100_000, 100, seed=3, round_index=6)


def test_moe_all_routed_fails_exactly_when_a_steps_routed_union_does_not_fit():
    """One local step: the client survives a budget of |E_union| experts, not one less."""
    from hfedmoe.platform.budgets.drawing import Budget
    from hfedmoe.platform.federation import make_trainer

    cfg = tiny_config(strategy="moe_all_routed", max_local_steps=1)
    fed, adapter = build_federation(cfg)
    trainer = make_trainer(adapter, fed.train, fed.footprint, cfg)
    state, batch = adapter.state(), cfg.federation.batch_size

    def train(experts_that_fit: int):
        memory = step_memory_bytes(fed.footprint, experts_that_fit, batch)
        budget = Budget("hand", "synthetic", memory, 1e11, 1e6, 1e6, None, 1.0)
        adapter.load_state(state)
        return trainer.train(0, fed.shards[0], budget, 0, state.num_bytes())

    _, ample = train(fed.footprint.num_experts_total)
    union = ample.experts_per_step_max  # one step that trains its whole routed union
    assert union == ample.routed_per_step and 1 < union <= fed.footprint.num_experts_total
    upload, fits = train(union)
    assert upload is not None and not fits.out_of_memory and fits.step_limit == union
    upload, short = train(union - 1)
    assert upload is None and short.out_of_memory and short.steps == 0
    # The failed client spent its download and nothing else (its one step never ran).
    assert short.seconds == pytest.approx(state.num_bytes() / 1e6, rel=1e-12)


def test_admitted_share_shows_where_budgets_bind():
    history, _ = run_simulation(tiny_config(rounds=1))
    weak = [c for c in history.clients if c.tier == "weak" and c.failure is None]
    strong = [c for c in history.clients if c.tier == "strong" and c.failure is None]
    # weak clients train 3 of the experts a batch routes to (more than 3: top-2 of 4 in
    # two layers over a batch), strong ones every routed expert.
    assert weak and all(c.admitted_share < 1.0 for c in weak)
    assert all(c.experts_per_step_max <= 3 < c.routed_per_step for c in weak)
    assert strong and all(c.admitted_share == 1.0 for c in strong)
    metrics = history.rounds[0]
    shares = [c.admitted_share for c in weak + strong]
    assert metrics.admitted_share == pytest.approx(np.mean(shares), rel=1e-12)
