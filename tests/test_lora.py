"""LoRA experts and QLoRA: selective adapter gradients, FLOPs, uploads, memory, families."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hfedmoe.platform.budgets.cost import step_memory_bytes
from hfedmoe.platform.config import ConfigError, ModelConfig, parse_config
from hfedmoe.platform.flops import StepFlops
from hfedmoe.platform.models import build_adapter
from hfedmoe.platform.models.experts import (
    BackwardPlan,
    ExpertLoRA,
    NF4Weight,
    StackedExperts,
    grouped_experts,
)

REPO = Path(__file__).resolve().parents[1]
D, H, INNER, E, R, K = 6, 5, 5, 4, 2, 2  # model dim, expert in/out widths, experts, rank, top-k


def _experts(seed: int, quantized: bool = False):
    """Random stacked experts with non-zero adapters (B = 0 would hide half the gradients)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    base = {"w_in": rand(E, H, D), "w_out": rand(E, D, INNER)}
    base.update(b_in=rand(E, H), b_out=rand(E, D))
    adapters = [rand(E, R, D), rand(E, H, R), rand(E, R, INNER), rand(E, D, R)]
    return base, adapters


def _reference(hidden, index, weights, base, adapters, scale, frozen=()):
    """y_t = sum_k w_tk E_i(x_t) with each expert's merged weight W + scale B A, via autograd.

    Experts in ``frozen`` pass no gradient at all (the stop-gradient backward).
    """
    a_in, b_in, a_out, b_out = adapters
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            w_in = base["w_in"][e] + scale * b_in[e] @ a_in[e]
            w_out = base["w_out"][e] + scale * b_out[e] @ a_out[e]
            h = torch.relu(hidden[t] @ w_in.T + base["b_in"][e])
            y = h @ w_out.T + base["b_out"][e]
            out[t] = out[t] + weights[t, slot] * (y.detach() if e in frozen else y)
    return out


def _routing(tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(tokens)])
    index[:, 0] = torch.arange(tokens) % 3  # expert 3 is only ever a second choice, or absent
    index[:, 1] = (index[:, 0] + 1) % 3
    weights = torch.rand(tokens, K, generator=gen, dtype=torch.float64)
    return index, weights


def _selected(base, adapters, trained: list[int], scale: float, stop_gradient: bool = False):
    """Stacked experts with per-expert adapter leaves, and a plan that trains ``trained``."""
    leaves = [[t[e].detach().requires_grad_(True) for t in adapters] for e in range(E)]
    plan = BackwardPlan(1, stop_gradient=stop_gradient)
    active = torch.zeros(E, dtype=torch.bool)
    active[trained] = True
    plan.set_active(0, active)
    experts = StackedExperts(
        base["w_in"], base["w_out"], torch.relu, base["b_in"], base["b_out"],
        lora=ExpertLoRA(*adapters, scale=scale), leaves=leaves,
    )  # fmt: skip
    return experts, leaves, plan


