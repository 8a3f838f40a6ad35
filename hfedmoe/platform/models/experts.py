"""Routed-expert computation with a per-batch trainable-expert mask decided after the forward.

HFedMoE picks the experts a client trains from the router probabilities of the very batch
it trains on (eqs 3-15), so the choice exists only after the forward pass. The forward
therefore runs every expert normally and keeps every sample's routing; what changes is the
backward:

* exact: the caller back-propagates with ``torch.autograd.backward(loss, inputs=trainable)``.
  Each expert's weights are a separate leaf tensor, so autograd's graph pruning skips the
  weight-gradient matmuls of experts outside ``inputs`` while their input gradient still
  flows to the layers below. Gradients of the trained parameters equal full backward's.
* stop_gradient: additionally, a frozen expert's output blocks its gradient (``GradGate``),
  so neither its weight nor its input gradient is computed. Cheaper, and an approximation:
  layers below lose the gradient paths through frozen experts. The router still gets the
  gradient of the routing weight, which needs only the saved expert output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class BackwardPlan:
    """Which experts of each MoE layer receive gradient in the current step.

    Set by the local trainer after the forward (``set_active``) and read during the
    backward by ``GradGate``; ``stop_gradient`` is fixed per run because it decides, at
    forward time, whether the gates are inserted at all.
    """

    def __init__(self, num_layers: int, stop_gradient: bool) -> None:
        self.stop_gradient = stop_gradient
        self.active: list[list[bool] | None] = [None] * num_layers

    def set_active(self, layer: int, mask: torch.Tensor) -> None:
        self.active[layer] = mask.tolist()  # read per expert in backward: plain bools

    def clear(self) -> None:
        self.active = [None] * len(self.active)

    def blocks(self, layer: int, expert: int) -> bool:
        mask = self.active[layer]
        return mask is not None and not mask[expert]


class GradGate(torch.autograd.Function):
    """Identity forward; in backward, drops the gradient of a frozen expert's output."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, plan: BackwardPlan, layer: int, expert: int):  # type: ignore[override]
        ctx.plan, ctx.layer, ctx.expert = plan, layer, expert
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if ctx.plan.blocks(ctx.layer, ctx.expert):
            return None, None, None, None
        return grad, None, None, None


ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def routed_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    expert_fn: ExpertFn,
    plan: BackwardPlan | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """y_t = sum_k w_tk E_{i_tk}(x_t) over the routed experts of each token (eq 2).

    One sort groups the (token, slot) pairs by expert and one host sync reads the group
    sizes; each expert then runs once on its contiguous block. The per-pair outputs are put
    back in (token, slot) order and summed over slots, which is deterministic on every
    device (no atomics), unlike ``index_add_`` on CUDA.

    hidden: [T, d]; top_k_index, top_k_weights: [T, k]. Returns [T, d].
    """
    num_tokens, k = top_k_index.shape
    flat_index = top_k_index.reshape(-1)
    order = torch.argsort(flat_index, stable=True)
    counts = torch.bincount(flat_index, minlength=num_experts).tolist()
    grouped_inputs = hidden[order // k]
    outputs = []
    for expert, block in enumerate(torch.split(grouped_inputs, counts)):
        if block.shape[0] == 0:
            continue
        y = expert_fn(expert, block)
        if plan is not None and plan.stop_gradient and torch.is_grad_enabled():
            y = GradGate.apply(y, plan, layer, expert)
        outputs.append(y)
    grouped_outputs = torch.cat(outputs) if outputs else hidden.new_zeros(0, hidden.shape[-1])
    per_pair = torch.empty_like(grouped_outputs)
    per_pair[order] = grouped_outputs
    weighted = per_pair * top_k_weights.reshape(-1, 1).to(per_pair.dtype)
    return weighted.view(num_tokens, k, -1).sum(dim=1).to(hidden.dtype)
