"""The strategy interface and its registry.

A strategy is a small class of hooks, one per decision a method makes differently:

- client side: which experts a batch trains (``select_experts``), and how many experts one
  step may train, which is what the memory check must hold (``step_limit``);
- server side: the weight of each uploaded expert row (``expert_weights``) and of each
  client's routers (``gate_weight``, ``gate_divisor``).

The defaults are FedAvg on the server. Registering a class under its ``name`` makes it a
valid ``federation.strategy``: adding a method is one class in one file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch

from hfedmoe.platform.records import BatchRouting, ClientReport
from hfedmoe.platform.selection import select_top_experts

if TYPE_CHECKING:
    from hfedmoe.platform.config import HFedMoEConfig


class Strategy:
    """Base class: budgeted top-scored selection on the client, FedAvg on the server."""

    name: ClassVar[str]
    # "selected": at most C_budget experts a step; "all": every expert, budget ignored;
    # "routed": every expert the batch routes to (E_union), budget ignored, its memory
    # checked per step; "none": experts frozen. Decides the memory a step needs and
    # which engines apply.
    trains: ClassVar[Literal["selected", "all", "routed", "none"]] = "selected"

    def __init__(self, hp: HFedMoEConfig) -> None:
        self.hp = hp

    # ---- client side -----------------------------------------------------------------
    def expert_scores(self, routing: BatchRouting) -> torch.Tensor:
        """[L, E] scores; the top C_budget of E_union are trained (eq 15's argmax)."""
        raise NotImplementedError(f"{type(self).__name__} must define expert_scores")

    def select_experts(
        self, routing: BatchRouting, capacity: int, rng: np.random.Generator
    ) -> torch.Tensor:
        """The [L, E] mask of experts trained on this batch (at most ``capacity``)."""
        scores = self.expert_scores(routing)
        return select_top_experts(scores, routing.union, capacity, self.hp.budget_scope)

    def step_limit(self, capacity: int, total: int) -> int:
        """Experts one step may train (over all layers), given C_budget over all layers.

        For "routed" it is what fits the memory: a step whose union is larger fails.
        """
        return {"selected": capacity, "routed": capacity, "all": total, "none": 0}[self.trains]

    # ---- server side -----------------------------------------------------------------
    def expert_weights(self, report: ClientReport, layer: int, index: np.ndarray) -> np.ndarray:
        """Weight of each uploaded row of ``layer`` (experts ``index``); 0 leaves it out."""
        return np.full(index.shape, float(report.num_samples))

    def gate_weight(self, report: ClientReport, preference: float) -> float:
        """Weight of this client's routers; ``preference`` is sum_e p_c(e) (eq 19)."""
        return float(report.num_samples)

    def gate_divisor(self, weight_sum: float, global_set_size: int) -> float:
        """What the weighted sum of routers is divided by (<= 0 keeps the old routers)."""
        return weight_sum


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available as ``federation.strategy: <cls.name>``."""
    known = STRATEGIES.get(cls.name)
    # The same class may arrive again as a copy (unpickled by value in a worker).
    if known is not None and _where(known) != _where(cls):
        raise ValueError(
            f"strategy {cls.name!r} is registered twice: {_where(known)}, {_where(cls)}"
        )
    STRATEGIES[cls.name] = cls
    return cls


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def make_strategy(name: str, hp: HFedMoEConfig) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}"
        ) from None
    return cls(hp)
