"""Prompt/response pairs for causal language modelling (`task: causal_lm`).

Pairs come from files or a Hugging Face dataset (configurable prompt and response fields),
or are built offline from a classification corpus as "name the topic of this article"
instructions, so the default run and the tests need no network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hfedmoe.platform.data import corpora
from hfedmoe.platform.errors import ConfigError

if TYPE_CHECKING:
    from datasets import Dataset

    from hfedmoe.platform.config import DataConfig

PAIR_SOURCES = ("files", "huggingface")
# The question comes before the article: truncation keeps a prompt's start (tokenize_pairs).
TOPIC_PROMPT = "Name the topic of this article. Answer with one of: {topics}.\n\n{text}"
# The one group of pairs whose answers are free text (no label to stratify or partition by).
FREE_TEXT_GROUP = "all"


# eq=False: the generated __eq__/__hash__ would compare numpy arrays and fail.
@dataclass(frozen=True, eq=False)
class InstructionPairs:
    """Prompts and their responses; `groups` (int64, 0..G-1) name a class per pair.

    Pairs whose answers come from a small fixed set (`label_like`, e.g. topic names) are
    grouped by answer, for the stratified split, Dirichlet partitioning and exact-match
    evaluation; free-text pairs form the single group FREE_TEXT_GROUP.
    """

    name: str
    prompts: list[str]
    responses: list[str]
    groups: np.ndarray
    group_names: list[str]
    label_like: bool

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise the dtype through object.__setattr__.
        object.__setattr__(self, "groups", np.asarray(self.groups, dtype=np.int64))
        n = len(self.prompts)
        if len(self.responses) != n or self.groups.shape != (n,):
            raise ValueError(
                f"{self.name}: {n} prompts, {len(self.responses)} responses and groups of "
                f"shape {self.groups.shape}; expected one of each per pair"
            )
        if n and not 0 <= self.groups.min() <= self.groups.max() < len(self.group_names):
            raise ValueError(f"{self.name}: groups must lie in 0..{len(self.group_names) - 1}")

    def __len__(self) -> int:
        return len(self.prompts)


def corpus_instructions(corpus: corpora.TextCorpus) -> InstructionPairs:
    """One "name the topic of this article" pair per text; the response is its label name.

    The prompt lists the allowed topics (the corpus's label names, in label order), so the
    answer set is fixed and pairs keep the corpus's labels as their groups.
    """
    topics = ", ".join(corpus.label_names)
    prompts = [TOPIC_PROMPT.format(topics=topics, text=text) for text in corpus.texts]
    responses = [corpus.label_names[label] for label in corpus.labels]
    return InstructionPairs(
        f"{corpus.name} topics", prompts, responses, corpus.labels, corpus.label_names, True
    )


def _read_dataset(source: str, path: str, split: str) -> Dataset:
    if source not in PAIR_SOURCES:
        raise ValueError(
            f"data.source {source!r} holds no prompt/response pairs; allowed: "
            f"{', '.join(PAIR_SOURCES)}"
        )
    exists = Path(path).exists()
    if source == "files" and not exists:
        raise FileNotFoundError(f"data.path {path} does not exist (data.source is 'files')")
    try:
        return corpora.load_dataset_split(path, split)
    except OSError as err:  # offline, no cache, hub unreachable (ConnectionError is an OSError)
        if exists:
            raise
        raise ConfigError(
            f"data.path {path}: could not load this dataset from the Hugging Face hub "
            f"({type(err).__name__}: {err}); offline, point data.path at local files"
        ) from None


def _text_column(dataset: Dataset, field: str, key: str, path: str) -> list[str]:
    if field not in dataset.column_names:
        raise ConfigError(
            f"{key}={field!r}: no such column in {path} (columns: "
            f"{', '.join(dataset.column_names)}); set {key} to the column to read"
        )
    values = list(dataset[field])
    missing = next((row for row, value in enumerate(values) if value is None), None)
    if missing is not None:
        raise ConfigError(f"{key}={field!r}: row {missing} of {path} has no value")
    return [str(value) for value in values]


def _pairs_from_dataset(
    dataset: Dataset, prompt_field: str, response_field: str, path: str
) -> InstructionPairs:
    prompts = _text_column(dataset, prompt_field, "data.prompt_field", path)
    responses = _text_column(dataset, response_field, "data.response_field", path)
    groups = np.zeros(len(prompts), dtype=np.int64)
    return InstructionPairs(path, prompts, responses, groups, [FREE_TEXT_GROUP], False)


def load_instruction_pairs(
    source: str, path: str, split: str, prompt_field: str, response_field: str
) -> InstructionPairs:
    """Free-text pairs from local files ("files") or a hub dataset ("huggingface").

    Both read through `corpora.load_dataset_split`: an existing csv/json/jsonl/parquet file
    or directory with the matching `datasets` builder, else a hub dataset by name. Values
    are read as strings; a missing column or value is a ConfigError naming the field.
    """
    dataset = _read_dataset(source, path, split)
    return _pairs_from_dataset(dataset, prompt_field, response_field, path)


def load_instructions(data_cfg: DataConfig) -> InstructionPairs:
    """The pairs a causal-LM run trains on, chosen from the `data` config section.

    bbc_news and ag_news, and files or hub datasets whose records have the label field but
    no prompt field, are classification corpora: they become topic instructions. Any other
    files or hub dataset is read as prompt/response pairs.
    """
    cfg = data_cfg  # short: every line below reads it
    if cfg.source not in PAIR_SOURCES:
        corpus = corpora.load_corpus(
            cfg.source, cfg.path, cfg.split, cfg.text_fields, cfg.label_field
        )
        return corpus_instructions(corpus)
    dataset = _read_dataset(cfg.source, cfg.path, cfg.split)
    columns = dataset.column_names
    if cfg.label_field in columns and cfg.prompt_field not in columns:
        corpus = corpora.corpus_from_dataset(dataset, cfg.text_fields, cfg.label_field, cfg.path)
        return corpus_instructions(corpus)
    return _pairs_from_dataset(dataset, cfg.prompt_field, cfg.response_field, cfg.path)
