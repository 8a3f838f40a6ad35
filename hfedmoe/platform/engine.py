"""THE round loop: ``run(cfg, executor, callbacks)``.

One round, top-down: sample K of N clients (seeded), let the executor train them and stream
their uploads into aggregation in the sampled order (the canonical order: the same sums on
every executor), evaluate the new global model when due, advance the simulated clock,
record the round, and hand it to the callbacks (checkpoint, tracking, progress, Tune,
early stop). Where clients run is the executor's business (``executors.InProcessExecutor``,
``hfedmoe.actors.RayExecutor``); everything else a run does besides training is a callback's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from hfedmoe.platform.aggregation import AggregationReport
from hfedmoe.platform.checkpoint import load_checkpoint
from hfedmoe.platform.config import ExperimentConfig
from hfedmoe.platform.errors import ConfigError, Terminated
from hfedmoe.platform.faults import driver_faults
from hfedmoe.platform.federation import Federation, build_federation
from hfedmoe.platform.models import MoEAdapter
from hfedmoe.platform.records import (
    ClientRecord,
    ClientReport,
    History,
    ModelState,
    RoundMetrics,
    ServerState,
    Variates,
)
from hfedmoe.platform.strategies import build_strategy

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What an executor returns for a round: the new global state and every client's report."""

    state: ModelState
    reports: list[ClientReport]  # in the order the clients were given
    aggregation: AggregationReport
    server_state: ServerState = field(default_factory=dict)  # the strategy's, after the round


class Executor(Protocol):
    """Runs a round's clients on the global state and aggregates their uploads in order."""

    def open(self, fed: Federation, adapter: MoEAdapter) -> dict[str, Any]:
        """Prepare (workers, actors); return a JSON-able description of the placement."""

    def run_round(
        self,
        round_index: int,
        clients: list[int],
        state: ModelState,
        server_state: ServerState,
        variates: dict[int, Variates],
    ) -> RoundResult:
        """Train ``clients`` from ``state``; aggregate their uploads in exactly this order.

        ``server_state`` is the strategy's (moments, SCAFFOLD's c), ``variates`` the kept
        control variates of those of ``clients`` that have any.
        """

    def close(self) -> None:
        """Release what ``open`` acquired (only that)."""


