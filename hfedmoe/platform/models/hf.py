"""Hugging Face MoE families: fused-expert models and SwitchTransformers' per-expert modules.

Fused-expert models (Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V2) keep each layer's experts in
stacked tensors and dispatch their computation through transformers' experts interface; we
register an ``hfedmoe`` implementation that runs the routed kernel with the per-batch
trainable mask. SwitchTransformers keeps one module per expert; its experts container is
given the same kernel.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV2ForSequenceClassification,
    MixtralConfig,
    MixtralForCausalLM,
    MixtralForSequenceClassification,
    OlmoeConfig,
    OlmoeForCausalLM,
    OlmoeModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3MoeForSequenceClassification,
    SwitchTransformersConfig,
    SwitchTransformersEncoderModel,
)
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersExperts,
    SwitchTransformersSparseMLP,
)

from hfedmoe.platform.config import ModelConfig
from hfedmoe.platform.errors import ConfigError
from hfedmoe.platform.models.adapter import (
    FusedExperts,
    ModuleExperts,
    MoEAdapter,
    MoELayer,
    read_topk_router,
)
from hfedmoe.platform.models.experts import StackedExperts, grouped_experts, routed_experts
from hfedmoe.platform.models.heads import CausalLM, PooledClassifier, SequenceClassifier
from hfedmoe.platform.models.lora import apply_lora, expert_lora, trained_leaves

EXPERTS_IMPLEMENTATION = "hfedmoe"


def hfedmoe_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts forward for transformers' fused layout (gate_up_proj [E, 2I, d], down_proj)."""
    experts = StackedExperts(
        self.gate_up_proj,
        self.down_proj,
        self._apply_gate,
        lora=expert_lora(self),
        leaves=trained_leaves(self, ["gate_up_proj", "down_proj"]),
    )
    return grouped_experts(
        hidden_states,
        top_k_index,
        top_k_weights,
        experts,
        self._hfedmoe_plan,
        self._hfedmoe_layer,
    )


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, hfedmoe_experts_forward)


