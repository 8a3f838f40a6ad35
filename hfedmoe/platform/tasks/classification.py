"""Sequence classification: a classifier head, cross-entropy on the labels, accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from hfedmoe.platform.data.corpora import load_corpus
from hfedmoe.platform.data.tokenisation import TokenizedText, batch_tensors, tokenize
from hfedmoe.platform.tasks.base import Evaluation, Examples, Task, register

if TYPE_CHECKING:
    from hfedmoe.platform.config import DataConfig
    from hfedmoe.platform.models import MoEAdapter


@register
class Classification(Task):
    name = "classification"
    head = "classifier"

    def load(self, data: DataConfig) -> Examples:
        corpus = load_corpus(data.source, data.path, data.split, data.text_fields, data.label_field)
        return Examples(corpus, corpus.labels, corpus.label_names, label_like=True)

    def tokenize(
        self, examples: Examples, rows: np.ndarray, tokenizer, max_length: int
    ) -> TokenizedText:
        corpus = examples.source
        texts = [corpus.texts[i] for i in rows]
        return tokenize(texts, corpus.labels[rows], tokenizer, max_length)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits, batch["labels"])

    @torch.no_grad()
    def evaluate(
        self, adapter: MoEAdapter, test: TokenizedText, batch_size: int, label_like: bool
    ) -> Evaluation:
        """Accuracy and mean cross-entropy of the adapter's model on the test set."""
        adapter.model.eval()
        correct, loss_sum = 0, 0.0
        for start in range(0, len(test), batch_size):
            batch = batch_tensors(test, np.arange(start, min(start + batch_size, len(test))))
            logits, _ = adapter.forward(batch["input_ids"], batch["attention_mask"])
            loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
        return Evaluation(loss=loss_sum / len(test), accuracy=correct / len(test))
