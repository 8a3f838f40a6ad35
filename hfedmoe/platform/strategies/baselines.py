"""The baselines HFedMoE must beat (Fang et al., arXiv 2601.00583, Section 5).

Budget-aware clients that pick C_budget experts by another rule (random, most routed),
budget-unaware full fine-tuning, and FLEx-style frozen experts. All aggregate by FedAvg.
"""

from __future__ import annotations

import numpy as np
import torch

from hfedmoe.platform.records import BatchRouting
from hfedmoe.platform.selection import select_random_experts
from hfedmoe.platform.strategies.base import Strategy, register


@register
class BudgetRandom(Strategy):
    """C_budget experts drawn uniformly from the routed ones."""

    name = "budget_random"

    def select_experts(
        self, routing: BatchRouting, capacity: int, rng: np.random.Generator
    ) -> torch.Tensor:
        return select_random_experts(routing.union, capacity, self.hp.budget_scope, rng)


@register
class BudgetTopUsage(Strategy):
    """The C_budget experts routed to by the most tokens of the batch."""

    name = "budget_top_usage"

    def expert_scores(self, routing: BatchRouting) -> torch.Tensor:
        return routing.token_counts.to(torch.float32)


@register
class FedAvgFull(Strategy):
    """FedAvg of the whole model; budgets ignored, so clients whose step does not fit fail."""

    name = "fedavg_full"
    trains = "all"

    def select_experts(
        self, routing: BatchRouting, capacity: int, rng: np.random.Generator
    ) -> torch.Tensor:
        # Only the routed experts receive a gradient; the mask admits every expert.
        return torch.ones_like(routing.union)


@register
class MoEAllRouted(Strategy):
    """Vanilla MoE fine-tuning: each batch trains every expert it routes to (E_union).

    Budget-unaware like fedavg_full, but sparse: what a step needs grows with the batch's
    routed union, so a step whose union does not fit the device runs out of memory and
    the client's update is lost (paper Fig. 3: failures driven by the routed union).
    """

    name = "moe_all_routed"
    trains = "routed"

    def select_experts(
        self, routing: BatchRouting, capacity: int, rng: np.random.Generator
    ) -> torch.Tensor:
        return routing.union


@register
class FLEx(Strategy):
    """FLEx-style: experts frozen, shared parameters and routers federated."""

    name = "flex"
    trains = "none"

    def select_experts(
        self, routing: BatchRouting, capacity: int, rng: np.random.Generator
    ) -> torch.Tensor:
        return torch.zeros_like(routing.union)
