"""The strategy interface, its optimisation parts, and their registries.

A strategy is a small class of hooks, one per decision a method makes differently:

- client side: which experts a batch trains (``select_experts``), and how many experts one
  step may train, which is what the memory check must hold (``step_limit``);
- server side: the weight of each uploaded expert row (``expert_weights``) and of each
  client's routers (``gate_weight``, ``gate_divisor``).

How the weights are optimised is composed in from two more registries, so that any
expert-selection rule runs with any of them (``federation.client_update``,
``federation.server_update``):

- a ``ClientUpdate`` corrects each local step's gradients (FedProx's proximal term,
  SCAFFOLD's control variates) and may keep per-client state (SCAFFOLD's c_i);
- a ``ServerUpdate`` turns the aggregate into the next global model (FedAvg: as is;
  FedAvgM, FedAdam, FedYogi, FedAdagrad: a server optimiser step on the pseudo-gradient).

The strategy's optimisation hooks (``start_local``, ``correct_gradients``,
``finish_local``, ``server_update``, ``update_control_variates``, ``initial_server_state``)
delegate to the configured parts, so a plugin strategy may override any hook directly.

Registering a class (``@register``) makes its ``name`` valid in the config: adding a method
is one class in one file. Each class validates its own ``params`` with its ``Params``
pydantic model (``federation.<part>: {name, params}``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from hfedmoe.platform.records import (
    BatchRouting,
    ClientReport,
    ModelState,
    ServerState,
    Updated,
    Variates,
)
from hfedmoe.platform.selection import select_top_experts

if TYPE_CHECKING:
    from hfedmoe.platform.config import HFedMoEConfig


class NoParams(BaseModel):
    """A part without parameters: ``params`` must be empty."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Part:
    """An optimisation part: a registered name, its validated params, its server state."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel) -> None:
        self.params = params

    def initial_server_state(self, state: ModelState) -> ServerState:
        """Server-side arrays this part keeps ("<name>/..." keys), before the first round."""
        return {}


class ClientUpdate(Part):
    """How a client's local steps are corrected; the default trains plainly."""

    def client_view(self, server: ServerState) -> ServerState:
        """The server arrays a client needs for its round (they travel with its job)."""
        return {}

    def start(self, reference: ModelState, server: ServerState, variates: Variates) -> None:
        """A client's round begins from ``reference`` (the global model it loaded), with
        ``client_view``'s arrays as ``server`` and its own kept ``variates``."""

    def correct(self, tensors: dict[str, torch.Tensor]) -> None:
        """Correct, in place, the gradients of the tensors this step trains."""

    def finish(self, tensors: dict[str, torch.Tensor], lr: float) -> Variates:
        """The client's round is done; return what its per-client state changed by."""
        return {}

    def update_server(self, server: ServerState, variate_sums: Variates, clients: int) -> None:
        """Fold the round's summed per-client changes into the server state (in place)."""


class ServerUpdate(Part):
    """How the aggregate becomes the next global model; the default (FedAvg) keeps it."""

    def update(
        self, previous: ModelState, aggregate: ModelState, updated: Updated, server: ServerState
    ) -> ModelState:
        """The next global model; may update ``server`` (its moments) in place."""
        return aggregate


class Strategy:
    """Base class: budgeted top-scored selection on the client, FedAvg on the server."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    # "selected": at most C_budget experts a step; "all": every expert, budget ignored;
    # "routed": every expert the batch routes to (E_union), budget ignored, its memory
    # checked per step; "none": experts frozen. Decides the memory a step needs and
    # which engines apply.
    trains: ClassVar[Literal["selected", "all", "routed", "none"]] = "selected"

    def __init__(
        self,
        hp: HFedMoEConfig,
        params: BaseModel | None = None,
        client_update: ClientUpdate | None = None,
        server_update: ServerUpdate | None = None,
    ) -> None:
        self.hp = hp
        self.params = params if params is not None else self.Params()
        self.client_update = client_update or ClientUpdate(NoParams())
        self.server_rule = server_update or ServerUpdate(NoParams())

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

    # ---- client-side optimisation (delegated to ``client_update``) ----------------------
    def client_view(self, server: ServerState) -> ServerState:
        return self.client_update.client_view(server)

    def start_local(self, reference: ModelState, server: ServerState, variates: Variates) -> None:
        self.client_update.start(reference, server, variates)

    def correct_gradients(self, tensors: dict[str, torch.Tensor]) -> None:
        self.client_update.correct(tensors)

    def finish_local(self, tensors: dict[str, torch.Tensor], lr: float) -> Variates:
        return self.client_update.finish(tensors, lr)

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

    # ---- server-side optimisation (delegated to the parts) ------------------------------
    def initial_server_state(self, state: ModelState) -> ServerState:
        """The arrays the driver keeps across rounds for this strategy (flat names)."""
        return {
            **self.client_update.initial_server_state(state),
            **self.server_rule.initial_server_state(state),
        }

    def server_update(
        self, previous: ModelState, aggregate: ModelState, updated: Updated, server: ServerState
    ) -> ModelState:
        return self.server_rule.update(previous, aggregate, updated, server)

    def update_control_variates(
        self, server: ServerState, variate_sums: Variates, clients: int
    ) -> None:
        self.client_update.update_server(server, variate_sums, clients)


class Registry(dict):
    """Registered classes by name, for one config field (e.g. ``federation.strategy``)."""

    def __init__(self, field: str) -> None:
        super().__init__()
        self.field = field

    def add(self, cls: type) -> type:
        known = self.get(cls.name)
        # The same class may arrive again as a copy (unpickled by value in a worker).
        if known is not None and _where(known) != _where(cls):
            raise ValueError(
                f"{self.field} {cls.name!r} is registered twice: {_where(known)}, {_where(cls)}"
            )
        self[cls.name] = cls
        return cls

    def lookup(self, name: str) -> type:
        try:
            return self[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.field} {name!r}; choose one of {', '.join(self)}"
            ) from None


STRATEGIES = Registry("federation.strategy")
CLIENT_UPDATES = Registry("federation.client_update")
SERVER_UPDATES = Registry("federation.server_update")
REGISTRIES = {
    "strategy": STRATEGIES,
    "client_update": CLIENT_UPDATES,
    "server_update": SERVER_UPDATES,
}


def register(cls: type) -> type:
    """Class decorator: make ``cls`` a valid name of the config field its base class fills.

    A ``Strategy`` subclass for ``federation.strategy``, a ``ClientUpdate`` for
    ``federation.client_update``, a ``ServerUpdate`` for ``federation.server_update``.
    """
    for base, registry in (
        (Strategy, STRATEGIES),
        (ClientUpdate, CLIENT_UPDATES),
        (ServerUpdate, SERVER_UPDATES),
    ):
        if issubclass(cls, base):
            return registry.add(cls)
    raise TypeError(f"{cls.__name__} is no Strategy, ClientUpdate or ServerUpdate subclass")


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def make_strategy(name: str, hp: HFedMoEConfig) -> Strategy:
    """A registered strategy with default parameters, plain client steps and FedAvg."""
    return STRATEGIES.lookup(name)(hp)
