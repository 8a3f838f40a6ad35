"""The memory and time model of a client's local round.

A training step that does not fit the client's memory fails (OOM); counted FLOPs over the
device's sustained throughput plus bytes over its bandwidth give the simulated time.
"""

from __future__ import annotations

from dataclasses import dataclass


# ---- memory and time of one local step ---------------------------------------------------------
@dataclass(frozen=True)
class ModelFootprint:
    """Parameter counts and activation size that decide a training step's memory."""

    total_params: int  # every parameter, all resident during training
    shared_trainable_params: int  # non-expert parameters a client trains (attention, norms, ...)
    params_per_expert: int  # parameters of one expert (all experts have equal size)
    num_experts_total: int  # experts over all MoE layers (layers x experts per layer)
    num_moe_layers: int
    activation_bytes_per_sample: float  # saved-activation bytes of one sample at max length
    bytes_per_param: int = 4  # of what trains: weights, gradients, AdamW moments
    # Resident weights at their storage dtypes (a 4-bit base, fp32 adapters); None: every
    # parameter at bytes_per_param.
    weight_bytes: float | None = None

    def __post_init__(self) -> None:
        counts = (self.total_params, self.shared_trainable_params, self.params_per_expert)
        if min(counts) < 0 or self.activation_bytes_per_sample < 0 or self.bytes_per_param < 1:
            raise ValueError(f"footprint sizes must be non-negative: {self}")
        if self.num_moe_layers < 1 or self.num_experts_total % self.num_moe_layers:
            raise ValueError(
                f"num_experts_total ({self.num_experts_total}) must be a multiple of "
                f"num_moe_layers ({self.num_moe_layers})"
            )


def step_memory_bytes(
    fp: ModelFootprint, trained_experts: int, batch_size: int, zero_stage: int = 0
) -> float:
    """Peak device memory of one training step that trains `trained_experts` experts.

    weights:       weight_bytes, by default total_params * bytes_per_param (frozen
                   parameters stay resident too)
    trained state: (shared_trainable + trained_experts * params_per_expert) * bytes_per_param
                   * 3 (the gradient plus AdamW's two moments)
    activations:   activation_bytes_per_sample * batch_size (saved for backward)

    zero_stage > 0 models DeepSpeed ZeRO with CPU offload: the moments leave the device
    (stage 1), then the gradients (stage 2), then the parameters (stage 3, which keeps
    about one MoE layer's share of them on the device while it computes).
    """
    weights = fp.total_params * fp.bytes_per_param if fp.weight_bytes is None else fp.weight_bytes
    if zero_stage >= 3:
        weights /= fp.num_moe_layers
    per_trained_param = {0: 3, 1: 1}.get(zero_stage, 0) * fp.bytes_per_param
    trained = fp.shared_trainable_params + trained_experts * fp.params_per_expert
    return weights + trained * per_trained_param + fp.activation_bytes_per_sample * batch_size


def full_step_memory_bytes(fp: ModelFootprint, batch_size: int) -> float:
    """Step memory with every expert trained (budget-unaware full fine-tuning)."""
    return step_memory_bytes(fp, fp.num_experts_total, batch_size)


def fits(
    fp: ModelFootprint,
    memory_bytes: float,
    trained_experts: int,
    batch_size: int,
    zero_stage: int = 0,
) -> bool:
    """Whether a step training `trained_experts` experts fits in `memory_bytes` (else: OOM)."""
    return step_memory_bytes(fp, trained_experts, batch_size, zero_stage) <= memory_bytes


def expert_capacity(
    fp: ModelFootprint,
    memory_bytes: float,
    batch_size: int,
    scope: str,
    max_experts: int | None = None,
) -> int:
    """C_budget: the most experts a client can train in one step within `memory_bytes`.

    scope "global" counts experts over all MoE layers; "per_layer" gives experts per layer
    (the global count // num_moe_layers, at most the layer's experts). `max_experts` caps the
    returned C_budget. Returns 0 also when not even the shared parameters fit: check `fits`
    with 0 experts to tell that client apart (it fails).
    """
    if scope not in ("global", "per_layer"):
        raise ValueError(f"scope must be 'global' or 'per_layer', got {scope!r}")
    if max_experts is not None and max_experts < 0:
        raise ValueError(f"max_experts must be >= 0 or None, got {max_experts}")
    n = _max_fitting_experts(fp, memory_bytes, batch_size)
    if scope == "per_layer":
        n //= fp.num_moe_layers
    return n if max_experts is None else min(n, max_experts)


def _max_fitting_experts(fp: ModelFootprint, memory_bytes: float, batch_size: int) -> int:
    """Largest n in [0, num_experts_total] whose step fits (0 when none does)."""
    if not fits(fp, memory_bytes, 0, batch_size):
        return 0
    per_expert = fp.params_per_expert * fp.bytes_per_param * 3
    if per_expert == 0:
        return fp.num_experts_total
    spare = memory_bytes - step_memory_bytes(fp, 0, batch_size)
    n = min(int(spare // per_expert), fp.num_experts_total)
    # Float division can land one off at an exact boundary; settle it with the model itself.
    while n < fp.num_experts_total and fits(fp, memory_bytes, n + 1, batch_size):
        n += 1
    while n > 0 and not fits(fp, memory_bytes, n, batch_size):
        n -= 1
    return n


def compute_seconds(flops: float, flops_per_s: float) -> float:
    """Seconds to execute `flops` at a sustained `flops_per_s`."""
    return flops / flops_per_s


def transfer_seconds(num_bytes: float, bytes_per_s: float) -> float:
    """Seconds to move `num_bytes` at `bytes_per_s`."""
    return num_bytes / bytes_per_s


def client_round_seconds(
    flops: float,
    bytes_down: float,
    bytes_up: float,
    flops_per_s: float,
    down_bytes_per_s: float,
    up_bytes_per_s: float,
) -> float:
    """Simulated wall-clock of a client round: download, then compute, then upload."""
    return (
        transfer_seconds(bytes_down, down_bytes_per_s)
        + compute_seconds(flops, flops_per_s)
        + transfer_seconds(bytes_up, up_bytes_per_s)
    )
