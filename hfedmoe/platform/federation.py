"""Everything a run builds from its config before round one, shared by every executor.

The task's examples and their seeded stratified split (over the groups: classes, or the
classes of label-like answers), the tokenised train and test sets, the client shards,
the model with the task's head and its memory footprint, the client budgets, and the
client trainer.
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
from hfedmoe.platform.data.corpora import check_split, split_record, stratified_split
from hfedmoe.platform.data.partitioning import ClientShards, partition
from hfedmoe.platform.data.tokenisation import TokenizedText
from hfedmoe.platform.models import MoEAdapter, build_adapter
from hfedmoe.platform.tasks import Task, make_task

log = logging.getLogger(__name__)


@dataclass
class Federation:
    cfg: ExperimentConfig
    task: Task
    label_names: list[str]  # the groups: classes, or classes of label-like answers
    label_like: bool  # answers from a small fixed set (always, for classification)
    train: TokenizedText  # or TokenizedPairs (causal_lm), which batches alike
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
    task = make_task(cfg.task.name, cfg.task.params)
    examples = task.load(data_cfg)
    groups = examples.groups
    train_idx, test_idx = stratified_split(groups, data_cfg.test_fraction, cfg.seed)
    source = f"data.path {data_cfg.path}" if data_cfg.path else f"data.source {data_cfg.source}"
    check_split(groups, test_idx, data_cfg.test_fraction, source)
    split = split_record(groups, train_idx, test_idx, cfg.seed, data_cfg.test_fraction)
    if data_cfg.max_test_samples is not None and len(test_idx) > data_cfg.max_test_samples:
        rng = np.random.default_rng([cfg.seed, 1])
        test_idx = np.sort(rng.choice(test_idx, data_cfg.max_test_samples, replace=False))
        split["evaluated_test_rows"] = len(test_idx)
    adapter = build_task_adapter(cfg, len(examples.group_names))
    train = task.tokenize(examples, train_idx, adapter.tokenizer, data_cfg.max_length)
    test = task.tokenize(examples, test_idx, adapter.tokenizer, data_cfg.max_length)
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
    footprint = measure_footprint(adapter, train, fed.batch_size, task)
    budgets = draw_budgets(
        cfg.budgets,
        fed.num_clients,
        cfg.seed,
        full_step_bytes=full_step_memory_bytes(footprint, fed.batch_size),
        resident_bytes=step_memory_bytes(footprint, 0, fed.batch_size),
    )
    federation = Federation(
        cfg=cfg,
        task=task,
        label_names=examples.group_names,
        label_like=examples.label_like,
        train=train,
        test=test,
        shards=shards,
        budgets=budgets,
        footprint=footprint,
        split=split,
    )
    return federation, adapter


def build_task_adapter(cfg: ExperimentConfig, num_labels: int) -> MoEAdapter:
    """The configured model with the configured task's head (every process builds it so)."""
    head = make_task(cfg.task.name, cfg.task.params).head
    return build_adapter(cfg.model, num_labels, cfg.seed, head)


def measure_footprint(
    adapter: MoEAdapter, train: TokenizedText, batch_size: int, task: Task | None = None
) -> ModelFootprint:
    """The model's footprint with activations measured on a full-length batch.

    Budgets must hold for any batch, so the activation term is measured with every
    position attended (rows are padded to max_length; dynamic padding only shrinks them).
    A task whose loss saves tensors that matter (``loss_in_footprint``: the LM head's
    log-softmax over [N, V] at the positions that predict targets) has its loss in the
    measured forward, on the rows it names (``footprint_rows``).
    """
    if task is None or not task.loss_in_footprint:
        input_ids = train.input_ids[:batch_size]
        saved = adapter.measure_activation_bytes(input_ids, torch.ones_like(input_ids))
        return adapter.footprint(activation_bytes_per_sample=saved / len(input_ids))
    rows = torch.as_tensor(task.footprint_rows(train, batch_size))
    batch = {name: value[rows] for name, value in vars(train).items()}
    input_ids = batch["input_ids"]
    saved = adapter.measure_activation_bytes(
        input_ids,
        torch.ones_like(input_ids),
        lambda logits: task.loss(logits, batch),
        task.positions(batch),
    )
    return adapter.footprint(activation_bytes_per_sample=saved / len(input_ids))


def make_trainer(
    adapter: MoEAdapter, train_data: TokenizedText, footprint: ModelFootprint, cfg: ExperimentConfig
) -> LocalTrainer:
    """The trainer of the configured engine (``federation.engine``)."""
    if cfg.federation.engine == "deepspeed":
        from hfedmoe.platform.zero import DeepSpeedTrainer  # imports deepspeed: only on demand

        return DeepSpeedTrainer(adapter, train_data, footprint, cfg)
    return LocalTrainer(adapter, train_data, footprint, cfg)
