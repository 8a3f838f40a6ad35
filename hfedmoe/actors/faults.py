"""Faults the config injects into the Ray executor's processes, at fixed points.

``faults.crash`` and ``faults.hang`` strike a client actor before it trains the listed
(round, client), ``faults.aggregator_crash`` the aggregator actor mid-round, each on the
first attempt only (the retry then succeeds, and a run with faults ends where the run
without them ends). ``faults.corrupt`` is the platform's wrapper of the client round
(``platform/faults.py``). The executor uses these subclasses only when the config asks
for such faults; the plain workers know nothing of faults. Random faults at random
moments are the chaos monkey's (``chaos.py``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from hfedmoe.actors.workers import AggregatorWorker, ClientWorker
from hfedmoe.platform.client import train_client
from hfedmoe.platform.config import ExperimentConfig
from hfedmoe.platform.faults import corrupting
from hfedmoe.platform.records import ClientReport, ClientUpload


def injects_client_faults(cfg: ExperimentConfig) -> bool:
    faults = cfg.faults
    return bool(faults.crash or faults.hang or faults.corrupt)


class FaultInjectingClientWorker(ClientWorker):
    """A client worker that dies or stalls where ``faults.crash`` / ``faults.hang`` say,
    and corrupts the uploads ``faults.corrupt`` lists."""

    def __init__(self, cfg: ExperimentConfig, *args) -> None:
        super().__init__(cfg, *args)
        self.train_client = corrupting(train_client, cfg.faults.corrupt)
        self.crash = {tuple(point) for point in cfg.faults.crash}
        self.hang = {tuple(point) for point in cfg.faults.hang}

    def train_many(
        self, jobs, round_index: int, state, server, bytes_down: int, attempt: int
    ) -> Iterator[ClientUpload | ClientReport | None]:
        for job in jobs:
            point = (round_index, job[0])
            if attempt == 0 and point in self.crash:
                os._exit(1)  # the process dies mid-task, as a real crash would
            if attempt == 0 and point in self.hang:
                time.sleep(10**6)  # stalls until the driver's time limit
            yield from super().train_many([job], round_index, state, server, bytes_down, attempt)


class FaultInjectingAggregatorWorker(AggregatorWorker):
    """An aggregator that dies on its first offer of the rounds ``faults.aggregator_crash``
    lists, with the round's state half summed."""

    def begin(self, state, server, round_index: int, attempt: int) -> None:
        super().begin(state, server, round_index, attempt)
        self.crash_on_offer = attempt == 0 and round_index in self.cfg.faults.aggregator_crash

    def offer_many(self, reports, *uploads) -> list[ClientReport]:
        if self.crash_on_offer:
            os._exit(1)
        return super().offer_many(reports, *uploads)
