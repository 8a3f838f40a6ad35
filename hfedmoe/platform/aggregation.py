"""Server-side aggregation: sparsity-aware experts, preference-weighted gates, FedAvg.

Equations 16-21 of HFedMoE as pure functions over stacked client arrays (the reference,
unit-tested against hand-computed values), and ``RoundAggregator``, which streams client
updates into the next global state with the same arithmetic in O(model) memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hfedmoe.platform.local import ClientUpdate
from hfedmoe.platform.models.adapter import ModelState


def expert_usage(prob_sum: np.ndarray, num_samples: int) -> np.ndarray:
    """Eq 16: u_c(e) = (1/|D_c|) sum_{x in D_c} G_e(x), from the summed probabilities."""
    return prob_sum / max(num_samples, 1)


def routing_set(usage: np.ndarray, tau: float) -> np.ndarray:
    """Eq 18 (first part): S_c = {e : u_c(e) >= tau}, also the indicator of eq 17."""
    return usage >= tau


def sparsity_aware_weights(sizes: np.ndarray, usage: np.ndarray, tau: float) -> np.ndarray:
    """Eq 17: w_c(e) = |D_c| 1(u_c(e) >= tau) / sum_j |D_j| 1(u_j(e) >= tau).

    sizes: [C]; usage: [C, ...]. Where no client qualifies the weights are all zero and
    the expert keeps its previous global value.
    """
    numer = sizes.reshape(-1, *[1] * (usage.ndim - 1)) * routing_set(usage, tau)
    denom = numer.sum(axis=0, keepdims=True)
    return np.divide(numer, denom, out=np.zeros_like(numer, dtype=np.float64), where=denom > 0)


def routing_consistency(sets: np.ndarray) -> np.ndarray:
    """Eq 18: r(c) = |S_c ∩ S_global| / |S_global|, S_global = union_c S_c.

    sets: [C, ...] bool. As written S_c is a subset of S_global, so r(c) = |S_c|/|S_global|.
    An empty S_global gives r = 0.
    """
    flat = sets.reshape(sets.shape[0], -1)
    union = flat.any(axis=0)
    size = union.sum()
    if size == 0:
        return np.zeros(flat.shape[0])
    return (flat & union).sum(axis=1) / size


def routing_preference(usage: np.ndarray, importance: np.ndarray, tau: float) -> np.ndarray:
    """Eq 19: p_c(e) = u_c(e) s_c(e) for e in S_c, else 0."""
    return np.where(routing_set(usage, tau), usage * importance, 0.0)


def gate_weights(preference: np.ndarray, global_set_size: int) -> np.ndarray:
    """Eq 20: alpha(c) = sum_{e in S_c} p_c(e) / |S_global|. preference: [C, ...]."""
    if global_set_size == 0:
        return np.zeros(preference.shape[0])
    return preference.reshape(preference.shape[0], -1).sum(axis=1) / global_set_size


def aggregate_gates(alphas: np.ndarray, gates: np.ndarray, normalise: bool) -> np.ndarray:
    """Eq 21: G^{t+1} = sum_c alpha(c) G_c^t.

    As written the alphas need not sum to one; with ``normalise`` (our default) they are
    divided by their sum. gates: [C, ...]. Callers keep the previous gate when all
    alphas are zero.
    """
    weights = alphas / alphas.sum() if normalise else alphas
    return np.tensordot(weights, gates, axes=1)


def fedavg(sizes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """FedAvg (McMahan et al. 2017): sum_c |D_c| theta_c / sum_c |D_c|. values: [C, ...]."""
    return np.tensordot(sizes / sizes.sum(), values, axes=1)


@dataclass
class AggregationReport:
    """What one round's aggregation did, for logging."""

    clients: list[int] = field(default_factory=list)
    consistency: list[float] = field(default_factory=list)  # r(c), eq 18, per client
    gate_alphas: list[float] = field(default_factory=list)  # alpha(c), eq 20, per client
    uploads: np.ndarray | None = None  # [L, E] clients that uploaded each expert
    contributors: np.ndarray | None = None  # [L, E] clients whose upload entered the average
    updated_by: list[list[list[int]]] = field(default_factory=list)  # [L][E] -> client ids

    @property
    def experts_updated(self) -> int:
        return int((self.contributors > 0).sum()) if self.contributors is not None else 0

    @property
    def mean_consistency(self) -> float:
        return float(np.mean(self.consistency)) if self.consistency else 0.0


