"""MoE classifiers and causal LMs behind one adapter: fused HF experts, per-expert modules,
upcycled dense."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from hfedmoe.platform.config import ModelConfig
from hfedmoe.platform.models.adapter import MoEAdapter, TrainableTensors
from hfedmoe.platform.models.hf import hf_adapter, pretrained_model, tiny_model
from hfedmoe.platform.models.upcycle import bundled_minilm_path, upcycled_adapter

__all__ = ["MoEAdapter", "TrainableTensors", "build_adapter"]


def build_adapter(
    cfg: ModelConfig, num_labels: int, seed: int, head: str = "classifier"
) -> MoEAdapter:
    """Build the configured model with the task's ``head`` ("classifier" over
    ``num_labels``, or "lm": the decoder's own LM head); the same config and seed give
    identical weights."""
    torch.manual_seed(seed)
    if cfg.kind == "upcycled":
        if head != "classifier":
            raise ValueError("model.kind 'upcycled' builds an encoder classifier, no LM head")
        adapter = upcycled_adapter(cfg, num_labels)
    elif cfg.kind == "pretrained":
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.tokenizer or cfg.path, trust_remote_code=cfg.trust_remote_code
        )
        model = pretrained_model(cfg.path, num_labels, cfg.trust_remote_code, head)
        adapter = hf_adapter(model, tokenizer, cfg.kind, num_labels, cfg)
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or str(bundled_minilm_path()))
        model = tiny_model(cfg.kind, cfg, len(tokenizer), tokenizer.pad_token_id, num_labels, head)
        adapter = hf_adapter(model, tokenizer, cfg.kind, num_labels, cfg)
    return adapter
