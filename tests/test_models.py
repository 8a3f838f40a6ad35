"""MoE adapters: routing capture, expert access, masked backward, FLOPs, upcycling."""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hfedmoe.platform.config import ModelConfig
from hfedmoe.platform.flops import StepFlops
from hfedmoe.platform.models import build_adapter
from hfedmoe.platform.models.upcycle import bundled_minilm_path, dense_bert_classifier

TINY_FAMILIES = ["qwen3_moe", "mixtral", "olmoe", "deepseek_v2", "switch_transformers"]
FUSED_FAMILIES = ["qwen3_moe", "mixtral", "olmoe", "deepseek_v2"]


def tiny(kind: str, **overrides):
    cfg = dict(
        kind=kind,
        num_experts=4,
        top_k=1 if kind == "switch_transformers" else 2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        num_layers=2,
        freeze=[],
    )
    cfg.update(overrides)
    return build_adapter(ModelConfig(**cfg), num_labels=3, seed=0)


def batch(adapter, seed: int = 0, size: int = 4, length: int = 12):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 20000, (size, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, length // 2 :] = 0  # one padded sample: routing must ignore its padding
    labels = torch.randint(0, 3, (size,), generator=gen)
    return input_ids, attention_mask, labels


@pytest.fixture(scope="module")
def upcycled():
    return build_adapter(ModelConfig(kind="upcycled", num_experts=4, top_k=2), 3, seed=0)


@pytest.mark.parametrize("kind", TINY_FAMILIES)
def test_routing_capture_per_sample(kind):
    adapter = tiny(kind)
    ids, mask, _ = batch(adapter)
    logits, routing = adapter.forward(ids, mask, capture_routing=True)
    num_layers, num_experts = adapter.num_layers, adapter.num_experts
    assert logits.shape == (4, 3)
    assert routing.probs.shape == (num_layers, 4, num_experts)
    # G_e(x) is a mean of per-token softmax rows: each sample's scores sum to one.
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(num_layers, 4))
    # Every valid token routes to top_k experts: at least top_k experts per sample.
    assert (routing.routed.sum(-1) >= adapter.layers[0].top_k).all()
    # Padding tokens are excluded from the token counts but still computed (pair counts).
    valid_tokens = int(mask.sum())
    top_k = adapter.layers[0].top_k
    assert routing.token_counts.sum(-1).tolist() == [valid_tokens * top_k] * num_layers
    assert routing.pair_counts.sum(-1).tolist() == [ids.numel() * top_k] * num_layers


@pytest.mark.parametrize("kind", FUSED_FAMILIES)
def test_routed_kernel_matches_transformers_eager(kind):
    adapter = tiny(kind)
    adapter.model.eval()
    ids, mask, _ = batch(adapter)
    with torch.no_grad():
        ours, _ = adapter.forward(ids, mask)
        adapter.model.model.set_experts_implementation("eager") if kind != "olmoe" else (
            adapter.model.backbone.set_experts_implementation("eager")
        )
        reference, _ = adapter.forward(ids, mask)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_routed_kernel_matches_switch_upstream():
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersExperts,
    )

    adapter = tiny("switch_transformers")
    adapter.model.eval()
    ids, mask, _ = batch(adapter)
    with torch.no_grad():
        ours, _ = adapter.forward(ids, mask)
        for layer in adapter.layers:
            layer.experts.owner.__class__ = SwitchTransformersExperts
        reference, _ = adapter.forward(ids, mask)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", TINY_FAMILIES)
def test_expert_rows_and_state_roundtrip(kind):
    adapter = tiny(kind)
    adapter.model.eval()
    ids, mask, _ = batch(adapter)
    before, _ = adapter.forward(ids, mask)
    state = adapter.state()
    changed = copy.deepcopy(state)
    for name in changed.experts[1]:
        changed.experts[1][name][2] += 1.0
    adapter.load_state(changed)
    for name, value in adapter.expert_rows(1, [2]).items():
        np.testing.assert_array_equal(value[0], changed.experts[1][name][2])
    for name, value in adapter.expert_rows(1, [1]).items():  # neighbours untouched
        np.testing.assert_array_equal(value[0], state.experts[1][name][1])
    adapter.load_state(state)
    after, _ = adapter.forward(ids, mask)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def _full_backward_grads(adapter, ids, mask, labels):
    """Reference: plain autograd through every parameter, fused experts as one tensor."""
    adapter.model.eval()  # no dropout, so both passes see the same function
    for p in adapter.model.parameters():
        p.requires_grad_(True)
        p.grad = None
    logits, routing = adapter.forward(ids, mask, capture_routing=True)
    F.cross_entropy(logits, labels).backward()
    params = dict(adapter.model.named_parameters())
    shared = {n: params[n].grad.clone() for n in adapter.shared_names}
    experts = [
        [
            {n: t.grad.clone() if t.grad is not None else None for n, t in _expert_params(layer, e)}
            for e in range(adapter.num_experts)
        ]
        for layer in adapter.layers
    ]
    return routing, shared, experts


