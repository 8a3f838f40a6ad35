"""Eqs 16-21 of HFedMoE (pure functions), screening, and the streaming RoundAggregator.

Expected numbers are worked out by hand in the comments; the streaming aggregator is
compared with whole-round reference formulas written here (test oracles), which are
themselves pinned by hand values. Tolerances: the streamed sums are float64 over at most
five clients, so they differ from the reference's einsum/tensordot order by a few ulps of
values of order 10 (atol 1e-12); results cast to float32 are compared at float32's
relative precision (rtol 1e-6 > 2**-23 ~ 1.2e-7 rounding of one cast).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from hfedmoe.platform.aggregation import (
    AggregationReport,
    RoundAggregator,
    aggregate_gates,
    expert_usage,
    fedavg,
    gate_weights,
    lora_delta,
    lora_pairs,
    refactor_low_rank,
    routing_consistency,
    routing_preference,
    routing_set,
    screen,
    sparsity_aware_contribution,
)
from hfedmoe.platform.config import HFedMoEConfig
from hfedmoe.platform.records import ClientReport, ClientUpload, ModelState
from hfedmoe.platform.strategies import make_strategy


def eq17_weights(sizes: np.ndarray, usage: np.ndarray, tau: float) -> np.ndarray:
    """Reference eq 17 over a whole round: contributions over their sum per expert."""
    numer = np.stack(
        [sparsity_aware_contribution(s, u, tau) for s, u in zip(sizes, usage, strict=True)]
    )
    denom = numer.sum(axis=0, keepdims=True)
    return np.divide(numer, denom, out=np.zeros_like(numer, dtype=np.float64), where=denom > 0)


def fedavg_reference(sizes: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.tensordot(sizes / sizes.sum(), values, axes=1)


def gates_reference(alphas: np.ndarray, gates: np.ndarray, normalise: bool) -> np.ndarray:
    weights = alphas / alphas.sum() if normalise else alphas
    return np.tensordot(weights, gates, axes=1)


# ----------------------------------------------------------------------------- eq 16


def test_eq16_usage_is_the_mean_probability():
    # prob sums over |D_c| = 4 samples: [1.0, 0.5, 0.0] / 4 = [0.25, 0.125, 0.0]
    got = expert_usage(np.array([1.0, 0.5, 0.0]), 4)
    np.testing.assert_allclose(got, [0.25, 0.125, 0.0])
    # [L=2, E=2]: [[2, 1], [0.5, 0.5]] / 5 = [[0.4, 0.2], [0.1, 0.1]]
    got = expert_usage(np.array([[2.0, 1.0], [0.5, 0.5]]), 5)
    np.testing.assert_allclose(got, [[0.4, 0.2], [0.1, 0.1]])


def test_eq16_no_samples_does_not_divide_by_zero():
    got = expert_usage(np.zeros(3), 0)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, [0.0, 0.0, 0.0])


# ----------------------------------------------------------------------------- eq 17

SIZES = np.array([10.0, 30.0, 60.0])
# [C=3, E=4]
USAGE = np.array(
    [
        [0.5, 0.0, 0.3, 0.0],
        [0.5, 0.2, 0.0, 0.0],
        [0.0, 0.2, 0.3, 0.01],
    ]
)


def test_routing_set_is_usage_at_least_tau():
    # tau = 0.05: 0.1 and 0.05 (equal counts) qualify, 0.049 does not
    np.testing.assert_array_equal(
        routing_set(np.array([0.1, 0.05, 0.049, 0.0]), 0.05), [True, True, False, False]
    )


def test_eq17_weights_by_hand():
    # tau = 0.1
    #   e0: clients 0, 1 qualify: 10/(10+30) = 0.25, 30/40 = 0.75, client 2 -> 0
    #   e1: clients 1, 2: 30/90 = 1/3, 60/90 = 2/3
    #   e2: clients 0, 2: 10/70 = 1/7, 60/70 = 6/7
    #   e3: nobody (0.01 < 0.1) -> all zero
    w = eq17_weights(SIZES, USAGE, 0.1)
    expected = np.array(
        [
            [0.25, 0.0, 1 / 7, 0.0],
            [0.75, 1 / 3, 0.0, 0.0],
            [0.0, 2 / 3, 6 / 7, 0.0],
        ]
    )
    np.testing.assert_allclose(w, expected, rtol=1e-12, atol=0)


def test_eq17_weights_with_integer_sizes_and_layer_dims():
    # Same numbers, usage reshaped to [C, L=2, E=2] and integer sizes.
    w = eq17_weights(np.array([10, 30, 60]), USAGE.reshape(3, 2, 2), 0.1)
    assert w.shape == (3, 2, 2)
    np.testing.assert_allclose(w.reshape(3, 4)[:, 0], [0.25, 0.75, 0.0], rtol=1e-12)  # e0 as above
    np.testing.assert_allclose(w.reshape(3, 4)[:, 3], [0.0, 0.0, 0.0])


def test_eq17_weights_sum_to_one_where_anyone_qualifies_and_zero_elsewhere():
    rng = np.random.default_rng(5)
    for _ in range(50):
        num_clients = int(rng.integers(1, 6))
        sizes = rng.integers(1, 100, num_clients).astype(float)
        usage = rng.random((num_clients, 2, 3)) * 0.3
        tau = 0.15
        w = eq17_weights(sizes, usage, tau)
        qualifies = usage >= tau
        assert (w[~qualifies] == 0).all()
        assert (w >= 0).all()
        totals = w.sum(axis=0)
        anyone = qualifies.any(axis=0)
        np.testing.assert_allclose(totals[anyone], 1.0, rtol=1e-12)
        assert (totals[~anyone] == 0).all()
        # Proportional to |D_c| among the qualifying clients.
        for layer, expert in zip(*np.nonzero(anyone), strict=True):
            q = qualifies[:, layer, expert]
            np.testing.assert_allclose(w[q, layer, expert], sizes[q] / sizes[q].sum(), rtol=1e-12)


# ----------------------------------------------------------------------------- eq 18


def test_eq18_consistency_by_hand():
    # S_0 = {0, 1}, S_1 = {1}, S_2 = {} -> S_global = {0, 1}, |S_global| = 2
    # r = [2/2, 1/2, 0/2] = [1.0, 0.5, 0.0]
    sets = np.array([[True, True, False, False], [False, True, False, False], [False] * 4])
    np.testing.assert_allclose(routing_consistency(sets), [1.0, 0.5, 0.0])
    # S_0 = {0}, S_1 = {2, 3} -> |S_global| = 3 -> r = [1/3, 2/3]
    sets = np.array([[True, False, False, False], [False, False, True, True]])
    np.testing.assert_allclose(routing_consistency(sets), [1 / 3, 2 / 3])


def test_eq18_consistency_over_layers():
    # [C=2, L=2, E=2]: S_0 = {(0,0), (1,1)}, S_1 = {(0,0), (0,1), (1,0)}
    # S_global = all 4 -> r = [2/4, 3/4]
    sets = np.array([[[True, False], [False, True]], [[True, True], [True, False]]])
    np.testing.assert_allclose(routing_consistency(sets), [0.5, 0.75])


def test_eq18_all_empty_sets_give_zeros():
    got = routing_consistency(np.zeros((3, 2, 4), dtype=bool))
    assert got.shape == (3,)
    np.testing.assert_array_equal(got, [0.0, 0.0, 0.0])


# ----------------------------------------------------------------------------- eqs 19, 20, 21


def test_eq19_preference_by_hand():
    # tau = 0.05: u = [0.5, 0.2, 0.04], s = [0.6, 0.5, 0.9]
    # p = [0.5*0.6, 0.2*0.5, 0 (0.04 < tau)] = [0.3, 0.1, 0.0]
    got = routing_preference(np.array([0.5, 0.2, 0.04]), np.array([0.6, 0.5, 0.9]), 0.05)
    np.testing.assert_allclose(got, [0.3, 0.1, 0.0], rtol=1e-12)


def test_eq20_gate_weights_by_hand():
    # alpha_0 = (0.3 + 0.1 + 0) / 4 = 0.1; alpha_1 = (0.2 + 0 + 0) / 4 = 0.05
    preference = np.array([[0.3, 0.1, 0.0], [0.2, 0.0, 0.0]])
    np.testing.assert_allclose(gate_weights(preference, 4), [0.1, 0.05], rtol=1e-12)
    # [C, L, E] is summed over all experts: [[0.1, 0.2], [0.3, 0.4]] -> 1.0 / 5 = 0.2
    np.testing.assert_allclose(gate_weights(np.array([[[0.1, 0.2], [0.3, 0.4]]]), 5), [0.2])


def test_eq20_empty_global_set_gives_zeros():
    got = gate_weights(np.zeros((3, 2, 2)), 0)
    np.testing.assert_array_equal(got, [0.0, 0.0, 0.0])


def test_eq21_gates_normalised_and_as_written():
    # p = [0.2, 0.6], |S_global| = 2 -> alphas [0.1, 0.3]; gates [[1, 2], [3, 4]]
    # streamed sum p.G = [0.2 + 1.8, 0.4 + 2.4] = [2.0, 2.8]
    weighted, previous = np.array([2.0, 2.8]), np.zeros(2)
    # normalised: / (0.2 + 0.6) -> [2.5, 3.5] (weights [0.25, 0.75])
    np.testing.assert_allclose(aggregate_gates(weighted, 0.8, previous), [2.5, 3.5], rtol=1e-12)
    # as written: / |S_global| = 2 -> [1.0, 1.4] = 0.1*[1, 2] + 0.3*[3, 4]
    np.testing.assert_allclose(aggregate_gates(weighted, 2.0, previous), [1.0, 1.4], rtol=1e-12)
    # no preference at all keeps the previous gate
    assert aggregate_gates(weighted, 0.0, np.ones(2)).tolist() == [1.0, 1.0]


def test_fedavg_by_hand():
    # sizes [1, 3]: (1*[0, 4] + 3*[8, 0]) / 4 = [24, 4] / 4 = [6, 1]
    got = fedavg(np.array([24.0, 4.0]), 4.0, np.zeros(2))
    np.testing.assert_allclose(got, [6.0, 1.0], rtol=1e-12)
    assert fedavg(np.array([24.0, 4.0]), 0.0, np.ones(2)).tolist() == [1.0, 1.0]


def test_screen_decides_every_failure():
    upload = ClientUpload(shared={"head": np.ones(2)})
    ok = ClientReport(1, 10, loss=0.5, seconds=3.0)
    assert screen(ok, upload, None) is None
    assert screen(ok, upload, 2.0) == "deadline"
    assert screen(ClientReport(1, 10, lost=True), None, None) == "lost"
    assert screen(ClientReport(1, 10, out_of_memory=True), None, None) == "oom"
    nan_upload = ClientUpload(shared={"head": np.array([1.0, math.nan])})
    assert screen(ok, nan_upload, None) == "non_finite"
    assert screen(ClientReport(1, 10, loss=math.inf), upload, None) == "non_finite"


# ----------------------------------------------------------------------------- RoundAggregator

L, E = 2, 3


def _previous(dtype=np.float32) -> ModelState:
    # Expert rows w[l][e] = [0.1 + l + e/10, -(0.1 + l + e/10)] (not exactly representable:
    # a bit-for-bit check is meaningful); router 0.7 everywhere; head [0.3, -0.3].
    experts = [
        {"w": np.array([[0.1 + layer + e / 10, -(0.1 + layer + e / 10)] for e in range(E)])}
        for layer in range(L)
    ]
    return ModelState(
        shared={"head": np.array([0.3, -0.3], dtype=dtype)},
        gates={"router": np.full((E, 2), 0.7, dtype=dtype)},
        experts=[{k: v.astype(dtype) for k, v in layer.items()} for layer in experts],
    )


def _update(client_id, size, usage, importance, uploads, value, head, router):
    """(report, upload); uploads: per layer, the expert ids sent, every row [value, -value]."""
    experts = []
    for index in uploads:
        index = np.asarray(index, dtype=np.int64)
        rows = np.tile(np.array([[value, -value]]), (index.size, 1))
        experts.append({"index": index, "w": rows})
    upload = ClientUpload(
        shared={"head": np.asarray(head, dtype=float)},
        gates={"router": np.full((E, 2), router, dtype=float)},
        experts=experts,
    )
    report = ClientReport(
        client_id=client_id,
        num_samples=size,
        usage=np.asarray(usage, dtype=float),
        importance=np.asarray(importance, dtype=float),
        loss=1.0,
    )
    return report, upload


# (expert rule, gate rule) of the paper -> the strategy that combines them
RULES = {
    ("sparsity_aware", "preference"): "hfedmoe",
    ("fedavg", "preference"): "hfedmoe_plain_agg",
    ("sparsity_aware", "fedavg"): "hfedmoe_no_gate_agg",
    ("fedavg", "fedavg"): "budget_random",
}


def _aggregator(previous, expert_rule, gate_rule, normalise=True) -> RoundAggregator:
    hp = HFedMoEConfig(tau=TAU, normalise_gate_weights=normalise)
    strategy = make_strategy(RULES[expert_rule, gate_rule], hp)
    return RoundAggregator(previous, strategy, TAU, deadline_s=None)


TAU = 0.1
# Client A: id 5, |D| = 10, uploads rows [1, -1], head [1, 2], router 1.
#   usage  L0 [0.5, 0.0, 0.3]   L1 [0.2, 0.05, 0.4]     S_A = L0 {0, 2}, L1 {0, 2}
#   uploads L0 {0, 1, 2}        L1 {0, 1}
# Client B: id 9, |D| = 30, uploads rows [3, -3], head [5, 6], router 3.
#   usage  L0 [0.5, 0.3, 0.0]   L1 [0.2, 0.0, 0.0]      S_B = L0 {0, 1}, L1 {0}
#   uploads L0 {0, 1, 2}        L1 {1}
# Per expert (sparsity_aware: uploaded AND u >= 0.1 | fedavg: every upload):
#   L0 e0: A, B qualify            -> (10*1 + 30*3)/40 = 2.5   | 2.5
#   L0 e1: only B (A has u = 0)    -> 3.0                      | 2.5
#   L0 e2: only A (B has u = 0)    -> 1.0                      | 2.5
#   L1 e0: A; B qualifies but did not upload -> 1.0            | 1.0
#   L1 e1: A (u 0.05), B (u 0) both below tau -> previous      | 2.5
#   L1 e2: nobody uploaded (A qualifies) -> previous           | previous
A = {
    "client_id": 5,
    "size": 10,
    "usage": [[0.5, 0.0, 0.3], [0.2, 0.05, 0.4]],
    # 0.9 sits on experts outside S_A: it must not enter eq 19.
    "importance": [[0.5, 0.9, 0.5], [0.5, 0.9, 0.5]],
    "uploads": [[0, 1, 2], [0, 1]],
    "value": 1.0,
    "head": [1.0, 2.0],
    "router": 1.0,
}
B = {
    "client_id": 9,
    "size": 30,
    "usage": [[0.5, 0.3, 0.0], [0.2, 0.0, 0.0]],
    "importance": [[1.0, 1.0, 0.7], [1.0, 0.7, 0.7]],
    "uploads": [[0, 1, 2], [1]],
    "value": 3.0,
    "head": [5.0, 6.0],
    "router": 3.0,
}
# Eq 18: S_global = L0 {0, 1, 2} + L1 {0, 2} -> |S_global| = 5; r_A = 4/5, r_B = 3/5.
# Eq 19: p_A = 0.5*0.5 + 0.3*0.5 + 0.2*0.5 + 0.4*0.5 = 0.7  (L1 e1: 0.05 < tau, excluded)
#        p_B = 0.5*1.0 + 0.3*1.0 + 0.2*1.0 = 1.0
# Eq 20: alpha_A = 0.7/5 = 0.14, alpha_B = 1.0/5 = 0.2
# Eq 21: normalised (0.14*1 + 0.2*3)/(0.14 + 0.2) = 0.74/0.34 = 37/17; as written 0.74
# Gate FedAvg: (10*1 + 30*3)/40 = 2.5. Shared head: (10*[1, 2] + 30*[5, 6])/40 = [4, 5].


def _run(expert_rule, gate_rule, normalise=True, clients=(A, B), previous=None):
    previous = previous if previous is not None else _previous()
    agg = _aggregator(previous, expert_rule, gate_rule, normalise)
    for client in clients:
        assert agg.offer(*_update(**client)) is None
    return previous, *agg.finalize()[:2]


def _row(value):
    return np.array([value, -value], dtype=np.float32)


def test_aggregator_sparsity_aware_experts_by_hand():
    previous, state, _ = _run("sparsity_aware", "preference")
    w0, w1 = state.experts[0]["w"], state.experts[1]["w"]
    np.testing.assert_allclose(w0, np.stack([_row(2.5), _row(3.0), _row(1.0)]), rtol=1e-6)
    np.testing.assert_allclose(w1[0], _row(1.0), rtol=1e-6)
    # no qualifying uploader (L1 e1) and no uploader at all (L1 e2): bit-for-bit unchanged
    assert w1[1:].tobytes() == previous.experts[1]["w"][1:].tobytes()
    assert w0.dtype == np.float32 and w1.dtype == np.float32


def test_aggregator_fedavg_experts_by_hand():
    previous, state, _ = _run("fedavg", "fedavg")
    w0, w1 = state.experts[0]["w"], state.experts[1]["w"]
    np.testing.assert_allclose(w0, np.stack([_row(2.5)] * 3), rtol=1e-6)
    np.testing.assert_allclose(w1[:2], np.stack([_row(1.0), _row(2.5)]), rtol=1e-6)
    assert w1[2].tobytes() == previous.experts[1]["w"][2].tobytes()


def test_aggregator_report_counts_sparsity_aware():
    _, _, report = _run("sparsity_aware", "preference")
    assert isinstance(report, AggregationReport)
    np.testing.assert_array_equal(report.contributors, [[2, 1, 1], [1, 0, 0]])
    assert report.experts_updated == 4
    assert report.consistency == pytest.approx([0.8, 0.6])
    assert report.mean_consistency == pytest.approx(0.7)
    assert report.gate_alphas == pytest.approx([0.14, 0.2])


def test_aggregator_report_counts_fedavg():
    _, _, report = _run("fedavg", "fedavg")
    np.testing.assert_array_equal(report.contributors, [[2, 2, 2], [1, 2, 0]])
    assert report.experts_updated == 5
    # consistency is reported for every rule (eq 18 depends only on usage and tau)
    assert report.consistency == pytest.approx([0.8, 0.6])


def test_aggregator_preference_gates_normalised_and_as_written():
    _, state, _ = _run("sparsity_aware", "preference", normalise=True)
    np.testing.assert_allclose(state.gates["router"], np.full((E, 2), 37 / 17), rtol=1e-6)
    _, state, _ = _run("sparsity_aware", "preference", normalise=False)
    np.testing.assert_allclose(state.gates["router"], np.full((E, 2), 0.74), rtol=1e-6)
    assert state.gates["router"].dtype == np.float32


def test_aggregator_fedavg_gates_and_shared():
    _, state, _ = _run("sparsity_aware", "fedavg")
    np.testing.assert_allclose(state.gates["router"], np.full((E, 2), 2.5), rtol=1e-6)
    np.testing.assert_allclose(state.shared["head"], [4.0, 5.0], rtol=1e-6)
    assert state.shared["head"].dtype == np.float32


def test_aggregator_does_not_mutate_the_previous_state():
    previous = _previous()
    snapshot = copy.deepcopy(previous)
    _, state, _ = _run("sparsity_aware", "preference", previous=previous)
    for name in ("shared", "gates"):
        for key, value in getattr(snapshot, name).items():
            assert getattr(previous, name)[key].tobytes() == value.tobytes()
    for old, now in zip(snapshot.experts, previous.experts, strict=True):
        assert old["w"].tobytes() == now["w"].tobytes()
    # The unchanged rows of the new state are copies, not views of the previous arrays.
    assert not np.shares_memory(state.experts[1]["w"], previous.experts[1]["w"])


def test_eq20_empty_global_set_keeps_the_gate_and_every_expert():
    # Every usage below tau: S_global is empty, alpha = 0 for all, nobody qualifies.
    low = {"usage": [[0.01, 0.0, 0.05], [0.0, 0.09, 0.0]]}
    previous, state, report = _run(
        "sparsity_aware", "preference", clients=({**A, **low}, {**B, **low})
    )
    assert state.gates["router"].tobytes() == previous.gates["router"].tobytes()
    for old, now in zip(previous.experts, state.experts, strict=True):
        assert now["w"].tobytes() == old["w"].tobytes()
    assert report.consistency == [0.0, 0.0]
    assert report.experts_updated == 0
    # Shared parameters are still FedAvg'd.
    np.testing.assert_allclose(state.shared["head"], [4.0, 5.0], rtol=1e-6)


@pytest.mark.parametrize("normalise", [True, False])
def test_all_zero_alphas_keep_the_gate(normalise):
    # S_global is non-empty (|S_global| = 5 as above) but every importance is 0, so every
    # p_c(e) = u*0 = 0 and every alpha = 0: the gate keeps its previous value, with or
    # without normalisation (eq 21 as written would give the all-zero router).
    zero = {"importance": [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]}
    previous, state, report = _run(
        "sparsity_aware", "preference", normalise, clients=({**A, **zero}, {**B, **zero})
    )
    assert state.gates["router"].tobytes() == previous.gates["router"].tobytes()
    assert report.gate_alphas == [0.0, 0.0]
    assert report.consistency == pytest.approx([0.8, 0.6])


def test_eq20_empty_global_set_reports_zero_alpha_per_client():
    low = {"usage": [[0.01, 0.0, 0.05], [0.0, 0.09, 0.0]]}
    _, _, report = _run("sparsity_aware", "preference", clients=({**A, **low}, {**B, **low}))
    assert report.gate_alphas == [0.0, 0.0]


def test_aggregator_with_no_clients_returns_the_previous_state():
    previous, state, report = _run("sparsity_aware", "preference", clients=())
    assert state.shared["head"].tobytes() == previous.shared["head"].tobytes()
    assert state.gates["router"].tobytes() == previous.gates["router"].tobytes()
    for old, now in zip(previous.experts, state.experts, strict=True):
        assert now["w"].tobytes() == old["w"].tobytes()
    assert report.consistency == [] and report.experts_updated == 0
    # Kept values are copies: editing the new state must not edit the previous one.
    assert not np.shares_memory(state.shared["head"], previous.shared["head"])
    assert not np.shares_memory(state.gates["router"], previous.gates["router"])
    assert not np.shares_memory(state.experts[0]["w"], previous.experts[0]["w"])


# ----------------------------------------------------------- streaming == reference


def _random_round(rng, num_clients=4):
    sizes = rng.integers(1, 50, num_clients).astype(float)
    usage = rng.random((num_clients, L, E)) * 0.2  # half of the entries below tau = 0.1
    importance = rng.random((num_clients, L, E))
    experts = rng.normal(size=(num_clients, L, E, 2))
    gates = rng.normal(size=(num_clients, E, 2))
    heads = rng.normal(size=(num_clients, 2))
    updates = [
        (
            ClientReport(c, int(sizes[c]), usage=usage[c], importance=importance[c], loss=1.0),
            ClientUpload(
                shared={"head": heads[c]},
                gates={"router": gates[c]},
                experts=[{"index": np.arange(E), "w": experts[c, layer]} for layer in range(L)],
            ),
        )
        for c in range(num_clients)
    ]
    return sizes, usage, importance, experts, gates, heads, updates


def _aggregate(previous, updates, expert_rule, gate_rule, normalise):
    agg = _aggregator(previous, expert_rule, gate_rule, normalise)
    for report, upload in updates:
        agg.offer(copy.copy(report), upload)
    return agg.finalize()[:2]


@pytest.mark.parametrize("normalise", [True, False])
def test_streaming_equals_reference_functions(normalise):
    rng = np.random.default_rng(42)
    previous = _previous(np.float64)
    saw_unqualified = False
    for _ in range(20):
        sizes, usage, importance, experts, gates, heads, updates = _random_round(rng)
        state, report = _aggregate(previous, updates, "sparsity_aware", "preference", normalise)

        weights = eq17_weights(sizes, usage, TAU)  # [C, L, E]
        for layer in range(L):
            w = weights[:, layer]  # [C, E]
            mixed = np.einsum("ce,ced->ed", w, experts[:, layer])
            anyone = w.sum(axis=0) > 0
            saw_unqualified |= not anyone.all()
            expected = np.where(anyone[:, None], mixed, previous.experts[layer]["w"])
            np.testing.assert_allclose(state.experts[layer]["w"], expected, rtol=0, atol=1e-12)

        global_size = int((usage >= TAU).any(axis=0).sum())
        alphas = gate_weights(routing_preference(usage, importance, TAU), global_size)
        np.testing.assert_allclose(report.gate_alphas, alphas, rtol=0, atol=1e-12)
        if alphas.sum() > 0:
            expected_gate = gates_reference(alphas, gates, normalise)
        else:
            expected_gate = previous.gates["router"]
        np.testing.assert_allclose(state.gates["router"], expected_gate, rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            state.shared["head"], fedavg_reference(sizes, heads), rtol=0, atol=1e-12
        )
        np.testing.assert_allclose(
            report.consistency, routing_consistency(usage >= TAU), rtol=0, atol=1e-12
        )
    assert saw_unqualified, "the random rounds should include an expert nobody qualifies for"


def test_streaming_fedavg_rules_equal_fedavg():
    rng = np.random.default_rng(7)
    previous = _previous(np.float64)
    for _ in range(10):
        sizes, _, _, experts, gates, heads, updates = _random_round(rng)
        state, _ = _aggregate(previous, updates, "fedavg", "fedavg", True)
        for layer in range(L):
            np.testing.assert_allclose(
                state.experts[layer]["w"],
                fedavg_reference(sizes, experts[:, layer]),
                rtol=0,
                atol=1e-12,
            )
        np.testing.assert_allclose(
            state.gates["router"], fedavg_reference(sizes, gates), atol=1e-12
        )
        np.testing.assert_allclose(state.shared["head"], fedavg_reference(sizes, heads), atol=1e-12)


@pytest.mark.parametrize(
    ("expert_rule", "gate_rule", "normalise"),
    [
        ("sparsity_aware", "preference", True),
        ("sparsity_aware", "preference", False),
        ("fedavg", "fedavg", True),
    ],
)
def test_order_of_clients_does_not_matter(expert_rule, gate_rule, normalise):
    rng = np.random.default_rng(3)
    previous = _previous(np.float64)
    for _ in range(10):
        *_, updates = _random_round(rng, num_clients=5)
        first, report_first = _aggregate(previous, updates, expert_rule, gate_rule, normalise)
        order = rng.permutation(len(updates))
        second, report_second = _aggregate(
            previous, [updates[i] for i in order], expert_rule, gate_rule, normalise
        )
        for layer in range(L):
            np.testing.assert_allclose(
                first.experts[layer]["w"], second.experts[layer]["w"], rtol=0, atol=1e-12
            )
        np.testing.assert_allclose(first.gates["router"], second.gates["router"], atol=1e-12)
        np.testing.assert_allclose(first.shared["head"], second.shared["head"], atol=1e-12)
        np.testing.assert_array_equal(report_first.contributors, report_second.contributors)
        assert sorted(report_first.consistency) == pytest.approx(sorted(report_second.consistency))


# ----------------------------------------------------------------------------- LoRA
#
# Tolerances. The aggregator accumulates B_c @ A_c in float64 and re-factors in float64, so
# its only error that matters is casting the new factors to float32: each entry of B and A
# moves by at most u = 2**-24 = EPS32/2 relative (one rounding each). To first order the
# product moves by dB A + B dA, with ||dB A||_F <= u ||B||_F ||A||_2. With B = U sqrt(S),
# A = sqrt(S) V^T: ||B||_F = sqrt(sum_k s_k) <= sqrt(r s_1) and ||A||_2 = sqrt(s_1), so
# ||dB A + B dA||_F <= 2 u sqrt(r) s_1 = sqrt(r) EPS32 s_1 <= sqrt(r) EPS32 ||delta||_F.
# We allow twice that (two casts, with the same margin again for the float64 SVD and the
# differently ordered float64 sums of the reference, each ~1e-16 relative and negligible).

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
EPS64 = float(np.finfo(np.float64).eps)
SHARED_A, SHARED_B = "x.lora_A.default.weight", "x.lora_B.default.weight"
EXPERT_PAIRS = (("lora_A_in", "lora_B_in"), ("lora_A_out", "lora_B_out"))


def _delta_tolerance(rank: int, delta: np.ndarray) -> np.ndarray:
    """2 sqrt(r) EPS32 ||delta||_F per trailing matrix (see the derivation above)."""
    return 2 * np.sqrt(rank) * EPS32 * np.linalg.norm(delta, axis=(-2, -1))


def _delta_error(b: np.ndarray, a: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """||b @ a - expected||_F per trailing matrix, the product taken in float64."""
    got = lora_delta(b.astype(np.float64), a.astype(np.float64))
    return np.linalg.norm(got - expected, axis=(-2, -1))


def test_lora_delta_by_hand():
    # [[1, 2], [3, 4]] @ [[5, 6, 7], [8, 9, 10]]
    #   row 0: [1*5 + 2*8, 1*6 + 2*9, 1*7 + 2*10] = [21, 24, 27]
    #   row 1: [3*5 + 4*8, 3*6 + 4*9, 3*7 + 4*10] = [47, 54, 61]
    b = np.array([[1.0, 2.0], [3.0, 4.0]])
    a = np.array([[5.0, 6.0, 7.0], [8.0, 9.0, 10.0]])
    np.testing.assert_array_equal(lora_delta(b, a), [[21, 24, 27], [47, 54, 61]])
    # Batched over a leading (expert) dim: the second B is 2 I, so its delta is 2 A.
    got = lora_delta(np.stack([b, 2 * np.eye(2)]), np.stack([a, a]))
    assert got.shape == (2, 2, 3)
    np.testing.assert_array_equal(got[1], [[10, 12, 14], [16, 18, 20]])
    # Rank 1: an outer product, [1, 2]^T [3, 4] = [[3, 4], [6, 8]].
    np.testing.assert_array_equal(
        lora_delta(np.array([[1.0], [2.0]]), np.array([[3.0, 4.0]])), [[3, 4], [6, 8]]
    )


def test_refactor_low_rank_by_hand():
    # diag(9, 4, 1): singular values 9, 4, 1 with unit-vector singular vectors (up to sign).
    # Rank 2 drops the 1: b @ a = diag(9, 4, 0), b = [e0*3, e1*2], a = [3 e0^T, 2 e1^T]:
    # sqrt(S) = [3, 2] on both sides. LAPACK's SVD is backward stable, errors of order
    # n EPS64 ||delta||_2 = 3 * 9 EPS64; we allow 10x that.
    atol = 10 * 3 * 9 * EPS64
    b, a = refactor_low_rank(np.diag([9.0, 4.0, 1.0]), 2)
    assert b.shape == (3, 2) and a.shape == (2, 3)
    np.testing.assert_allclose(b @ a, np.diag([9.0, 4.0, 0.0]), rtol=0, atol=atol)
    np.testing.assert_allclose(np.abs(b), [[3, 0], [0, 2], [0, 0]], rtol=0, atol=atol)
    np.testing.assert_allclose(np.abs(a), [[3, 0, 0], [0, 2, 0]], rtol=0, atol=atol)

    # Batched, non-square [2, 3, 2]:
    #   [[0, 2], [5, 0], [0, 0]]: singular values 5, 2 -> rank 1 keeps [[0, 0], [5, 0], [0, 0]]
    #   [[1, 0], [0, 0], [0, 3]]: singular values 3, 1 -> rank 1 keeps [[0, 0], [0, 0], [0, 3]]
    delta = np.array([[[0.0, 2.0], [5.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]]])
    b, a = refactor_low_rank(delta.astype(np.float32), 1)
    assert b.shape == (2, 3, 1) and a.shape == (2, 1, 2)
    assert b.dtype == np.float64 and a.dtype == np.float64  # computed in float64
    kept = np.array([[[0, 0], [5, 0], [0, 0]], [[0, 0], [0, 0], [0, 3]]], dtype=float)
    np.testing.assert_allclose(b @ a, kept, rtol=0, atol=10 * 3 * 5 * EPS64)
    # Eckart-Young: the Frobenius error is the dropped singular value, 2 and 1.
    np.testing.assert_allclose(
        np.linalg.norm(b @ a - delta, axis=(-2, -1)), [2.0, 1.0], rtol=0, atol=10 * 3 * 5 * EPS64
    )

    # rank > min(out, in) = 2: exact, padded with a zero direction.
    b, a = refactor_low_rank(delta, 3)
    assert b.shape == (2, 3, 3) and a.shape == (2, 3, 2)
    np.testing.assert_allclose(b @ a, delta, rtol=0, atol=10 * 3 * 5 * EPS64)
    assert (b[..., 2] == 0).all() and (a[..., 2, :] == 0).all()


def test_lora_pairs_are_found_by_name_and_checked():
    tensors = {
        "lora_A_in": np.zeros((3, 2, 5)),
        "lora_B_in": np.zeros((3, 4, 2)),
        "w": np.zeros((3, 2)),
        "lonely.lora_A.weight": np.zeros((2, 5)),  # no lora_B partner: not a pair
    }
    assert lora_pairs(tensors) == [("lora_A_in", "lora_B_in")]
    # B's rank (last dim) must match A's rank (second-to-last dim).
    with pytest.raises(ValueError, match="lora_A_in"):
        lora_pairs({**tensors, "lora_B_in": np.zeros((3, 4, 3))})


def _lora_previous(rank: int, out: int, inp: int, seed: int = 0) -> ModelState:
    """Random float32 state, one MoE layer of E experts.

    Experts: "w" [E, 2]; "lora_A_in" [E, r, inp] / "lora_B_in" [E, out, r];
    "lora_A_out" [E, r, out] / "lora_B_out" [E, inp, r]. Shared: "head" [2] and the
    peft-style pair SHARED_A [r, inp] / SHARED_B [out, r]. Gates: "router" [E, 2].
    """
    rng = np.random.default_rng(seed)

    def f32(*shape):
        return rng.normal(size=shape).astype(np.float32)

    return ModelState(
        shared={"head": f32(2), SHARED_A: f32(rank, inp), SHARED_B: f32(out, rank)},
        gates={"router": f32(E, 2)},
        experts=[
            {
                "w": f32(E, 2),
                "lora_A_in": f32(E, rank, inp),
                "lora_B_in": f32(E, out, rank),
                "lora_A_out": f32(E, rank, out),
                "lora_B_out": f32(E, inp, rank),
            }
        ],
    )


def _lora_update(client_id, size, usage, index, experts, shared):
    """(report, upload) for one MoE layer; experts: name -> [len(index), ...] rows."""
    usage = np.asarray(usage, dtype=float)
    report = ClientReport(client_id, size, usage=usage, importance=np.ones_like(usage), loss=1.0)
    upload = ClientUpload(
        shared=shared,
        gates={"router": np.zeros((E, 2), dtype=np.float32)},
        experts=[{"index": np.asarray(index, dtype=np.int64), **experts}],
    )
    return report, upload


def _lora_round(previous, updates, mode):
    """Aggregate with the hfedmoe strategy (eq 17 for experts, |D_c| for shared)."""
    strategy = make_strategy("hfedmoe", HFedMoEConfig(tau=TAU))
    agg = RoundAggregator(previous, strategy, TAU, deadline_s=None, lora_aggregate=mode)
    for report, upload in updates:
        assert agg.offer(report, upload) is None
    return agg.finalize()[:2]


# The hand case: rank 1, 2x2 adapters, E = 3, tau = 0.1.
#   Client 0: |D| = 10, delta e0 = [1, 0]^T [1, 0] = diag(1, 0), w [1, -1], head [1, 2]
#   Client 1: |D| = 30, delta e0 = [0, 1]^T [0, 1] = diag(0, 1), w [3, -3], head [5, 6]
# Both upload experts {0, 1}, with usage 0.5 on e0 and 0.05 < tau on e1 (weight 0); e2 is
# not uploaded. Eq 17 on e0 and |D_c| on shared: weights 10/40 = 0.25 and 30/40 = 0.75.
#   average of the deltas: 0.25 diag(1, 0) + 0.75 diag(0, 1) = diag(0.25, 0.75)
#   product, rank 1: diag(0, 0.75), B = +-[0, sqrt(.75)]^T, A = +-[0, sqrt(.75)];
#                    error ||diag(0.25, 0)||_F = 0.25, the dropped singular value
#   factors: B = 0.25 [1, 0]^T + 0.75 [0, 1]^T = [0.25, 0.75]^T, A = [0.25, 0.75],
#            B A = [[0.0625, 0.1875], [0.1875, 0.5625]]; error
#            ||[[-0.1875, 0.1875], [0.1875, -0.1875]]||_F = sqrt(4 * 0.1875^2) = 0.375 > 0.25
#   w e0: 0.25 * 1 + 0.75 * 3 = 2.5; head: 0.25 [1, 2] + 0.75 [5, 6] = [4, 5] (both modes)
HAND_AVERAGE = np.diag([0.25, 0.75])
HAND_FACTORS_DELTA = np.array([[0.0625, 0.1875], [0.1875, 0.5625]])


def _hand_updates():
    updates = []
    for client_id, size, vec, value, head in [
        (0, 10, [1.0, 0.0], 1.0, [1.0, 2.0]),
        (1, 30, [0.0, 1.0], 3.0, [5.0, 6.0]),
    ]:
        b = np.array(vec, dtype=np.float32).reshape(2, 1)  # [out, r]
        a = b.T.copy()  # [r, in]
        junk = np.full((1, 2, 2), 7.0, dtype=np.float32)  # e1 rows: weight 0, must not count
        rows_b = np.concatenate([b[None], junk[:, :, :1]])  # [2 experts, out, r]
        rows_a = np.concatenate([a[None], junk[:, :1, :]])  # [2 experts, r, in]
        experts = {
            "w": np.array([[value, -value], [7.0, -7.0]], dtype=np.float32),
            "lora_A_in": rows_a,
            "lora_B_in": rows_b,
            "lora_A_out": rows_a.copy(),
            "lora_B_out": rows_b.copy(),
        }
        shared = {"head": np.array(head, dtype=np.float32), SHARED_A: a, SHARED_B: b}
        usage = [[0.5, 0.05, 0.0]]
        updates.append(_lora_update(client_id, size, usage, [0, 1], experts, shared))
    return updates


def _hand_round(mode):
    previous = _lora_previous(rank=1, out=2, inp=2)
    state, report = _lora_round(previous, _hand_updates(), mode)
    return previous, state, report


def test_lora_product_error_is_the_eckart_young_tail_and_factors_is_not():
    _, product, _ = _hand_round("product")
    _, factors, _ = _hand_round("factors")
    tol = _delta_tolerance(1, HAND_AVERAGE)  # ||diag(.25, .75)||_F ~ 0.79
    adapters = [(product.shared[SHARED_B], product.shared[SHARED_A])]
    adapters += [(product.experts[0][b][0], product.experts[0][a][0]) for a, b in EXPERT_PAIRS]
    for b, a in adapters:
        assert b.dtype == np.float32 and a.dtype == np.float32
        assert _delta_error(b, a, np.diag([0.0, 0.75])) <= tol  # the best rank-1 approximation
        assert abs(_delta_error(b, a, HAND_AVERAGE) - 0.25) <= tol  # the dropped singular value
        # sqrt(S) split: one float32 cast (rtol EPS32 = 2u); the zero entry is a float64 SVD
        # residual, ~EPS64 ||delta|| / gap = EPS64 * 0.75 / 0.5, allowed 10x.
        for factor in (b, a):
            np.testing.assert_allclose(
                np.abs(factor.ravel()), [0.0, np.sqrt(0.75)], rtol=EPS32, atol=15 * EPS64
            )
    adapters = [(factors.shared[SHARED_B], factors.shared[SHARED_A])]
    adapters += [(factors.experts[0][b][0], factors.experts[0][a][0]) for a, b in EXPERT_PAIRS]
    for b, a in adapters:
        # 0.25, 0.75 and their products are exact in binary: the float32 result is exact.
        np.testing.assert_array_equal(lora_delta(b, a), HAND_FACTORS_DELTA)
        assert abs(_delta_error(b, a, HAND_AVERAGE) - 0.375) <= tol  # worse than the tail


def test_lora_factors_mode_averages_a_and_b_separately_by_hand():
    _, state, _ = _hand_round("factors")
    # Every value below is exact in float32 (sums of multiples of 1/4 and 3/4 of 0, 1, 3).
    for a_name, b_name in EXPERT_PAIRS:
        np.testing.assert_array_equal(state.experts[0][b_name][0], [[0.25], [0.75]])
        np.testing.assert_array_equal(state.experts[0][a_name][0], [[0.25, 0.75]])
    np.testing.assert_array_equal(state.shared[SHARED_B], [[0.25], [0.75]])
    np.testing.assert_array_equal(state.shared[SHARED_A], [[0.25, 0.75]])


@pytest.mark.parametrize("mode", ["factors", "product"])
def test_lora_modes_leave_other_tensors_alone(mode):
    _, state, _ = _hand_round(mode)
    np.testing.assert_array_equal(state.experts[0]["w"][0], [2.5, -2.5])
    np.testing.assert_array_equal(state.shared["head"], [4.0, 5.0])
    # The new state lists its tensors in the previous state's order.
    previous = _lora_previous(rank=1, out=2, inp=2)
    assert list(state.shared) == list(previous.shared)
    assert list(state.experts[0]) == list(previous.experts[0])


def test_lora_product_keeps_untrained_experts():
    previous, state, report = _hand_round("product")
    # e1 was uploaded below tau (weight 0), e2 not at all: A and B rows bit-for-bit unchanged.
    np.testing.assert_array_equal(report.contributors, [[2, 0, 0]])
    for name in ("w", *[n for pair in EXPERT_PAIRS for n in pair]):
        now, old = state.experts[0][name], previous.experts[0][name]
        assert now.dtype == old.dtype and now.shape == old.shape
        assert now[1:].tobytes() == old[1:].tobytes()
        assert not np.shares_memory(now, old)
        assert now[0].tobytes() != old[0].tobytes()


def test_lora_product_without_shared_uploads_keeps_the_shared_pair():
    previous = _lora_previous(rank=1, out=2, inp=2)
    updates = _hand_updates()
    for _, upload in updates:
        upload.shared = {}
    state, _ = _lora_round(previous, updates, "product")
    for name in (SHARED_A, SHARED_B, "head"):
        assert state.shared[name].tobytes() == previous.shared[name].tobytes()


def test_lora_product_is_the_weighted_average_of_deltas_when_ranks_allow():
    # Clients share each expert's A (and the shared A) and differ in B, with eq 17 weights
    # that differ per expert (SIZES and USAGE as in the eq 17 test: e0 [0.25, 0.75, 0],
    # e1 [0, 1/3, 2/3], e2 [1/7, 0, 6/7]); sum_c w_c B_c A = (sum_c w_c B_c) A has rank <= r,
    # so the re-factored product is the average of the deltas up to the cast.
    rank, out, inp = 2, 4, 3
    rng = np.random.default_rng(11)
    previous = _lora_previous(rank, out, inp)
    num_clients = len(SIZES)
    usage = USAGE[:, None, :E]  # [C, L=1, E]
    common = {"lora_A_in": (rank, inp), "lora_A_out": (rank, out)}
    own = {"lora_B_in": (out, rank), "lora_B_out": (inp, rank), "w": (2,)}
    a_rows = {k: rng.normal(size=(E, *shape)).astype(np.float32) for k, shape in common.items()}
    b_rows = {
        k: rng.normal(size=(num_clients, E, *shape)).astype(np.float32) for k, shape in own.items()
    }
    shared_a = rng.normal(size=(rank, inp)).astype(np.float32)
    shared_b = rng.normal(size=(num_clients, out, rank)).astype(np.float32)
    updates = [
        _lora_update(
            c,
            int(SIZES[c]),
            usage[c],
            np.arange(E),
            {**a_rows, **{k: v[c] for k, v in b_rows.items()}},
            {"head": np.zeros(2, np.float32), SHARED_A: shared_a, SHARED_B: shared_b[c]},
        )
        for c in range(num_clients)
    ]
    state, _ = _lora_round(previous, updates, "product")

    weights = eq17_weights(SIZES, usage, TAU)[:, 0]  # [C, E]
    assert (weights > 0).sum(axis=0).tolist() == [2, 2, 2]  # two clients per expert
    for a_name, b_name in EXPERT_PAIRS:
        deltas = lora_delta(b_rows[b_name].astype(np.float64), a_rows[a_name].astype(np.float64))
        expected = np.einsum("ce,ceij->eij", weights, deltas)  # [E, out, in]
        got_b, got_a = state.experts[0][b_name], state.experts[0][a_name]
        assert got_b.dtype == np.float32 and got_a.dtype == np.float32
        assert got_b.shape == (E, *previous.experts[0][b_name].shape[1:])
        assert (_delta_error(got_b, got_a, expected) <= _delta_tolerance(rank, expected)).all()
    expected = np.einsum("c,cij->ij", SIZES / SIZES.sum(), shared_b.astype(np.float64)) @ shared_a
    err = _delta_error(state.shared[SHARED_B], state.shared[SHARED_A], expected)
    assert err <= _delta_tolerance(rank, expected)
    # The non-LoRA "w" is the eq 17 average as before (float32 cast: rtol 1e-6, see the top).
    np.testing.assert_allclose(
        state.experts[0]["w"], np.einsum("ce,ced->ed", weights, b_rows["w"]), rtol=1e-6
    )


def test_lora_product_error_is_the_tail_when_ranks_do_not_allow():
    # Independent A_c and B_c: the 4x3 average of three rank-2 deltas has rank 3 > r = 2,
    # so the product mode's error is the third singular value of the true average, and
    # factors mode (a rank-2 delta too) cannot do better.
    rank, out, inp = 2, 4, 3
    rng = np.random.default_rng(12)
    previous = _lora_previous(rank, out, inp)
    num_clients = len(SIZES)
    usage = USAGE[:, None, :E]
    shapes = {
        "lora_A_in": (rank, inp),
        "lora_B_in": (out, rank),
        "lora_A_out": (rank, out),
        "lora_B_out": (inp, rank),
        "w": (2,),
    }
    rows = {k: rng.normal(size=(num_clients, E, *v)).astype(np.float32) for k, v in shapes.items()}
    updates = [
        _lora_update(
            c,
            int(SIZES[c]),
            usage[c],
            np.arange(E),
            {k: v[c] for k, v in rows.items()},
            {
                "head": np.zeros(2, np.float32),
                SHARED_A: rows["lora_A_in"][c, 0],  # expert 0's adapter reused as shared
                SHARED_B: rows["lora_B_in"][c, 0],
            },
        )
        for c in range(num_clients)
    ]
    product, _ = _lora_round(previous, updates, "product")
    factors, _ = _lora_round(previous, updates, "factors")

    weights = eq17_weights(SIZES, usage, TAU)[:, 0]  # [C, E]
    for a_name, b_name in EXPERT_PAIRS:
        deltas = lora_delta(rows[b_name].astype(np.float64), rows[a_name].astype(np.float64))
        average = np.einsum("ce,ceij->eij", weights, deltas)
        singular = np.linalg.svd(average, compute_uv=False)  # [E, 3]
        assert (singular[:, rank] > 1e-3 * singular[:, 0]).all()  # really rank 3
        tail = np.sqrt((singular[:, rank:] ** 2).sum(axis=-1))
        tol = _delta_tolerance(rank, average)
        err = _delta_error(product.experts[0][b_name], product.experts[0][a_name], average)
        assert (np.abs(err - tail) <= tol).all()
        err = _delta_error(factors.experts[0][b_name], factors.experts[0][a_name], average)
        assert (err >= tail - tol).all()
    average = np.einsum(
        "c,cij->ij",
        SIZES / SIZES.sum(),
        lora_delta(rows["lora_B_in"][:, 0].astype(float), rows["lora_A_in"][:, 0].astype(float)),
    )
    tail = np.linalg.svd(average, compute_uv=False)[rank]
    err = _delta_error(product.shared[SHARED_B], product.shared[SHARED_A], average)
    assert abs(err - tail) <= _delta_tolerance(rank, average)


def test_lora_aggregate_must_be_known():
    strategy = make_strategy("hfedmoe", HFedMoEConfig(tau=TAU))
    with pytest.raises(ValueError, match=r"model\.lora\.aggregate.*factors.*product"):
        RoundAggregator(_previous(), strategy, TAU, deadline_s=None, lora_aggregate="mean")