class RoutedSwitchExperts(SwitchTransformersExperts):
    """SwitchTransformers' experts container computed with the routed kernel."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        selected_experts: torch.Tensor,
        routing_weights: torch.Tensor,
    ) -> torch.Tensor:
        # selected_experts is one-hot [T, 1, E]; a token dropped for expert capacity has an
        # all-zero row and, as upstream, contributes nothing.
        kept = selected_experts.sum(dim=-1) > 0
        return routed_experts(
            hidden_states,
            selected_experts.argmax(dim=-1),
            routing_weights * kept,
            self.num_experts,
            lambda e, x: self[f"expert_{e}"](x),
            self._hfedmoe_plan,
            self._hfedmoe_layer,
        )


def _read_switch_router(output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    one_hot, _probs, logits = output
    # A token over an expert's capacity has an all-zero row: RoutedSwitchExperts computes
    # it on expert 0 (argmax) with weight 0, and it is not routed anywhere.
    kept = one_hot.sum(dim=-1, keepdim=True) > 0
    return logits, one_hot.argmax(dim=-1, keepdim=True), kept


def _fused_layers(model: nn.Module) -> list[MoELayer]:
    layers = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        router = getattr(module, "gate", None)
        if experts is None or router is None or not hasattr(experts, "gate_up_proj"):
            continue
        if experts.has_bias or experts.is_transposed or not experts.has_gate:
            raise NotImplementedError(
                f"{name}: expert layout (bias={experts.has_bias}, transposed="
                f"{experts.is_transposed}, gated={experts.has_gate}) is not supported yet"
            )
        layers.append(
            MoELayer(
                name=name,
                top_k=router.top_k,
                router=router,
                read_router=read_topk_router,
                experts=FusedExperts(experts, ["gate_up_proj", "down_proj"]),
            )
        )
    return layers


def _switch_layers(model: nn.Module) -> list[MoELayer]:
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, SwitchTransformersSparseMLP):
            module.experts.__class__ = RoutedSwitchExperts
            experts = [module.experts[f"expert_{e}"] for e in range(module.experts.num_experts)]
            layers.append(
                MoELayer(
                    name=name,
                    top_k=1,
                    router=module.router,
                    read_router=_read_switch_router,
                    experts=ModuleExperts(module.experts, experts),
                )
            )
    return layers


def _find_layers(model: nn.Module) -> list[MoELayer]:
    return _switch_layers(model) or _fused_layers(model)


# The decoder families' own causal-LM models (head "lm"): their LM head over the vocabulary.
CAUSAL_LM = {
    "qwen3_moe": Qwen3MoeForCausalLM,
    "mixtral": MixtralForCausalLM,
    "olmoe": OlmoeForCausalLM,
    "deepseek_v2": DeepseekV2ForCausalLM,
}


def tiny_model(
    kind: str, cfg, vocab_size: int, pad_token_id: int, num_labels: int, head: str = "classifier"
) -> nn.Module:
    """A small random-init model of one HF MoE family, built from a config.

    ``head`` "classifier": a classifier over ``num_labels``; "lm": the family's own
    ``*ForCausalLM`` (its LM head over the full vocabulary). With ``cfg.vocab_size`` below
    the tokenizer's, a classifier's token ids are hashed into that many embeddings, for
    models of a few thousand parameters (platform-overhead benchmarks).
    """
    hashed = cfg.vocab_size if cfg.vocab_size and cfg.vocab_size < vocab_size else None
    vocab_size = hashed or vocab_size
    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers or 2,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=4096,
        pad_token_id=pad_token_id,
        num_experts_per_tok=cfg.top_k,
        num_labels=num_labels,
    )
    if head == "lm" and kind not in CAUSAL_LM:
        raise ValueError(f"model.kind {kind!r} has no causal-LM head")
    wrap = CausalLM if head == "lm" else None
    if kind == "qwen3_moe":
        config = Qwen3MoeConfig(
            **common,
            num_experts=cfg.num_experts,
            moe_intermediate_size=cfg.intermediate_size,
            intermediate_size=cfg.intermediate_size,
            decoder_sparse_step=1,
            norm_topk_prob=True,
        )
        if wrap:
            return CausalLM(Qwen3MoeForCausalLM(config))
        return SequenceClassifier(Qwen3MoeForSequenceClassification(config), hashed)
    if kind == "mixtral":
        config = MixtralConfig(
            **common, num_local_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size
        )
        if wrap:
            return CausalLM(MixtralForCausalLM(config))
        return SequenceClassifier(MixtralForSequenceClassification(config), hashed)
    if kind == "olmoe":
        config = OlmoeConfig(
            **common, num_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size
        )
        if wrap:
            return CausalLM(OlmoeForCausalLM(config))
        return PooledClassifier(
            OlmoeModel(config), cfg.hidden_size, num_labels, hashed_vocab=hashed
        )
    if kind == "deepseek_v2":
        head_dim = cfg.hidden_size // cfg.num_heads
        config = DeepseekV2Config(
            **common,
            n_routed_experts=cfg.num_experts,
            n_shared_experts=cfg.num_shared_experts or None,
            moe_intermediate_size=cfg.intermediate_size,
            intermediate_size=cfg.intermediate_size,
            first_k_dense_replace=0,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            kv_lora_rank=cfg.hidden_size // 2,
            q_lora_rank=None,
            qk_nope_head_dim=head_dim,
            qk_rope_head_dim=head_dim,
            v_head_dim=head_dim,
            head_dim=head_dim,
        )
        if wrap:
            return CausalLM(DeepseekV2ForCausalLM(config))
        return SequenceClassifier(DeepseekV2ForSequenceClassification(config), hashed)
    if kind == "switch_transformers":
        config = SwitchTransformersConfig(
            vocab_size=vocab_size,
            d_model=cfg.hidden_size,
            d_ff=cfg.intermediate_size,
            d_kv=cfg.hidden_size // cfg.num_heads,
            num_heads=cfg.num_heads,
            num_layers=cfg.num_layers or 2,
            num_sparse_encoder_layers=cfg.num_layers or 2,
            num_decoder_layers=1,
            num_sparse_decoder_layers=0,
            num_experts=cfg.num_experts,
            expert_capacity=4096,
            pad_token_id=pad_token_id,
        )
        backbone = SwitchTransformersEncoderModel(config)
        return PooledClassifier(backbone, cfg.hidden_size, num_labels, hashed_vocab=hashed)
    raise ValueError(f"model.kind {kind!r} is not a tiny HF MoE family")


def pretrained_model(
    path: str, num_labels: int, trust_remote_code: bool = False, head: str = "classifier"
) -> nn.Module:
    """An MoE checkpoint from the hub or a local directory, with a classification head
    (``head`` "classifier") or its own causal-LM head ("lm").

    Code shipped with the checkpoint runs only if ``trust_remote_code`` (model config).
    """
    trust = {"trust_remote_code": trust_remote_code}
    config = AutoConfig.from_pretrained(path, **trust)
    if head == "lm":
        try:
            return CausalLM(AutoModelForCausalLM.from_pretrained(path, **trust))
        except ValueError as err:
            raise ConfigError(
                f"model.path {path}: a {config.model_type} checkpoint has no causal-LM head, "
                "which task.name=causal_lm needs; use a decoder checkpoint or task "
                f"classification ({err})"
            ) from None
    if config.model_type == "switch_transformers":
        backbone = SwitchTransformersEncoderModel.from_pretrained(path)
        return PooledClassifier(backbone, config.d_model, num_labels)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, **trust
        )
        return SequenceClassifier(model)
    except ValueError:
        # No sequence-classification head for this family (e.g. OLMoE): pool the backbone.
        backbone = AutoModel.from_pretrained(path, **trust)
        return PooledClassifier(backbone, config.hidden_size, num_labels)


def hf_adapter(
    model: nn.Module, tokenizer, family: str, num_labels: int, cfg: ModelConfig
) -> MoEAdapter:
    """Wrap a classifier built above, switching fused experts to the routed kernel."""
    inner = model.model if isinstance(model, SequenceClassifier | CausalLM) else model.backbone
    if hasattr(inner, "set_experts_implementation") and inner._can_set_experts_implementation():
        inner.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    layers = _find_layers(model)
    lora_targets = None
    if cfg.lora.rank is not None:
        apply_lora(model, layers, cfg.lora, cfg.quantization)
        lora_targets = cfg.lora.targets
    return MoEAdapter(model, layers, tokenizer, family, num_labels, cfg.freeze, lora_targets)
