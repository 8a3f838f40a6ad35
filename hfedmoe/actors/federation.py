"""The Ray driver: rounds of budget-shaped client actors and a streaming aggregator actor.

Per round the global state goes into the object store once (``ray.put``); sampled clients
run on actors of their resource shape (``pools.py``); each finished update is handed to
the aggregator actor in the round's sampled order, as soon as every earlier client has
finished, so aggregation streams, holds O(model) memory, and sums in the same order as the
in-process runner: the two give the same metrics for the same config and seed. The
driver then evaluates, logs to MLflow, checkpoints, and advances the simulated clock.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import yaml
from tqdm import tqdm

from hfedmoe.actors.pools import CONTROL_TIMEOUT_S, ClientPools, Job, PoolPlan, plan_pools
from hfedmoe.actors.workers import AggregatorWorker, ClientWorker
from hfedmoe.platform.checkpoint import (
    history_from_json,
    history_to_json,
    load_checkpoint,
    save_checkpoint,
)
from hfedmoe.platform.config import ConfigError, ExperimentConfig, check_paths, load_config
from hfedmoe.platform.devices import budget_summary, full_step_memory_bytes
from hfedmoe.platform.federation import Federation, build_federation
from hfedmoe.platform.local import ClientUpdate
from hfedmoe.platform.models import ModelState
from hfedmoe.platform.simulation import (
    History,
    RoundBook,
    RoundMetrics,
    aggregation_order,
    evaluate,
    sample_clients,
    should_evaluate,
)
from hfedmoe.tuning.tracking import RunTracker, summarise

log = logging.getLogger(__name__)

GiB = 2**30
STARTUP_TIMEOUT_S = 300.0  # client actors placed and models built


@dataclass
class RunResult:
    history: History
    state: ModelState
    run_dir: Path
    mlflow_run_id: str | None


def new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output_dir).resolve() / f"{cfg.name}-{stamp}"


def connect(address: str | None) -> bool:
    """Join the configured cluster or start a local one; True if this call started Ray."""
    if ray.is_initialized():
        return False
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


def run_federation(
    cfg: ExperimentConfig | None = None,
    run_dir: Path | None = None,
    resume: Path | None = None,
    progress: bool = True,
    parent_run_id: str | None = None,
    on_round=None,
    placement: tuple[str, float, float] | None = None,
) -> RunResult:
    """Run (or resume) a federation on Ray with tracking and per-round checkpoints.

    placement: (device, capacity, memory) for the client pools instead of the whole
    cluster's; a sweep trial passes its share (its placement group's bundles).
    """
    if resume is not None:
        run_dir = Path(resume).resolve()
        cfg = load_config(run_dir / "config.yaml")
        checkpoint = load_checkpoint(run_dir)
        if checkpoint is None:
            raise ConfigError(f"--resume {run_dir}: no checkpoint in this run directory")
    else:
        check_paths(cfg)
        run_dir = Path(run_dir).resolve() if run_dir else new_run_dir(cfg)
        if load_checkpoint(run_dir) is not None:
            raise ConfigError(f"{run_dir} already holds a run; resume it with --resume {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        checkpoint = None

    started_ray = connect(cfg.runtime.address)
    with contextlib.ExitStack() as cleanup:
        if started_ray:
            cleanup.callback(ray.shutdown)
        fed, adapter = build_federation(cfg)
        device, capacity, memory = placement or cluster_capacity(cfg.runtime.device)
        plans, actor_bytes = size_pools(
            cfg, fed.budgets.resource_fraction, fed.footprint, device, capacity, memory
        )
        log.info("client pools: %s", plans)

        if checkpoint is None:
            global_state, history, clock, start = adapter.state(), History(), 0.0, 0
            run_id = None
        else:
            global_state, progress_record = checkpoint
            history = history_from_json(progress_record["history"])
            clock = progress_record["clock"]
            start = progress_record["round"] + 1
            run_id = progress_record.get("mlflow_run_id")
        tracker = None
        if cfg.tracking.enabled:
            tracker = RunTracker(cfg, run_dir, run_id=run_id, parent_run_id=parent_run_id)
            run_id = tracker.run_id

        pools = _start_pools(cfg, fed, plans, device, actor_bytes)
        cleanup.callback(pools.shutdown)
        last_bundle = 1 + sum(p.actors for p in plans)
        aggregator = (
            ray.remote(AggregatorWorker).options(num_cpus=0, **_bundle(last_bundle)).remote(cfg)
        )
        cleanup.callback(ray.kill, aggregator, no_restart=True)

        bytes_down = global_state.num_bytes()
        # The global weights enter the object store once: here, then as the aggregator's
        # result each round (the driver reads that zero-copy and never puts it back).
        state_ref = ray.put(global_state)
        bar = tqdm(total=cfg.federation.rounds, initial=start, disable=not progress, unit="round")
        cleanup.callback(bar.close)
        try:
            for round_index in range(start, cfg.federation.rounds):
                started = time.perf_counter()
                state_ref, global_state, metrics = _run_round(
                    cfg, fed, adapter, pools, aggregator, state_ref, round_index, bytes_down,
                    clock, history,
                )  # fmt: skip
                clock = metrics.simulated_seconds
                metrics.wall_seconds = time.perf_counter() - started
                # Log before checkpointing: a crash in between logs a round twice on
                # resume (harmless) instead of never.
                if tracker is not None:
                    tracker.log_round(metrics)
                save_checkpoint(
                    run_dir,
                    round_index,
                    global_state,
                    {"clock": clock, "history": history_to_json(history), "mlflow_run_id": run_id},
                )
                bar.update(1)
                bar.set_postfix_str(_postfix(metrics))
                if on_round is not None:
                    on_round(metrics, global_state)
        except BaseException:
            if tracker is not None:
                tracker.finish("FAILED")
            raise
        if tracker is not None:
            tracker.log_summary(summarise(history, cfg.federation.target_accuracy))
            extra = {
                "split": fed.split,
                "budgets": budget_summary(fed.budgets),
                "pools": [asdict(p) for p in plans],
                "footprint": asdict(fed.footprint),
            }
            tracker.log_artifacts(cfg, history, run_dir, extra)
            tracker.finish()
    return RunResult(history, global_state, run_dir, run_id)


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


def _start_pools(cfg, fed: Federation, plans: list[PoolPlan], device: str, actor_bytes: float):
    train_ref = ray.put(fed.train)
    worker = ray.remote(ClientWorker)

    def make_actor(plan: PoolPlan, slot: int):
        resources = {"num_gpus": plan.fraction, "num_cpus": 0} if device == "cuda" else {
            "num_cpus": plan.fraction
        }  # fmt: skip
        threads = cfg.threads or max(1, int(plan.fraction))
        options = {**resources, **_bundle(1 + slot), "memory": int(actor_bytes), "max_restarts": 0}
        return worker.options(**options).remote(
            cfg, train_ref, fed.footprint, fed.num_labels, device, threads
        )

    return ClientPools(plans, make_actor, STARTUP_TIMEOUT_S)


def _run_round(
    cfg: ExperimentConfig,
    fed: Federation,
    adapter,
    pools: ClientPools,
    aggregator,
    state_ref: ray.ObjectRef,
    round_index: int,
    bytes_down: int,
    clock: float,
    history: History,
) -> tuple[ray.ObjectRef, ModelState, RoundMetrics]:
    """One round from the global state in ``state_ref``: (new state's ref, new state, metrics)."""
    fn = cfg.federation
    ray.get(aggregator.begin.remote(state_ref), timeout=CONTROL_TIMEOUT_S)
    sampled = sample_clients(fn.num_clients, fn.clients_per_round, cfg.seed, round_index)
    order = aggregation_order(sampled, fed.budgets.resource_fraction)
    jobs = chunk_jobs(order, fed.budgets.resource_fraction, pools)

    def submit(actor, job: Job):
        work = [(c, fed.shards[c], fed.budgets[c]) for c in job.clients]
        return actor.train_many.options(num_returns=2).remote(
            work, round_index, state_ref, bytes_down, job.attempt
        )

    outcomes, verdicts, next_position = {}, {}, 0
    for outcome in pools.run(jobs, submit, cfg.runtime.client_timeout_s, cfg.runtime.retries):
        outcomes[outcome.job.position] = outcome
        # Hand chunks over in aggregation order: streaming, yet summed as in one process.
        while next_position in outcomes:
            ready = outcomes[next_position]
            if ready.failure is None:
                verdicts[next_position] = aggregator.add_many.remote(ready.update_ref)
            ready.update_ref = None  # the aggregator's task holds the object now
            next_position += 1
    reasons = ray.get(list(verdicts.values()), timeout=CONTROL_TIMEOUT_S)
    reasons = dict(zip(verdicts, reasons, strict=True))
    book = RoundBook(round_index, fed)
    for job in jobs:
        outcome = outcomes[job.position]
        if outcome.failure is not None:
            for c in job.clients:
                book.record(ClientUpdate(c, len(fed.shards[c]), failure=outcome.failure))
            continue
        for stats, reason in zip(outcome.stats, reasons[job.position], strict=True):
            stats.failure = reason
            book.record(stats)
    new_state_ref, report_ref = aggregator.finalize.options(num_returns=2).remote()
    new_state, report = ray.get([new_state_ref, report_ref], timeout=CONTROL_TIMEOUT_S)
    accuracy = test_loss = None
    if should_evaluate(cfg, round_index):
        adapter.load_state(new_state)
        accuracy, test_loss = evaluate(adapter, fed.test, fn.eval_batch_size)
    return new_state_ref, new_state, book.close(report, accuracy, test_loss, clock, history)


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


def _postfix(m: RoundMetrics) -> str:
    failed = m.sampled - m.succeeded
    acc = "-" if m.accuracy is None else f"{m.accuracy:.3f}"
    return f"acc={acc} failed={failed}/{m.sampled} sim={m.simulated_seconds:.1f}s"
