"""The types every layer shares: model state, routing, client uploads and reports, history.

A leaf module (numpy and torch only), so that models, strategies, aggregation, executors
and tracking can all speak of the same records without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch


@dataclass
class ModelState:
    """The trainable weights that travel between server and clients, as numpy arrays.

    Frozen parameters never change, so they are not part of the state: every party
    builds them identically from the config and seed.
    """

    shared: dict[str, np.ndarray]
    gates: dict[str, np.ndarray]
    experts: list[dict[str, np.ndarray]]  # per MoE layer: tensor name -> [E, ...]

    def num_bytes(self) -> int:
        arrays = [*self.shared.values(), *self.gates.values()]
        arrays += [a for layer in self.experts for a in layer.values()]
        return int(sum(a.nbytes for a in arrays))

    def to_flat(self) -> dict[str, np.ndarray]:
        """One array per tensor: "shared/NAME", "gate/NAME", "expert/LAYER/NAME" ([E, ...])."""
        flat = {f"shared/{k}": v for k, v in self.shared.items()}
        flat.update({f"gate/{k}": v for k, v in self.gates.items()})
        for layer, arrays in enumerate(self.experts):
            flat.update({f"expert/{layer}/{k}": v for k, v in arrays.items()})
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, np.ndarray]) -> ModelState:
        state = cls(shared={}, gates={}, experts=[])
        for key, value in flat.items():
            kind, rest = key.split("/", 1)
            if kind == "shared":
                state.shared[rest] = value
            elif kind == "gate":
                state.gates[rest] = value
            else:
                layer, name = rest.split("/", 1)
                while len(state.experts) <= int(layer):
                    state.experts.append({})
                state.experts[int(layer)][name] = value
        return state


# Arrays a strategy keeps on the server across rounds (moments, SCAFFOLD's c), by
# "<part>/<flat tensor name>" (``ModelState.to_flat``); owned by the driver, checkpointed.
ServerState = dict[str, np.ndarray]
# One client's control variates (or their change), by trained-tensor key: "shared/NAME",
# "gate/NAME", or "expert/LAYER/EXPERT/NAME" for one expert's row.
Variates = dict[str, np.ndarray]


def split_key(key: str) -> tuple[str, int | None]:
    """A trained-tensor key as (flat tensor name, expert row or None).

    "expert/0/3/w_in" -> ("expert/0/w_in", 3); "shared/x" -> ("shared/x", None).
    """
    if key.startswith("expert/"):
        _, layer, expert, name = key.split("/", 3)
        return f"expert/{layer}/{name}", int(expert)
    return key, None


def row_of(flat: dict[str, np.ndarray], key: str, prefix: str = "") -> np.ndarray:
    """The array of a trained-tensor key in a flat dict: an expert key names one row."""
    name, row = split_key(key)
    return flat[prefix + name] if row is None else flat[prefix + name][row]


@dataclass
class Updated:
    """Which parts of the model a round's aggregation changed (a server optimiser moves
    only these): shared tensors, routers, and per [L, E] expert rows."""

    shared: bool
    gates: bool
    experts: np.ndarray  # [L, E] bool


@dataclass
class BatchRouting:
    """Routing of one batch, reduced from tokens to samples.

    probs[l, i, e] is G_e(x_i) for MoE layer l: the softmax router probability of expert e
    averaged over sample i's non-padding tokens (our token-to-sample reduction; the paper
    defines G per input). routed[l, i, e] says whether e was in the top-k of at least one
    of sample i's tokens, so E_union is ``routed.any(dim=1)``.
    """

    probs: torch.Tensor  # [L, B, E] float32
    routed: torch.Tensor  # [L, B, E] bool
    token_counts: torch.Tensor  # [L, E] non-padding tokens routed to each expert
    pair_counts: torch.Tensor  # [L, E] (token, slot) pairs each expert computes, padding included

    @property
    def union(self) -> torch.Tensor:
        """E_union: [L, E] experts routed by any sample of the batch."""
        return self.routed.any(dim=1)


@dataclass
class ClientUpload:
    """The tensors a client sends: what it trained, nothing else."""

    shared: dict[str, np.ndarray] = field(default_factory=dict)
    gates: dict[str, np.ndarray] = field(default_factory=dict)
    # Per MoE layer: "index" -> int64 [k] expert ids, then tensor name -> [k, ...].
    experts: list[dict[str, np.ndarray]] = field(default_factory=list)
    # SCAFFOLD: the change c_i+ - c_i of this client's control variates (trained keys).
    variates: dict[str, np.ndarray] = field(default_factory=dict)

    def arrays(self) -> list[np.ndarray]:
        tensors = [*self.shared.values(), *self.gates.values()]
        tensors += [a for layer in self.experts for k, a in layer.items() if k != "index"]
        return tensors + list(self.variates.values())

    def num_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays()))

    def is_finite(self) -> bool:
        return all(np.isfinite(a).all() for a in self.arrays())


FAILURES = ("oom", "deadline", "non_finite", "lost")


@dataclass
class ClientReport:
    """What a client reports besides its tensors: statistics, modelled cost, outcome.

    ``out_of_memory`` and ``lost`` are facts (the trainer ran out of modelled or enforced
    memory; the executor never got the client back). ``failure`` is the verdict, written
    only by ``aggregation.screen``.
    """

    client_id: int
    num_samples: int  # |D_c|, the aggregation weight
    usage: np.ndarray | None = None  # [L, E] u_c(e), eq 16
    importance: np.ndarray | None = None  # [L, E] s_c(e), eq 5 averaged over batches
    trained: np.ndarray | None = None  # [L, E] experts this client really updated
    loss: float = math.nan
    steps: int = 0
    experts_per_step: float = 0.0  # mean over steps of the experts that got a gradient
    experts_per_step_max: int = 0
    routed_per_step: float = 0.0  # mean over steps of |E_union|, the batch's routed experts
    admitted_share: float = 0.0  # mean over steps of trained / |E_union| (1: nothing binds)
    capacity: int = 0  # C_budget, in the configured scope (per layer or over all layers)
    step_limit: int = 0  # experts one step may train, over all layers
    flops: float = 0.0
    memory_bytes: float = 0.0  # modelled peak of a step
    measured_peak_bytes: float | None = None  # on GPU: allocator peak under the enforced cap
    compute_seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0  # simulated wall-clock: download + compute + upload
    wall_seconds: float = 0.0  # real time this client's training took in its process
    out_of_memory: bool = False
    lost: bool = False
    failure: str | None = None  # one of FAILURES, or None

    @property
    def failed(self) -> bool:
        return self.failure is not None


@dataclass
class RoundMetrics:
    """One round, as logged. All but the two wall-clock fields is deterministic per seed."""

    round: int
    sampled: int
    succeeded: int
    failed_oom: int
    failed_deadline: int
    failed_non_finite: int
    failed_lost: int
    train_loss: float
    accuracy: float | None
    test_loss: float | None
    experts_per_step: float  # mean over successful clients
    experts_trained: float  # mean distinct experts a successful client updated
    experts_updated: int  # experts whose global value changed this round
    routing_consistency: float  # mean r(c), eq 18
    routed_per_step: float  # mean |E_union| of a step, over successful clients
    admitted_share: float  # mean share of the routed union a step trains (1: nothing binds)
    admitted_share_sd: float  # its spread over successful clients
    bytes_down: int
    bytes_up: int
    client_flops: float
    client_wall_seconds: float  # real time the clients' training took, summed
    round_seconds: float  # simulated
    simulated_seconds: float  # cumulative simulated clock
    wall_seconds: float = 0.0
    perplexity: float | None = None  # causal_lm: exp(test_loss) where evaluated

    def deterministic(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("wall_seconds")
        values.pop("client_wall_seconds")
        return values


@dataclass
class ClientRecord:
    """One client's round, for the per-client plots and tables."""

    round: int
    client: int
    tier: str
    capacity: int  # C_budget in the configured scope
    step_limit: int  # experts one step may train, over all layers
    experts_per_step: float
    experts_per_step_max: int
    experts_trained: int
    loss: float
    seconds: float
    failure: str | None
    memory_bytes: float = 0.0  # modelled peak of a step
    routed_per_step: float = 0.0  # mean |E_union| of its steps
    admitted_share: float = 0.0  # mean share of the routed union its steps trained
    measured_peak_bytes: float | None = None  # on GPU: the allocator's peak under the cap

    @classmethod
    def from_report(cls, report: ClientReport, round_index: int, tier: str) -> ClientRecord:
        """The record of ``report``: every field both types have is the report's; the
        round, the client's tier and its count of trained experts come from elsewhere."""
        trained = int(report.trained.sum()) if report.trained is not None else 0
        return cls(
            round=round_index,
            client=report.client_id,
            tier=tier,
            experts_trained=trained,
            **{name: getattr(report, name) for name in _REPORTED},
        )


