"""HFedMoE (Fang et al., arXiv 2601.00583) and its three ablations.

Client: the top C_budget experts of the batch's routed union by information-bottleneck
score (eqs 3-15). Server: sparsity-aware expert aggregation (eq 17) and
preference-weighted gates (eqs 19-21). Each ablation overrides exactly one hook.
"""

from __future__ import annotations

import numpy as np
import torch

from hfedmoe.platform.aggregation import sparsity_aware_contribution
from hfedmoe.platform.records import BatchRouting, ClientReport
from hfedmoe.platform.selection import batch_importance, ib_scores
from hfedmoe.platform.strategies.base import Strategy, register


@register
class HFedMoE(Strategy):
    """IB-guided budgeted selection, sparsity-aware experts, preference-weighted gates."""

    name = "hfedmoe"

    def expert_scores(self, routing: BatchRouting) -> torch.Tensor:
        return ib_scores(routing.probs, self.hp.importance_mix, self.hp.beta)  # eq 14

    def expert_weights(self, report: ClientReport, layer: int, index: np.ndarray) -> np.ndarray:
        usage = report.usage[layer, index]
        return sparsity_aware_contribution(float(report.num_samples), usage, self.hp.tau)

    def gate_weight(self, report: ClientReport, preference: float) -> float:
        return preference  # alpha(c) up to the common 1/|S_global| (eq 20)

    def gate_divisor(self, weight_sum: float, global_set_size: int) -> float:
        if weight_sum <= 0:
            return 0.0
        # Normalised alphas divide by their sum; eq 21 as written by |S_global|.
        return weight_sum if self.hp.normalise_gate_weights else float(global_set_size)


@register
class HFedMoENoIB(HFedMoE):
    """Ablation: rank experts by importance s_b(e) alone (eq 5, no KL term)."""

    name = "hfedmoe_no_ib"

    def expert_scores(self, routing: BatchRouting) -> torch.Tensor:
        return batch_importance(routing.probs, self.hp.importance_mix)


@register
class HFedMoEPlainAgg(HFedMoE):
    """Ablation: FedAvg of every uploaded expert instead of eq 17."""

    name = "hfedmoe_plain_agg"
    expert_weights = Strategy.expert_weights


@register
class HFedMoENoGateAgg(HFedMoE):
    """Ablation: FedAvg of routers instead of eqs 19-21."""

    name = "hfedmoe_no_gate_agg"
    gate_weight = Strategy.gate_weight
    gate_divisor = Strategy.gate_divisor
