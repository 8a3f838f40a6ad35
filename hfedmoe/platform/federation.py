"""Everything a run builds from its config before round one, shared by every executor.

The corpus and its seeded stratified split, the tokenised train and test sets, the client
shards, the model and its memory footprint, the client budgets, and the client trainer.
Building is deterministic: the same config gives the same federation in any process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hfedmoe.platform.budgets.cost import (
    ModelFootprint,
    full_step_memory_bytes,
    step_memory_bytes,
)
from hfedmoe.platform.budgets.drawing import ClientBudgets, draw_budgets
from hfedmoe.platform.client import LocalTrainer
from hfedmoe.platform.config import ExperimentConfig
from hfedmoe.platform.data.corpora import (
    check_split,
    load_corpus,
    split_record,
    stratified_split,
)
from hfedmoe.platform.data.partitioning import ClientShards, partition
from hfedmoe.platform.data.tokenisation import TokenizedText, tokenize
from hfedmoe.platform.models import MoEAdapter, build_adapter

log = logging.getLogger(__name__)


@dataclass
class Federation:
    cfg: ExperimentConfig
    label_names: list[str]
    train: TokenizedText
    test: TokenizedText
    shards: ClientShards
    budgets: ClientBudgets
    footprint: ModelFootprint
    split: dict[str, Any]  # which rows went where, to report with the results

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def build_federation(cfg: ExperimentConfig) -> tuple[Federation, MoEAdapter]:
    """Load data, split, tokenise, partition, build the model, measure it, draw budgets."""
    data_cfg, fed = cfg.data, cfg.federation
    corpus = load_corpus(
        data_cfg.source, data_cfg.path, data_cfg.split, data_cfg.text_fields, data_cfg.label_field
    )
    train_idx, test_idx = stratified_split(corpus.labels, data_cfg.test_fraction, cfg.seed)
    source = f"data.path {data_cfg.path}" if data_cfg.path else f"data.source {data_cfg.source}"
    check_split(corpus.labels, test_idx, data_cfg.test_fraction, source)
    split = split_record(corpus.labels, train_idx, test_idx, cfg.seed, data_cfg.test_fraction)
    if data_cfg.max_test_samples is not None and len(test_idx) > data_cfg.max_test_samples:
        rng = np.random.default_rng([cfg.seed, 1])
        test_idx = np.sort(rng.choice(test_idx, data_cfg.max_test_samples, replace=False))
        split["evaluated_test_rows"] = len(test_idx)
    adapter = build_adapter(cfg.model, corpus.num_classes, cfg.seed)
    train = _tokenize(corpus, train_idx, adapter, data_cfg.max_length)
    test = _tokenize(corpus, test_idx, adapter, data_cfg.max_length)
    part = data_cfg.partition
    shards = partition(
        train.labels.numpy(),
        fed.num_clients,
        part.kind,
        alpha=part.alpha,
        shards_per_client=part.shards_per_client,
        min_size=part.min_size,
        allow_empty=part.allow_empty,
        samples_per_client=part.samples_per_client,
        seed=cfg.seed,
    )
    footprint = measure_footprint(adapter, train, fed.batch_size)
    budgets = draw_budgets(
        cfg.budgets,
        fed.num_clients,
        cfg.seed,
        full_step_bytes=full_step_memory_bytes(footprint, fed.batch_size),
        resident_bytes=step_memory_bytes(footprint, 0, fed.batch_size),
    )
    federation = Federation(
        cfg=cfg,
        label_names=corpus.label_names,
        train=train,
        test=test,
        shards=shards,
        budgets=budgets,
        footprint=footprint,
        split=split,
    )
    return federation, adapter


def _tokenize(corpus, rows: np.ndarray, adapter: MoEAdapter, max_length: int) -> TokenizedText:
    texts = [corpus.texts[i] for i in rows]
    return tokenize(texts, corpus.labels[rows], adapter.tokenizer, max_length)


def measure_footprint(adapter: MoEAdapter, train: TokenizedText, batch_size: int) -> ModelFootprint:
    """The model's footprint with activations measured on a full-length batch.

    Budgets must hold for any batch, so the activation term is measured with every
    position attended (rows are padded to max_length; dynamic padding only shrinks them).
    """
    input_ids = train.input_ids[:batch_size]
    saved = adapter.measure_activation_bytes(input_ids, torch.ones_like(input_ids))
    return adapter.footprint(activation_bytes_per_sample=saved / len(input_ids))


def make_trainer(
    adapter: MoEAdapter, train_data: TokenizedText, footprint: ModelFootprint, cfg: ExperimentConfig
) -> LocalTrainer:
    """The trainer of the configured engine (``federation.engine``)."""
    if cfg.federation.engine == "deepspeed":
        from hfedmoe.platform.zero import DeepSpeedTrainer  # imports deepspeed: only on demand

        return DeepSpeedTrainer(adapter, train_data, footprint, cfg)
    return LocalTrainer(adapter, train_data, footprint, cfg)
