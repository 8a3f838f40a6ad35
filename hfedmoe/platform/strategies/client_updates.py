"""Client-side optimisation parts (``federation.client_update``): plain, FedProx, SCAFFOLD.

Each corrects the gradients of the tensors a local step trains, before the optimiser
step; for experts those are only the rows active in that step, so an expert a client
never trains is never touched. The corrections are the gradients of the methods' local
objectives, added to the gradient instead of the loss (no extra autograd work).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from hfedmoe.platform.records import ModelState, ServerState, Variates, row_of
from hfedmoe.platform.strategies.base import ClientUpdate, register


def proximal_gradient(
    grad: torch.Tensor, weights: torch.Tensor, reference: torch.Tensor, mu: float
) -> torch.Tensor:
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", eq 2).

    The local objective adds mu/2 ||w - w_global||^2, whose gradient is mu (w - w_global):
    the corrected gradient is ``grad + mu (weights - reference)``.
    """
    return grad + mu * (weights - reference)


def scaffold_corrected_gradient(
    grad: torch.Tensor, client_variate: torch.Tensor, server_variate: torch.Tensor
) -> torch.Tensor:
    """SCAFFOLD (Karimireddy et al. 2020, Algorithm 1 line 10): g_i(y) - c_i + c."""
    return grad - client_variate + server_variate


def scaffold_client_variate(
    client_variate: np.ndarray,
    server_variate: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    steps: int,
    lr: float,
) -> np.ndarray:
    """SCAFFOLD (Karimireddy et al. 2020, Algorithm 1 line 12, option II):
    c_i+ = c_i - c + (x - y_i) / (K lr), x the global model the client started from,
    y_i where its K local steps of learning rate lr ended."""
    return client_variate - server_variate + (start - end) / (steps * lr)


def scaffold_server_variate(
    server_variate: np.ndarray, change_sum: np.ndarray, num_clients: int
) -> np.ndarray:
    """SCAFFOLD (Karimireddy et al. 2020, Algorithm 1 line 17): c + (1/N) sum_i (c_i+ - c_i),
    N all clients, the sum over the round's clients."""
    return server_variate + change_sum / num_clients


@register
class Plain(ClientUpdate):
    """The local steps as they are (FedAvg's clients)."""

    name = "plain"


class FedProxParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    mu: float = Field(0.01, ge=0, description="weight of the proximal term mu/2 ||w - w_g||^2")


class _Reference:
    """The round's global values of trained-tensor keys, as tensors like the trained ones."""

    def __init__(self, state: ModelState) -> None:
        self.flat = state.to_flat()
        self.cache: dict[str, torch.Tensor] = {}

    def tensor(self, key: str, like: torch.Tensor, flat: dict | None = None, prefix: str = ""):
        cached = self.cache.get(prefix + key)
        if cached is None:
            value = row_of(self.flat if flat is None else flat, key, prefix)
            cached = torch.from_numpy(np.array(value)).to(like.device, like.dtype)
            self.cache[prefix + key] = cached
        return cached


@register
class FedProx(ClientUpdate):
    """FedProx: each trained tensor is pulled towards the global value it started from."""

    name = "fedprox"
    Params = FedProxParams

    def start(self, reference: ModelState, server: ServerState, variates: Variates) -> None:
        self.reference = _Reference(reference)

    @torch.no_grad()
    def correct(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            if t.grad is not None:  # trained this step
                w_g = self.reference.tensor(key, t)
                t.grad = proximal_gradient(t.grad, t, w_g, self.params.mu)


VARIATE = "scaffold/c/"


@register
class Scaffold(ClientUpdate):
    """SCAFFOLD, option II, sparse over experts.

    The server variate c covers the whole trainable state (``ServerState`` entries
    "scaffold/c/<tensor>"); a client's c_i exists only for the tensors it ever trained
    (missing: 0), and the driver keeps it between the client's rounds. K, the local steps
    of option II, is counted per tensor: the steps that trained it (for an expert, the
    steps it was selected in and routed to), since an expert's row moves only in those.
    The local optimiser is the client's AdamW, so (x - y_i)/(K lr) estimates the mean
    corrected step direction rather than SGD's mean gradient, as in the paper's option II.
    Its cost: c travels down with the model and c_i+ - c_i up with the update, doubling
    the traffic (counted in bytes_down and bytes_up).
    """

    name = "scaffold"

    def initial_server_state(self, state: ModelState) -> ServerState:
        return {VARIATE + k: np.zeros_like(v) for k, v in state.to_flat().items()}

    def client_view(self, server: ServerState) -> ServerState:
        return {k: v for k, v in server.items() if k.startswith(VARIATE)}

    def start(self, reference: ModelState, server: ServerState, variates: Variates) -> None:
        self.reference = _Reference(reference)
        self.server = server
        self.variates = variates
        self.steps: dict[str, int] = {}

    def _client_variate(self, key: str, like: np.ndarray) -> np.ndarray:
        own = self.variates.get(key)
        return own if own is not None else np.zeros_like(like)

    @torch.no_grad()
    def correct(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            if t.grad is None:
                continue
            c = self.reference.tensor(key, t, self.server, VARIATE)
            c_i = self.reference.cache.get("client/" + key)
            if c_i is None:
                own = self._client_variate(key, row_of(self.server, key, VARIATE))
                c_i = self.reference.cache["client/" + key] = torch.from_numpy(np.array(own)).to(
                    t.device, t.dtype
                )
            t.grad = scaffold_corrected_gradient(t.grad, c_i, c)
            self.steps[key] = self.steps.get(key, 0) + 1

    def finish(self, tensors: dict[str, torch.Tensor], lr: float) -> Variates:
        changes = {}
        for key, steps in self.steps.items():
            c = row_of(self.server, key, VARIATE)
            c_i = self._client_variate(key, c)
            end = tensors[key].detach().cpu().numpy()
            start = row_of(self.reference.flat, key)
            new = scaffold_client_variate(c_i, c, start, end, steps, lr).astype(c.dtype)
            changes[key] = new - c_i
        return changes

    def update_server(self, server: ServerState, variate_sums: Variates, clients: int) -> None:
        for name, total in variate_sums.items():
            c = server[VARIATE + name]
            server[VARIATE + name] = scaffold_server_variate(c, total, clients).astype(c.dtype)
