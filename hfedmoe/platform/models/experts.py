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

Fused experts (rows of stacked tensors: the upcycled model and transformers' fused MoE
families) run as one autograd node per layer, ``grouped_experts``: grouped GEMMs over the
(token, slot) pairs sorted by expert, and a backward that computes weight gradients only
for the step's trained experts and, in stop-gradient mode, back-propagates only their
rows. Its cost no longer grows with the number of experts at equal active FLOPs, which a
Python loop of small GEMMs, one autograd node per expert, did (bench/b7). Per-expert
modules (SwitchTransformers) keep that loop, ``routed_experts``.

With LoRA (``ExpertLoRA``, models/lora.py) the same node applies each expert's rank-r
adapter factored beside its frozen base, which may be stored in 4 bits (``NF4Weight``);
the trained experts then get O(r) adapter gradients and the base only passes the input
gradient through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import flop_registry, register_flop_formula


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

    def passing(self, layer: int, num_experts: int) -> list[bool]:
        """Experts whose output gradient flows this step: the active ones, all if unset."""
        mask = self.active[layer]
        return [True] * num_experts if mask is None else mask


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


Activation = Callable[[torch.Tensor], torch.Tensor]


class NF4Weight(nn.Module):
    """A frozen stacked weight stored in 4 bits (NF4, QLoRA's format) through bitsandbytes.

    ``dense()`` dequantizes it for the layer's GEMMs; the kernel calls it again in backward
    rather than saving the dense copy, so only the 4-bit form stays resident between the
    forward and the backward (as in QLoRA). Blocks of 64 values share one fp32 absmax.
    """

    def __init__(self, weight: torch.Tensor, blocksize: int = 64) -> None:
        super().__init__()
        from bitsandbytes.functional import quantize_4bit

        packed, state = quantize_4bit(weight.detach(), blocksize=blocksize, quant_type="nf4")
        self.shape, self.dtype, self.blocksize = weight.shape, weight.dtype, blocksize
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code", state.code)

    def dense(self) -> torch.Tensor:
        from bitsandbytes.functional import QuantState, dequantize_4bit

        state = QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=self.code,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
        )
        return dequantize_4bit(self.packed, state)


def dense(weight: torch.Tensor | NF4Weight) -> torch.Tensor:
    return weight.dense() if isinstance(weight, NF4Weight) else weight


@dataclass
class ExpertLoRA:
    """Rank-r adapters of one layer's experts: each expert computes with W + scale * B A.

    a_in [E, r, d], b_in [E, H, r] adapt w_in; a_out [E, r, I], b_out [E, d, r] adapt
    w_out. The adapter is applied factored (x A^T B^T), never merged, so a step costs the
    adapter's O(r) FLOPs on top of the frozen base's, and its weight gradients are O(r).
    """

    a_in: torch.Tensor
    b_in: torch.Tensor
    a_out: torch.Tensor
    b_out: torch.Tensor
    scale: float

    def tensors(self) -> list[torch.Tensor]:
        return [self.a_in, self.b_in, self.a_out, self.b_out]


