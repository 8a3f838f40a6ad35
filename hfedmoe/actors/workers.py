"""The code that runs inside Ray actors: a client worker and the aggregator.

Both are plain classes around the platform's ``train_client`` and ``RoundAggregator``; the
executor wraps them with ``ray.remote`` and the resources of their role.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from hfedmoe.platform.aggregation import AggregationReport, RoundAggregator
from hfedmoe.platform.budgets.cost import ModelFootprint
from hfedmoe.platform.budgets.drawing import Budget
from hfedmoe.platform.client import train_client
from hfedmoe.platform.config import ExperimentConfig
from hfedmoe.platform.data.tokenisation import TokenizedText
from hfedmoe.platform.federation import make_trainer
from hfedmoe.platform.models import build_adapter
from hfedmoe.platform.records import ClientReport, ClientUpload, ModelState
from hfedmoe.platform.strategies import Strategy, make_strategy, register


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
        strategy: type[Strategy],
    ) -> None:
        register(strategy)  # a class the driver registered; this process may not have
        torch.set_num_threads(threads)
        adapter = build_adapter(cfg.model, num_labels, cfg.seed)
        adapter.model.to(device)
        self.cfg = cfg
        self.trainer = make_trainer(adapter, train, footprint, cfg)
        self.train_client = train_client  # one client's round (faults.py wraps it)

    def ready(self) -> int:
        return os.getpid()

    def train_many(
        self,
        jobs: list[tuple[int, np.ndarray, Budget]],
        round_index: int,
        state: ModelState,
        bytes_down: int,
        attempt: int,
    ) -> Iterator[ClientUpload | ClientReport | None]:
        """Train a chunk of clients, each from the global state, in order.

        Streams each client's upload and then its report as separate objects the moment
        the client is done: the aggregator fetches the upload, the driver the report, and
        a crash later in the chunk loses only the clients not yet streamed. One call per
        chunk spreads Ray's per-call cost over its clients. ``attempt`` counts the chunk's
        tries (0: the first).
        """
        for client_id, indices, budget in jobs:
            upload, report = self.train_client(
                self.trainer, client_id, indices, budget, round_index, state, bytes_down
            )
            yield upload
            yield report


class AggregatorWorker:
    """Screens and streams one round's uploads into the next global state, O(model) memory."""

    def __init__(self, cfg: ExperimentConfig, strategy: type[Strategy]) -> None:
        register(strategy)
        self.cfg = cfg
        self.strategy = make_strategy(cfg.federation.strategy, cfg.hfedmoe)
        self.aggregator: RoundAggregator | None = None

    def ready(self) -> int:
        return os.getpid()

    def begin(self, state: ModelState, round_index: int, attempt: int) -> None:
        fed = self.cfg.federation
        self.aggregator = RoundAggregator(
            state,
            self.strategy,
            self.cfg.hfedmoe.tau,
            fed.round_deadline_s,
            lora_aggregate=self.cfg.model.lora.aggregate,
        )

    def offer_many(
        self, reports: list[ClientReport], *uploads: ClientUpload | None
    ) -> list[str | None]:
        """Offer clients in order; for each, why it was left out, or None."""
        return [
            self.aggregator.offer(report, upload)
            for report, upload in zip(reports, uploads, strict=True)
        ]

    def finalize(self) -> tuple[ModelState, AggregationReport]:
        state, report = self.aggregator.finalize()
        self.aggregator = None
        return state, report
