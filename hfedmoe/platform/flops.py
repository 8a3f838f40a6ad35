"""Exact FLOPs of local training steps without intercepting every operation.

``torch.utils.flop_counter.FlopCounterMode`` routes every op through Python (about 40%
overhead on a small model), too much for every step of every client, and it can change
numerics slightly (kernel choice under the dispatch mode), which would make a run's
weights depend on which process counted what. A step's FLOPs split into a dense part
(attention, embeddings, heads, routers), fixed by the batch shape, and the expert
matmuls, fixed by how many (token, slot) pairs each expert computes and which experts
are trained:

* forward: every pair, one pass of the expert's matmuls;
* input gradient: every pair in exact mode, only pairs of trained experts in stop-gradient
  mode (frozen experts are not back-propagated at all);
* weight gradient: only pairs of trained experts.

A causal LM's head is the other part that varies within a shape: it runs on the N
positions that predict a target (``tasks.causal_lm``), 2 d V FLOPs each forward, as many
for the input gradient, and as many again for its weight gradient when it trains.

The dense part of each batch shape is measured once per process by a calibration pass
(``calibrate``) whose result is discarded; every real step adds that to the analytic
expert and head parts. A test checks the sum against FlopCounterMode on real steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


class StepFlops:
    def __init__(
        self,
        matmul_params_per_expert: int,
        stop_gradient: bool,
        adapter_params_per_expert: int = 0,
        lm_head_params: int = 0,
        lm_head_trains: bool = False,
    ) -> None:
        """``adapter_params_per_expert`` > 0: experts train rank-r LoRA adapters (models.lora).

        One matmul pass over one pair costs 2 FLOPs (multiply, add) per weight element. With
        adapters, forward and input gradient pass through base and adapter; the weight
        gradient is the adapters' only, 4 FLOPs per adapter element and pair (the rank-r
        products x A^T and g B, recomputed, then the two outer products).

        ``lm_head_params`` (V x d) > 0: a causal LM's head, whose FLOPs count per predicted
        position: forward and input gradient, and the weight gradient if ``lm_head_trains``.
        """
        self.per_prediction = 2.0 * lm_head_params * (3 if lm_head_trains else 2)
        self.per_pair = 2.0 * (matmul_params_per_expert + adapter_params_per_expert)
        if adapter_params_per_expert:
            self.weight_grad_per_pair = 4.0 * adapter_params_per_expert
        else:
            self.weight_grad_per_pair = 2.0 * matmul_params_per_expert
        self.stop_gradient = stop_gradient
        self.dense: dict[tuple[int, ...], float] = {}

    def expert_flops(self, pair_counts: torch.Tensor, active: torch.Tensor) -> float:
        """pair_counts, active: [L, E]. FLOPs of the expert matmuls, forward and backward."""
        all_pairs = float(pair_counts.sum())
        trained_pairs = float(pair_counts[active].sum())
        input_grad_pairs = trained_pairs if self.stop_gradient else all_pairs
        passes = self.per_pair * (all_pairs + input_grad_pairs)
        return passes + self.weight_grad_per_pair * trained_pairs

    def known(self, shape: tuple[int, ...]) -> bool:
        return shape in self.dense

    def calibrate(
        self,
        shape: tuple[int, ...],
        step: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        predictions: int = 0,
    ) -> None:
        """Count one throw-away step; ``step`` returns its (pair_counts, active), and
        ``predictions`` is how many positions it ran the LM head on."""
        with FlopCounterMode(display=False) as counter:
            pair_counts, active = step()
        varying = self.expert_flops(pair_counts, active) + self.per_prediction * predictions
        self.dense[shape] = counter.get_total_flops() - varying

    def total(
        self,
        shape: tuple[int, ...],
        pair_counts: torch.Tensor,
        active: torch.Tensor,
        predictions: int = 0,
    ) -> float:
        experts = self.expert_flops(pair_counts, active)
        return self.dense[shape] + experts + self.per_prediction * predictions
