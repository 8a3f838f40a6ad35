"""Classification heads: every adapter wraps its model as ``model(input_ids, attention_mask)``."""

from __future__ import annotations

import torch
from torch import nn


def hash_token_ids(input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Fold a tokenizer's ids into a smaller embedding table (the hashing trick).

    Id 0 (padding for the bundled tokenizer) stays 0 so padding detection still works;
    other ids map to 1..vocab_size-1.
    """
    folded = 1 + (input_ids - 1) % (vocab_size - 1)
    return torch.where(input_ids == 0, input_ids, folded)


class PooledClassifier(nn.Module):
    """Mean of the backbone's last hidden states over non-padding tokens, then a linear layer.

    Used where a family has no sequence-classification head (OLMoE, the SwitchTransformers
    encoder) and for the upcycled MiniLM, whose pretraining objective used mean pooling.
    """

    def __init__(
        self,
        backbone: nn.Module,
        hidden_size: int,
        num_labels: int,
        dropout: float = 0.1,
        hashed_vocab: int | None = None,
    ):
        super().__init__()
        self.hashed_vocab = hashed_vocab
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.hashed_vocab is not None:
            input_ids = hash_token_ids(input_ids, self.hashed_vocab)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))


class SequenceClassifier(nn.Module):
    """A Hugging Face ``*ForSequenceClassification`` model returning bare logits."""

    def __init__(self, model: nn.Module, hashed_vocab: int | None = None):
        super().__init__()
        self.hashed_vocab = hashed_vocab
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.hashed_vocab is not None:
            input_ids = hash_token_ids(input_ids, self.hashed_vocab)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class CausalLM(nn.Module):
    """A Hugging Face ``*ForCausalLM`` model (its own LM head) returning logits.

    ``positions`` [B, T] bool: the LM head runs only on the hidden states there and the
    logits are [N, V] for those N positions, row-major (what transformers'
    ``logits_to_keep`` does for the last positions; a fine-tuning loss needs only the
    positions that predict a response token, a small share of [B, T] for short answers).
    Without it, logits are [B, T, V].
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if positions is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.model.get_output_embeddings()(hidden.last_hidden_state[positions])
