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
    """One client of a job: its report and upload, or the failure that lost it."""

    job: Job
    client: int
    report: Any = None  # the client's ClientReport, fetched
    upload_ref: ray.ObjectRef | None = None  # its ClientUpload (or None), left in the store
    failure: str | None = None  # "lost" when the client never came back


@dataclass(frozen=True)
class FaultEvent:
    """A fault the runtime recovered from (or gave a client up to)."""

    kind: str  # "client_actor_died", "client_timed_out" or "aggregator_died"
    old_pid: int
    new_pid: int  # the replacement's process
    retried: tuple[int, ...] = ()  # clients run again (on the replacement's shape)
    kept: tuple[int, ...] = ()  # clients of the same call that had already come back
    given_up: tuple[int, ...] = ()  # clients out of retries, reported lost


# (actor, job) -> the call's generator: per client, its upload's object, then its report's
Submit = Callable[[Any, Job], ray.ObjectRefGenerator]


@dataclass
class _Call:
    job: Job
    actor: Any
    delivered: list[int] = dataclasses.field(default_factory=list)
    upload_ref: ray.ObjectRef | None = None  # the next client's, until its report comes


class ClientPools:
    """Long-lived client actors by resource shape, with a round scheduler."""

    def __init__(
        self,
        plans: list[PoolPlan],
        make_actor: Callable[[PoolPlan, int], Any],  # (plan, slot) -> actor handle
        startup_timeout_s: float,
        events: list[FaultEvent],
    ) -> None:
        self.plans = {p.fraction: p for p in plans}
        self.make_actor = make_actor
        self.startup_timeout_s = startup_timeout_s
        self.slots: dict[Any, int] = {}  # live actor -> its slot (placement group bundle)
        self.pids: dict[Any, int] = {}
        self.events = events  # appended to as faults happen
        slot = iter(range(sum(p.actors for p in plans)))
        started = {
            p.fraction: [self._new_actor(p, next(slot)) for _ in range(p.actors)] for p in plans
        }
        self._await_ready(list(self.slots))
        self.pool: dict[float, list] = started

    def _new_actor(self, plan: PoolPlan, slot: int):
        """Actors are numbered in plan order; a replacement takes its predecessor's slot."""
        actor = self.make_actor(plan, slot)
        self.slots[actor] = slot
        return actor

    def _await_ready(self, actors: list) -> None:
        try:
            pids = ray.get([a.ready.remote() for a in actors], timeout=self.startup_timeout_s)
        except GetTimeoutError:
            raise PlacementError(
                f"{len(actors)} client actors were not all running after "
                f"{self.startup_timeout_s:.0f} s: the cluster ({ray.available_resources()}) "
                "cannot place them; lower runtime.max_actors or runtime.actor_memory_gb"
            ) from None
        self.pids.update(zip(actors, pids, strict=True))

    def actors(self, fraction: float) -> int:
        return len(self.pool[fraction])

    def run(
        self, jobs: list[Job], submit: Submit, timeout_s: float, retries: int, depth: int = 2
    ) -> Iterator[Outcome]:
        """Run the jobs on their shapes' actors; yield each client's outcome as it comes.

        Each actor holds up to ``depth`` jobs, so the next starts the moment one ends
        (Ray runs an actor's calls in order) instead of after a round trip to this
        driver. A call streams its clients back one by one, so when its actor dies, or a
        client runs past ``timeout_s`` (counted from the previous client's end, or from
        the call reaching the head of its actor's queue), only the clients not yet back
        are retried, on another actor of the shape (``retries`` times), then reported
        lost. The actor is killed and replaced; calls queued behind it, which never
        started, are resubmitted. An exception raised by the client code itself is a
        bug, not a fault: it ends the run.
        """
        queues = {f: deque(j for j in jobs if j.fraction == f) for f in self.pool}
        queued: dict[Any, deque] = {a: deque() for pool in self.pool.values() for a in pool}
        running: dict[ray.ObjectRefGenerator, _Call] = {}
        deadlines: dict[ray.ObjectRefGenerator, float] = {}  # the call at each queue's head

        def promote(actor) -> None:
            if queued[actor]:
                deadlines.setdefault(queued[actor][0], time.monotonic() + timeout_s)

        def finish(call_ref) -> None:
            actor = running.pop(call_ref).actor
            queued[actor].remove(call_ref)
            deadlines.pop(call_ref, None)
            promote(actor)

        def fail(actor, kind: str) -> Iterator[Outcome]:
            """The actor is gone: its head call used an attempt, the rest never started."""
            line = [running.pop(ref) for ref in queued.pop(actor)]
            for ref in list(deadlines):
                if ref not in running:
                    deadlines.pop(ref)
            for call in line[1:]:
                queues[call.job.fraction].appendleft(call.job)
            head = line[0] if line else None
            retried, kept, given_up = (), (), ()
            if head is not None:
                kept = tuple(head.delivered)
                rest = tuple(c for c in head.job.clients if c not in head.delivered)
                if rest and head.job.attempt < retries:
                    log.warning("clients %s: %s, retrying", rest, kind.replace("_", " "))
                    retry = dataclasses.replace(
                        head.job, clients=rest, attempt=head.job.attempt + 1
                    )
                    queues[retry.fraction].appendleft(retry)
                    retried = rest
                elif rest:
                    given_up = rest
            old_pid = self.pids.get(actor, -1)
            replacement = self._bury(actor)
            queued[replacement] = deque()
            self.events.append(
                FaultEvent(kind, old_pid, self.pids[replacement], retried, kept, given_up)
            )
            for client in given_up:
                yield Outcome(head.job, client, failure="lost")

        while running or any(queues.values()):
            for fraction, queue in queues.items():
                while queue:
                    actor = min(self.pool[fraction], key=lambda a: len(queued[a]))
                    if len(queued[actor]) >= depth:
                        break
                    job = queue.popleft()
                    call_ref = submit(actor, job)
                    running[call_ref] = _Call(job, actor)
                    queued[actor].append(call_ref)
                    promote(actor)
            wait_s = min(deadlines.values(), default=np.inf) - time.monotonic()
            done, _ = ray.wait(list(running), num_returns=1, timeout=min(max(wait_s, 0), 5.0))
            for call_ref in done:
                call = running[call_ref]
                try:
                    item = next(call_ref)
                    if call.upload_ref is None:
                        call.upload_ref = item
                        continue
                    report = ray.get(item, timeout=CONTROL_TIMEOUT_S)
                except StopIteration:
                    if len(call.delivered) == len(call.job.clients):
                        finish(call_ref)
                    else:  # its last item was the error that ended it, taken as an upload
                        yield from fail(call.actor, "client_actor_died")
                    continue
                except RayActorError:
                    yield from fail(call.actor, "client_actor_died")
                    continue
                call.delivered.append(report.client_id)
                yield Outcome(call.job, report.client_id, report, call.upload_ref)
                call.upload_ref = None
                deadlines[call_ref] = time.monotonic() + timeout_s
            now = time.monotonic()
            for call_ref in [r for r, deadline in deadlines.items() if deadline < now]:
                if call_ref not in running:  # failed along with an earlier one
                    continue
                # A call that answered while this driver was busy (starting a replacement
                # blocks it) is not late: it is read on the next pass.
                if ray.wait([call_ref], num_returns=1, timeout=0)[0]:
                    continue
                call = running[call_ref]
                log.warning("clients %s: past their time limit", call.job.clients)
                yield from fail(call.actor, "client_timed_out")

    def _bury(self, dead) -> Any:
        """Kill an actor and return its replacement, running (a model built) and in its slot."""
        ray.kill(dead, no_restart=True)
        fraction = next(f for f, pool in self.pool.items() if dead in pool)
        self.pids.pop(dead, None)
        slot = self.slots.pop(dead)
        while True:
            replacement = self._new_actor(self.plans[fraction], slot)
            try:  # wait here, so its start-up never counts against a client's time limit
                self._await_ready([replacement])
                break
            except RayActorError:  # died while starting (a chaos test, a node lost): again
                self.slots.pop(replacement)
                log.warning("a replacement client actor died while starting; starting another")
        self.pool[fraction] = [replacement if a is dead else a for a in self.pool[fraction]]
        return replacement

    def shutdown(self) -> None:
        """Kill exactly the actors this pool created (never anything else of the user's)."""
        for actor in self.slots:
            ray.kill(actor, no_restart=True)
        self.slots, self.pids = {}, {}
        self.pool = {f: [] for f in self.pool}
