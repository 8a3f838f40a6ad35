"""Chaos for the Ray executor: kill its actors at random moments while a run goes on.

A run with faults must end exactly where the same run without them ends (every client's
randomness derives from (seed, round, client), and aggregation sums in the sampled
order). The chaos test and the soak benchmark check that with this monkey, beside the
faults a config injects at fixed points (``faults.crash``, ``hang``, ``aggregator_crash``:
``faults.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
import ray

from hfedmoe.actors.executor import RayExecutor
from hfedmoe.platform.config import ExperimentConfig
from hfedmoe.platform.engine import sample_clients

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Strike:
    seconds: float  # since the monkey started
    action: str  # "kill_client", "kill_aggregator" or "stall_client"


class ChaosMonkey:
    """From a background thread, strikes a random live actor of ``executor`` every so often.

    Waits an exponential time (mean ``mean_interval_s``) between strikes and stops after
    ``max_strikes``. A strike kills the aggregator (``aggregator_share`` of them), freezes
    a client actor's process with SIGSTOP (``stall_share``: a real stall, which the
    client time limit must catch; the actor has to run on this machine), or kills a
    client actor. Use as a context manager around the run.
    """

    def __init__(
        self,
        executor: RayExecutor,
        seed: int,
        mean_interval_s: float,
        max_strikes: int,
        aggregator_share: float = 0.25,
        stall_share: float = 0.25,
    ) -> None:
        self.executor = executor
        self.rng = np.random.default_rng(seed)
        self.mean_interval_s = mean_interval_s
        self.max_strikes = max_strikes
        self.shares = (aggregator_share, stall_share)
        self.strikes: list[Strike] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos-monkey", daemon=True)

    def __enter__(self) -> ChaosMonkey:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while len(self.strikes) < self.max_strikes:
            if self._stop.wait(self.rng.exponential(self.mean_interval_s)):
                return
            pools, aggregator = self.executor.pools, self.executor.aggregator
            if pools is None or aggregator is None:  # not started yet, or closed
                continue
            actors = [a for pool in list(pools.pool.values()) for a in list(pool)]
            if not actors:  # the pools just shut down
                continue
            client = actors[self.rng.integers(len(actors))]
            draw = self.rng.random()
            if draw < self.shares[0]:
                action = "kill_aggregator"
                ray.kill(aggregator, no_restart=True)
            elif draw < sum(self.shares) and client in pools.pids:
                action = "stall_client"
                with contextlib.suppress(ProcessLookupError):  # died meanwhile: a no-op
                    os.kill(pools.pids[client], signal.SIGSTOP)
            else:
                action = "kill_client"
                ray.kill(client, no_restart=True)
            self.strikes.append(Strike(time.monotonic() - self._started, action))
            log.warning("chaos: %s", action.replace("_", " "))


def random_faults(
    cfg: ExperimentConfig, seed: int, crashes: int, hangs: int, aggregator_crashes: int
) -> dict[str, list]:
    """A `faults` section with crashed and stalled clients and lost aggregators at random
    points (sampled clients of random rounds; never two faults on one client and round)."""
    rng = np.random.default_rng(seed)
    fed = cfg.federation
    points = [
        (r, c)
        for r in range(fed.rounds)
        for c in sample_clients(fed.num_clients, fed.clients_per_round, cfg.seed, r)
    ]
    chosen = rng.choice(len(points), crashes + hangs, replace=False)
    pairs = [list(points[i]) for i in chosen]
    rounds = rng.choice(fed.rounds, aggregator_crashes, replace=False)
    return {
        "crash": pairs[:crashes],
        "hang": pairs[crashes:],
        "aggregator_crash": sorted(int(r) for r in rounds),
    }
