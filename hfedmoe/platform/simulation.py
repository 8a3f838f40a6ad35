"""The reference runner: a whole federation, sequentially, in one process.

Each round samples K of N clients (seeded), trains them one after another on one model
instance, streams their updates into the round's aggregator, evaluates the new global
model on the held-out split and records the round. The Ray runner (hfedmoe.actors)
reuses every piece here except the loop over clients, and must produce the same metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hfedmoe.platform.aggregation import AggregationReport, RoundAggregator
from hfedmoe.platform.config import ExperimentConfig
from hfedmoe.platform.data import TokenizedText, batch_tensors
from hfedmoe.platform.federation import Federation, build_federation
from hfedmoe.platform.local import ClientUpdate, make_trainer
from hfedmoe.platform.models import ModelState, MoEAdapter
from hfedmoe.platform.strategies import get_strategy

log = logging.getLogger(__name__)


def sample_clients(num_clients: int, per_round: int, seed: int, round_index: int) -> np.ndarray:
    """The K clients of a round, without replacement, from the run seed and round index."""
    rng = np.random.default_rng([seed, 2, round_index])
    return rng.choice(num_clients, size=per_round, replace=False)


def aggregation_order(sampled: np.ndarray, fractions: np.ndarray) -> list[int]:
    """The round's clients grouped by resource shape (ascending), in sampled order within.

    Both runners train and aggregate in this order: the Ray runner hands each shape's
    clients to that shape's actors in chunks, and floating-point sums depend on order.
    """
    return [int(c) for c in sorted(sampled.tolist(), key=lambda c: fractions[c])]


@torch.no_grad()
def evaluate(adapter: MoEAdapter, test: TokenizedText, batch_size: int) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the adapter's model on the test set."""
    adapter.model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(test), batch_size):
        batch = batch_tensors(test, np.arange(start, min(start + batch_size, len(test))))
        logits, _ = adapter.forward(batch["input_ids"], batch["attention_mask"])
        loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    return correct / len(test), loss_sum / len(test)


def inject_faults(update: ClientUpdate, cfg: ExperimentConfig, round_index: int) -> ClientUpdate:
    """Apply the config's injected update corruption (faults.corrupt) to a finished update.

    Crash and hang faults are the Ray runner's business (an actor dies or stalls and the
    client is retried); in one process they are no-ops, which is what a retry yields.
    """
    if update.failed or (round_index, update.client_id) not in cfg.faults.corrupt:
        return update
    name = next(iter(update.shared or update.gates))
    target = update.shared if name in update.shared else update.gates
    target[name] = np.full_like(target[name], np.nan)
    return update


def screen(update: ClientUpdate, deadline_s: float | None) -> ClientUpdate:
    """Reject what a server must not aggregate: non-finite tensors, late arrivals."""
    if update.failed:
        return update
    if not update.is_finite():
        update.failure = "non_finite"
    elif deadline_s is not None and update.seconds > deadline_s:
        update.failure = "deadline"
    return update


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
    bytes_down: int
    bytes_up: int
    client_flops: float
    client_wall_seconds: float  # real time the clients' training took, summed
    round_seconds: float  # simulated
    simulated_seconds: float  # cumulative simulated clock
    wall_seconds: float = 0.0

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
    measured_peak_bytes: float | None = None  # on GPU: the allocator's peak under the cap


@dataclass
class History:
    rounds: list[RoundMetrics] = field(default_factory=list)
    clients: list[ClientRecord] = field(default_factory=list)
    usage: list[np.ndarray] = field(default_factory=list)  # per round: mean u_c(e), [L, E]

    def final_accuracy(self) -> float | None:
        evaluated = [r.accuracy for r in self.rounds if r.accuracy is not None]
        return evaluated[-1] if evaluated else None

    def time_to_accuracy(self, target: float) -> tuple[int | None, float | None]:
        """First round and simulated seconds at which accuracy reached ``target``."""
        for r in self.rounds:
            if r.accuracy is not None and r.accuracy >= target:
                return r.round, r.simulated_seconds
        return None, None