@pytest.mark.parametrize("stop_gradient", [False, True])
@pytest.mark.parametrize("trained", [[0, 2], [1]])
def test_lora_kernel_gradients_equal_the_merged_weight_and_skip_unselected_experts(
    trained, stop_gradient
):
    base, adapters = _experts(0)
    scale = 1.5
    index, weights = _routing(tokens=7, seed=1)
    hidden = torch.randn(7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    # Ours: per-expert adapter leaves sharing storage with the stacked tensors.
    x = hidden.clone().requires_grad_(True)
    experts, leaves, plan = _selected(base, adapters, trained, scale, stop_gradient)
    ours = grouped_experts(x, index, weights, experts, plan, 0)
    inputs = [x] + [t for e in trained for t in leaves[e]]
    torch.autograd.backward(ours.square().sum(), inputs=inputs)

    # Reference: the merged weights, every adapter a leaf.
    x_ref = hidden.clone().requires_grad_(True)
    ref_adapters = [t.clone().requires_grad_(True) for t in adapters]
    frozen = [e for e in range(E) if e not in trained] if stop_gradient else []
    ref = _reference(x_ref, index, weights, base, ref_adapters, scale, frozen)
    ref.square().sum().backward()

    # float64 throughout, O(10) operations per element: rounding stays below 1e-12.
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for e in range(E):
        for leaf, ref_tensor in zip(leaves[e], ref_adapters, strict=True):
            if e in trained:
                torch.testing.assert_close(leaf.grad, ref_tensor.grad[e], rtol=1e-12, atol=1e-12)
            else:
                assert leaf.grad is None  # no gradient at all, not a zero one


def test_an_unselected_experts_adapter_costs_no_weight_gradient_flops():
    base, adapters = _experts(3)
    index, weights = _routing(tokens=9, seed=4)
    hidden = torch.randn(9, D, dtype=torch.float64)
    pairs = torch.bincount(index.reshape(-1), minlength=E)

    def backward_flops(trained: list[int]) -> float:
        experts, leaves, plan = _selected(base, adapters, trained, scale=2.0)
        x = hidden.clone().requires_grad_(True)
        out = grouped_experts(x, index, weights, experts, plan, 0)
        with FlopCounterMode(display=False) as counter:
            torch.autograd.backward(out.sum(), inputs=[x] + [t for e in trained for t in leaves[e]])
        return counter.get_total_flops()

    adapter_params = R * (D + H) + R * (INNER + D)
    none, one, two = backward_flops([]), backward_flops([0]), backward_flops([0, 1])
    # Training expert e adds 4 FLOPs per adapter element and (token, slot) pair, nothing else:
    # the base never gets a weight gradient, and untrained experts cost only the input path.
    assert one - none == 4 * adapter_params * int(pairs[0])
    assert two - one == 4 * adapter_params * int(pairs[1])


@pytest.fixture(scope="module")
def lora_minilm():
    cfg = ModelConfig(kind="upcycled", num_experts=4, top_k=2, num_layers=2, lora={"rank": 4})
    return build_adapter(cfg, 3, seed=0)


def _batch(adapter, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (4, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return ids, mask, torch.randint(0, 3, (4,), generator=gen)


def _counted(adapter, ids, mask, labels, active):
    with adapter.training(stop_gradient=False) as leaves:
        adapter.model.eval()  # no dropout: the count is deterministic
        with FlopCounterMode(display=False) as counter:
            logits, routing = adapter.forward(ids, mask, capture_routing=True)
            adapter.set_active_experts(active)
            chosen = leaves.for_step(active)
            torch.autograd.backward(F.cross_entropy(logits, labels), inputs=list(chosen.values()))
        for t in chosen.values():
            t.grad = None
    return counter.get_total_flops(), routing


def _calibrated_meter(adapter, ids, mask, labels) -> StepFlops:
    meter = StepFlops(
        adapter.matmul_params_per_expert(), False, adapter.adapter_params_per_expert()
    )
    every = torch.ones(2, 4, dtype=torch.bool)  # as the client calibrates in LoRA mode
    meter.calibrate(
        tuple(ids.shape),
        lambda: (_counted(adapter, ids, mask, labels, every)[1].pair_counts, every),
    )
    return meter


ACTIVE_MASKS = [  # [L, E] for 2 layers of 4 experts
    [[True, False, False, False], [True, False, False, False]],
    [[True, True, True, False], [True, True, True, False]],
    [[False, False, False, False], [False, True, False, False]],  # nothing in the first layer
]


def test_step_flops_model_counts_adapters_and_the_base_input_gradient(lora_minilm):
    adapter = lora_minilm
    # One expert of the base: w_in [1536, 384] and w_out [384, 1536] of MiniLM's FFN.
    assert adapter.matmul_params_per_expert() == 2 * 1536 * 384
    assert adapter.adapter_params_per_expert() == 4 * (384 + 1536) * 2
    meter = _calibrated_meter(adapter, *_batch(adapter))
    for seed, mask_ in enumerate(ACTIVE_MASKS, start=1):  # other batches of the same shape
        ids, mask, labels = _batch(adapter, seed)
        active = torch.tensor(mask_)
        counted, routing = _counted(adapter, ids, mask, labels, active)
        predicted = meter.total(tuple(ids.shape), routing.pair_counts, active)
        # Sums of exact integer counts in float64: equal up to its rounding.
        assert predicted == pytest.approx(counted, rel=1e-12)


def test_without_attention_adapters_the_flops_model_is_an_upper_bound():
    cfg = ModelConfig(
        kind="upcycled", num_experts=4, top_k=2, num_layers=2,
        lora={"rank": 4, "targets": ["experts"]},
    )  # fmt: skip
    adapter = build_adapter(cfg, 3, seed=0)
    meter = _calibrated_meter(adapter, *_batch(adapter))
    for seed, mask_ in enumerate([*ACTIVE_MASKS, [[True] * 4] * 2], start=1):
        ids, mask, labels = _batch(adapter, seed)
        active = torch.tensor(mask_)
        counted, routing = _counted(adapter, ids, mask, labels, active)
        predicted = meter.total(tuple(ids.shape), routing.pair_counts, active)
        if all(mask_[0]):  # every expert of the first layer trains: the whole depth, exactly
            assert predicted == pytest.approx(counted, rel=1e-12)
        else:  # the backward stops early: less than modelled
            assert predicted > counted


def test_lora_state_holds_adapters_head_only_and_the_base_is_frozen(lora_minilm):
    adapter = lora_minilm
    state = adapter.state()
    assert set(state.experts[0]) == {"lora_A_in", "lora_B_in", "lora_A_out", "lora_B_out"}
    assert state.experts[0]["lora_A_in"].shape == (4, 4, 384)
    assert state.experts[0]["lora_B_out"].shape == (4, 384, 4)
    assert not state.gates  # the router is not a target: frozen
    head = ["classifier.bias", "classifier.weight"]
    assert sorted(n for n in state.shared if "lora_" not in n) == head
    # Attention (a default target): A and B of query, key, value and output, per layer.
    assert len([n for n in state.shared if "lora_" in n]) == 2 * 4 * 2
    frozen = set(adapter.frozen_names)
    assert {"backbone.encoder.layer.0.intermediate.w_in"} <= frozen
    assert any("router" in n for n in frozen) and any("query.base_layer" in n for n in frozen)
    # B starts at zero: the adapted model computes the base model.
    assert all(not layer["lora_B_in"].any() for layer in state.experts)


def test_linear_targets_take_peft_adapters_and_the_router_trains_whole():
    cfg = ModelConfig(
        kind="upcycled",
        num_experts=4,
        num_layers=1,
        lora={"rank": 2, "dropout": 0.1, "targets": ["experts", "attention", "router"]},
    )
    adapter = build_adapter(cfg, 3, seed=0)
    from peft.tuners.lora import Linear as PeftLinear

    query = adapter.model.backbone.encoder.layer[0].attention.self.query
    assert isinstance(query, PeftLinear) and query.r["default"] == 2
    assert adapter.gate_names == ["backbone.encoder.layer.0.intermediate.router.weight"]
    lora_shared = [n for n in adapter.shared_names if "lora_" in n]
    assert len(lora_shared) == 2 * 4  # A and B of query, key, value, attention output
    assert "backbone.encoder.layer.0.attention.self.query.base_layer.weight" in (
        adapter.frozen_names
    )


def test_nf4_base_is_quantized_and_the_adapted_model_starts_at_it():
    full = build_adapter(
        ModelConfig(kind="upcycled", num_experts=4, num_layers=2, lora={"rank": 4}), 3, seed=0
    )
    cfg = ModelConfig(
        kind="upcycled", num_experts=4, num_layers=2, lora={"rank": 4}, quantization="nf4"
    )
    quantized = build_adapter(cfg, 3, seed=0)
    moe = quantized.model.backbone.encoder.layer[0].intermediate
    assert isinstance(moe.w_in, NF4Weight) and moe.w_in.packed.dtype == torch.uint8
    # 4 bits per weight plus one fp32 absmax per 64 weights.
    assert moe.w_in.packed.numel() == 4 * 1536 * 384 // 2
    assert moe.w_in.absmax.numel() == 4 * 1536 * 384 // 64
    dense = full.model.backbone.encoder.layer[0].intermediate.w_in.detach()
    error = (moe.w_in.dense() - dense).abs()
    # NF4 levels are at most ~0.34 apart on [-1, 1] (between 0.72 and 1.0 in the code book),
    # so rounding is at most half that times each block's absmax.
    absmax = dense.reshape(-1, 64).abs().amax(1, keepdim=True)
    assert (error.reshape(-1, 64) <= 0.17 * absmax + 1e-6).all()
    ids, mask, labels = _batch(quantized)
    quantized.model.eval()
    with torch.no_grad():
        logits, _ = quantized.forward(ids, mask)
    assert torch.isfinite(logits).all()
    # It trains: the adapters of the active experts get gradients through the 4-bit base.
    active = torch.ones(2, 4, dtype=torch.bool)
    with quantized.training(stop_gradient=False) as leaves:
        logits, _ = quantized.forward(ids, mask)
        quantized.set_active_experts(active)
        chosen = leaves.for_step(active)
        torch.autograd.backward(F.cross_entropy(logits, labels), inputs=list(chosen.values()))
        assert all(t.grad is not None for k, t in chosen.items() if "lora_B" in k)


def test_nf4_without_working_bitsandbytes_names_the_field(monkeypatch):
    import bitsandbytes.functional

    def unsupported(*args, **kwargs):
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", unsupported)
    cfg = ModelConfig(
        kind="upcycled", num_experts=4, num_layers=1, lora={"rank": 4}, quantization="nf4"
    )
    with pytest.raises(ConfigError, match=r"model\.quantization='nf4'.*model\.quantization: none"):
        build_adapter(cfg, 3, seed=0)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": {"quantization": "nf4"}}, "set model.lora.rank"),
        ({"model": {"lora": {"rank": 4, "targets": ["attention"]}}}, "must include 'experts'"),
        ({"model": {"lora": {"rank": 0}}}, "model.lora.rank"),
        ({"model": {"lora": {"rank": 4, "aggregate": "mean"}}}, "model.lora.aggregate"),
        (
            {
                "model": {"lora": {"rank": 4}},
                "federation": {"engine": "deepspeed", "strategy": "flex"},
            },
            "federation.engine: torch",
        ),
    ],
)
def test_bad_lora_settings_name_the_field_and_the_fix(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_memory_model_counts_a_4bit_base_adapters_and_their_optimiser_state(lora_minilm):
    full = build_adapter(ModelConfig(kind="upcycled", num_experts=4, num_layers=2), 3, seed=0)
    cfg = ModelConfig(
        kind="upcycled", num_experts=4, num_layers=2, lora={"rank": 4}, quantization="nf4"
    )
    qlora = build_adapter(cfg, 3, seed=0)
    fp_full, fp_lora, fp_q = (a.footprint(100.0) for a in (full, lora_minilm, qlora))
    expert_params = 2 * 1536 * 384 + 1536 + 384
    adapter_params = 4 * (384 + 1536) * 2
    assert fp_full.params_per_expert == expert_params
    assert fp_lora.params_per_expert == fp_q.params_per_expert == adapter_params
    # LoRA: every fp32 parameter resident, adapters included.
    assert fp_lora.weight_bytes == 4 * sum(p.numel() for p in lora_minilm.model.parameters())
    # QLoRA: the experts' matrices at 4 bits + absmax per 64, plus one layer dequantized.
    matrices = 2 * 4 * 2 * 1536 * 384  # layers x experts x (w_in, w_out)
    nf4 = matrices // 2 + 4 * matrices // 64 + 4 * 16 * 4  # packed, absmax; 4 fp32 code books
    one_layer_dense = 4 * 4 * 2 * 1536 * 384
    assert fp_q.weight_bytes == fp_lora.weight_bytes - 4 * matrices + nf4 + one_layer_dense
    # A step's trained state: gradient and two AdamW moments of what it trains.
    batch = 8
    per_expert_full = step_memory_bytes(fp_full, 1, batch) - step_memory_bytes(fp_full, 0, batch)
    per_expert_lora = step_memory_bytes(fp_lora, 1, batch) - step_memory_bytes(fp_lora, 0, batch)
    assert per_expert_full == 12 * expert_params
    assert per_expert_lora == 12 * adapter_params
    # Whole-expert training of all 8 experts needs more than LoRA training of all of them.
    assert step_memory_bytes(fp_full, 8, batch) > step_memory_bytes(fp_lora, 8, batch)


@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v2"])
def test_fused_hf_families_train_per_expert_adapters(kind):
    cfg = ModelConfig(
        kind=kind,
        num_experts=4,
        top_k=2,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        lora={"rank": 4, "targets": ["experts", "shared_experts", "attention"]},
    )
    adapter = build_adapter(cfg, 3, seed=0)
    state = adapter.state()
    assert state.experts[0]["lora_B_in"].shape == (4, 2 * 48, 4)  # gate_up_proj [E, 2I, d]
    if kind == "deepseek_v2":  # the shared expert's linears take peft adapters
        assert any("shared_experts.down_proj.lora_A" in n for n in state.shared)
    ids, mask, labels = _batch(adapter)
    active = torch.zeros(2, 4, dtype=torch.bool)
    active[:, 1] = True
    with adapter.training(stop_gradient=False) as leaves:
        logits, _ = adapter.forward(ids, mask)
        adapter.set_active_experts(active)
        chosen = leaves.for_step(active)
        torch.autograd.backward(F.cross_entropy(logits, labels), inputs=list(chosen.values()))
        grads = {k: t.grad for k, t in chosen.items()}
    assert all(k.split("/")[2] == "1" for k in grads if k.startswith("expert/"))
    assert all(grads[k] is not None for k in grads if "lora_B" in k)


def test_lora_on_a_pretrained_deepseek_checkpoint(tmp_path):
    """DeepSeekMoE-shaped: a shared expert plus fine-grained routed experts, saved and reloaded."""
    source = build_adapter(
        ModelConfig(
            kind="deepseek_v2",
            num_experts=8,
            top_k=2,
            hidden_size=32,
            intermediate_size=16,
            num_layers=2,
        ),
        3,
        seed=0,
    )
    source.model.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    cfg = ModelConfig(kind="pretrained", path=str(tmp_path), lora={"rank": 2}, quantization="nf4")
    adapter = build_adapter(cfg, 3, seed=1)
    assert adapter.num_experts == 8 and adapter.lora
    assert any("shared_experts" in n for n in adapter.frozen_names)
    ids, mask, _ = _batch(adapter)
    adapter.model.eval()
    source.model.eval()
    with torch.no_grad():
        ours, _ = adapter.forward(ids, mask)
        theirs, _ = source.forward(ids, mask)
    # Same checkpoint, adapters at B = 0: only the 4-bit rounding of the experts differs.
    assert (ours - theirs).abs().max() < 0.1 * theirs.abs().max()
    assert not torch.equal(ours, theirs)


def test_client_uploads_only_the_adapters_it_trained():
    from hfedmoe.platform.client import train_client
    from hfedmoe.platform.federation import build_federation, make_trainer

    cfg = parse_config(
        {
            "seed": 3,
            "data": {"max_length": 24, "max_test_samples": 20},
            "model": {"kind": "upcycled", "num_experts": 4, "top_k": 1, "num_layers": 2,
                      "lora": {"rank": 4}},
            "federation": {"num_clients": 4, "clients_per_round": 2, "max_local_steps": 1,
                           "batch_size": 2},
            "budgets": {"distribution": "tiers", "tiers": [
                {"name": "one", "proportion": 1.0, "memory_fraction": 2.0, "flops_per_s": 1e12,
                 "max_experts": 1}]},
        }
    )  # fmt: skip
    fed, adapter = build_federation(cfg)
    trainer = make_trainer(adapter, fed.train, fed.footprint, cfg)
    state = adapter.state()
    base = adapter.model.backbone.encoder.layer[0].intermediate.w_in.detach().clone()
    upload, report = train_client(
        trainer, 0, fed.shards[0], fed.budgets[0], 0, state, state.num_bytes()
    )
    # One step, C_budget = 1: exactly one expert's four adapter tensors, of one layer.
    trained = [(layer, int(e)) for layer, u in enumerate(upload.experts) for e in u["index"]]
    assert len(trained) == 1 and report.trained.sum() == 1
    layer, _ = trained[0]
    assert set(upload.experts[layer]) == {"index", *adapter.layers[0].experts.names}
    assert upload.experts[layer]["lora_B_in"].shape == (1, 1536, 4)
    # Besides: the head and the attention adapters; no base tensor, no router.
    assert set(upload.shared) == set(adapter.shared_names) and not upload.gates
    assert all("lora_" in n or n.startswith("classifier.") for n in upload.shared)
    adapter_bytes = 4 * (384 + 1536) * 2 * 4
    assert report.bytes_up == adapter_bytes + sum(a.nbytes for a in upload.shared.values())
    # The frozen base did not move.
    torch.testing.assert_close(
        adapter.model.backbone.encoder.layer[0].intermediate.w_in, base, rtol=0, atol=0
    )
    assert upload.is_finite() and np.abs(upload.experts[layer]["lora_B_in"]).sum() > 0


def test_deepseek_qlora_config_binds_phones_to_a_fifth_of_the_experts():
    import yaml

    from hfedmoe.platform.executors import run_in_process
    from hfedmoe.platform.federation import build_federation

    raw = yaml.safe_load((REPO / "configs" / "deepseek_qlora.yaml").read_text())
    raw["federation"].update(rounds=1, clients_per_round=20, max_local_steps=1)
    cfg = parse_config(raw)
    _, adapter = build_federation(cfg)
    mlp = adapter.model.model.model.layers[0].mlp
    assert mlp.shared_experts.gate_proj.base_layer.out_features == 2 * 32  # two shared
    assert adapter.num_experts == 64 and adapter.layers[0].top_k == 6
    run = run_in_process(cfg)
    clients = run.history.clients
    assert all(c.failure is None for c in clients)
    phones = [c for c in clients if c.tier == "phone"]
    assert phones and all(0 < c.capacity < 0.25 * 128 for c in phones)


def test_a_target_the_model_lacks_names_the_field():
    cfg = ModelConfig(
        kind="qwen3_moe", num_experts=4, hidden_size=32, intermediate_size=48, num_layers=1,
        lora={"rank": 2, "targets": ["experts", "shared_experts"]},
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.lora\.targets \['shared_experts'\]"):
        build_adapter(cfg, 3, seed=0)
