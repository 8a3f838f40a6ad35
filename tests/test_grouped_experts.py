"""The grouped expert kernel against the per-expert loop it replaced, selective backward,
FLOPs, determinism and fine-grained upcycling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hfedmoe.platform.config import ModelConfig
from hfedmoe.platform.models.experts import (
    BackwardPlan,
    StackedExperts,
    grouped_experts,
    routed_experts,
)
from hfedmoe.platform.models.upcycle import upcycled_adapter

NUM_EXPERTS, TOKENS, TOP_K, D, H = 6, 10, 3, 8, 12


def layer(dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):  # drawn in float64 so that every dtype gets the same values
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    weights = {
        "w_in": rand(NUM_EXPERTS, H, D),
        "w_out": rand(NUM_EXPERTS, D, H),
        "b_in": rand(NUM_EXPERTS, H),
        "b_out": rand(NUM_EXPERTS, D),
    }
    hidden = rand(TOKENS, D)
    # Expert 5 is never routed: it must get no gradient even when marked active.
    index = torch.stack(
        [torch.randperm(NUM_EXPERTS - 1, generator=gen)[:TOP_K] for _ in range(TOKENS)]
    )
    probs = torch.softmax(rand(TOKENS, TOP_K), dim=-1)
    return weights, hidden, index, probs


def run(kernel: str, dtype, active: list[bool], stop_gradient: bool):
    """Output and gradients of one layer with per-expert leaves, as the trainer takes them."""
    weights, hidden, index, probs = layer(dtype)
    hidden.requires_grad_(True)
    probs.requires_grad_(True)
    names = ["w_in", "w_out", "b_in", "b_out"]
    leaves = [{n: weights[n][e].clone().requires_grad_(True) for n in names} for e in range(6)]
    plan = BackwardPlan(1, stop_gradient)
    if kernel == "grouped":
        # The stacked tensors share storage with the leaves, as FusedExperts arranges.
        stacked = {n: torch.stack([leaf[n].detach() for leaf in leaves]) for n in names}
        for e, leaf in enumerate(leaves):
            for n in names:
                leaf[n] = stacked[n][e].requires_grad_(True)
        experts = StackedExperts(
            stacked["w_in"],
            stacked["w_out"],
            F.gelu,
            stacked["b_in"],
            stacked["b_out"],
            leaves=[[leaf[n] for n in names] for leaf in leaves],
        )
        out = grouped_experts(hidden, index, probs, experts, plan, 0)
    else:

        def expert(e: int, x: torch.Tensor) -> torch.Tensor:
            w = leaves[e]
            return F.linear(F.gelu(F.linear(x, w["w_in"], w["b_in"])), w["w_out"], w["b_out"])

        out = routed_experts(hidden, index, probs, NUM_EXPERTS, expert, plan, 0)
    plan.set_active(0, torch.tensor(active))
    trained = [t for e, leaf in enumerate(leaves) if active[e] for t in leaf.values()]
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = target.to(dtype)
    torch.autograd.backward((out * target).sum(), inputs=[hidden, probs, *trained])
    grads = {
        "hidden": hidden.grad,
        "probs": probs.grad,
        **{f"{e}/{n}": t.grad for e, leaf in enumerate(leaves) for n, t in leaf.items()},
    }
    return out.detach(), grads


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_grouped_kernel_equals_the_per_expert_loop(stop_gradient):
    # float64 takes the kernel's loop over groups (torch._grouped_mm is 16/32-bit only) and
    # checks its autograd logic. Tolerance: every value is a sum of at most H + D = 20
    # products of O(10) terms, so reordering the sums moves it by under
    # 20 * 2**-53 * 10**2 ~ 2e-13; 1e-10 leaves room and still catches any wrong term.
    active = [True, False, True, False, True, True]
    ours, ours_grads = run("grouped", torch.float64, active, stop_gradient)
    loop, loop_grads = run("loop", torch.float64, active, stop_gradient)
    torch.testing.assert_close(ours, loop, rtol=1e-10, atol=1e-10)
    assert ours_grads.keys() == loop_grads.keys()
    for key, ref in loop_grads.items():
        if ref is None:  # frozen, or never routed (expert 5): no gradient at all
            assert ours_grads[key] is None, key
        else:
            torch.testing.assert_close(ours_grads[key], ref, rtol=1e-10, atol=1e-10)
    assert all(ours_grads[f"{e}/w_in"] is None for e in (1, 3, 5))


def test_grouped_gemm_path_matches_in_float32():
    # float32 runs torch._grouped_mm. Against the float64 loop, each sum of <= 20 products
    # of O(10) terms carries under 20 * 2**-24 * 10**2 ~ 1.2e-4 of rounding; with the
    # activation and the following layer's sum, 1e-3 absolute bounds it.
    active = [True, True, False, True, False, False]
    ours, ours_grads = run("grouped", torch.float32, active, stop_gradient=False)
    ref, ref_grads = run("loop", torch.float64, active, stop_gradient=False)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-3)
    for key, value in ref_grads.items():
        if value is not None:
            torch.testing.assert_close(ours_grads[key], value.float(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_frozen_experts_cost_no_weight_gradient_flops(stop_gradient):
    weights, hidden, index, probs = layer(torch.float32)
    experts = StackedExperts(
        weights["w_in"].clone().requires_grad_(True),
        weights["w_out"].clone().requires_grad_(True),
        F.gelu,
    )
    plan = BackwardPlan(1, stop_gradient)
    hidden.requires_grad_(True)
    active = [True, False, False, True, False, False]
    with FlopCounterMode(display=False) as counter:
        out = grouped_experts(hidden, index, probs, experts, plan, 0)
        plan.set_active(0, torch.tensor(active))
        out.sum().backward()
    per_pair = 2 * (H * D + D * H)
    pairs = TOKENS * TOP_K
    trained_pairs = int(sum((index == e).sum() for e in (0, 3)))
    input_pairs = trained_pairs if stop_gradient else pairs
    assert counter.get_total_flops() == per_pair * (pairs + input_pairs + trained_pairs)
    # Stacked gradients (no leaves): rows of frozen experts are zero.
    for grad in (experts.w_in.grad, experts.w_out.grad):
        assert grad[[1, 2, 4, 5]].abs().sum() == 0 and grad[[0, 3]].abs().sum() > 0


def test_training_steps_are_bit_identical_on_repeat():
    def train():
        torch.manual_seed(0)
        cfg = ModelConfig(
            kind="upcycled", expert_init="partition", num_experts=8, top_k=4, num_layers=2
        )
        adapter = upcycled_adapter(cfg, num_labels=3)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 20000, (4, 16), generator=gen)
        labels = torch.randint(0, 3, (4,), generator=gen)
        with adapter.training(stop_gradient=False) as leaves:
            logits, routing = adapter.forward(ids, torch.ones_like(ids), capture_routing=True)
            active = routing.routed.any(dim=1)
            active[:, ::2] = False
            adapter.set_active_experts(active)
            tensors = leaves.for_step(active)
            torch.autograd.backward(F.cross_entropy(logits, labels), inputs=list(tensors.values()))
            return {k: t.grad.clone() for k, t in tensors.items() if t.grad is not None}

    first, second = train(), train()
    assert first.keys() == second.keys() and any(k.startswith("expert/") for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_gpu_check_dry_run_writes_its_reports(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    report = gpu_check.main([str(tmp_path), "--dry-run"])
    assert {p.name for p in tmp_path.iterdir()} == {"packing.json", "memory.json", "mfu.json"}
    assert [r["workers"] for r in report["packing"]["rows"]] == [1, 2]
    assert all(r["as_expected"] for r in report["memory"]["rows"])
    assert report["mfu"]["flops_per_step"] > 0 and report["mfu"]["step_s"] > 0