def _expert_params(layer, e):
    store = layer.experts
    if hasattr(store, "stacked"):
        return [(n, _RowGrad(p, e)) for n, p in store.stacked().items()]
    return list(store.modules[e].named_parameters())


class _RowGrad:
    """A fused parameter's gradient restricted to one expert's rows."""

    def __init__(self, param, expert):
        self.grad = None if param.grad is None else param.grad[expert]


def _masked_backward(adapter, ids, mask, labels, active, stop_gradient):
    for p in adapter.model.parameters():
        p.grad = None
    with adapter.training(stop_gradient=stop_gradient) as leaves:
        adapter.model.eval()
        logits, _ = adapter.forward(ids, mask, capture_routing=True)
        adapter.set_active_experts(active)
        chosen = leaves.for_step(active)
        torch.autograd.backward(F.cross_entropy(logits, labels), inputs=list(chosen.values()))
        grads = {k: None if t.grad is None else t.grad.clone() for k, t in chosen.items()}
        frozen = {
            (layer, e): [t.grad for t in leaves.experts[layer][e].values()]
            for layer in range(adapter.num_layers)
            for e in range(adapter.num_experts)
            if not active[layer, e]
        }
        for t in chosen.values():
            t.grad = None
    return grads, frozen


def _half_of_union(routing):
    union = routing.routed.any(dim=1)
    active = torch.zeros_like(union)
    for layer in range(union.shape[0]):
        hit = union[layer].nonzero().flatten()
        active[layer, hit[: max(1, len(hit) // 2)]] = True
    return active


@pytest.mark.parametrize("kind", ["qwen3_moe", "switch_transformers", "upcycled"])
def test_exact_mode_equals_full_backward_for_trained(kind, upcycled):
    adapter = upcycled if kind == "upcycled" else tiny(kind)
    ids, mask, labels = batch(adapter)
    routing, shared_ref, experts_ref = _full_backward_grads(adapter, ids, mask, labels)
    active = _half_of_union(routing)
    grads, frozen = _masked_backward(adapter, ids, mask, labels, active, stop_gradient=False)
    for name in adapter.shared_names:
        if shared_ref[name] is not None and f"shared/{name}" in grads:
            torch.testing.assert_close(grads[f"shared/{name}"], shared_ref[name])
    checked = 0
    for layer in range(adapter.num_layers):
        for e in range(adapter.num_experts):
            if active[layer, e]:
                for name, ref in experts_ref[layer][e].items():
                    torch.testing.assert_close(grads[f"expert/{layer}/{e}/{name}"], ref)
                    checked += 1
    assert checked > 0
    # Frozen experts got no weight gradient at all: the work was skipped, not zeroed.
    assert all(g is None for grads in frozen.values() for g in grads)


def test_stop_gradient_keeps_last_layer_exact_and_cuts_paths_below():
    adapter = tiny("qwen3_moe")
    ids, mask, labels = batch(adapter)
    routing, shared_ref, experts_ref = _full_backward_grads(adapter, ids, mask, labels)
    active = _half_of_union(routing)
    grads, frozen = _masked_backward(adapter, ids, mask, labels, active, stop_gradient=True)
    last = adapter.num_layers - 1
    for e in active[last].nonzero().flatten().tolist():
        for name, ref in experts_ref[last][e].items():
            torch.testing.assert_close(grads[f"expert/{last}/{e}/{name}"], ref)
    # Below the last MoE layer, gradient no longer flows through frozen experts.
    embed = next(n for n in adapter.shared_names if "embed" in n)
    assert not torch.allclose(grads[f"shared/{embed}"], shared_ref[embed])
    assert all(g is None for grads in frozen.values() for g in grads)


def _counted_flops(adapter, ids, mask, labels, active, stop_gradient):
    with adapter.training(stop_gradient=stop_gradient) as leaves:
        adapter.model.eval()  # no dropout: every call routes the batch identically
        with FlopCounterMode(display=False) as counter:
            logits, routing = adapter.forward(ids, mask, capture_routing=True)
            mask_ = torch.ones_like(routing.routed.any(dim=1)) if active is None else active
            adapter.set_active_experts(mask_)
            chosen = leaves.for_step(mask_)
            torch.autograd.backward(F.cross_entropy(logits, labels), inputs=list(chosen.values()))
        for t in chosen.values():
            t.grad = None
    return counter.get_total_flops(), routing


def test_masked_backward_saves_counted_flops(upcycled):
    ids, mask, labels = batch(upcycled, length=32)
    full, routing = _counted_flops(upcycled, ids, mask, labels, None, stop_gradient=False)
    active = torch.zeros_like(routing.routed.any(dim=1))
    active[:, 0] = True  # one expert per layer of four
    exact, _ = _counted_flops(upcycled, ids, mask, labels, active, stop_gradient=False)
    stop, _ = _counted_flops(upcycled, ids, mask, labels, active, stop_gradient=True)
    assert stop < exact < full
    # The saving is the weight gradient of the frozen experts' pairs (exact), plus their
    # input gradient (stop-gradient): 2 FLOPs per matmul weight per (token, slot) pair.
    per_pair = 2 * upcycled.matmul_params_per_expert()
    frozen_pairs = float(routing.pair_counts[~active].sum())
    assert full - exact == pytest.approx(per_pair * frozen_pairs)
    assert exact - stop == pytest.approx(per_pair * frozen_pairs)


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_step_flops_model_matches_flop_counter(upcycled, stop_gradient):
    meter = StepFlops(upcycled.matmul_params_per_expert(), stop_gradient)
    ids, mask, labels = batch(upcycled, seed=0, length=16)

    def calibration_step():
        with upcycled.training(stop_gradient=stop_gradient) as leaves:
            upcycled.model.eval()
            logits, routing = upcycled.forward(ids, mask, capture_routing=True)
            none = torch.zeros_like(routing.routed.any(dim=1))
            upcycled.set_active_experts(none)
            chosen = leaves.for_step(none)
            torch.autograd.backward(F.cross_entropy(logits, labels), inputs=list(chosen.values()))
            for t in chosen.values():
                t.grad = None
        return routing.pair_counts, none

    meter.calibrate(tuple(ids.shape), calibration_step)
    for seed, keep in [(1, 1), (2, 3)]:  # other batches of the same shape, other masks
        ids, mask, labels = batch(upcycled, seed=seed, length=16)
        _, routing = upcycled.forward(ids, mask, capture_routing=True)
        active = torch.zeros_like(routing.routed.any(dim=1))
        active[:, :keep] = True
        counted, routing = _counted_flops(upcycled, ids, mask, labels, active, stop_gradient)
        predicted = meter.total(tuple(ids.shape), routing.pair_counts, active)
        assert predicted == pytest.approx(counted)


def test_upcycled_minilm_equals_dense_at_initialisation():
    adapter = build_adapter(ModelConfig(kind="upcycled", num_experts=8, top_k=2), 5, seed=3)
    torch.manual_seed(0)
    dense = dense_bert_classifier(bundled_minilm_path(), 5, None)
    dense.classifier.load_state_dict(adapter.model.classifier.state_dict())
    adapter.model.eval()
    dense.eval()
    texts = ["Shares rose sharply after the results.", "The striker scored twice on Sunday."]
    tok = adapter.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        moe_logits, routing = adapter.forward(
            tok["input_ids"], tok["attention_mask"], capture_routing=True
        )
        dense_logits = dense(tok["input_ids"], tok["attention_mask"])
    torch.testing.assert_close(moe_logits, dense_logits, rtol=1e-5, atol=1e-5)
    # And the experts are really routed to: more than one expert is used in each layer.
    assert (routing.routed.any(dim=1).sum(-1) > 1).all()
    assert adapter.num_layers == 6 and adapter.num_experts == 8


def test_pretrained_path_loads_a_saved_checkpoint(tmp_path):
    adapter = tiny("qwen3_moe")
    adapter.model.eval()
    adapter.model.model.save_pretrained(tmp_path)
    adapter.tokenizer.save_pretrained(tmp_path)
    loaded = build_adapter(ModelConfig(kind="pretrained", path=str(tmp_path)), 3, seed=1)
    loaded.model.eval()
    ids, mask, _ = batch(adapter)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward(ids, mask)[0], adapter.forward(ids, mask)[0])
    assert loaded.num_layers == 2 and loaded.num_experts == 4


def test_freeze_patterns_and_footprint(upcycled):
    names = dict(upcycled.model.named_parameters())
    assert upcycled.frozen_names and all("embeddings" in n for n in upcycled.frozen_names)
    assert upcycled.gate_names and all("router" in n for n in upcycled.gate_names)
    fp = upcycled.footprint(activation_bytes_per_sample=10.0)
    assert fp.total_params == sum(p.numel() for p in names.values())
    experts_total = fp.num_experts_total * fp.params_per_expert
    frozen = sum(names[n].numel() for n in upcycled.frozen_names)
    assert fp.total_params == experts_total + fp.shared_trainable_params + frozen


def test_hashed_vocabulary_for_tiny_models():
    from hfedmoe.platform.models.heads import hash_token_ids

    ids = torch.tensor([[0, 1, 255, 256, 30521]])
    # 1 + (id - 1) % 255: 1 -> 1, 255 -> 255, 256 -> 1, 30521 -> 1 + 30520 % 255 = 176
    assert hash_token_ids(ids, 256).tolist() == [[0, 1, 255, 1, 176]]
    adapter = tiny("qwen3_moe", vocab_size=256, hidden_size=16, num_heads=2, num_layers=1)
    assert adapter.model.model.model.embed_tokens.weight.shape[0] == 256
    assert sum(p.numel() for p in adapter.model.parameters()) < 20_000
    ids, mask, _ = batch(adapter)
    logits, routing = adapter.forward(ids, mask, capture_routing=True)
    assert logits.shape == (4, 3) and routing.probs.shape[0] == 1


def test_switch_tokens_dropped_for_capacity_are_not_routed():
    adapter = tiny("switch_transformers")
    for layer in adapter.layers:
        layer.router.expert_capacity = 1  # one token per expert and sequence: most drop
    ids, mask, _ = batch(adapter)
    _, routing = adapter.forward(ids, mask, capture_routing=True)
    valid = int(mask.sum())
    # The experts still compute every token (dropped ones with weight 0)...
    assert routing.pair_counts.sum(-1).tolist() == [ids.numel()] * adapter.num_layers
    # ...but at most one token per expert and sequence counts as routed to it.
    assert (routing.token_counts.sum(-1) <= adapter.num_experts * ids.shape[0]).all()
    assert (routing.token_counts.sum(-1) < valid).all()


@pytest.mark.parametrize("kind", ["qwen3_moe", "switch_transformers"])
def test_expert_rows_of_no_expert_are_empty(kind):
    adapter = tiny(kind)
    rows = adapter.expert_rows(0, [])
    assert rows and all(a.shape[0] == 0 for a in rows.values())


def test_checkpoint_code_runs_only_when_trust_remote_code_is_set(tmp_path):
    """A checkpoint may ship Python (config.json's auto_map); by default it never runs."""
    adapter = tiny("qwen3_moe")
    adapter.model.model.save_pretrained(tmp_path)
    adapter.tokenizer.save_pretrained(tmp_path)
    marker = tmp_path / "code-ran"
    (tmp_path / "configuration_shipped.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import Qwen3MoeConfig\n\n\n"
        "class ShippedConfig(Qwen3MoeConfig):\n    pass\n"
    )
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_shipped.ShippedConfig"}
    (tmp_path / "config.json").write_text(json.dumps(config))

    assert ModelConfig().trust_remote_code is False
    loaded = build_adapter(ModelConfig(kind="pretrained", path=str(tmp_path)), 3, seed=1)
    assert loaded.num_experts == 4 and not marker.exists()  # transformers' own class
    trusted = ModelConfig(kind="pretrained", path=str(tmp_path), trust_remote_code=True)
    # The shipped config class has no classifier mapping, so the load fails after the code ran.
    with contextlib.suppress(ValueError):
        build_adapter(trusted, 3, seed=1)
    assert marker.exists()
