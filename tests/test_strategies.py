"""Client-side expert selection of every strategy (HFedMoE, ablations, baselines)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hfedmoe.platform.config import ConfigError, HFedMoEConfig, parse_config
from hfedmoe.platform.records import BatchRouting
from hfedmoe.platform.strategies import STRATEGIES, Strategy, make_strategy

BUDGETED = [n for n, s in STRATEGIES.items() if s.trains == "selected"]


def _routing(probs, routed, token_counts) -> BatchRouting:
    probs = torch.as_tensor(probs, dtype=torch.float32)
    routed = torch.as_tensor(routed, dtype=torch.bool)
    counts = torch.as_tensor(token_counts, dtype=torch.int64)
    return BatchRouting(probs=probs, routed=routed, token_counts=counts, pair_counts=counts)


def _picked(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in torch.nonzero(mask).tolist()}


# One MoE layer, B = 2, E = 4. Expert 3 is never routed (not in E_union) but is given the
# highest probability and token count, so any rule that ignores E_union would pick it.
#   x_1: [0.8, 0.2, 0.0, 0.9]   routed {0, 1}
#   x_2: [0.0, 0.4, 0.6, 0.9]   routed {1, 2}
# lambda = 0.5, beta = 1:
#   e0: mean 0.4, max 0.8 -> s = 0.6;  KL = (0.8 log(0.8/0.4) + 0)/2 = 0.4 log 2 ~ 0.27726
#       I = 0.6 - 0.27726 ~ 0.32274
#   e1: mean 0.3, max 0.4 -> s = 0.35; KL = (0.2 log(2/3) + 0.4 log(4/3))/2 ~ 0.01699
#       I ~ 0.33301
#   e2: mean 0.3, max 0.6 -> s = 0.45; KL = (0 + 0.6 log 2)/2 = 0.3 log 2 ~ 0.20794
#       I ~ 0.24206
#   e3: s = 0.9, KL = 0 -> I = 0.9 (but not a candidate)
# Ranking by importance (eq 5): e0 0.6 > e2 0.45 > e1 0.35
# Ranking by IB (eq 14):        e1 0.333 > e0 0.323 > e2 0.242
# Token counts [1, 9, 5, 20]:   e1 9 > e2 5 > e0 1
EXAMPLE = _routing(
    probs=[[[0.8, 0.2, 0.0, 0.9], [0.0, 0.4, 0.6, 0.9]]],
    routed=[[[True, True, False, False], [False, True, True, False]]],
    token_counts=[[1, 9, 5, 20]],
)
HP = HFedMoEConfig(beta=1.0, importance_mix=0.5, budget_scope="global")


def _select(name, routing=EXAMPLE, capacity=1, hp=HP, seed=0) -> torch.Tensor:
    return make_strategy(name, hp).select_experts(routing, capacity, np.random.default_rng(seed))


def test_example_scores_by_hand():
    # Guard for the numbers in the comment above (independent arithmetic only).
    i0 = 0.6 - 0.4 * math.log(2)
    i1 = 0.35 - (0.2 * math.log(2 / 3) + 0.4 * math.log(4 / 3)) / 2
    i2 = 0.45 - 0.3 * math.log(2)
    assert i1 > i0 > i2
    assert 0.6 > 0.45 > 0.35


def test_hfedmoe_ranks_by_ib_and_no_ib_by_importance():
    # C = 1: IB picks e1, importance picks e0.
    assert _picked(_select("hfedmoe")) == {(0, 1)}
    assert _picked(_select("hfedmoe_no_ib")) == {(0, 0)}
    # C = 2: IB {e1, e0}, importance {e0, e2}.
    assert _picked(_select("hfedmoe", capacity=2)) == {(0, 0), (0, 1)}
    assert _picked(_select("hfedmoe_no_ib", capacity=2)) == {(0, 0), (0, 2)}


def test_ib_ablations_share_the_hfedmoe_selection():
    for name in ("hfedmoe_plain_agg", "hfedmoe_no_gate_agg"):
        for capacity in (1, 2):
            assert torch.equal(
                _select(name, capacity=capacity), _select("hfedmoe", capacity=capacity)
            )


def test_beta_zero_makes_hfedmoe_rank_by_importance():
    hp = HFedMoEConfig(beta=0.0, importance_mix=0.5, budget_scope="global")
    assert _picked(_select("hfedmoe", hp=hp)) == {(0, 0)}


def test_budget_top_usage_ranks_by_token_counts():
    # Token counts [1, 9, 5, 20]; expert 3 is not routed. C = 1 -> e1, C = 2 -> {e1, e2}.
    assert _picked(_select("budget_top_usage")) == {(0, 1)}
    assert _picked(_select("budget_top_usage", capacity=2)) == {(0, 1), (0, 2)}
    # C = 4 > |E_union| = 3 -> all routed experts, never e3
    assert _picked(_select("budget_top_usage", capacity=4)) == {(0, 0), (0, 1), (0, 2)}


def test_fedavg_full_trains_everything_and_flex_nothing():
    for capacity in (0, 1, 10):
        full = _select("fedavg_full", capacity=capacity)
        assert full.dtype == torch.bool and full.shape == (1, 4) and full.all()
        frozen = _select("flex", capacity=capacity)
        assert frozen.dtype == torch.bool and frozen.shape == (1, 4) and not frozen.any()


def test_budget_random_is_reproducible_and_varies_with_seed():
    # Two layers, six routed experts, C = 2 -> C(6, 2) = 15 possible masks.
    routing = _routing(
        probs=torch.full((2, 2, 3), 1 / 3),
        routed=torch.ones(2, 2, 3, dtype=torch.bool),
        token_counts=torch.ones(2, 3),
    )
    draws = [_select("budget_random", routing, capacity=2, seed=s) for s in range(20)]
    assert torch.equal(draws[3], _select("budget_random", routing, capacity=2, seed=3))
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1
    assert all(int(d.sum()) == 2 for d in draws)


def test_per_layer_scope_gives_capacity_in_each_layer():
    # Layer 0 = EXAMPLE's layer; layer 1: x_1 [0.1, 0.7, 0.1, 0.1], x_2 [0.1, 0.1, 0.7, 0.1],
    # routed {1} and {2}; token counts [0, 3, 4, 0].
    # Layer 1 importance (lambda 0.5): e1 = e2 = 0.5*0.4 + 0.5*0.7 = 0.55 -> tie -> e1;
    # the same KL for e1 and e2, so IB also ties -> e1; token counts -> e2.
    routing = _routing(
        probs=[
            [[0.8, 0.2, 0.0, 0.9], [0.0, 0.4, 0.6, 0.9]],
            [[0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]],
        ],
        routed=[
            [[True, True, False, False], [False, True, True, False]],
            [[False, True, False, False], [False, False, True, False]],
        ],
        token_counts=[[1, 9, 5, 20], [0, 3, 4, 0]],
    )
    hp = HFedMoEConfig(beta=1.0, importance_mix=0.5, budget_scope="per_layer")
    assert _picked(_select("hfedmoe", routing, hp=hp)) == {(0, 1), (1, 1)}
    assert _picked(_select("hfedmoe_no_ib", routing, hp=hp)) == {(0, 0), (1, 1)}
    assert _picked(_select("budget_top_usage", routing, hp=hp)) == {(0, 1), (1, 2)}
    # The same routing with global scope and C = 1 gives one expert in total.
    hp_global = HFedMoEConfig(beta=1.0, importance_mix=0.5, budget_scope="global")
    for name in BUDGETED:
        assert int(_select(name, routing, hp=hp_global).sum()) == 1


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_every_strategy_respects_capacity_and_union(scope):
    rng = np.random.default_rng(11)
    hp = HFedMoEConfig(beta=0.3, importance_mix=0.5, budget_scope=scope)
    for _ in range(12):
        num_layers, batch, num_experts = 2, int(rng.integers(1, 5)), 5
        logits = torch.from_numpy(rng.normal(size=(num_layers, batch, num_experts)))
        probs = torch.softmax(logits, dim=-1)
        routed = torch.from_numpy(rng.random((num_layers, batch, num_experts)) < 0.3)
        counts = torch.from_numpy(rng.integers(0, 10, (num_layers, num_experts)))
        routing = _routing(probs, routed, counts)
        union = routed.any(dim=1)
        for capacity in range(0, 2 * num_experts + 2):
            for name in STRATEGIES:
                mask = _select(name, routing, capacity, hp, seed=int(rng.integers(1000)))
                assert mask.shape == (num_layers, num_experts) and mask.dtype == torch.bool
                if name == "fedavg_full":
                    assert mask.all()
                    continue
                if name == "moe_all_routed":
                    assert torch.equal(mask, union)
                    continue
                if name == "flex":
                    assert not mask.any()
                    continue
                assert not (mask & ~union).any(), f"{name} trained an unrouted expert"
                if scope == "global":
                    assert int(mask.sum()) == min(capacity, int(union.sum())), name
                else:
                    assert mask.sum(dim=1).tolist() == [
                        min(capacity, int(n)) for n in union.sum(dim=1)
                    ], name


BUILT_IN = {
    # name: (trains, experts aggregated by eq 17, gates by eqs 19-21)
    "hfedmoe": ("selected", True, True),
    "hfedmoe_no_ib": ("selected", True, True),
    "hfedmoe_plain_agg": ("selected", False, True),
    "hfedmoe_no_gate_agg": ("selected", True, False),
    "fedavg_full": ("all", False, False),
    "budget_random": ("selected", False, False),
    "budget_top_usage": ("selected", False, False),
    "moe_all_routed": ("routed", False, False),
    "flex": ("none", False, False),
}


def test_strategy_table():
    table = {
        name: (
            cls.trains,
            cls.expert_weights is not Strategy.expert_weights,
            cls.gate_weight is not Strategy.gate_weight,
        )
        for name, cls in STRATEGIES.items()
        if name in BUILT_IN
    }
    assert table == BUILT_IN


def test_step_limit_follows_what_a_strategy_trains():
    hp = HFedMoEConfig()
    assert make_strategy("hfedmoe", hp).step_limit(5, 48) == 5
    assert make_strategy("fedavg_full", hp).step_limit(5, 48) == 48
    assert make_strategy("flex", hp).step_limit(5, 48) == 0
    assert make_strategy("moe_all_routed", hp).step_limit(5, 48) == 5  # what fits


def test_unknown_strategy_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown federation.strategy 'nope'.*hfedmoe"):
        make_strategy("nope", HFedMoEConfig())
    with pytest.raises(ConfigError, match=r"federation.strategy.*unknown .*strategy 'nope'"):
        parse_config({"federation": {"strategy": "nope"}})