# The ClientRecord fields copied from a ClientReport as they are (same name, same meaning).
_REPORTED = tuple(
    f.name for f in fields(ClientRecord) if f.name in {g.name for g in fields(ClientReport)}
)


@dataclass
class History:
    rounds: list[RoundMetrics] = field(default_factory=list)
    clients: list[ClientRecord] = field(default_factory=list)
    usage: list[np.ndarray] = field(default_factory=list)  # per round: mean u_c(e), [L, E]
    # per round: client group -> (sum of its successful clients' u_c(e) [L, E], clients)
    group_usage: list[dict[str, tuple[np.ndarray, int]]] = field(default_factory=list)
    # causal_lm: evaluated round -> rows of (prompt, reference, generated, exact_match)
    generations: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def final_accuracy(self) -> float | None:
        evaluated = [r.accuracy for r in self.rounds if r.accuracy is not None]
        return evaluated[-1] if evaluated else None

    def time_to_accuracy(self, target: float) -> tuple[int | None, float | None]:
        """First round and simulated seconds at which accuracy reached ``target``."""
        for r in self.rounds:
            if r.accuracy is not None and r.accuracy >= target:
                return r.round, r.simulated_seconds
        return None, None

    def last_round_record(self) -> dict[str, Any]:
        """The last round as one JSON record: its metrics, its clients and its mean usage.

        A round appends usage only when a client succeeded, hence None otherwise.
        """
        metrics = self.rounds[-1]
        clients = []
        for record in reversed(self.clients):  # this round's clients are the tail
            if record.round != metrics.round:
                break
            clients.append(asdict(record))
        return {
            "round": metrics.round,
            "metrics": asdict(metrics),
            "clients": clients[::-1],
            "usage": self.usage[-1].tolist() if metrics.succeeded else None,
            "group_usage": {
                group: {"sum": total.tolist(), "clients": count}
                for group, (total, count) in self.group_usage[-1].items()
            },
            "generations": self.generations.get(metrics.round, []),
        }

    @classmethod
    def from_round_records(cls, records: list[dict[str, Any]]) -> History:
        """The history of ``last_round_record`` records, in round order."""
        history = cls()
        for record in records:
            history.rounds.append(RoundMetrics(**record["metrics"]))
            history.clients.extend(ClientRecord(**c) for c in record["clients"])
            if record["usage"] is not None:
                history.usage.append(np.asarray(record["usage"]))
            groups = record.get("group_usage", {})  # absent from runs of older versions
            history.group_usage.append(
                {g: (np.asarray(v["sum"]), v["clients"]) for g, v in groups.items()}
            )
            if record.get("generations"):  # absent from runs of older versions
                history.generations[record["round"]] = record["generations"]
        return history

    def usage_by_group(self) -> dict[str, np.ndarray]:
        """Mean u_c(e) [L, E] of each client group over the whole run, groups sorted."""
        totals: dict[str, list] = {}
        for round_groups in self.group_usage:
            for group, (total, count) in round_groups.items():
                entry = totals.setdefault(group, [0.0, 0])
                entry[0] = entry[0] + total
                entry[1] += count
        return {g: totals[g][0] / totals[g][1] for g in sorted(totals)}
