"""The in-process executor: a round's clients one after another on one model, no Ray.

The reference the Ray executor must match bit for bit: the same trainer, the same
``train_client``, the same aggregator, the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hfedmoe.platform.client import LocalTrainer, train_client
from hfedmoe.platform.config import ExperimentConfig
from hfedmoe.platform.engine import Callback, RoundResult, Run, run
from hfedmoe.platform.faults import TrainClient, corrupting
from hfedmoe.platform.federation import Federation, make_trainer
from hfedmoe.platform.models import MoEAdapter
from hfedmoe.platform.records import ModelState, ServerState, Variates
from hfedmoe.platform.strategies import round_aggregator


class InProcessExecutor:
    """Trains clients sequentially on the engine's own model instance."""

    def __init__(self) -> None:
        self.fed: Federation | None = None
        self.trainer: LocalTrainer | None = None
        self.train_client: TrainClient = train_client

    def open(self, fed: Federation, adapter: MoEAdapter) -> dict[str, Any]:
        self.fed = fed
        self.trainer = make_trainer(adapter, fed.train, fed.footprint, fed.cfg)
        self.train_client = corrupting(train_client, fed.cfg.faults.corrupt)  # faults.py
        return {"executor": "in_process"}

    def run_round(
        self,
        round_index: int,
        clients: list[int],
        state: ModelState,
        server_state: ServerState,
        variates: dict[int, Variates],
    ) -> RoundResult:
        fed, strategy = self.fed, self.trainer.strategy
        aggregator = round_aggregator(fed.cfg, strategy, state, server_state)
        bytes_down = state.num_bytes()
        view = strategy.client_view(server_state)
        reports = []
        for client in clients:
            upload, report = self.train_client(
                self.trainer, client, fed.shards[client], fed.budgets[client], round_index,
                state, bytes_down, view, variates.get(client),
            )  # fmt: skip
            aggregator.offer(report, upload)
            reports.append(report)
        new_state, aggregation, new_server_state = aggregator.finalize()
        return RoundResult(new_state, reports, aggregation, new_server_state)

    def close(self) -> None:
        self.trainer = None


def run_in_process(cfg: ExperimentConfig, callbacks: Sequence[Callback] = ()) -> Run:
    """A whole federation in this process, writing nothing (tests, benchmarks, notebooks)."""
    return run(cfg, InProcessExecutor(), callbacks)
