"""Parameter-efficient experts: a rank-r LoRA adapter per expert, over a frozen (maybe 4-bit) base.

Two mechanisms, one per kind of target:

* Routed experts stored as stacked tensors (the upcycled BERT experts and transformers'
  fused MoE families) get adapters written here, as stacked tensors of their own
  (``lora_A_in`` [E, r, d], ``lora_B_in`` [E, H, r], ``lora_A_out`` [E, r, I],
  ``lora_B_out`` [E, d, r]) that the routed kernel applies factored. peft's own wrapper of
  3-D expert parameters (``LoraConfig(target_parameters=...)``) keeps every expert's
  adapter in one [r * E, in] tensor and adds every expert's delta weight on each forward:
  an unselected expert's adapter would still get a (zero) gradient, AdamW state and the
  full delta's FLOPs. Per-expert rows of our own tensors are separate autograd leaves, so
  eq 15's selection decides which adapters get gradient at all (see ``models.experts``).
* Ordinary linear layers (attention projections, DeepSeek's shared experts) take peft's
  LoRA layers (``inject_adapter_in_model``): standard, with dropout.

The base never trains: only adapters, the classification head and (if targeted) the
router do, so they alone travel between server and clients.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hfedmoe.platform.config import ConfigError, LoRAConfig
from hfedmoe.platform.models.adapter import FusedExperts, MoELayer
from hfedmoe.platform.models.experts import ExpertLoRA, NF4Weight

EXPERT_ADAPTERS = ["lora_A_in", "lora_B_in", "lora_A_out", "lora_B_out"]

# Module names (regular expressions, matched in full) of the linear targets peft adapts.
LINEAR_TARGETS = {
    "attention": r".*\.(query|key|value|attention\.output\.dense|q_proj|k_proj|v_proj|o_proj"
    r"|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj)",
    "shared_experts": r".*\.shared_experts?\.(gate_proj|up_proj|down_proj)",
}


def expert_lora(owner: nn.Module) -> ExpertLoRA | None:
    """The adapters of an experts module, as the routed kernel takes them (None: no LoRA)."""
    if not hasattr(owner, "lora_A_in"):
        return None
    a_in, b_in, a_out, b_out = (getattr(owner, n) for n in EXPERT_ADAPTERS)
    return ExpertLoRA(a_in, b_in, a_out, b_out, owner.lora_scale)


def trained_leaves(owner: nn.Module, base_names: list[str]) -> list[list[torch.Tensor]] | None:
    """Each expert's training leaves in the kernel's order: adapters with LoRA, else the base."""
    leaves = owner._hfedmoe_leaves
    if leaves is None:
        return None
    names = EXPERT_ADAPTERS if hasattr(owner, "lora_A_in") else base_names
    return [[expert[n] for n in names] for expert in leaves]


def add_expert_adapters(owner: nn.Module, w_in: str, w_out: str, rank: int, alpha: float) -> None:
    """Give a stacked-experts module one rank-r adapter per expert on w_in and on w_out.

    As in LoRA (and peft), A starts uniform in +-1/sqrt(fan_in) and B at zero, so the
    adapted model computes exactly what the base does until it trains.
    """
    base_in, base_out = getattr(owner, w_in), getattr(owner, w_out)
    num_experts, hidden, model_dim = base_in.shape
    _, out_dim, inner = base_out.shape

    def uniform(*shape: int) -> nn.Parameter:
        bound = 1.0 / math.sqrt(shape[-1])
        return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))

    owner.lora_A_in = uniform(num_experts, rank, model_dim)
    owner.lora_B_in = nn.Parameter(torch.zeros(num_experts, hidden, rank))
    owner.lora_A_out = uniform(num_experts, rank, inner)
    owner.lora_B_out = nn.Parameter(torch.zeros(num_experts, out_dim, rank))
    owner.lora_scale = alpha / rank


def quantize_nf4(owner: nn.Module, name: str) -> None:
    """Replace a frozen stacked weight by its 4-bit NF4 form (QLoRA's frozen base)."""
    weight = getattr(owner, name)
    delattr(owner, name)
    setattr(owner, name, NF4Weight(weight.data))


def apply_lora(
    model: nn.Module, layers: list[MoELayer], cfg: LoRAConfig, quantization: str
) -> None:
    """Add the configured adapters to a built classifier, in place, before ``MoEAdapter``.

    Draws A from torch's global generator: seed it first (``build_adapter`` does).
    """
    assert cfg.rank is not None and "experts" in cfg.targets  # LoRAConfig validates both
    if quantization == "nf4":
        _require_nf4()
    for layer in layers:
        experts = layer.experts
        if not isinstance(experts, FusedExperts):
            raise ConfigError(
                f"model.lora: {layer.name} keeps its experts as separate modules "
                "(SwitchTransformers), which have no per-expert adapters yet; use a fused "
                "family (upcycled, qwen3_moe, mixtral, olmoe, deepseek_v2) or remove model.lora"
            )
        # The two stacked matrices, input side first (w_in/w_out, gate_up_proj/down_proj).
        w_in, w_out = [n for n, t in experts.stacked().items() if t.dim() == 3]
        add_expert_adapters(experts.owner, w_in, w_out, cfg.rank, cfg.alpha)
        if quantization == "nf4":
            for name in (w_in, w_out):
                quantize_nf4(experts.owner, name)
        layer.experts = FusedExperts(experts.owner, EXPERT_ADAPTERS)
    patterns = [LINEAR_TARGETS[t] for t in cfg.targets if t in LINEAR_TARGETS]
    if patterns:
        from peft import LoraConfig, inject_adapter_in_model

        peft_config = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules="|".join(f"(?:{p})" for p in patterns),
        )
        try:
            inject_adapter_in_model(peft_config, model)
        except ValueError as error:  # no module of this model matches a target
            named = [t for t in cfg.targets if t in LINEAR_TARGETS]
            raise ConfigError(
                f"model.lora.targets {named}: {error}; remove the targets this model lacks"
            ) from error


def _require_nf4() -> None:
    """Fail with the field and the fix where bitsandbytes cannot quantize on this machine."""
    try:
        from bitsandbytes.functional import quantize_4bit

        quantize_4bit(torch.ones(64), blocksize=64, quant_type="nf4")
    except Exception as error:  # ImportError, or a wheel without this device's kernels
        raise ConfigError(
            "model.quantization='nf4' needs bitsandbytes with 4-bit kernels for this machine "
            f"({type(error).__name__}: {error}); install bitsandbytes>=0.48 (x86-64 CPUs and "
            "CUDA), or set model.quantization: none"
        ) from error
