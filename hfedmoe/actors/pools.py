"""Client actor pools, one per resource shape, and the scheduler of a round's clients.

A client's budget gives it a resource shape: the fraction of one CPU (or GPU) its actor
holds (``Budget.resource_fraction``). Each shape gets a pool of long-lived actors sized
from the cluster: the shape's share of the population times the cluster's capacity,
divided by the fraction, never more actors than clients of that shape, and the total
within what the cluster's CPUs (or GPUs) and memory can hold. A client always runs on an
actor of its own shape. Actors are reused across rounds and replaced when they die.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from hfedmoe.platform.errors import ConfigError

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 600.0  # any call whose work is done or small; generous, never infinite


class PlacementError(ConfigError):
    """The cluster cannot hold the actors a run needs."""


@dataclass(frozen=True)
class PoolPlan:
    fraction: float  # of one CPU or GPU per actor
    actors: int
    clients: int  # clients of this shape in the population


def plan_pools(fractions: np.ndarray, capacity: float, max_actors: int) -> list[PoolPlan]:
    """Actors per resource shape for clients with these resource fractions.

    capacity: CPUs (or GPUs) the pools may use; max_actors: a cap from memory or threads.
    """
    shapes, counts = np.unique(fractions, return_counts=True)
    if len(shapes) > max_actors:
        raise PlacementError(
            f"{len(shapes)} resource shapes need at least {len(shapes)} actors, but at most "
            f"{max_actors} fit; raise runtime.max_actors or use fewer budget tiers"
        )
    total = counts.sum()
    actors = [
        int(min(count, max(1, math.floor(capacity * count / total / f + 1e-9))))
        for f, count in zip(shapes, counts, strict=True)
    ]

    # Shrink the largest pools until the actors fit the CPUs/GPUs and the actor cap.
    def used() -> float:
        return sum(a * f for a, f in zip(actors, shapes, strict=True))

    while used() > capacity + 1e-9 or sum(actors) > max_actors:
        shrinkable = [i for i, a in enumerate(actors) if a > 1]
        if not shrinkable:
            raise PlacementError(
                f"one actor per resource shape {sorted(shapes.tolist())} needs "
                f"{sum(shapes):g} CPUs/GPUs; the cluster offers {capacity:g}"
            )
        by_resources = used() > capacity + 1e-9
        largest = max(
            shrinkable, key=lambda i: actors[i] * shapes[i] if by_resources else actors[i]
        )
        actors[largest] -= 1
    return [PoolPlan(float(f), a, int(c)) for f, a, c in zip(shapes, actors, counts, strict=True)]


@dataclass
class Job:
    """A chunk of one round's clients of one resource shape, run by one actor call."""

    position: int  # index of the chunk among the round's jobs
    clients: tuple[int, ...]
    fraction: float
    attempt: int = 0


@dataclass
class Outcome:
    job: Job
    reports: Any = None  # the clients' ClientReports, fetched
    upload_refs: list[ray.ObjectRef] | None = None  # one ClientUpload (or None) per client
    failure: str | None = None  # "lost" when the chunk never returned


# (actor, job) -> (ref of the reports, refs of the uploads)
Submit = Callable[[Any, Job], tuple[ray.ObjectRef, list[ray.ObjectRef]]]


