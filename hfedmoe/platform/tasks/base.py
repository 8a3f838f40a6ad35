"""The task interface and its registry.

A task says what a federation learns, everywhere the platform used to assume sequence
classification:

- which head the model gets (``head``: a classifier over the groups, or the family's own
  LM head);
- the examples a config names (``load``) and their tensors (``tokenize``);
- the training loss of a batch (``loss``, from the logits at ``positions``), which
  LocalTrainer, the FLOP calibration and the memory measurement all use;
- the evaluation of the global model (``evaluate``).

Registering a class under its ``name`` makes it a valid ``task.name``; its ``Params``
model validates ``task.params``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from hfedmoe.platform.config import DataConfig
    from hfedmoe.platform.models import MoEAdapter


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, eq=False)
class Examples:
    """A task's examples before tokenisation, with the groups splits and partitions read.

    ``groups`` are the classes (classification) or the classes of label-like answers
    (causal_lm on topic instructions), else all zeros.
    """

    source: Any  # TextCorpus or InstructionPairs
    groups: np.ndarray  # [N] int64
    group_names: list[str]
    label_like: bool  # answers come from a small fixed set: exact match is meaningful


@dataclass
class Evaluation:
    """The global model on the test set."""

    loss: float  # classification: mean CE per sample; causal_lm: mean CE per target token
    accuracy: float | None  # classification: accuracy; causal_lm: exact match (label-like)
    perplexity: float | None = None  # causal_lm: exp(loss)
    generations: list[dict[str, Any]] = field(default_factory=list)  # causal_lm: samples


class Task:
    """Base class of a task; subclasses define every hook."""

    name: ClassVar[str]
    head: ClassVar[Literal["classifier", "lm"]]
    Params: ClassVar[type[BaseModel]] = NoParams
    # Whether the measured activations include the loss's own saved tensors (the LM head's
    # log-softmax saves [B, T, V] floats; a classifier's CE saves [B, C], left out so that
    # classification footprints stay as they were).
    loss_in_footprint: ClassVar[bool] = False

    def __init__(self, params: BaseModel) -> None:
        self.params = params

    def load(self, data: DataConfig) -> Examples:
        raise NotImplementedError

    def tokenize(self, examples: Examples, rows: np.ndarray, tokenizer, max_length: int):
        """TokenizedText (or a type that batches like it) of ``rows``."""
        raise NotImplementedError

    def positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """[B, T] bool: where the loss needs the LM head's logits (None: a classifier)."""
        return None

    def predictions(self, batch: dict[str, torch.Tensor]) -> int:
        """How many positions of the batch run the LM head (its FLOPs are per position)."""
        return 0

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar training loss of a batch, from the logits at ``positions(batch)``."""
        raise NotImplementedError

    def footprint_rows(self, train, batch_size: int) -> np.ndarray:
        """The training rows whose step the memory model measures."""
        return np.arange(min(batch_size, len(train)))

    def evaluate(self, adapter: MoEAdapter, test, batch_size: int, label_like: bool) -> Evaluation:
        raise NotImplementedError


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``task.name: <cls.name>``."""
    TASKS[cls.name] = cls
    return cls


def make_task(name: str, params: dict[str, Any] | None = None) -> Task:
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
    return cls(cls.Params.model_validate(params or {}))