class RoundAggregator:
    """Streams one round's client updates into the next global state.

    expert_rule "sparsity_aware" averages expert e over the clients that uploaded it (that
    is, trained it) and have u_c(e) >= tau, weighted by |D_c| (eq 17 restricted to the
    experts the server actually received); "fedavg" averages every upload of e. An expert
    nobody contributes to keeps its value. gate_rule "preference" weights each client's
    routers by alpha(c) (eqs 19-21), "fedavg" by |D_c|. Shared parameters: FedAvg.
    Accumulators are float64; the result is cast back to each tensor's dtype.
    """

    def __init__(
        self,
        global_state: ModelState,
        expert_rule: str,
        gate_rule: str,
        tau: float,
        normalise_gates: bool,
    ) -> None:
        self.previous = global_state
        self.expert_rule = expert_rule
        self.gate_rule = gate_rule
        self.tau = tau
        self.normalise_gates = normalise_gates
        self.shared_sum = {k: np.zeros(v.shape) for k, v in global_state.shared.items()}
        self.shared_weight = 0.0
        self.gate_sum = {k: np.zeros(v.shape) for k, v in global_state.gates.items()}
        self.gate_weight = 0.0
        self.expert_sum = [
            {k: np.zeros(v.shape) for k, v in layer.items()} for layer in global_state.experts
        ]
        num_layers = len(global_state.experts)
        num_experts = next(iter(global_state.experts[0].values())).shape[0]
        self.expert_weight = np.zeros((num_layers, num_experts))
        self.report = AggregationReport(
            uploads=np.zeros((num_layers, num_experts), dtype=np.int64),
            contributors=np.zeros((num_layers, num_experts), dtype=np.int64),
            updated_by=[[[] for _ in range(num_experts)] for _ in range(num_layers)],
        )
        self.sets: list[np.ndarray] = []
        self.preference_sums: list[float] = []

    def add(self, update: ClientUpdate) -> None:
        size = float(update.num_samples)
        self.report.clients.append(update.client_id)
        if update.shared:
            for name, value in update.shared.items():
                self.shared_sum[name] += size * value
            self.shared_weight += size
        client_set = routing_set(update.usage, self.tau)
        self.sets.append(client_set)
        preference = float(routing_preference(update.usage, update.importance, self.tau).sum())
        self.preference_sums.append(preference)
        if update.gates:
            weight = preference if self.gate_rule == "preference" else size
            for name, value in update.gates.items():
                self.gate_sum[name] += weight * value
            self.gate_weight += weight
        for layer, uploaded in enumerate(update.experts):
            index = uploaded["index"]
            if index.size == 0:
                continue
            self.report.uploads[layer, index] += 1
            if self.expert_rule == "sparsity_aware":
                rows = np.flatnonzero(client_set[layer, index])
                index = index[rows]
            else:
                rows = np.arange(index.size)
            for name in self.expert_sum[layer]:
                self.expert_sum[layer][name][index] += size * uploaded[name][rows]
            self.expert_weight[layer, index] += size
            self.report.contributors[layer, index] += 1
            for e in index.tolist():
                self.report.updated_by[layer][e].append(update.client_id)

    def finalize(self) -> tuple[ModelState, AggregationReport]:
        previous = self.previous
        shared = _average(self.shared_sum, self.shared_weight, previous.shared)
        sets = np.stack(self.sets) if self.sets else np.zeros((0, *self.expert_weight.shape), bool)
        self.report.consistency = routing_consistency(sets).tolist() if self.sets else []
        if self.gate_rule == "preference":
            global_size = int(sets.any(axis=0).sum()) if self.sets else 0
            alphas = gate_weights(np.array(self.preference_sums), global_size)
            self.report.gate_alphas = alphas.tolist()
            # Eq 21 without normalisation divides the preference-weighted sum by |S_global|.
            divisor = self.gate_weight if self.normalise_gates else float(global_size)
            gates = _average(self.gate_sum, divisor if alphas.sum() > 0 else 0.0, previous.gates)
        else:
            gates = _average(self.gate_sum, self.gate_weight, previous.gates)
        experts = [
            _keep_or_average(sums, weight, old)
            for sums, weight, old in zip(
                self.expert_sum, self.expert_weight, previous.experts, strict=True
            )
        ]
        return ModelState(shared=shared, gates=gates, experts=experts), self.report


def _keep_or_average(
    sums: dict[str, np.ndarray], weight: np.ndarray, old: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per-expert average (weight [E]); an expert with zero weight keeps its old rows."""
    layer = {}
    for name, total in sums.items():
        shape = (-1, *[1] * (total.ndim - 1))
        averaged = total / np.where(weight > 0, weight, 1.0).reshape(shape)
        layer[name] = np.where((weight > 0).reshape(shape), averaged, old[name]).astype(
            old[name].dtype
        )
    return layer


def _average(sums: dict[str, np.ndarray], weight: float, old: dict[str, np.ndarray]):
    if weight <= 0:
        return {k: v.copy() for k, v in old.items()}
    return {k: (sums[k] / weight).astype(old[k].dtype) for k in sums}