class ClientPools:
    """Long-lived client actors by resource shape, with a round scheduler."""

    def __init__(
        self,
        plans: list[PoolPlan],
        make_actor: Callable[[PoolPlan, int], Any],  # (plan, slot) -> actor handle
        startup_timeout_s: float,
    ) -> None:
        self.plans = {p.fraction: p for p in plans}
        self.make_actor = make_actor
        self.slots: dict[Any, int] = {}  # live actor -> its slot (placement group bundle)
        slots = iter(range(sum(p.actors for p in plans)))
        self.pool: dict[float, list] = {
            p.fraction: [self._new_actor(p, next(slots)) for _ in range(p.actors)] for p in plans
        }
        self.startup_timeout_s = startup_timeout_s
        self._await_ready(startup_timeout_s, list(self.slots))

    def _new_actor(self, plan: PoolPlan, slot: int):
        """Actors are numbered in plan order; a replacement takes its predecessor's slot."""
        actor = self.make_actor(plan, slot)
        self.slots[actor] = slot
        return actor

    def _await_ready(self, timeout_s: float, actors: list) -> None:
        try:
            ray.get([a.ready.remote() for a in actors], timeout=timeout_s)
        except GetTimeoutError:
            raise PlacementError(
                f"{len(actors)} client actors were not all running after {timeout_s:.0f} s: "
                f"the cluster ({ray.available_resources()}) cannot place them; lower "
                "runtime.max_actors or runtime.actor_memory_gb"
            ) from None

    def actors(self, fraction: float) -> int:
        return len(self.pool[fraction])

    def run(
        self, jobs: list[Job], submit: Submit, timeout_s: float, retries: int, depth: int = 2
    ) -> Iterator[Outcome]:
        """Run the jobs on their shapes' actors; yield outcomes as they complete.

        Each actor holds up to ``depth`` jobs, so the next starts the moment one ends
        (Ray runs an actor's calls in order) instead of after a round trip to this
        driver. A job whose actor dies, or which runs past ``timeout_s`` per client from
        the moment it reached the head of its actor's queue, is retried on another actor
        of its shape (``retries`` times), then reported lost; the actor is killed and
        replaced, and jobs queued behind it, which never started, are resubmitted. An
        exception raised by the client code itself is a bug, not a fault: it ends the run.
        """
        queues = {f: deque(j for j in jobs if j.fraction == f) for f in self.pool}
        queued: dict[Any, deque] = {a: deque() for pool in self.pool.values() for a in pool}
        running: dict[ray.ObjectRef, tuple[Job, Any, list[ray.ObjectRef]]] = {}
        deadlines: dict[ray.ObjectRef, float] = {}  # for the job at the head of each queue

        def promote(actor) -> None:
            if queued[actor]:
                head = queued[actor][0]
                deadlines.setdefault(
                    head, time.monotonic() + timeout_s * len(running[head][0].clients)
                )

        def fail(actor) -> Iterator[Outcome]:
            """The actor is gone: its head job used an attempt, the rest never started."""
            line = list(queued.pop(actor))
            for index, ref in enumerate(line):
                job = running.pop(ref)[0]
                deadlines.pop(ref, None)
                if index > 0:
                    queues[job.fraction].appendleft(job)
                elif job.attempt < retries:
                    log.warning("clients %s: actor lost, retrying", job.clients)
                    queues[job.fraction].appendleft(
                        dataclasses.replace(job, attempt=job.attempt + 1)
                    )
                else:
                    yield Outcome(job, failure="lost")
            queued[self._bury(actor)] = deque()

        while running or any(queues.values()):
            for fraction, queue in queues.items():
                while queue:
                    actor = min(self.pool[fraction], key=lambda a: len(queued[a]))
                    if len(queued[actor]) >= depth:
                        break
                    job = queue.popleft()
                    reports_ref, upload_refs = submit(actor, job)
                    running[reports_ref] = (job, actor, upload_refs)
                    queued[actor].append(reports_ref)
                    promote(actor)
            wait_s = min(deadlines.values(), default=np.inf) - time.monotonic()
            done, _ = ray.wait(list(running), num_returns=1, timeout=min(max(wait_s, 0), 5.0))
            for ref in done:
                job, actor, upload_refs = running[ref]
                try:
                    reports = ray.get(ref, timeout=CONTROL_TIMEOUT_S)
                except RayActorError:
                    yield from fail(actor)
                    continue
                running.pop(ref)
                queued[actor].remove(ref)
                deadlines.pop(ref, None)
                promote(actor)
                yield Outcome(job, reports=reports, upload_refs=upload_refs)
            now = time.monotonic()
            for ref in [r for r, deadline in deadlines.items() if deadline < now]:
                actor = running[ref][1]
                log.warning("clients %s: past their time limit", running[ref][0].clients)
                yield from fail(actor)

    def _bury(self, dead) -> Any:
        """Kill an actor and return its replacement, running (a model built) and in its slot."""
        ray.kill(dead, no_restart=True)
        fraction = next(f for f, pool in self.pool.items() if dead in pool)
        replacement = self._new_actor(self.plans[fraction], self.slots.pop(dead))
        self.pool[fraction] = [replacement if a is dead else a for a in self.pool[fraction]]
        # Wait here, so its start-up never counts against a job's time limit.
        self._await_ready(self.startup_timeout_s, [replacement])
        return replacement

    def shutdown(self) -> None:
        """Kill exactly the actors this pool created (never anything else of the user's)."""
        for actor in self.slots:
            ray.kill(actor, no_restart=True)
        self.slots = {}
        self.pool = {f: [] for f in self.pool}
