"""Server optimisers (``federation.server_update``): FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad.

Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2), on the
pseudo-gradient Delta = aggregate - previous, where the aggregate is what the strategy's
aggregation made (eq 17 for experts, eqs 19-21 for routers, FedAvg for the rest). Each
update rule is one pure function below; defaults are the paper's (beta1 0.9, beta2 0.99,
tau 1e-3, v initialised to tau^2).

Sparse over experts: only the expert rows some client updated this round move, and only
their moments update; an expert nobody trained keeps its value and its moments, as if
that round had not happened for it (a zero Delta would instead decay its moments and,
with momentum, keep moving it). Shared tensors and routers move when any client's
upload entered them.

The moments are kept at each tensor's own dtype (float32 for float32 weights): the move
they make is rounded to that dtype anyway, and the state stays the model's size per
moment. The arithmetic of a step runs in float64.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hfedmoe.platform.records import ModelState, ServerState, Updated
from hfedmoe.platform.strategies.base import ServerUpdate, register


def fedavgm_step(
    x: np.ndarray, delta: np.ndarray, m: np.ndarray, lr: float, momentum: float
) -> tuple[np.ndarray, np.ndarray]:
    """FedAvgM (Hsu et al. 2019; Reddi et al. 2021, Sec. 3): m = momentum m + Delta,
    x + lr m."""
    m = momentum * m + delta
    return x + lr * m, m


def fedadagrad_step(
    x: np.ndarray, delta: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float, beta1: float,
    tau: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """FedAdagrad (Reddi et al. 2021, Algorithm 2): m = b1 m + (1-b1) Delta,
    v = v + Delta^2, x + lr m / (sqrt(v) + tau)."""
    m = beta1 * m + (1 - beta1) * delta
    v = v + delta**2
    return x + lr * m / (np.sqrt(v) + tau), m, v


def fedadam_step(
    x: np.ndarray, delta: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float, beta1: float,
    beta2: float, tau: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """FedAdam (Reddi et al. 2021, Algorithm 2): m = b1 m + (1-b1) Delta,
    v = b2 v + (1-b2) Delta^2, x + lr m / (sqrt(v) + tau)."""
    m = beta1 * m + (1 - beta1) * delta
    v = beta2 * v + (1 - beta2) * delta**2
    return x + lr * m / (np.sqrt(v) + tau), m, v


def fedyogi_step(
    x: np.ndarray, delta: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float, beta1: float,
    beta2: float, tau: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """FedYogi (Reddi et al. 2021, Algorithm 2): m = b1 m + (1-b1) Delta,
    v = v - (1-b2) Delta^2 sign(v - Delta^2), x + lr m / (sqrt(v) + tau)."""
    m = beta1 * m + (1 - beta1) * delta
    square = delta**2
    v = v - (1 - beta2) * square * np.sign(v - square)
    return x + lr * m / (np.sqrt(v) + tau), m, v


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FedAvgMParams(_Params):
    lr: float = Field(1.0, gt=0, description="server learning rate")
    momentum: float = Field(0.9, ge=0, lt=1)


class AdaptiveParams(_Params):
    lr: float = Field(1e-2, gt=0, description="server learning rate (eta)")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, description="adaptivity: v starts at tau^2")


@register
class FedAvg(ServerUpdate):
    """The aggregate is the next model (server learning rate 1, no state)."""

    name = "fedavg"


class _Optimiser(ServerUpdate):
    """A server optimiser with per-tensor moments, moved only where the round updated."""

    moments: ClassVar[tuple[str, ...]] = ("m", "v")

    def initial_server_state(self, state: ModelState) -> ServerState:
        start = {"m": 0.0, "v": getattr(self.params, "tau", 0.0) ** 2}
        return {
            f"{self.name}/{moment}/{k}": np.full_like(v, start[moment])
            for k, v in state.to_flat().items()
            for moment in self.moments
        }

    def step(self, x: np.ndarray, delta: np.ndarray, moments: list[np.ndarray]) -> tuple:
        """(new x, *new moments), in float64."""
        raise NotImplementedError

    def update(
        self, previous: ModelState, aggregate: ModelState, updated: Updated, server: ServerState
    ) -> ModelState:
        before, after = previous.to_flat(), aggregate.to_flat()
        moved = {}
        for key, x in before.items():
            rows = _moved_rows(key, updated)
            value = after[key]
            if rows is not None:
                value = value.copy()
                names = [f"{self.name}/{moment}/{key}" for moment in self.moments]
                x64 = x[rows].astype(np.float64)
                delta = value[rows].astype(np.float64) - x64
                new = self.step(x64, delta, [server[n][rows].astype(np.float64) for n in names])
                value[rows] = new[0]
                for name, moment in zip(names, new[1:], strict=True):
                    server[name] = server[name].copy()
                    server[name][rows] = moment
            moved[key] = value
        return ModelState.from_flat(moved)


def _moved_rows(key: str, updated: Updated) -> slice | np.ndarray | None:
    """The rows of a flat tensor the round updated: all, some expert rows, or None."""
    kind = key.split("/", 1)[0]
    if kind == "shared":
        return slice(None) if updated.shared else None
    if kind == "gate":
        return slice(None) if updated.gates else None
    rows = np.flatnonzero(updated.experts[int(key.split("/")[1])])
    return rows if rows.size else None


@register
class FedAvgM(_Optimiser):
    """Server momentum (Hsu et al. 2019)."""

    name = "fedavgm"
    Params = FedAvgMParams
    moments = ("m",)

    def step(self, x, delta, moments):
        p = self.params
        return fedavgm_step(x, delta, moments[0], p.lr, p.momentum)


class FedAdagradParams(_Params):
    lr: float = Field(1e-2, gt=0, description="server learning rate (eta)")
    beta1: float = Field(0.9, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, description="adaptivity: v starts at tau^2")


@register
class FedAdagrad(_Optimiser):
    name = "fedadagrad"
    Params = FedAdagradParams

    def step(self, x, delta, moments):
        p = self.params
        return fedadagrad_step(x, delta, *moments, p.lr, p.beta1, p.tau)


@register
class FedAdam(_Optimiser):
    name = "fedadam"
    Params = AdaptiveParams

    def step(self, x, delta, moments):
        p = self.params
        return fedadam_step(x, delta, *moments, p.lr, p.beta1, p.beta2, p.tau)


@register
class FedYogi(_Optimiser):
    name = "fedyogi"
    Params = AdaptiveParams

    def step(self, x, delta, moments):
        p = self.params
        return fedyogi_step(x, delta, *moments, p.lr, p.beta1, p.beta2, p.tau)