@dataclass
class StackedExperts:
    """One layer's experts as stacked tensors: y = act(x W_in^T + b_in) W_out^T + b_out.

    w_in [E, H, d], w_out [E, d, I], b_in [E, H], b_out [E, d]; ``activation`` maps the
    [pairs, H] pre-activation to [pairs, I] (H = 2I for a gated activation). With ``lora``
    the base tensors are frozen (w_in and w_out possibly 4-bit) and the adapters are what
    trains. ``leaves``, set while training, holds each expert's rows of the trained tensors
    (``trainable()``) as leaves sharing their storage.
    """

    w_in: torch.Tensor | NF4Weight
    w_out: torch.Tensor | NF4Weight
    activation: Activation
    b_in: torch.Tensor | None = None
    b_out: torch.Tensor | None = None
    lora: ExpertLoRA | None = None
    leaves: Sequence[Sequence[torch.Tensor]] | None = None

    @property
    def num_experts(self) -> int:
        return int(self.w_in.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        """The base tensors, dequantized where stored in 4 bits."""
        weights = [dense(self.w_in), dense(self.w_out)]
        return weights + [t for t in (self.b_in, self.b_out) if t is not None]

    def trainable(self) -> list[torch.Tensor]:
        """The stacked tensors that receive gradient, in the order of each expert's leaves."""
        if self.lora is not None:
            return self.lora.tensors()
        return self.tensors()


def grouped_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    experts: StackedExperts,
    plan: BackwardPlan | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """y_t = sum_k w_tk E_{i_tk}(x_t) over the routed experts of each token (eq 2).

    The same function as ``routed_experts``, as one autograd node. Gradients reach the
    per-expert leaves while training (``experts.leaves``), else the stacked tensors.
    hidden: [T, d]; top_k_index, top_k_weights: [T, k]. Returns [T, d].
    """
    if experts.leaves is None:
        params = experts.trainable()
    else:
        params = [t for expert in experts.leaves for t in expert]
    return _GroupedExperts.apply(
        hidden, top_k_weights, top_k_index, _Layer(experts, plan, layer), *params
    )


@dataclass
class _Layer:
    """What the autograd node needs besides tensors."""

    experts: StackedExperts
    plan: BackwardPlan | None
    layer: int


class _GroupedExperts(torch.autograd.Function):
    """Forward over every routed pair; weight gradients only for the trained experts.

    Pairs are sorted by expert (a stable sort: the order is deterministic) and each
    expert's contiguous rows go through two grouped GEMMs. Gathers and the weighted sum over
    each token's k slots are index_select and embedding_bag: one pass over the [pairs, d]
    rows each, no scatter with atomics. Backward, with g the output gradient:

    * routing weights (the router's gradient): <g_t, E_i(x_t)> for every pair;
    * input: through every pair in exact mode, through the trained experts' pairs only in
      stop-gradient mode (a frozen expert's output gradient is dropped);
    * weights: grouped GEMMs over the trained experts' rows only, one [n_trained, ...]
      gradient per tensor whose slices go to the experts' leaves.

    Saved for backward: the layer input, the pre-activation and (for the router) the
    per-pair outputs; gathered inputs and the activation are recomputed where needed.
    """

    @staticmethod
    def forward(ctx, hidden, top_k_weights, top_k_index, spec: _Layer, *params):  # type: ignore[override]
        experts = spec.experts
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # sorted row -> (token, slot) pair
        counts = torch.bincount(flat, minlength=experts.num_experts)
        offsets = counts.cumsum(0, dtype=torch.int32)
        token = order // top_k_index.shape[1]
        w_in, w_out = dense(experts.w_in), dense(experts.w_out)
        rows = hidden.index_select(0, token)
        pre = _project(rows, w_in, _pair(experts.lora, "in"), offsets, counts)
        if experts.b_in is not None:
            pre += experts.b_in.index_select(0, flat[order])
        act = experts.activation(pre)
        per_row = _project(act, w_out, _pair(experts.lora, "out"), offsets, counts)
        weights = top_k_weights.to(per_row.dtype)
        out = F.embedding_bag(
            _slots(order, top_k_index), per_row, per_sample_weights=weights, mode="sum"
        )
        if experts.b_out is not None:
            out += F.embedding_bag(
                top_k_index, experts.b_out, per_sample_weights=weights, mode="sum"
            )
        ctx.spec = spec
        ctx.save_for_backward(
            hidden,
            top_k_weights,
            top_k_index,
            order,
            counts,
            pre,
            per_row if ctx.needs_input_grad[1] else None,
            *experts.trainable(),  # the frozen (maybe 4-bit) base is re-read from spec
        )
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, top_k_weights, top_k_index, order, counts, pre, per_row, *weights = (
            ctx.saved_tensors
        )
        spec: _Layer = ctx.spec
        experts = spec.experts
        w_in, w_out = dense(experts.w_in), dense(experts.w_out)
        num_experts = experts.num_experts
        grad_out = grad_out.to(pre.dtype)
        token = order // top_k_index.shape[1]
        slots = _slots(order, top_k_index)
        row_weights = top_k_weights.to(pre.dtype).reshape(-1).index_select(0, order)
        grad_rows = grad_out.index_select(0, token)  # g_t of each sorted row

        grad_weights = None
        if ctx.needs_input_grad[1]:
            dots = torch.linalg.vecdot(grad_rows, per_row).index_select(0, slots.reshape(-1))
            grad_weights = dots.view_as(top_k_weights)
            if experts.b_out is not None:
                grad_weights = grad_weights + (grad_out @ experts.b_out.mT).gather(1, top_k_index)
            grad_weights = grad_weights.to(top_k_weights.dtype)

        sizes = counts.tolist()  # the layer's one host sync
        if spec.plan is None:
            passing, stop_gradient = [True] * num_experts, False
        else:
            passing = spec.plan.passing(spec.layer, num_experts)
            stop_gradient = spec.plan.stop_gradient
        per_expert = len(ctx.needs_input_grad) - 4 > len(weights)
        trained = [
            passing[e] and sizes[e] > 0 and _wants_grad(ctx, e, len(weights), per_expert)
            for e in range(num_experts)
        ]
        input_grad = ctx.needs_input_grad[0]
        # Experts whose rows back-propagate: all routed ones for the input gradient in
        # exact mode, the passing ones in stop-gradient mode, else only the trained ones.
        flowing = [
            n > 0 and (trained[e] or (input_grad and (passing[e] or not stop_gradient)))
            for e, n in enumerate(sizes)
        ]
        param_grads: list[torch.Tensor | None] = [None] * (len(ctx.needs_input_grad) - 4)
        if not any(flowing):
            return (None, grad_weights, None, None, *param_grads)

        row_expert = torch.repeat_interleave(
            torch.arange(num_experts, device=counts.device), counts, output_size=order.numel()
        )
        rows = _rows_of(flowing, sizes, row_expert)  # None: every row
        grad_per_row = _take(grad_rows, rows) * _take(row_weights, rows).unsqueeze(1)
        flowing_counts = counts * torch.tensor(flowing, device=counts.device)
        offsets = flowing_counts.cumsum(0, dtype=torch.int32)
        lora_in, lora_out = _pair(experts.lora, "in"), _pair(experts.lora, "out")
        grad_act = _project_back(grad_per_row, w_out, lora_out, offsets, flowing_counts)
        with torch.enable_grad():  # recompute the activation for its backward
            pre_rows = _take(pre, rows).detach().requires_grad_(True)
            # Fed through a view: module hooks (FlopCounterMode's tracker) cannot take a
            # leaf as a module input inside a nested autograd.grad.
            act = experts.activation(pre_rows.view_as(pre_rows))
        (grad_pre,) = torch.autograd.grad(act, pre_rows, grad_act)

        grad_hidden = None
        if input_grad:
            grad_x = _project_back(grad_pre, w_in, lora_in, offsets, flowing_counts)
            if rows is not None:  # pairs of frozen experts read a zero row
                position = torch.full_like(order, rows.numel())
                position[rows] = torch.arange(rows.numel(), device=rows.device)
                slots = position.index_select(0, slots.reshape(-1)).view_as(slots)
                grad_x = torch.cat([grad_x, grad_x.new_zeros(1, grad_x.shape[1])])
            grad_hidden = F.embedding_bag(slots, grad_x, mode="sum").to(hidden.dtype)

        chosen = [e for e in range(num_experts) if trained[e]]
        if chosen:
            # The trained experts' rows among the flowing ones.
            flowing_sizes = [n if flowing[e] else 0 for e, n in enumerate(sizes)]
            sub = _rows_of(trained, flowing_sizes, _take(row_expert, rows))
            grad_rows_of = (
                _take(grad_per_row, sub),
                _take(grad_pre, sub),
                _take(act.detach(), sub),
                hidden.index_select(0, _take(_take(token, rows), sub)),
                [sizes[e] for e in chosen],
            )
            if experts.lora is None:
                grads = _weight_grads(experts, *grad_rows_of)
            else:
                grads = _lora_weight_grads(experts.lora, chosen, *grad_rows_of)
            if per_expert:
                for j, g in enumerate(grads):
                    for e, row in zip(chosen, g.unbind(0), strict=True):
                        param_grads[e * len(grads) + j] = row
            else:
                index = torch.tensor(chosen, device=counts.device)
                for j, (g, w) in enumerate(zip(grads, weights, strict=True)):
                    param_grads[j] = torch.zeros_like(w).index_copy_(0, index, g.to(w.dtype))
        return (grad_hidden, grad_weights, None, None, *param_grads)


def _slots(order: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
    """[T, k]: the sorted row of each (token, slot) pair (the inverse of ``order``)."""
    slots = torch.empty_like(order)
    slots[order] = torch.arange(order.numel(), device=order.device)
    return slots.view_as(top_k_index)


def _wants_grad(ctx, expert: int, num_tensors: int, per_expert: bool) -> bool:
    """Whether any weight of ``expert`` needs a gradient (inputs 4.. are the weights)."""
    needs = ctx.needs_input_grad[4:]
    if per_expert:
        return any(needs[expert * num_tensors : (expert + 1) * num_tensors])
    return any(needs)


def _rows_of(keep: list[bool], sizes: list[int], row_expert: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows whose expert is kept; None when that is every row.

    sizes[e]: rows of expert e among ``row_expert`` (the expert of each row).
    """
    if all(k or n == 0 for k, n in zip(keep, sizes, strict=True)):
        return None
    mask = torch.tensor(keep, device=row_expert.device)
    return mask.index_select(0, row_expert).nonzero().squeeze(1)


def _take(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows)


def _pair(lora: ExpertLoRA | None, side: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A, B, scale) of the adapter on w_in ("in") or w_out ("out"); None without LoRA."""
    if lora is None:
        return None
    if side == "in":
        return lora.a_in, lora.b_in, lora.scale
    return lora.a_out, lora.b_out, lora.scale


def _project(x, weight, lora, offsets, counts) -> torch.Tensor:
    """x [M, in] through each row group's expert map [G, out, in] (+ scale x A^T B^T)."""
    y = _grouped_mm(x, weight.mT, offsets, counts)
    if lora is not None:
        a, b, scale = lora
        y += scale * _grouped_mm(_grouped_mm(x, a.mT, offsets, counts), b.mT, offsets, counts)
    return y


def _project_back(grad, weight, lora, offsets, counts) -> torch.Tensor:
    """The input gradient of ``_project``: grad [M, out] -> [M, in]."""
    x_grad = _grouped_mm(grad, weight, offsets, counts)
    if lora is not None:
        a, b, scale = lora
        x_grad += scale * _grouped_mm(_grouped_mm(grad, b, offsets, counts), a, offsets, counts)
    return x_grad


def _lora_weight_grads(
    lora: ExpertLoRA,
    chosen: list[int],
    grad_out: torch.Tensor,
    grad_pre: torch.Tensor,
    act: torch.Tensor,
    inputs: torch.Tensor,
    sizes: list[int],
) -> list[torch.Tensor]:
    """Gradients [n, ...] of the n trained experts' adapters (a_in, b_in, a_out, b_out).

    With y = x W^T + s x A^T B^T and g = dL/dy: dB = s g^T (x A^T), dA = s (g B)^T x. The
    rank-r products x A^T and g B are recomputed for the trained rows only: O(r) work per
    row, where a full expert's weight gradient is O(H d).
    """
    index = torch.tensor(chosen, device=grad_out.device)
    a_in, b_in, a_out, b_out = (t.index_select(0, index) for t in lora.tensors())
    lengths = torch.tensor(sizes, device=grad_out.device)
    offsets = lengths.cumsum(0, dtype=torch.int32)

    def mm(a, b):
        return _grouped_mm(a, b, offsets, lengths)

    s = lora.scale
    return [
        s * mm(mm(grad_pre, b_in).mT, inputs),  # a_in [n, r, d]
        s * mm(grad_pre.mT, mm(inputs, a_in.mT)),  # b_in [n, H, r]
        s * mm(mm(grad_out, b_out).mT, act),  # a_out [n, r, I]
        s * mm(grad_out.mT, mm(act, a_out.mT)),  # b_out [n, d, r]
    ]


def _weight_grads(
    experts: StackedExperts,
    grad_out: torch.Tensor,
    grad_pre: torch.Tensor,
    act: torch.Tensor,
    inputs: torch.Tensor,
    sizes: list[int],
) -> list[torch.Tensor]:
    """Gradients [n, ...] of the n trained experts' tensors, from their rows (grouped by expert)."""
    lengths = torch.tensor(sizes, device=grad_out.device)
    offsets = lengths.cumsum(0, dtype=torch.int32)
    grads = [
        _grouped_mm(grad_pre.mT, inputs, offsets, lengths),  # w_in [n, H, d]
        _grouped_mm(grad_out.mT, act, offsets, lengths),  # w_out [n, d, I]
    ]
    # Bias gradients are per-expert row sums: a segment reduction, deterministic.
    if experts.b_in is not None:
        grads.append(torch.segment_reduce(grad_pre, "sum", lengths=lengths))
    if experts.b_out is not None:
        grads.append(torch.segment_reduce(grad_out, "sum", lengths=lengths))
    return grads


def _grouped_mm(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Grouped GEMM, groups split at the int32 ``offsets`` (cumulative ``counts``).

    a [M, K] @ b [G, K, N] -> [M, N] (row groups), or a [M, K] @ b [K, N] -> [G, M, N]
    (groups along K: per-group weight gradients). torch._grouped_mm takes 16-bit and 32-bit
    floats with 16-byte aligned strides; anything else takes a loop over the groups (one
    host sync for their sizes).
    """
    if _grouped_mm_takes(a) and _grouped_mm_takes(b):
        return torch._grouped_mm(a, b, offs=offsets)
    sizes = counts.tolist()
    if b.dim() == 3:
        blocks = [x @ w for x, w in zip(a.split(sizes), b, strict=True)]
        return torch.cat(blocks) if blocks else a.new_zeros(0, b.shape[-1])
    return torch.stack([x @ y for x, y in zip(a.split(sizes, dim=1), b.split(sizes), strict=True)])


def _grouped_mm_takes(t: torch.Tensor) -> bool:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s == 1 or s * size % 16 == 0 for s in t.stride())


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add of the groups' products; padding-free by construction."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # row groups: [M, K] @ [G, K, N]
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # groups along K: [M, K] @ [K, N]
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 3:  # batched
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    return 2 * a_shape[1] * a_shape[2] * b_shape[1]  # [G, M, K] @ [K, N]: column groups


# FlopCounterMode (used to calibrate StepFlops and by the tests) has no formula for
# grouped GEMMs in this torch; without one the expert matmuls would count as zero.
if torch.ops.aten._grouped_mm not in flop_registry:
    register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flops)