@dataclass
class Run:
    """A run as the callbacks see it."""

    cfg: ExperimentConfig
    run_dir: Path | None  # None: nothing is written (checkpoints need one)
    fed: Federation
    state: ModelState
    server_state: ServerState = field(default_factory=dict)  # the strategy's, O(model)
    # Control variates of every client that ever trained (SCAFFOLD), its trained rows only;
    # ``variates_changed`` are the clients whose variates the last round changed.
    variates: dict[int, Variates] = field(default_factory=dict)
    variates_changed: list[int] = field(default_factory=list)
    history: History = field(default_factory=History)
    clock: float = 0.0  # simulated seconds
    next_round: int = 0
    placement: dict[str, Any] = field(default_factory=dict)
    # Small JSON values callbacks keep across a resume (e.g. the MLflow run id).
    notes: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Hooks around the loop (pfl-research's on_train_begin / after_central_iteration / end)."""

    def on_run_begin(self, run: Run) -> None:
        """Before the first round this process runs (also after a resume)."""

    def after_round(self, run: Run, metrics: RoundMetrics) -> bool:
        """After each round is recorded; return True to stop the run after it."""
        return False

    def on_run_end(self, run: Run, status: str) -> None:
        """Once, however the run ends: FINISHED, FAILED (an exception) or KILLED (a signal)."""


def sample_clients(num_clients: int, per_round: int, seed: int, round_index: int) -> list[int]:
    """The K clients of a round, without replacement, from the run seed and round index.

    Their order is the round's canonical aggregation order on every executor.
    """
    rng = np.random.default_rng([seed, 2, round_index])
    return [int(c) for c in rng.choice(num_clients, size=per_round, replace=False)]


def should_evaluate(cfg: ExperimentConfig, round_index: int) -> bool:
    last = round_index == cfg.federation.rounds - 1
    return last or (round_index + 1) % cfg.federation.eval_every == 0


def round_metrics(
    round_index: int,
    result: RoundResult,
    accuracy: float | None,
    test_loss: float | None,
    clock: float,
    deadline_s: float | None,
) -> RoundMetrics:
    """Reduce a round's client reports to the logged metrics."""
    reports = result.reports
    ok = [r for r in reports if not r.failed]
    slowest = max((r.seconds for r in reports), default=0.0)
    round_seconds = min(slowest, deadline_s) if deadline_s is not None else slowest
    samples = sum(r.num_samples for r in ok)

    def count(failure: str) -> int:
        return sum(1 for r in reports if r.failure == failure)

    return RoundMetrics(
        round=round_index,
        sampled=len(reports),
        succeeded=len(ok),
        failed_oom=count("oom"),
        failed_deadline=count("deadline"),
        failed_non_finite=count("non_finite"),
        failed_lost=count("lost"),
        train_loss=sum(r.loss * r.num_samples for r in ok) / samples if samples else math.nan,
        accuracy=accuracy,
        test_loss=test_loss,
        experts_per_step=_mean([r.experts_per_step for r in ok]),
        experts_trained=_mean([float(r.trained.sum()) for r in ok]),
        experts_updated=result.aggregation.experts_updated,
        routing_consistency=result.aggregation.mean_consistency,
        routed_per_step=_mean([r.routed_per_step for r in ok]),
        admitted_share=_mean([r.admitted_share for r in ok]),
        admitted_share_sd=float(np.std([r.admitted_share for r in ok])) if ok else 0.0,
        bytes_down=sum(r.bytes_down for r in reports),
        bytes_up=sum(r.bytes_up for r in ok),
        client_flops=sum(r.flops for r in reports),
        client_wall_seconds=sum(r.wall_seconds for r in reports),
        round_seconds=round_seconds,
        simulated_seconds=clock + round_seconds,
    )


def record_round(history: History, fed: Federation, metrics: RoundMetrics, reports) -> None:
    """Append a round and its clients to the history (per-client rows, mean usage)."""
    budgets = fed.budgets
    for r in reports:
        tier = budgets.tier_names[budgets.tier[r.client_id]]
        history.clients.append(ClientRecord.from_report(r, metrics.round, tier))
    usage = [r.usage for r in reports if not r.failed]
    if usage:
        history.usage.append(np.sum(usage, axis=0) / len(usage))
    groups: dict[str, tuple[np.ndarray, int]] = {}
    for r in reports:
        if not r.failed:
            group = client_group(fed, r.client_id, r.capacity)
            total, count = groups.get(group, (0.0, 0))
            groups[group] = (total + r.usage, count + 1)
    history.group_usage.append(groups)
    history.rounds.append(metrics)


MAX_NAMED_GROUPS = 12


def client_group(fed: Federation, client_id: int, capacity: int) -> str:
    """The group a client's expert usage is shown under: its budget tier, or, where tiers
    are too many to show (device traces: one per device), its C_budget in quarters."""
    names = fed.budgets.tier_names
    if len(names) <= MAX_NAMED_GROUPS:
        return names[fed.budgets.tier[client_id]]
    fp = fed.footprint
    experts = fp.num_experts_total
    if fed.cfg.hfedmoe.budget_scope == "per_layer":
        experts //= fp.num_moe_layers
    quarter = min(3, 4 * capacity // experts)
    return f"C_budget {25 * quarter}-{25 * (quarter + 1)}%"


def run(
    cfg: ExperimentConfig,
    executor: Executor,
    callbacks: Sequence[Callback] = (),
    run_dir: Path | None = None,
    resume: bool = False,
) -> Run:
    """Run (or, with ``resume``, continue from ``run_dir``'s last checkpoint) a federation.

    Injected driver faults (``faults.py``) come last, after every callback saw the round.
    """
    callbacks = [*callbacks, *driver_faults(cfg.faults)]
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    fed, adapter = build_federation(cfg)
    state = adapter.state()
    run_state = Run(cfg, Path(run_dir) if run_dir else None, fed, state)
    run_state.server_state = build_strategy(cfg).initial_server_state(state)
    if resume:
        _restore(run_state)
    status = "FAILED"
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_as_exception())
        run_state.placement = executor.open(fed, adapter)
        stack.callback(executor.close)
        begun: list[Callback] = []

        def end_callbacks() -> None:
            for callback in reversed(begun):
                callback.on_run_end(run_state, status)

        stack.callback(end_callbacks)
        for callback in callbacks:
            callback.on_run_begin(run_state)
            begun.append(callback)
        try:
            _loop(run_state, adapter, executor, callbacks)
            status = "FINISHED"
        except (KeyboardInterrupt, Terminated):
            status = "KILLED"
            raise
    return run_state


def _loop(run_state: Run, adapter: MoEAdapter, executor: Executor, callbacks) -> None:
    cfg, fed = run_state.cfg, run_state.fed
    fn = cfg.federation
    for round_index in range(run_state.next_round, fn.rounds):
        started = time.perf_counter()
        clients = sample_clients(fn.num_clients, fn.clients_per_round, cfg.seed, round_index)
        kept = {c: run_state.variates[c] for c in clients if c in run_state.variates}
        result = executor.run_round(
            round_index, clients, run_state.state, run_state.server_state, kept
        )
        accuracy = test_loss = perplexity = None
        if should_evaluate(cfg, round_index):
            adapter.load_state(result.state)
            evaluation = fed.task.evaluate(adapter, fed.test, fn.eval_batch_size, fed.label_like)
            accuracy, test_loss, perplexity = (
                evaluation.accuracy,
                evaluation.loss,
                evaluation.perplexity,
            )
            if evaluation.generations:
                run_state.history.generations[round_index] = evaluation.generations
        metrics = round_metrics(
            round_index, result, accuracy, test_loss, run_state.clock, fn.round_deadline_s
        )
        metrics.perplexity = perplexity
        metrics.wall_seconds = time.perf_counter() - started
        record_round(run_state.history, fed, metrics, result.reports)
        run_state.state = result.state
        run_state.server_state = result.server_state
        changes = result.aggregation.variate_changes
        for client, change in changes.items():
            run_state.variates[client] = apply_variate_change(
                run_state.variates.get(client, {}), change
            )
        run_state.variates_changed = sorted(changes)
        run_state.clock = metrics.simulated_seconds
        run_state.next_round = round_index + 1
        log.info("round %d: %s", round_index, metrics)
        # Every callback sees every round, even when an earlier one asks to stop.
        stops = [callback.after_round(run_state, metrics) for callback in callbacks]
        if any(stops):
            log.info("stopping after round %d at a callback's request", round_index)
            return


def apply_variate_change(kept: Variates, change: Variates) -> Variates:
    """A client's control variates after a round: c_i + (c_i+ - c_i), key by key (a key
    it trained for the first time starts from 0)."""
    new = dict(kept)
    for key, delta in change.items():
        new[key] = kept[key] + delta if key in kept else delta
    return new


def _restore(run_state: Run) -> None:
    checkpoint = load_checkpoint(run_state.run_dir)
    if checkpoint is None:
        raise ConfigError(f"--resume {run_state.run_dir}: no checkpoint in this run directory")
    run_state.state = checkpoint.state
    if checkpoint.server_state is not None:  # runs of older versions kept none
        run_state.server_state = checkpoint.server_state
    run_state.variates = checkpoint.variates
    run_state.history = checkpoint.history
    run_state.clock = checkpoint.clock
    run_state.next_round = checkpoint.round + 1
    run_state.notes = checkpoint.notes


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` while the run lasts (main thread only: Python
    delivers signals there; a Tune trial's thread is stopped by Tune instead)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, _frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0
