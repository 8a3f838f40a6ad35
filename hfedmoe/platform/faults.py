"""Faults the config injects (``faults``), for robustness experiments and the runtime's tests.

The platform's share, applied from outside the code it breaks: a corrupted upload
(``faults.corrupt``) is a wrapper the executors put around the client round, and a failing
driver (``faults.driver_crash``) is a callback the engine appends after the run's own. Faults
that need a process to lose (a client actor's crash or stall, the aggregator's loss) are the
Ray executor's: ``hfedmoe/actors/faults.py``. The trainer, the round loop and the actor
workers know nothing of faults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from hfedmoe.platform.config import FaultConfig
from hfedmoe.platform.errors import InjectedFault
from hfedmoe.platform.records import ClientReport, ClientUpload, RoundMetrics

if TYPE_CHECKING:
    from hfedmoe.platform.engine import Run

# ``client.train_client``'s signature: (trainer, client, indices, budget, round, state, ...).
TrainClient = Callable[..., tuple[ClientUpload | None, ClientReport]]


def corrupting(train: TrainClient, corrupt: list[tuple[int, int]]) -> TrainClient:
    """``train``, except that the uploads of the listed (round, client) pairs turn into NaN.

    What the screening in ``aggregation`` must reject; the report stays as trained.
    """
    listed = {(int(r), int(c)) for r, c in corrupt}
    if not listed:
        return train

    def train_corrupted(trainer, client_id, indices, budget, round_index, *rest):
        upload, report = train(trainer, client_id, indices, budget, round_index, *rest)
        if upload is not None and (round_index, client_id) in listed:
            target = upload.shared or upload.gates
            name = next(iter(target))
            target[name] = np.full_like(target[name], np.nan)
        return upload, report

    return train_corrupted


class DriverCrash:
    """The driver fails right after round ``round_index`` is recorded by every callback
    before it (checkpoint, tracking): ``faults.driver_crash``.

    A callback (``engine.Callback``'s hooks; it does not subclass it, since the engine
    appends it and this module stays below the engine). A resumed run, or a retried sweep
    trial, starts after that round and so does not fail again.
    """

    def __init__(self, round_index: int) -> None:
        self.round_index = round_index

    def on_run_begin(self, run: Run) -> None:
        pass

    def after_round(self, run: Run, metrics: RoundMetrics) -> bool:
        if metrics.round == self.round_index:
            round_index = metrics.round
            raise InjectedFault(f"faults.driver_crash: the driver fails after round {round_index}")
        return False

    def on_run_end(self, run: Run, status: str) -> None:
        pass


def driver_faults(faults: FaultConfig) -> list[DriverCrash]:
    """The callbacks that inject the config's driver faults (none, usually)."""
    return [] if faults.driver_crash is None else [DriverCrash(faults.driver_crash)]
