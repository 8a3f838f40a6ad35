"""The Ray executor: budget-shaped client actor pools and a streaming aggregator actor.

Per round the global state goes into the object store once (``ray.put``); the round's
clients run in chunks on actors of their resource shape (``pools.py``), each client's
upload coming back as its own object; as soon as every earlier client (in the engine's
order) has finished, the waiting uploads and reports are handed to the aggregator actor,
which screens and adds them exactly as the in-process executor does. Aggregation so
streams, holds O(model) memory, and sums in the same order: the two executors give
bit-identical results for the same config and seed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
from dataclasses import asdict
from typing import Any

import ray
from ray.exceptions import RayActorError

from hfedmoe.actors.faults import (
    FaultInjectingAggregatorWorker,
    FaultInjectingClientWorker,
    injects_client_faults,
)
from hfedmoe.actors.pools import (
    CONTROL_TIMEOUT_S,
    ClientPools,
    FaultEvent,
    Job,
    PoolPlan,
    plan_pools,
)
from hfedmoe.actors.workers import AggregatorWorker, ClientWorker
from hfedmoe.platform.budgets.cost import full_step_memory_bytes
from hfedmoe.platform.config import ConfigError, ExperimentConfig, host_port
from hfedmoe.platform.engine import RoundResult
from hfedmoe.platform.federation import Federation
from hfedmoe.platform.models import MoEAdapter
from hfedmoe.platform.records import ClientReport, ModelState, ServerState, Variates
from hfedmoe.platform.strategies import build_strategy, strategy_classes

log = logging.getLogger(__name__)

GiB = 2**30
STARTUP_TIMEOUT_S = 300.0  # client actors placed and models built


ADDRESS_TIMEOUT_S = 3.0  # a head's GCS answers a TCP connect in milliseconds


def check_address(address: str | None) -> None:
    """Fail in seconds, naming the setting, if nothing listens at the Ray address to join.

    ``ray.init`` retries an address that does not answer for minutes. ``auto`` and
    ``local`` are left to Ray; so is everything once this process is connected.
    """
    setting = "runtime.address"
    if address is None:  # ray.init then joins RAY_ADDRESS, if set (ray job submit sets it)
        setting, address = "RAY_ADDRESS", os.environ.get("RAY_ADDRESS")
    target = host_port(address) if address else None
    if target is None or ray.is_initialized():
        return
    try:
        socket.create_connection(target, timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else err.strerror or str(err)
        raise ConfigError(
            f"{setting} {address}: no Ray cluster answers there ({reason} within "
            f"{ADDRESS_TIMEOUT_S:.0f} s); start it (ray start --head on that machine), correct "
            f"{setting}, or unset it to start Ray on this machine"
        ) from None


def connect(address: str | None) -> bool:
    """Join the configured cluster or start a local one; True if this call started Ray."""
    if ray.is_initialized():
        return False
    check_address(address)
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    return True


def cluster_capacity(device: str) -> tuple[str, float, float]:
    """(device, CPUs or GPUs for client actors, bytes of Ray's memory resource)."""
    resources = ray.cluster_resources()
    if device == "auto":
        device = "cuda" if resources.get("GPU", 0) > 0 else "cpu"
    unit = "GPU" if device == "cuda" else "CPU"
    if resources.get(unit, 0) <= 0:
        raise ConfigError(f"runtime.device={device}: the Ray cluster has no {unit}")
    return device, float(resources[unit]), float(resources.get("memory", 0.0))


def size_pools(
    cfg: ExperimentConfig,
    fractions,
    footprint,
    device: str,
    capacity: float,
    memory: float,
) -> tuple[list[PoolPlan], float]:
    """Pool plans for clients with these resource fractions, and each actor's memory.

    capacity: CPUs (or GPUs) the client actors may use; memory: bytes of Ray's memory
    resource they may use (0: no limit from memory).
    """
    runtime = cfg.runtime
    if runtime.actor_memory_gb is not None:
        actor_bytes = runtime.actor_memory_gb * GiB
    else:  # the model trained in full plus the interpreter, torch and transformers
        actor_bytes = full_step_memory_bytes(footprint, cfg.federation.batch_size) + 0.6 * GiB
    limits = [runtime.max_actors or 10**9]
    if memory > 0:
        limits.append(max(1, int(memory // actor_bytes)))
    if device == "cpu":  # actors beyond the cores only time-share them and cost memory,
        # but every resource shape needs an actor of its own.
        limits.append(max(1, int(capacity), len(set(fractions.tolist()))))
    return plan_pools(fractions, capacity, min(limits)), actor_bytes


def _bundle(index: int) -> dict:
    """Inside a Tune trial, pin an actor to its own bundle of the trial's placement group.

    Left to Ray, a small actor may take a slice of a large actor's bundle and leave the
    large one nowhere to go; sweep.trial_bundles lays bundles out as driver, client
    actors in plan order, aggregator.
    """
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = get_current_placement_group()
    if group is None:
        return {}
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=index
        )
    }


CHUNKS_PER_ACTOR = 4  # enough chunks that actors finish a round close together
MAX_CHUNK = 16


def chunk_jobs(order: list[int], fractions, pools: ClientPools) -> list[Job]:
    """Split the ordered clients into per-shape chunks, about CHUNKS_PER_ACTOR per actor.

    One actor call per chunk divides Ray's per-call cost (submission, scheduling, one
    object per result) among its clients; the order of clients is unchanged.
    """
    jobs: list[Job] = []
    for fraction in sorted({float(fractions[c]) for c in order}):
        clients = [c for c in order if fractions[c] == fraction]
        size = math.ceil(len(clients) / (CHUNKS_PER_ACTOR * pools.actors(fraction)))
        size = min(max(size, 1), MAX_CHUNK)
        for start in range(0, len(clients), size):
            jobs.append(Job(len(jobs), tuple(clients[start : start + size]), fraction))
    return jobs


class AggregatorDied(Exception):
    """The aggregator actor died: the round starts again from its start state."""


class RayExecutor:
    """Runs clients on budget-shaped Ray actors and aggregates on an aggregator actor.

    placement: (device, capacity, memory) for the client pools instead of the whole
    cluster's; a sweep trial passes its share (its placement group's bundles).
    Faults it recovers from are kept in ``events``, in order, across the whole run.
    """

    def __init__(self, placement: tuple[str, float, float] | None = None) -> None:
        self.placement = placement
        self.cleanup = contextlib.ExitStack()
        self.fed: Federation | None = None
        self.pools: ClientPools | None = None
        self.aggregator = None
        self.aggregator_pid = -1
        self.state_ref: ray.ObjectRef | None = None
        self.state_of_ref: ModelState | None = None
        self.events: list[FaultEvent] = []

    def open(self, fed: Federation, adapter: MoEAdapter) -> dict[str, Any]:
        cfg = fed.cfg
        self.fed = fed
        if connect(cfg.runtime.address):
            self.cleanup.callback(ray.shutdown)
        device, capacity, memory = self.placement or cluster_capacity(cfg.runtime.device)
        plans, actor_bytes = size_pools(
            cfg, fed.budgets.resource_fraction, fed.footprint, device, capacity, memory
        )
        log.info("client pools: %s", plans)
        self.classes = portable_classes(cfg)
        self.strategy = build_strategy(cfg)  # the driver's copy: which state clients get
        self.pools = _start_pools(cfg, fed, plans, device, actor_bytes, self.classes, self.events)
        self.cleanup.callback(self.pools.shutdown)
        self.aggregator_bundle = _bundle(1 + sum(p.actors for p in plans))
        self._start_aggregator()
        self.cleanup.callback(lambda: ray.kill(self.aggregator, no_restart=True))
        return {"executor": "ray", "device": device, "pools": [asdict(p) for p in plans]}

    def _start_aggregator(self) -> None:
        injects = bool(self.fed.cfg.faults.aggregator_crash)
        aggregator = FaultInjectingAggregatorWorker if injects else AggregatorWorker
        worker = ray.remote(aggregator).options(
            num_cpus=0, max_restarts=0, **self.aggregator_bundle
        )
        while True:
            self.aggregator = worker.remote(self.fed.cfg, self.classes)
            try:
                self.aggregator_pid = self._from_aggregator(self.aggregator.ready.remote())
                return
            except AggregatorDied:  # died while starting (a node lost, a chaos test): again
                log.warning("the aggregator actor died while starting; starting another")

    def _from_aggregator(self, refs):
        try:
            return ray.get(refs, timeout=CONTROL_TIMEOUT_S)
        except RayActorError as err:
            raise AggregatorDied(str(err)) from err

    def run_round(
        self,
        round_index: int,
        clients: list[int],
        state: ModelState,
        server_state: ServerState,
        variates: dict[int, Variates],
    ) -> RoundResult:
        """One round; a dead aggregator is replaced and the round re-run from its start.

        Every client's randomness derives from (seed, round, client), and the server
        state is the driver's (the aggregator returns a new one, never edits it), so the
        re-run gives exactly the result the lost attempt would have given.
        """
        retries = self.fed.cfg.runtime.retries
        attempt = 0
        while True:
            try:
                return self._attempt_round(
                    round_index, clients, state, server_state, variates, attempt
                )
            except AggregatorDied:
                old_pid = self.aggregator_pid
                ray.kill(self.aggregator, no_restart=True)
                if attempt == retries:
                    raise RuntimeError(
                        f"round {round_index}: the aggregator actor died {retries + 1} times "
                        "(runtime.retries); the run stops at its last checkpoint, and "
                        "`--resume` continues from there"
                    ) from None
                log.warning("round %d: aggregator actor died; re-running the round", round_index)
                self._start_aggregator()
                self.events.append(
                    FaultEvent("aggregator_died", old_pid, self.aggregator_pid, tuple(clients))
                )
                attempt += 1

    def _attempt_round(
        self,
        round_index: int,
        clients: list[int],
        state: ModelState,
        server_state: ServerState,
        variates: dict[int, Variates],
        attempt: int,
    ) -> RoundResult:
        fed, cfg = self.fed, self.fed.cfg
        # The global weights enter the object store once per state: the aggregator's
        # result is already there, so only a state the driver made itself is put.
        if state is not self.state_of_ref:
            self.state_ref, self.state_of_ref = ray.put(state), state
        state_ref = self.state_ref
        bytes_down = state.num_bytes()
        server_ref = ray.put(server_state)
        view_ref = ray.put(self.strategy.client_view(server_state))
        self._from_aggregator(
            self.aggregator.begin.remote(state_ref, server_ref, round_index, attempt)
        )
        position = {c: i for i, c in enumerate(clients)}
        jobs = chunk_jobs(clients, fed.budgets.resource_fraction, self.pools)

        def submit(actor, job: Job) -> ray.ObjectRefGenerator:
            work = [(c, fed.shards[c], fed.budgets[c], variates.get(c)) for c in job.clients]
            return actor.train_many.remote(
                work, round_index, state_ref, view_ref, bytes_down, job.attempt
            )

        ready: dict[int, tuple[ClientReport, Any]] = {}  # position -> (report, upload ref)
        screened: list[ray.ObjectRef] = []  # the reports, with the aggregator's verdicts
        next_position = 0
        timeout_s, retries = cfg.runtime.client_timeout_s, cfg.runtime.retries
        for outcome in self.pools.run(jobs, submit, timeout_s, retries):
            c = outcome.client
            if outcome.failure is None:
                ready[position[c]] = (outcome.report, outcome.upload_ref)
            else:  # the client never came back: it is lost
                lost = ClientReport(c, len(fed.shards[c]), bytes_down=bytes_down, lost=True)
                ready[position[c]] = (lost, None)
            # Hand over the clients every earlier one of which is done: streaming, in order.
            batch = []
            while next_position in ready:
                batch.append(ready.pop(next_position))
                next_position += 1
            if batch:
                batch_reports = [report for report, _ in batch]
                uploads = [upload for _, upload in batch]  # refs resolve in the actor
                screened.append(self.aggregator.offer_many.remote(batch_reports, *uploads))
        # The verdicts are written once, by the aggregator's screening, as in process.
        reports = [r for offered in self._from_aggregator(screened) for r in offered]
        refs = self.aggregator.finalize.options(num_returns=3).remote()
        new_state, aggregation, new_server_state = self._from_aggregator(refs)
        self.state_ref, self.state_of_ref = refs[0], new_state
        return RoundResult(new_state, reports, aggregation, new_server_state)

    def close(self) -> None:
        self.cleanup.close()
        self.pools = self.aggregator = self.state_ref = self.state_of_ref = None


def portable_classes(cfg: ExperimentConfig) -> list[type]:
    """The registered classes the config names (strategy, client and server update), made
    to travel to workers that cannot import them.

    A class defined outside an installed package (a ``--plugin`` file, a test module, a
    notebook) is pickled by value, so a worker gets the class itself and registers it;
    one from an installed package travels by reference as usual.
    """
    classes = strategy_classes(cfg)
    for cls in classes:
        if cls.__module__ != "__main__" and not cls.__module__.startswith("hfedmoe."):
            ray.cloudpickle.register_pickle_by_value(sys.modules[cls.__module__])
    return classes


def _start_pools(
    cfg,
    fed: Federation,
    plans: list[PoolPlan],
    device: str,
    actor_bytes: float,
    classes: list[type],
    events: list[FaultEvent],
) -> ClientPools:
    train_ref = ray.put(fed.train)
    worker = ray.remote(FaultInjectingClientWorker if injects_client_faults(cfg) else ClientWorker)

    def make_actor(plan: PoolPlan, slot: int):
        resources = {"num_gpus": plan.fraction, "num_cpus": 0} if device == "cuda" else {
            "num_cpus": plan.fraction
        }  # fmt: skip
        threads = cfg.threads or max(1, int(plan.fraction))
        options = {**resources, **_bundle(1 + slot), "memory": int(actor_bytes), "max_restarts": 0}
        return worker.options(**options).remote(
            cfg, train_ref, fed.footprint, fed.num_labels, device, threads, classes
        )

    return ClientPools(plans, make_actor, STARTUP_TIMEOUT_S, events)
