"""Server-side aggregation: screening, sparsity-aware experts, preference-weighted gates.

Equations 16-21 of HFedMoE as pure functions (unit-tested against hand-computed values),
``screen``, the one place a client's failure is decided, and ``RoundAggregator``, which
streams a round's uploads into the next global state in O(model) memory. What weight an
upload gets, and how the aggregate becomes the next model (a server optimiser), is the
strategy's choice: any object with the ``AggregationRule`` hooks (``strategies.base.Strategy``
is one; this module never imports the strategies).

LoRA adapters (``model.lora.aggregate``): a pair of tensors whose names differ only by
``lora_A`` vs ``lora_B`` is one adapter, A [..., r, in] and B [..., out, r], whose weight
delta is (a constant scale times) B @ A. Two ways to aggregate it:

- ``factors`` (FedIT, Zhang et al. 2024; the default): A and B are averaged separately,
  like every other tensor. Cheap, but the average of the B_c times the average of the
  A_c is not the average of the B_c A_c: cross terms B_i A_j enter the global delta.
- ``product``: the weighted average of the deltas B_c A_c is accumulated instead (per
  expert row with eq 17's weights, |D_c| for shared tensors) and re-factored to rank r by
  truncated SVD (``refactor_low_rank``): the best rank-r approximation of the average
  (Eckart-Young), exact when the average has rank <= r. Its accumulator is the dense
  [..., out, in] delta, still O(model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from hfedmoe.platform.records import (
    ClientReport,
    ClientUpload,
    ModelState,
    ServerState,
    Updated,
    Variates,
    split_key,
)


class AggregationRule(Protocol):
    """The strategy hooks aggregation calls (``strategies.base.Strategy`` has them all)."""

    def expert_weights(self, report: ClientReport, layer: int, index: np.ndarray) -> np.ndarray:
        """Weight of each uploaded row of ``layer`` (experts ``index``); 0 leaves it out."""

    def gate_weight(self, report: ClientReport, preference: float) -> float:
        """Weight of this client's routers."""

    def gate_divisor(self, weight_sum: float, global_set_size: int) -> float:
        """What the weighted sum of routers is divided by (<= 0 keeps the old routers)."""

    def server_update(
        self, previous: ModelState, aggregate: ModelState, updated: Updated, server: ServerState
    ) -> ModelState:
        """The next global model from the aggregate (may update ``server`` in place)."""

    def update_control_variates(
        self, server: ServerState, variate_sums: Variates, clients: int
    ) -> None:
        """Fold the round's summed control-variate changes into ``server`` (in place)."""


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


