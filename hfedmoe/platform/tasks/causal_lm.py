"""Generative fine-tuning: the family's own LM head, next-token loss on the response.

Examples are prompt/response pairs (``data.instructions``): topic instructions built from a
classification corpus ("name the topic of this article"), or pairs read from files or the
hub. The loss is the mean cross-entropy of the response tokens (and the end token) given
everything before them; prompt and padding positions are -100 in ``targets`` and do not
count. Routing statistics count every non-padding token, prompt included: the experts
compute on the prompt, and the response depends on it.

Evaluation: held-out loss per target token and its perplexity; where the answers are
label-like (a small fixed set, e.g. topic names), the exact-match rate of greedy
generation from the prompt, which ``accuracy`` reports so that target accuracy, early
stopping and sweeps work unchanged; and a few (prompt, reference, generated) rows.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from hfedmoe.platform.data.instructions import load_instructions
from hfedmoe.platform.data.tokenisation import TokenizedPairs, batch_tensors, tokenize_pairs
from hfedmoe.platform.tasks.base import Evaluation, Examples, Task, register

if TYPE_CHECKING:
    from hfedmoe.platform.config import DataConfig
    from hfedmoe.platform.models import MoEAdapter

IGNORE = -100  # targets at positions that are not predicted (HF convention)
PROMPT_CHARS = 300  # characters of a prompt shown in the generations table


class CausalLMParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="greedy generation stops after this many tokens or at the end token "
        "(default: the longest reference answer of the test set, end token included)",
    )
    logged_generations: int = Field(
        8, ge=0, description="test samples whose (prompt, reference, generated) are logged"
    )


def predicting_positions(targets: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose next token is a target (targets [B, T] are aligned
    with input_ids, -100 where a position is not predicted)."""
    positions = torch.zeros_like(targets, dtype=torch.bool)
    positions[:, :-1] = targets[:, 1:] != IGNORE
    return positions


