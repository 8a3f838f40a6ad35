"""Server-side aggregation: screening, sparsity-aware experts, preference-weighted gates.

Equations 16-21 of HFedMoE as pure functions (unit-tested against hand-computed values),
``screen``, the one place a client's failure is decided, and ``RoundAggregator``, which
streams a round's uploads into the next global state in O(model) memory. What weight an
upload gets is the strategy's choice (``strategies.base.Strategy``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from hfedmoe.platform.records import ClientReport, ClientUpload, ModelState

if TYPE_CHECKING:
    from hfedmoe.platform.strategies import Strategy


def expert_usage(prob_sum: np.ndarray, num_samples: int) -> np.ndarray:
    """Eq 16: u_c(e) = (1/|D_c|) sum_{x in D_c} G_e(x), from the summed probabilities."""
    return prob_sum / max(num_samples, 1)


def routing_set(usage: np.ndarray, tau: float) -> np.ndarray:
    """Eq 18 (first part): S_c = {e : u_c(e) >= tau}, also the indicator of eq 17."""
    return usage >= tau


def sparsity_aware_contribution(size: float, usage: np.ndarray, tau: float) -> np.ndarray:
    """Eq 17's numerator: |D_c| 1(u_c(e) >= tau), the weight of client c's expert e.

    The expert's new value is the sum of contributions times uploads over the sum of
    contributions; the aggregator keeps both sums as it streams. Where no client
    contributes, the expert keeps its previous global value.
    """
    return size * routing_set(usage, tau)


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


def aggregate_gates(weighted_sum: np.ndarray, divisor: float, previous: np.ndarray) -> np.ndarray:
    """Eq 21: G^{t+1} = sum_c alpha(c) G_c^t, from the streamed sum_c p_c G_c.

    alpha(c) = p_c / |S_global| (eq 20), so the sum is divided by |S_global| as written,
    or by sum_c p_c when the alphas are normalised to sum to one (our default,
    ``hfedmoe.normalise_gate_weights``). A divisor <= 0 (no preference at all) keeps the
    previous gate.
    """
    if divisor <= 0:
        return previous.copy()
    return (weighted_sum / divisor).astype(previous.dtype)


def fedavg(weighted_sum: np.ndarray, weight: float, previous: np.ndarray) -> np.ndarray:
    """FedAvg (McMahan et al. 2017): sum_c |D_c| theta_c / sum_c |D_c|, from the streamed sum.

    Nobody contributing (weight 0) keeps the previous value.
    """
    if weight <= 0:
        return previous.copy()
    return (weighted_sum / weight).astype(previous.dtype)


def screen(
    report: ClientReport, upload: ClientUpload | None, deadline_s: float | None
) -> str | None:
    """The one place a client's failure is decided: why its upload must not be aggregated.

    lost: the executor never got the client back; oom: its step did not fit its memory;
    non_finite: NaN/Inf in a tensor or the loss; deadline: it would arrive after
    ``federation.round_deadline_s`` simulated seconds.
    """
    if report.lost:
        return "lost"
    if report.out_of_memory or upload is None:
        return "oom"
    if not (upload.is_finite() and math.isfinite(report.loss)):
        return "non_finite"
    if deadline_s is not None and report.seconds > deadline_s:
        return "deadline"
    return None


@dataclass
class AggregationReport:
    """What one round's aggregation did, for logging."""

    consistency: list[float] = field(default_factory=list)  # r(c), eq 18, per client
    gate_alphas: list[float] = field(default_factory=list)  # alpha(c), eq 20, per client
    contributors: np.ndarray | None = None  # [L, E] clients whose upload entered the average

    @property
    def experts_updated(self) -> int:
        return int((self.contributors > 0).sum()) if self.contributors is not None else 0

    @property
    def mean_consistency(self) -> float:
        return float(np.mean(self.consistency)) if self.consistency else 0.0


class RoundAggregator:
    """Streams one round's uploads into the next global state.

    Each upload is screened, then added with the strategy's weights: per uploaded expert
    row (an expert nobody contributes to keeps its value), per client's routers, and
    |D_c| for shared parameters. Accumulators are float64 and the sums run in the order
    uploads are offered (the engine's canonical order, the same on every executor); the
    result is cast back to each tensor's dtype.
    """

    def __init__(
        self,
        global_state: ModelState,
        strategy: Strategy,
        tau: float,
        deadline_s: float | None,
    ) -> None:
        self.previous = global_state
        self.strategy = strategy
        self.tau = tau
        self.deadline_s = deadline_s
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
        self.contributors = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.sets: list[np.ndarray] = []
        self.preference_sums: list[float] = []

    def offer(self, report: ClientReport, upload: ClientUpload | None) -> str | None:
        """Screen a client's upload and add it unless it fails; record and return the verdict."""
        report.failure = screen(report, upload, self.deadline_s)
        if report.failure is None:
            self._add(report, upload)
        return report.failure

    def _add(self, report: ClientReport, upload: ClientUpload) -> None:
        size = float(report.num_samples)
        if upload.shared:
            for name, value in upload.shared.items():
                self.shared_sum[name] += size * value
            self.shared_weight += size
        self.sets.append(routing_set(report.usage, self.tau))
        preference = float(routing_preference(report.usage, report.importance, self.tau).sum())
        self.preference_sums.append(preference)
        if upload.gates:
            weight = self.strategy.gate_weight(report, preference)
            for name, value in upload.gates.items():
                self.gate_sum[name] += weight * value
            self.gate_weight += weight
        for layer, uploaded in enumerate(upload.experts):
            index = uploaded["index"]
            if index.size == 0:
                continue
            weights = self.strategy.expert_weights(report, layer, index)
            rows = np.flatnonzero(weights > 0)
            index, weights = index[rows], weights[rows]
            for name in self.expert_sum[layer]:
                values = uploaded[name][rows]
                # The product at the upload's dtype, as for shared parameters; the sum is float64.
                scale = weights.astype(values.dtype).reshape(-1, *[1] * (values.ndim - 1))
                self.expert_sum[layer][name][index] += scale * values
            self.expert_weight[layer, index] += weights
            self.contributors[layer, index] += 1

    def finalize(self) -> tuple[ModelState, AggregationReport]:
        previous = self.previous
        shared = {
            k: fedavg(v, self.shared_weight, previous.shared[k]) for k, v in self.shared_sum.items()
        }
        sets = np.stack(self.sets) if self.sets else np.zeros((0, *self.expert_weight.shape), bool)
        global_size = int(sets.any(axis=0).sum())
        divisor = self.strategy.gate_divisor(self.gate_weight, global_size)
        gates = {
            k: aggregate_gates(v, divisor, previous.gates[k]) for k, v in self.gate_sum.items()
        }
        experts = [
            _keep_or_average(sums, weight, old)
            for sums, weight, old in zip(
                self.expert_sum, self.expert_weight, previous.experts, strict=True
            )
        ]
        report = AggregationReport(
            consistency=routing_consistency(sets).tolist() if self.sets else [],
            gate_alphas=gate_weights(np.array(self.preference_sums), global_size).tolist(),
            contributors=self.contributors,
        )
        return ModelState(shared=shared, gates=gates, experts=experts), report


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