def lora_delta(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """An adapter's weight delta B @ A (up to LoRA's constant scale), batched over leading dims.

    b: [..., out, r], a: [..., r, in] -> [..., out, in].
    """
    return np.matmul(b, a)


def refactor_low_rank(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncated SVD of each trailing 2-D matrix: (b [..., out, rank], a [..., rank, in]).

    b @ a is the best rank-``rank`` approximation of ``delta`` in the Frobenius and spectral
    norms (Eckart-Young); its Frobenius error is sqrt(sum of the squared singular values
    beyond ``rank``). The singular values are split evenly, B = U sqrt(S), A = sqrt(S) V^T,
    so neither factor carries the whole scale. Computed in float64; the caller casts.

    Directions with a zero singular value come out as zero columns of B and zero rows of
    A; since LoRA's gradient of each factor goes through the other, training cannot revive
    them, so the average of the deltas should have full rank ``rank`` to keep the adapter.
    """
    u, s, vt = np.linalg.svd(np.asarray(delta, dtype=np.float64), full_matrices=False)
    root = np.sqrt(s[..., :rank])
    b = u[..., :, :rank] * root[..., None, :]
    a = root[..., :, None] * vt[..., :rank, :]
    missing = rank - root.shape[-1]
    if missing > 0:
        # rank > min(out, in): the SVD is already exact; pad with zero directions.
        b = np.concatenate([b, np.zeros((*b.shape[:-1], missing))], axis=-1)
        a = np.concatenate([a, np.zeros((*a.shape[:-2], missing, a.shape[-1]))], axis=-2)
    return b, a


LORA_AGGREGATE = ("factors", "product")


def lora_pairs(tensors: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """The (A name, B name) adapters among ``tensors``: names that differ by lora_A/lora_B.

    A pair must have A [..., r, in] and B [..., out, r] with the same leading dims. A
    ``lora_A`` tensor without its ``lora_B`` partner is not a pair (it is averaged as is).
    """
    pairs = []
    for a_name in sorted(tensors):
        if "lora_A" not in a_name:
            continue
        b_name = a_name.replace("lora_A", "lora_B")
        if b_name not in tensors:
            continue
        a, b = tensors[a_name], tensors[b_name]
        if (
            a.ndim < 2
            or a.ndim != b.ndim
            or a.shape[:-2] != b.shape[:-2]
            or a.shape[-2] != b.shape[-1]
        ):
            raise ValueError(
                f"LoRA pair {a_name} {a.shape} / {b_name} {b.shape}: expected A [..., r, in] "
                "and B [..., out, r] with the same leading dims"
            )
        pairs.append((a_name, b_name))
    return pairs


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
    # Accepted clients' control-variate changes (SCAFFOLD), for the driver to keep.
    variate_changes: dict[int, Variates] = field(default_factory=dict)
    gate_divisor: float = 0.0  # <= 0: the routers kept their previous values

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

    ``lora_aggregate`` (``model.lora.aggregate``) says how LoRA pairs (lora_A/lora_B, in
    expert layers and shared tensors) are combined. ``"factors"``: A and B are averaged
    separately, like any tensor (FedIT); note that the average of the A_c and of the B_c
    does not multiply to the average of the B_c A_c. ``"product"``: the weighted sum of
    each client's B_c @ A_c (per expert row with the same weights, |D_c| for shared) is
    accumulated in place of the factors' sums, then ``finalize`` divides by the weight
    and re-factors to the pair's rank with ``refactor_low_rank``; an expert nobody
    contributes to keeps its A and B rows. Other tensors are aggregated alike in both.

    ``finalize`` then hands the aggregate to the strategy's ``server_update`` (FedAvg: as
    is; a server optimiser: a step on aggregate - previous) with ``server_state``, the
    strategy's arrays the driver keeps across rounds, and returns the new server state:
    an aggregator replaced mid-round re-runs the round from the same state. Uploaded
    control-variate changes (SCAFFOLD) are summed in float64 per tensor and folded into
    the server state over ``num_clients`` (N).
    """

    def __init__(
        self,
        global_state: ModelState,
        strategy: AggregationRule,
        tau: float,
        deadline_s: float | None,
        lora_aggregate: str = "factors",
        server_state: ServerState | None = None,
        num_clients: int = 1,
    ) -> None:
        if lora_aggregate not in LORA_AGGREGATE:
            raise ValueError(
                f"model.lora.aggregate must be one of {LORA_AGGREGATE}, got {lora_aggregate!r}"
            )
        self.previous = global_state
        self.strategy = strategy
        self.tau = tau
        self.deadline_s = deadline_s
        self.lora_aggregate = lora_aggregate
        product = lora_aggregate == "product"
        # In product mode each pair's delta accumulator replaces its two factor accumulators.
        self.shared_pairs = lora_pairs(global_state.shared) if product else []
        self.expert_pairs = [lora_pairs(layer) if product else [] for layer in global_state.experts]
        self.shared_delta = _delta_sums(global_state.shared, self.shared_pairs)
        self.expert_delta = [
            _delta_sums(layer, pairs)
            for layer, pairs in zip(global_state.experts, self.expert_pairs, strict=True)
        ]
        self.shared_sum = _factor_sums(global_state.shared, self.shared_pairs)
        self.shared_weight = 0.0
        self.gate_sum = {k: np.zeros(v.shape) for k, v in global_state.gates.items()}
        self.gate_weight = 0.0
        self.expert_sum = [
            _factor_sums(layer, pairs)
            for layer, pairs in zip(global_state.experts, self.expert_pairs, strict=True)
        ]
        num_layers = len(global_state.experts)
        num_experts = next(iter(global_state.experts[0].values())).shape[0]
        self.expert_weight = np.zeros((num_layers, num_experts))
        self.contributors = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.sets: list[np.ndarray] = []
        self.preference_sums: list[float] = []
        self.server_state = dict(server_state or {})  # entries replaced, never mutated
        self.num_clients = num_clients
        self.variate_sums: Variates = {}
        self.variate_changes: dict[int, Variates] = {}

    def offer(self, report: ClientReport, upload: ClientUpload | None) -> str | None:
        """Screen a client's upload and add it unless it fails; record and return the verdict."""
        report.failure = screen(report, upload, self.deadline_s)
        if report.failure is None:
            self._add(report, upload)
        return report.failure

    def _add(self, report: ClientReport, upload: ClientUpload) -> None:
        size = float(report.num_samples)
        if upload.shared:
            for name, total in self.shared_sum.items():  # product-mode pairs: below
                total += size * upload.shared[name]
            for (a_name, b_name), total in self.shared_delta.items():
                total += size * _delta64(upload.shared[b_name], upload.shared[a_name])
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
            for (a_name, b_name), total in self.expert_delta[layer].items():
                delta = _delta64(uploaded[b_name][rows], uploaded[a_name][rows])
                total[index] += weights.reshape(-1, *[1] * (delta.ndim - 1)) * delta
            self.expert_weight[layer, index] += weights
            self.contributors[layer, index] += 1
        if upload.variates:
            self._add_variates(report.client_id, upload.variates)

    def _add_variates(self, client_id: int, changes: Variates) -> None:
        flat = self.previous.to_flat()
        for key in sorted(changes):
            name, row = split_key(key)
            total = self.variate_sums.get(name)
            if total is None:
                total = self.variate_sums[name] = np.zeros(flat[name].shape)
            if row is None:
                total += changes[key]
            else:
                total[row] += changes[key]
        self.variate_changes[client_id] = changes

    def finalize(self) -> tuple[ModelState, AggregationReport, ServerState]:
        """The next global state, what the aggregation did, and the new server state."""
        aggregate, report = self._aggregate()
        updated = Updated(
            shared=self.shared_weight > 0,
            gates=report.gate_divisor > 0,
            experts=self.expert_weight > 0,
        )
        server = self.server_state
        state = self.strategy.server_update(self.previous, aggregate, updated, server)
        if self.variate_sums:
            self.strategy.update_control_variates(server, self.variate_sums, self.num_clients)
        report.variate_changes = self.variate_changes
        return state, report, server

    def _aggregate(self) -> tuple[ModelState, AggregationReport]:
        previous = self.previous
        shared = {
            k: fedavg(v, self.shared_weight, previous.shared[k]) for k, v in self.shared_sum.items()
        }
        for (a_name, b_name), total in self.shared_delta.items():
            old_a, old_b = previous.shared[a_name], previous.shared[b_name]
            if self.shared_weight <= 0:
                shared[a_name], shared[b_name] = old_a.copy(), old_b.copy()
            else:
                b, a = refactor_low_rank(total / self.shared_weight, old_a.shape[-2])
                shared[a_name], shared[b_name] = a.astype(old_a.dtype), b.astype(old_b.dtype)
        shared = {k: shared[k] for k in previous.shared}  # the previous state's order
        sets = np.stack(self.sets) if self.sets else np.zeros((0, *self.expert_weight.shape), bool)
        global_size = int(sets.any(axis=0).sum())
        divisor = self.strategy.gate_divisor(self.gate_weight, global_size)
        gates = {
            k: aggregate_gates(v, divisor, previous.gates[k]) for k, v in self.gate_sum.items()
        }
        experts = []
        for sums, deltas, weight, old in zip(
            self.expert_sum, self.expert_delta, self.expert_weight, previous.experts, strict=True
        ):
            layer = {
                **_keep_or_average(sums, weight, old),
                **_keep_or_refactor(deltas, weight, old),
            }
            experts.append({k: layer[k] for k in old})  # the previous state's order
        report = AggregationReport(
            consistency=routing_consistency(sets).tolist() if self.sets else [],
            gate_alphas=gate_weights(np.array(self.preference_sums), global_size).tolist(),
            contributors=self.contributors,
            gate_divisor=divisor,
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


def _factor_sums(
    tensors: dict[str, np.ndarray], pairs: list[tuple[str, str]]
) -> dict[str, np.ndarray]:
    """float64 zero accumulators for every tensor not in a product-aggregated pair."""
    paired = {name for pair in pairs for name in pair}
    return {k: np.zeros(v.shape) for k, v in tensors.items() if k not in paired}


def _delta_sums(
    tensors: dict[str, np.ndarray], pairs: list[tuple[str, str]]
) -> dict[tuple[str, str], np.ndarray]:
    """float64 zero accumulators [..., out, in] for the deltas B @ A of ``pairs``."""
    return {(a, b): np.zeros((*tensors[b].shape[:-1], tensors[a].shape[-1])) for a, b in pairs}


def _delta64(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    # In float64: the product's r-term dot products would otherwise round at the
    # upload's dtype before they are summed over clients.
    return lora_delta(b.astype(np.float64), a.astype(np.float64))


def _keep_or_refactor(
    deltas: dict[tuple[str, str], np.ndarray], weight: np.ndarray, old: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per-expert average of the deltas (weight [E]), re-factored to each pair's rank.

    An expert with zero weight keeps its old A and B rows.
    """
    layer = {}
    updated = weight > 0
    for (a_name, b_name), total in deltas.items():
        old_a, old_b = old[a_name], old[b_name]
        new_a, new_b = old_a.copy(), old_b.copy()
        if updated.any():
            averaged = total[updated] / weight[updated].reshape(-1, *[1] * (total.ndim - 1))
            b, a = refactor_low_rank(averaged, old_a.shape[-2])
            new_a[updated], new_b[updated] = a.astype(old_a.dtype), b.astype(old_b.dtype)
        layer[a_name], layer[b_name] = new_a, new_b
    return layer
