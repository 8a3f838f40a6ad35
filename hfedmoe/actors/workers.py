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
from hfedmoe.platform.federation import build_task_adapter, make_trainer
from hfedmoe.platform.records import ClientReport, ClientUpload, ModelState, ServerState, Variates
from hfedmoe.platform.strategies import build_strategy, register, round_aggregator


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
        classes: list[type],
    ) -> None:
        for cls in classes:  # classes the driver registered; this process may not have
            register(cls)
        torch.set_num_threads(threads)
        adapter = build_task_adapter(cfg, num_labels)
        adapter.model.to(device)
        self.cfg = cfg
        self.trainer = make_trainer(adapter, train, footprint, cfg)
        self.train_client = train_client  # one client's round (faults.py wraps it)

    def ready(self) -> int:
        return os.getpid()

    def train_many(
        self,
        jobs: list[tuple[int, np.ndarray, Budget, Variates | None]],
        round_index: int,
        state: ModelState,
        server: ServerState,
        bytes_down: int,
        attempt: int,
    ) -> Iterator[ClientUpload | ClientReport | None]:
        """Train a chunk of clients, each from the global state, in order.

        Each job carries the client's own control variates; ``server`` is the strategy's
        client view of the server state (both empty unless the client update keeps any).

        Streams each client's upload and then its report as separate objects the moment
        the client is done: the aggregator fetches the upload, the driver the report, and
        a crash later in the chunk loses only the clients not yet streamed. One call per
        chunk spreads Ray's per-call cost over its clients. ``attempt`` counts the chunk's
        tries (0: the first).
        """
        for client_id, indices, budget, variates in jobs:
            upload, report = self.train_client(
                self.trainer, client_id, indices, budget, round_index, state, bytes_down,
                server, variates,
            )  # fmt: skip
            yield upload
            yield report


class AggregatorWorker:
    """Screens and streams one round's uploads into the next global state, O(model) memory."""

    def __init__(self, cfg: ExperimentConfig, classes: list[type]) -> None:
        for cls in classes:
            register(cls)
        self.cfg = cfg
        self.strategy = build_strategy(cfg)
        self.aggregator: RoundAggregator | None = None

    def ready(self) -> int:
        return os.getpid()

    def begin(self, state: ModelState, server: ServerState, round_index: int, attempt: int) -> None:
        """A round starts from the global state and the server state the driver owns."""
        self.aggregator = round_aggregator(self.cfg, self.strategy, state, server)

    def offer_many(
        self, reports: list[ClientReport], *uploads: ClientUpload | None
    ) -> list[ClientReport]:
        """Offer clients in order; return their reports with the verdict screening wrote."""
        for report, upload in zip(reports, uploads, strict=True):
            self.aggregator.offer(report, upload)
        return reports

    def finalize(self) -> tuple[ModelState, AggregationReport, ServerState]:
        result = self.aggregator.finalize()
        self.aggregator = None
        return result