def next_token_loss(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of each target token given the tokens before it.

    logits [N, V] are the LM head's at ``predicting_positions(targets)``, row-major: the
    logits at position t predict the token at t + 1. "mean" is the mean over the N target
    tokens, "sum" their sum.
    """
    following = targets[:, 1:]
    return F.cross_entropy(logits.float(), following[following != IGNORE], reduction=reduction)


@torch.no_grad()
def greedy_generate(
    adapter: MoEAdapter,
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    stop_ids: torch.Tensor,
    max_new_tokens: int,
    pad_id: int,
) -> list[list[int]]:
    """Greedy continuations of right-padded prompts (rows of ``input_ids`` up to their
    ``prompt_lengths``), each ending at its ``stop_ids`` token or after ``max_new_tokens``.

    No KV cache: each step runs the model on the prefixes again (answers here are a few
    tokens). Right padding keeps every real token at its own position; padding after a
    row's end is masked and, the attention being causal, never seen by its real tokens.
    """
    rows = len(input_ids)
    width = int(prompt_lengths.max()) + max_new_tokens
    ids = torch.full((rows, width), pad_id, dtype=input_ids.dtype)
    mask = torch.zeros((rows, width), dtype=torch.int64)
    for i, length in enumerate(prompt_lengths.tolist()):
        ids[i, :length] = input_ids[i, :length]
        mask[i, :length] = 1
    lengths = prompt_lengths.clone()
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool)
    for _ in range(max_new_tokens):
        end = int(lengths.max())
        last = torch.zeros((rows, end), dtype=torch.bool)
        last[torch.arange(rows), lengths - 1] = True
        logits, _ = adapter.forward(ids[:, :end], mask[:, :end], positions=last)
        tokens = logits.argmax(dim=-1).cpu()
        for i in torch.nonzero(~done).flatten().tolist():
            generated[i].append(int(tokens[i]))
            ids[i, lengths[i]] = tokens[i]
            mask[i, lengths[i]] = 1
            lengths[i] += 1
            done[i] = bool(tokens[i] == stop_ids[i])
        if bool(done.all()):
            break
    return generated


def exact_matches(generated: list[list[int]], references: list[list[int]]) -> list[bool]:
    """Whether each generation is its reference token for token, end token included."""
    return [g == r for g, r in zip(generated, references, strict=True)]


@register
class CausalLM(Task):
    name = "causal_lm"
    head = "lm"
    Params = CausalLMParams
    loss_in_footprint = True

    def load(self, data: DataConfig) -> Examples:
        pairs = load_instructions(data)
        return Examples(pairs, pairs.groups, pairs.group_names, pairs.label_like)

    def tokenize(
        self, examples: Examples, rows: np.ndarray, tokenizer, max_length: int
    ) -> TokenizedPairs:
        pairs = examples.source
        subset = type(pairs)(
            name=pairs.name,
            prompts=[pairs.prompts[i] for i in rows],
            responses=[pairs.responses[i] for i in rows],
            groups=pairs.groups[rows],
            group_names=pairs.group_names,
            label_like=pairs.label_like,
        )
        return tokenize_pairs(subset, tokenizer, max_length)

    def positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return predicting_positions(batch["targets"])

    def predictions(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["targets"][:, 1:] != IGNORE).sum())

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return next_token_loss(logits, batch["targets"])

    def footprint_rows(self, train: TokenizedPairs, batch_size: int) -> np.ndarray:
        """The rows with the longest responses: the LM head's activations grow with the
        target tokens, and the budget must hold for any batch."""
        targets = (train.targets != IGNORE).sum(dim=1)
        return np.argsort(-targets.numpy(), kind="stable")[:batch_size]

    @torch.no_grad()
    def evaluate(
        self, adapter: MoEAdapter, test: TokenizedPairs, batch_size: int, label_like: bool
    ) -> Evaluation:
        """Loss per target token and perplexity; exact match of greedy answers where the
        answers are label-like; generations of the first ``logged_generations`` samples."""
        adapter.model.eval()
        loss_sum, tokens, matches = 0.0, 0, 0
        logged = min(self.params.logged_generations, len(test))
        rows: list[dict] = []
        max_new = self.params.max_new_tokens or int((test.targets != IGNORE).sum(dim=1).max())
        for start in range(0, len(test), batch_size):
            index = np.arange(start, min(start + batch_size, len(test)))
            batch = batch_tensors(test, index)
            logits, _ = adapter.forward(
                batch["input_ids"], batch["attention_mask"], positions=self.positions(batch)
            )
            loss_sum += float(next_token_loss(logits, batch["targets"], reduction="sum"))
            tokens += self.predictions(batch)
            generate = index if label_like else index[index < logged]
            if len(generate) == 0:
                continue
            chosen = generate - start
            references = [t[t != IGNORE].tolist() for t in batch["targets"][chosen]]
            generated = greedy_generate(
                adapter,
                batch["input_ids"][chosen],
                batch["prompt_lengths"][chosen],
                torch.tensor([r[-1] for r in references]),
                max_new,
                adapter.tokenizer.pad_token_id,
            )
            exact = exact_matches(generated, references)
            matches += sum(exact)
            for row in range(len(chosen)):
                if generate[row] < logged:
                    rows.append(
                        self._generation_row(
                            adapter, batch, chosen[row], generated[row], exact[row]
                        )
                    )
        loss = loss_sum / max(tokens, 1)
        return Evaluation(
            loss=loss,
            accuracy=matches / len(test) if label_like else None,
            perplexity=math.exp(loss),
            generations=rows,
        )

    @staticmethod
    def _generation_row(adapter: MoEAdapter, batch, row: int, generated: list[int], exact: bool):
        tokenizer = adapter.tokenizer
        prompt = batch["input_ids"][row, : int(batch["prompt_lengths"][row])]
        reference = batch["targets"][row]
        return {
            "prompt": tokenizer.decode(prompt, skip_special_tokens=True)[-PROMPT_CHARS:],
            "reference": tokenizer.decode(reference[reference != IGNORE], skip_special_tokens=True),
            "generated": tokenizer.decode(generated, skip_special_tokens=True),
            "exact_match": exact,
        }
