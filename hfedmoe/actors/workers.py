"""The code that runs inside Ray actors: a client worker and the aggregator.

Both are plain classes around the platform's LocalTrainer and RoundAggregator; the pool
and the driver wrap them with ``ray.remote`` and the resources of their role.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from hfedmoe.platform.config import ExperimentConfig
from hfedmoe.platform.data import TokenizedText
from hfedmoe.platform.devices import Budget, ModelFootprint
from hfedmoe.platform.local import ClientUpdate, make_trainer
from hfedmoe.platform.models import ModelState, build_adapter
from hfedmoe.platform.simulation import inject_faults, new_aggregator, screen


class ClientWorker:
    """Trains clients of one resource shape, one at a time, on its own model copy."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        train: TokenizedText,
        footprint: ModelFootprint,
        num_labels: int,
        device: str,
        threads: int,
    ) -> None:
        torch.set_num_threads(threads)
        adapter = build_adapter(cfg.model, num_labels, cfg.seed)
        adapter.model.to(device)
        self.cfg = cfg
        self.trainer = make_trainer(adapter, train, footprint, cfg)

    def ready(self) -> int:
        return os.getpid()

    def train_many(
        self,
        jobs: list[tuple[int, np.ndarray, Budget]],
        round_index: int,
        state: ModelState,
        bytes_down: int,
        attempt: int,
    ) -> tuple[list[ClientUpdate], list[ClientUpdate]]:
        """Train a chunk of clients, each from the global state, in order.

        Returns (statistics, full updates): the driver fetches the first, the aggregator
        the second. One call per chunk spreads Ray's per-call cost over its clients.
        """
        stats, updates = [], []
        for client_id, indices, budget in jobs:
            if attempt == 0 and (round_index, client_id) in self.cfg.faults.crash:
                os._exit(1)  # injected fault: the process dies mid-task, as a real crash would
            if attempt == 0 and (round_index, client_id) in self.cfg.faults.hang:
                time.sleep(10**6)  # injected fault: stalls until the driver's time limit
            self.trainer.adapter.load_state(state)
            update = self.trainer.train(client_id, indices, budget, round_index, bytes_down)
            update = inject_faults(update, self.cfg, round_index)
            stats.append(update.without_tensors())
            updates.append(update)
        return stats, updates


class AggregatorWorker:
    """Streams one round's updates into the next global state (eqs 16-21), O(model) memory."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.aggregator = None

    def begin(self, state: ModelState) -> None:
        self.aggregator = new_aggregator(self.cfg, state)

    def add_many(self, updates: list[ClientUpdate]) -> list[str | None]:
        """Screen and add updates in order; for each, why it was left out, or None."""
        reasons = []
        for update in updates:
            update = screen(update, self.cfg.federation.round_deadline_s)
            if not update.failed:
                self.aggregator.add(update)
            reasons.append(update.failure)
        return reasons

    def finalize(self):
        state, report = self.aggregator.finalize()
        self.aggregator = None
        return state, report