class RoundBook:
    """Collects one round's client updates into metrics; shared by both runners."""

    def __init__(self, round_index: int, fed: Federation) -> None:
        self.round_index = round_index
        self.fed = fed
        self.updates: list[ClientUpdate] = []
        self.usage_sum: np.ndarray | None = None

    def record(self, update: ClientUpdate) -> None:
        # Keep statistics only: the tensors go to the aggregator and are dropped here.
        self.updates.append(update.without_tensors())
        if not update.failed and update.usage is not None:
            self.usage_sum = (
                update.usage if self.usage_sum is None else self.usage_sum + update.usage
            )

    def close(
        self,
        report: AggregationReport,
        accuracy: float | None,
        test_loss: float | None,
        clock: float,
        history: History,
    ) -> RoundMetrics:
        ok = [u for u in self.updates if not u.failed]
        deadline = self.fed.cfg.federation.round_deadline_s
        slowest = max((u.seconds for u in self.updates), default=0.0)
        round_seconds = min(slowest, deadline) if deadline is not None else slowest
        samples = sum(u.num_samples for u in ok)
        metrics = RoundMetrics(
            round=self.round_index,
            sampled=len(self.updates),
            succeeded=len(ok),
            failed_oom=self._count("oom"),
            failed_deadline=self._count("deadline"),
            failed_non_finite=self._count("non_finite"),
            failed_lost=self._count("lost"),
            train_loss=sum(u.loss * u.num_samples for u in ok) / samples if samples else math.nan,
            accuracy=accuracy,
            test_loss=test_loss,
            experts_per_step=_mean([u.experts_per_step for u in ok]),
            experts_trained=_mean([float(u.trained.sum()) for u in ok]),
            experts_updated=report.experts_updated,
            routing_consistency=report.mean_consistency,
            bytes_down=sum(u.bytes_down for u in self.updates),
            bytes_up=sum(u.bytes_up for u in ok),
            client_flops=sum(u.flops for u in self.updates),
            client_wall_seconds=sum(u.wall_seconds for u in self.updates),
            round_seconds=round_seconds,
            simulated_seconds=clock + round_seconds,
        )
        budgets = self.fed.budgets
        for u in self.updates:
            history.clients.append(
                ClientRecord(
                    round=self.round_index,
                    client=u.client_id,
                    tier=budgets.tier_names[budgets.tier[u.client_id]],
                    capacity=u.capacity,
                    step_limit=u.step_limit,
                    experts_per_step=u.experts_per_step,
                    experts_per_step_max=u.experts_per_step_max,
                    experts_trained=int(u.trained.sum()) if u.trained is not None else 0,
                    loss=u.loss,
                    seconds=u.seconds,
                    failure=u.failure,
                    memory_bytes=u.memory_bytes,
                    measured_peak_bytes=u.measured_peak_bytes,
                )
            )
        if self.usage_sum is not None:
            history.usage.append(self.usage_sum / len(ok))
        history.rounds.append(metrics)
        return metrics

    def _count(self, failure: str) -> int:
        return sum(1 for u in self.updates if u.failure == failure)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def new_aggregator(cfg: ExperimentConfig, global_state: ModelState) -> RoundAggregator:
    strategy = get_strategy(cfg.federation.strategy)
    return RoundAggregator(
        global_state,
        strategy.expert_rule,
        strategy.gate_rule,
        cfg.hfedmoe.tau,
        cfg.hfedmoe.normalise_gate_weights,
    )


def should_evaluate(cfg: ExperimentConfig, round_index: int) -> bool:
    last = round_index == cfg.federation.rounds - 1
    return last or (round_index + 1) % cfg.federation.eval_every == 0


RoundCallback = Callable[[RoundMetrics, ModelState], None]


def run_simulation(
    cfg: ExperimentConfig,
    on_round: RoundCallback | None = None,
    prepared: tuple[Federation, MoEAdapter] | None = None,
) -> tuple[History, ModelState]:
    """Run every round in this process; return the history and the final global state."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    fed, adapter = prepared or build_federation(cfg)
    trainer = make_trainer(adapter, fed.train, fed.footprint, cfg)
    global_state = adapter.state()
    bytes_down = global_state.num_bytes()
    history, clock = History(), 0.0
    for round_index in range(cfg.federation.rounds):
        started = time.perf_counter()
        book = RoundBook(round_index, fed)
        aggregator = new_aggregator(cfg, global_state)
        fn = cfg.federation
        sampled = sample_clients(fn.num_clients, fn.clients_per_round, cfg.seed, round_index)
        for client in aggregation_order(sampled, fed.budgets.resource_fraction):
            adapter.load_state(global_state)
            update = trainer.train(
                int(client), fed.shards[client], fed.budgets[client], round_index, bytes_down
            )
            update = screen(inject_faults(update, cfg, round_index), fn.round_deadline_s)
            if not update.failed:
                aggregator.add(update)
            book.record(update)
        global_state, report = aggregator.finalize()
        accuracy = test_loss = None
        if should_evaluate(cfg, round_index):
            adapter.load_state(global_state)
            accuracy, test_loss = evaluate(adapter, fed.test, fn.eval_batch_size)
        metrics = book.close(report, accuracy, test_loss, clock, history)
        clock = metrics.simulated_seconds
        metrics.wall_seconds = time.perf_counter() - started
        log.info("round %d: %s", round_index, metrics)
        if on_round is not None:
            on_round(metrics, global_state)
    return history, global_state
