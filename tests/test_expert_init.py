"""Experts built from a dense checkpoint: copy (sparse upcycling), drop, partition."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfedmoe.platform.config import ConfigError, ModelConfig, parse_config
from hfedmoe.platform.data.corpora import load_bbc_news
from hfedmoe.platform.models import build_adapter
from hfedmoe.platform.models.upcycle import (
    UpcycledFeedForward,
    balanced_assignment,
    bundled_minilm_path,
    dense_bert_classifier,
)

LAYERS = 2  # the first two MiniLM layers keep every build and forward well under a second
WIDTH = 1536  # MiniLM's FFN width I
HIDDEN = 384


def build(expert_init: str, num_experts: int = 8, top_k: int = 2, seed: int = 0, **extra):
    cfg = ModelConfig(
        kind="upcycled",
        num_experts=num_experts,
        top_k=top_k,
        num_layers=LAYERS,
        expert_init=expert_init,
        **extra,
    )
    return build_adapter(cfg, num_labels=3, seed=seed)


@functools.cache
def dense_model():
    """The dense source model (read only: tests never train it)."""
    return dense_bert_classifier(bundled_minilm_path(), 3, LAYERS).eval()


def dense_ffn(layer: int):
    block = dense_model().backbone.encoder.layer[layer]
    return block.intermediate.dense.requires_grad_(False), block.output.dense.requires_grad_(False)


def moe_block(adapter, layer: int) -> UpcycledFeedForward:
    return adapter.model.backbone.encoder.layer[layer].intermediate


def texts_batch(adapter, count: int = 8, length: int = 64):
    texts = list(load_bbc_news().texts[::97][:count])
    return adapter.tokenizer(
        texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )


def last_hidden(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model.backbone(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state


@pytest.fixture(scope="module")
def partition_all():
    """Partitioned MiniLM with every expert selected: must be the dense model."""
    adapter = build("partition", num_experts=8, top_k=8)
    adapter.model.eval()
    return adapter


# ---- partition ---------------------------------------------------------------------------


def test_partition_with_every_expert_computes_the_dense_model(partition_all):
    tokens = texts_batch(partition_all, count=4)
    moe = last_hidden(partition_all.model, tokens)
    dense = last_hidden(dense_model(), tokens)
    # Only the summation order differs: each FFN output sums its 1536 neuron terms as 8
    # partial sums of 192 plus an 8-term sum, instead of one 1536-term dot product. A
    # reordered fp32 sum of n terms moves by at most about n * 2^-24 * sum|terms| and in
    # practice by a few ulps (measured: 1e-6 on hidden values of magnitude 8, i.e. about
    # 2 ulps), and LayerNorm keeps the scale near 1 from layer to layer. 1e-5 leaves ten
    # times that margin, while leaving out a single group moves the output by far more
    # (checked below), so the tolerance still tells the dense sum from a partial one.
    torch.testing.assert_close(moe, dense, rtol=1e-5, atol=1e-5)
    one_less = build("partition", num_experts=8, top_k=7)
    one_less.model.eval()
    assert (last_hidden(one_less.model, tokens) - dense).abs().max() > 1e-2


def test_partition_combines_selected_experts_with_weight_one_and_trains_the_router(
    partition_all,
):
    block = moe_block(partition_all, 0)
    hidden = torch.randn(5, HIDDEN)
    _, weights, _ = block.router(hidden)
    assert torch.equal(weights, torch.ones_like(weights))
    # The output bias is one shared parameter, added once, not a per-expert tensor.
    assert "b_out" not in block.expert_names and block.out_bias.shape == (HIDDEN,)
    assert any(name.endswith("intermediate.out_bias") for name in partition_all.shared_names)
    # Straight-through combine weights: value 1, gradient of the soft mixture.
    adapter = build("partition", num_experts=8, top_k=2)
    tokens = texts_batch(adapter, count=2, length=16)
    with adapter.training(stop_gradient=False) as leaves:
        logits, _ = adapter.forward(tokens["input_ids"], tokens["attention_mask"])
        logits.square().sum().backward()
        for gate in leaves.gates.values():
            assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_partition_splits_each_ffn_into_equal_groups_of_its_neurons():
    adapter = build("partition", num_experts=16, top_k=2)
    for layer in range(LAYERS):
        dense_in, dense_out = dense_ffn(layer)
        block = moe_block(adapter, layer)
        assert block.w_in.shape == (16, WIDTH // 16, HIDDEN)
        assert block.w_out.shape == (16, HIDDEN, WIDTH // 16)
        # Every dense neuron is in exactly one expert, with its own bias and output column.
        rows = block.w_in.detach().reshape(WIDTH, HIDDEN)
        match = torch.cdist(rows, dense_in.weight.detach()).argmin(dim=1)
        assert sorted(match.tolist()) == list(range(WIDTH))
        torch.testing.assert_close(rows, dense_in.weight.detach()[match], rtol=0, atol=0)
        torch.testing.assert_close(block.b_in.detach().reshape(WIDTH), dense_in.bias[match])
        columns = block.w_out.detach().permute(1, 0, 2).reshape(HIDDEN, WIDTH)
        torch.testing.assert_close(columns, dense_out.weight.detach()[:, match], rtol=0, atol=0)
        torch.testing.assert_close(block.out_bias.detach(), dense_out.bias.detach())


def test_balanced_assignment_fills_every_group_exactly():
    similarity = torch.randn(96, 8, generator=torch.Generator().manual_seed(1))
    similarity[:, 3] += 10  # every point prefers group 3; it may still take only 12
    assignment = balanced_assignment(similarity, size=12)
    assert torch.bincount(assignment, minlength=8).tolist() == [12] * 8
    # Group 3 keeps the 12 points most similar to it.
    assert set(torch.nonzero(assignment == 3).flatten().tolist()) == set(
        similarity[:, 3].topk(12).indices.tolist()
    )


def test_partition_router_prefers_the_groups_that_fire():
    """On real text the router picks the groups with the largest output well above chance."""
    num_experts, top_k = 16, 4
    adapter = build("partition", num_experts=num_experts, top_k=top_k)
    adapter.model.eval()
    inputs: list[torch.Tensor] = []
    hooks = [
        moe_block(adapter, layer).register_forward_pre_hook(
            lambda _m, args: inputs.append(args[0].detach())
        )
        for layer in range(LAYERS)
    ]
    tokens = texts_batch(adapter)
    with torch.no_grad():
        _, routing = adapter.forward(
            tokens["input_ids"], tokens["attention_mask"], capture_routing=True
        )
    for hook in hooks:
        hook.remove()
    real = tokens["attention_mask"].bool().flatten()
    for layer in range(LAYERS):
        block = moe_block(adapter, layer)
        x = inputs[layer].reshape(-1, HIDDEN)[real]
        with torch.no_grad():
            # Norm of each group's contribution to each token's FFN output: what fires.
            act = block.activation(torch.einsum("td,eid->tei", x, block.w_in) + block.b_in)
            fired = torch.einsum("tei,edi->ted", act, block.w_out).norm(dim=-1)
            logits = F.linear(x, block.router.weight)
        chosen = logits.topk(top_k, dim=-1).indices
        best = fired.topk(top_k, dim=-1).indices
        overlap = (chosen.unsqueeze(-1) == best.unsqueeze(-2)).any(-1).float().mean()
        # Chance is k/E = 0.25; measured 0.39 (layer 0) and 0.52 (layer 1).
        assert overlap > 1.4 * top_k / num_experts
        # Per-token router distributions are not uniform, and the batch's usage is uneven.
        probs = logits.softmax(dim=-1)
        entropy = -(probs * probs.log()).sum(dim=-1).mean()
        assert entropy < 0.95 * math.log(num_experts)
        usage = routing.token_counts[layer].float() / routing.token_counts[layer].sum()
        usage_entropy = -(usage * usage.clamp_min(1e-12).log()).sum()
        assert usage_entropy < 0.95 * math.log(num_experts)


def test_partition_footprint_counts_fine_grained_experts():
    adapter = build("partition", num_experts=16, top_k=2)
    width = WIDTH // 16
    assert adapter.params_per_expert() == 2 * width * HIDDEN + width
    assert adapter.matmul_params_per_expert() == 2 * width * HIDDEN
    footprint = adapter.footprint(activation_bytes_per_sample=1.0)
    names = dict(adapter.model.named_parameters())
    frozen = sum(names[n].numel() for n in adapter.frozen_names)
    experts_total = footprint.num_experts_total * footprint.params_per_expert
    assert footprint.total_params == experts_total + footprint.shared_trainable_params + frozen
    # The partition holds the dense model's parameters plus one router per layer.
    dense_params = sum(p.numel() for p in dense_model().parameters())
    assert footprint.total_params == dense_params + LAYERS * 16 * HIDDEN


def test_partition_needs_num_experts_dividing_the_ffn_width():
    with pytest.raises(ConfigError, match=r"model\.num_experts \(7\) must divide"):
        build("partition", num_experts=7, top_k=2)


# ---- copy and drop -----------------------------------------------------------------------


def test_copy_gives_identical_experts_and_the_dense_model():
    adapter = build("copy", num_experts=4, top_k=2)
    adapter.model.eval()
    for layer in range(LAYERS):
        dense_in, _ = dense_ffn(layer)
        block = moe_block(adapter, layer)
        for expert in range(4):
            assert torch.equal(block.w_in[expert], dense_in.weight)
    tokens = texts_batch(adapter, count=2, length=32)
    torch.testing.assert_close(
        last_hidden(adapter.model, tokens), last_hidden(dense_model(), tokens)
    )


def test_drop_redraws_its_own_fraction_of_each_experts_neurons():
    adapter = build("drop", num_experts=4, top_k=2, drop_ratio=0.25)
    dense_in, dense_out = dense_ffn(0)
    block = moe_block(adapter, 0)
    redrawn = []
    for expert in range(4):
        changed = (block.w_in[expert] != dense_in.weight).any(dim=1)
        assert int(changed.sum()) == WIDTH // 4
        # Input row, input bias and output column of a neuron are redrawn together.
        assert torch.equal(changed, block.b_in[expert] != dense_in.bias)
        assert torch.equal(changed, (block.w_out[expert] != dense_out.weight).any(dim=0))
        assert torch.equal(block.b_out[expert], dense_out.bias)
        redrawn.append(changed)
        # Redrawn rows follow the original tensor's statistics.
        fresh = block.w_in.detach()[expert][changed]
        assert abs(float(fresh.std() / dense_in.weight.std()) - 1) < 0.05
    assert all(not torch.equal(redrawn[0], other) for other in redrawn[1:])


@pytest.mark.parametrize("expert_init", ["drop", "partition"])
def test_experts_are_pairwise_distinct(expert_init):
    adapter = build(expert_init, num_experts=4, top_k=2)
    w_in = moe_block(adapter, 0).w_in.detach()
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(w_in[a], w_in[b])


@pytest.mark.parametrize("expert_init", ["drop", "partition"])
def test_same_seed_same_model(expert_init):
    first = build(expert_init, seed=3).state()
    second = build(expert_init, seed=3).state()
    for x, y in [
        (first.shared, second.shared),
        (first.gates, second.gates),
        *zip(first.experts, second.experts, strict=True),
    ]:
        assert x.keys() == y.keys()
        assert all(np.array_equal(x[k], y[k]) for k in x)
    other = build(expert_init, seed=4).state()
    assert any(
        not np.array_equal(a[k], b[k])
        for a, b in zip(first.experts, other.experts, strict=True)
        for k in a
    )


# ---- configuration -----------------------------------------------------------------------


def test_expert_init_needs_a_model_built_from_a_dense_checkpoint():
    with pytest.raises(ConfigError, match=r"model\.expert_init='partition'.*model\.kind"):
        parse_config({"model": {"kind": "qwen3_moe", "expert_init": "partition"}})


def test_drop_ratio_is_checked():
    with pytest.raises(ConfigError, match=r"model\.drop_ratio"):
        parse_config({"model": {"expert_init": "drop", "drop_ratio": 1.5}})
    with pytest.raises(ConfigError, match=r"model\.expert_init"):
        parse_config({"model": {"expert_init": "moefy"}})
    assert parse_config({"model": {"expert_init": "drop"}}).model.drop_ratio == 0.5
