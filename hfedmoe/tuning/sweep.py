"""Ray Tune sweeps in which each trial is a whole federation.

A sweep file names a base experiment config, fixed overrides, and a search space over
dotted config keys (tau, beta, lambda, the budget distribution or whole ``budgets``
sections by name, the strategy, the client count, seeds...). Each trial runs
the engine on the Ray executor inside one placement group: a bundle for its driver, one per client
actor its pools will create, one for its aggregator; Tune captures the trial's child
actors into that group, so trials neither deadlock nor oversubscribe. The sweep is a
parent MLflow run, each trial a child run with the per-round metrics and artifacts of a
single run. At the end a table of trials (config, final accuracy, rounds and simulated
time to the target accuracy, failures) is printed and saved as CSV and as an artifact of
the parent run, with the best config.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hfedmoe.platform.budgets.drawing import draw_budgets
from hfedmoe.platform.config import (
    ConfigError,
    ExperimentConfig,
    check_paths,
    check_tracking_uri,
    parse_config,
    read_yaml,
    set_dotted,
    validation_message,
)
from hfedmoe.platform.engine import Callback, Run
from hfedmoe.platform.plugins import load_plugins
from hfedmoe.platform.records import RoundMetrics

DRIVER_CPUS = 0.25  # a trial's driver waits on its actors most of the time
AGGREGATOR_CPUS = 0.01  # placement groups need a non-empty bundle; aggregation is light


class SearchSpec(BaseModel):
    """One dimension: exactly one of grid, choice, uniform, loguniform, randint.

    grid and choice take a list of values or a mapping of names to values (the names
    appear in the results table, e.g. named budget distributions).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    grid: list[Any] | dict[str, Any] | None = None
    choice: list[Any] | dict[str, Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchSpec:
        given = [
            k
            for k in ("grid", "choice", "uniform", "loguniform", "randint")
            if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of grid, choice, uniform, loguniform, randint "
                f"(got {given or 'none'})"
            )
        options = self.grid if self.grid is not None else self.choice
        if options is not None and len(options) == 0:
            raise ValueError("grid/choice needs at least one value")
        for bounds in (self.uniform, self.loguniform, self.randint):
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"range {list(bounds)} must have low < high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs positive bounds")
        return self

    def options(self) -> dict[Any, Any] | None:
        """Named finite options (other lists of lists/mappings by their JSON), None for ranges."""
        options = self.grid if self.grid is not None else self.choice
        if options is None:
            return None
        if isinstance(options, dict):
            return dict(options)
        if all(isinstance(v, str | int | float | bool) for v in options):
            return {v: v for v in options}  # scalars name themselves
        return {_label(v): v for v in options}

    def probes(self) -> list[Any]:
        """Values to validate against the base config before any trial starts."""
        named = self.options()
        if named is not None:
            return list(named.values())
        return list(self.uniform or self.loguniform or self.randint)


class AshaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    grace_period: int = Field(1, ge=1, description="rounds before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(..., description="the sweep's name: its directory and MLflow parent run")
    base: str = Field(..., description="experiment YAML, relative to the sweep file")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value")
    search: dict[str, SearchSpec] = Field(..., min_length=1)
    num_samples: int = Field(1, ge=1, description="samples of the random dimensions (x grid)")
    asha: AshaConfig | None = Field(None, description="early stopping on per-round accuracy")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: from cluster")
    trial_units: float | None = Field(
        None,
        gt=0,
        description="CPUs (GPUs when runtime.device is cuda) reserved per trial; default: "
        "one per resource shape plus the trial's driver and aggregator",
    )
    max_failures: int = Field(1, ge=0, description="retries of a failed trial")
    storage_path: str = Field("runs/sweeps", description="Tune's storage (made absolute)")
    tracking_uri: str | None = Field(None, description="MLflow store (default: sqlite in it)")
    experiment: str | None = Field(None, description="MLflow experiment (default: name)")
    target_accuracy: float | None = Field(None, gt=0, le=1)

    @field_validator("tracking_uri")
    @classmethod
    def _a_tracking_uri(cls, uri: str | None) -> str | None:
        return None if uri is None else check_tracking_uri(uri)

    @model_validator(mode="after")
    def _asha_sees_real_accuracy(self) -> SweepConfig:
        if self.asha is None:
            return self
        fixed = {"federation.rounds", "federation.eval_every"} & set(self.search)
        if fixed:
            raise ValueError(
                f"asha: do not search {sorted(fixed)}; ASHA's rungs need one round count "
                "and accuracy measured every round"
            )
        return self


def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def load_sweep(path: str | Path) -> tuple[SweepConfig, dict[str, Any]]:
    """Read and validate a sweep file; return it and the base config as a raw mapping.

    Every finite option and both ends of every range are applied to the base config and
    validated, so a bad value fails here, naming the key, before any trial starts.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    raw = read_yaml(path, "sweep file") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping (name, base, search, ...)")
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {validation_message(err, SweepConfig)}") from None
    base_path = (path.parent / sweep.base).resolve()
    if not base_path.is_file():
        raise ConfigError(
            f"{path}: base: {base_path} does not exist; give the experiment YAML's path "
            "relative to the sweep file"
        )
    base = read_yaml(base_path, "config") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{base_path}: the top level must be a mapping of sections")
    for key, value in sweep.overrides.items():
        set_dotted(base, key, value)
    base_cfg = parse_config(base, f"{path}: base {base_path} with overrides")
    check_paths(base_cfg)
    if sweep.asha is not None and base_cfg.federation.eval_every != 1:
        raise ConfigError(
            f"sweep.asha: the base config evaluates every {base_cfg.federation.eval_every} "
            "rounds; ASHA compares per-round accuracy, so set federation.eval_every: 1"
        )
    for key, spec in sweep.search.items():
        for value in spec.probes():
            try:
                parse_config(_with(base, {key: value}))
            except ConfigError as err:
                raise ConfigError(f"sweep.search.{key} = {_label(value)}: {err}") from None
    return sweep, base


def _with(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    raw = json.loads(json.dumps(base))  # deep copy of plain YAML data
    for key, value in values.items():
        set_dotted(raw, key, value)
    return raw


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's search space; finite options are searched by name and resolved in the trial."""
    from ray import tune

    space = {}
    for key, spec in sweep.search.items():
        named = spec.options()
        if spec.grid is not None:
            space[key] = tune.grid_search(list(named))
        elif spec.choice is not None:
            space[key] = tune.choice(list(named))
        elif spec.uniform is not None:
            space[key] = tune.uniform(*spec.uniform)
        elif spec.loguniform is not None:
            space[key] = tune.loguniform(*spec.loguniform)
        else:
            space[key] = tune.randint(spec.randint[0], spec.randint[1] + 1)
    return space


def trial_config(
    sweep: SweepConfig, base: dict[str, Any], params: dict[str, Any]
) -> ExperimentConfig:
    """The experiment config of one trial: base, overrides, then the sampled values."""
    values = {}
    for key, picked in params.items():
        named = sweep.search[key].options()
        values[key] = named[picked] if named is not None else picked
    return parse_config(_with(base, values))


def client_share(cfg: ExperimentConfig, per_trial: float) -> tuple[str, float]:
    """(device, CPUs or GPUs) a trial's client actors share: its units minus the rest."""
    if cfg.runtime.device == "cuda":
        return "cuda", float(max(1, math.floor(per_trial)))
    return "cpu", per_trial - DRIVER_CPUS - AGGREGATOR_CPUS


def trial_bundles(cfg: ExperimentConfig, per_trial: float, footprint) -> list[dict[str, float]]:
    """The trial's placement group: its driver, one bundle per client actor, aggregator.

    The pools inside the trial are sized by the same function from the same inputs, so
    every actor the trial creates finds its bundle.
    """
    from hfedmoe.actors.executor import size_pools

    device, capacity = client_share(cfg, per_trial)
    fractions = draw_budgets(cfg.budgets, cfg.federation.num_clients, cfg.seed, 1.0)
    plans, actor_bytes = size_pools(
        cfg, fractions.resource_fraction, footprint, device, capacity, memory=0.0
    )
    unit = "GPU" if device == "cuda" else "CPU"
    actors = [
        {unit: p.fraction, "memory": float(int(actor_bytes))}
        for p in plans
        for _ in range(p.actors)
    ]
    return [{"CPU": DRIVER_CPUS}, *actors, {"CPU": AGGREGATOR_CPUS}]


class _Footprints:
    """Model footprints by what determines them, measured once per sweep."""

    def __init__(self) -> None:
        self.cache: dict[str, Any] = {}

    def __call__(self, cfg: ExperimentConfig):
        key = json.dumps(
            [
                cfg.model.model_dump(mode="json"),
                cfg.task.model_dump(mode="json"),  # a causal LM's head and loss differ
                cfg.data.max_length,
                cfg.federation.batch_size,
                cfg.seed,
            ]
        )
        if key not in self.cache:
            from hfedmoe.platform.federation import build_federation

            self.cache[key] = build_federation(cfg)[0].footprint
        return self.cache[key]


def trial_share(
    sweep: SweepConfig, base: ExperimentConfig, cluster_units: float
) -> tuple[float, int]:
    """(CPUs or GPUs reserved per trial, trials at once), from the sweep or the cluster.

    By default a trial gets one unit per resource shape of the base config (one actor per
    shape, at least) plus its driver and aggregator, and as many trials run at once as
    fit; on a cluster smaller than that, one trial takes the whole cluster.
    """
    fractions = draw_budgets(base.budgets, base.federation.num_clients, base.seed, 1.0)
    shapes = len(set(fractions.resource_fraction.tolist()))
    if sweep.trial_units is not None and sweep.trial_units > cluster_units:
        raise ConfigError(
            f"sweep.trial_units ({sweep.trial_units:g}) is more than the cluster has "
            f"({cluster_units:g}): no trial could ever start"
        )
    want = sweep.trial_units or min(cluster_units, shapes + DRIVER_CPUS + AGGREGATOR_CPUS)
    concurrent = sweep.max_concurrent_trials or max(1, math.floor(cluster_units / want))
    if sweep.trial_units is None and concurrent == 1:
        want = cluster_units  # one trial at a time: give it everything
    return want, concurrent


@dataclass
class SweepResult:
    sweep_dir: Path
    parent_run_id: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None


def run_sweep(path: str | Path, progress: bool = True, plugins: Sequence[str] = ()) -> SweepResult:
    """Run every trial of a sweep file on Ray Tune; return the table of trials.

    ``plugins`` (``--plugin``) are imported here before the sweep is validated, and by
    every trial before it builds its config (a path must exist on the trial's node).
    """
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from hfedmoe.actors.executor import connect
    from hfedmoe.tracking.mlflow_run import experiment_id, unreachable

    plugins = load_plugins(plugins)
    sweep, base_raw = load_sweep(path)
    base = parse_config(base_raw)
    # The parent run must exist before any trial can nest under it: no buffering here.
    problem = unreachable(sweep.tracking_uri) if sweep.tracking_uri else None
    if problem is not None:
        raise ConfigError(
            f"sweep tracking_uri {sweep.tracking_uri}: {problem}. Start that server (e.g. "
            "scripts/mlflow-server), correct tracking_uri, or leave it unset for a sqlite "
            "store in the sweep's directory"
        )
    storage = Path(sweep.storage_path).resolve()
    sweep_dir = storage / f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking_uri = sweep.tracking_uri or f"sqlite:///{sweep_dir / 'mlflow.db'}"
    experiment = sweep.experiment or sweep.name

    started_ray = connect(base.runtime.address)
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        unit = "GPU" if base.runtime.device == "cuda" else "CPU"
        cluster_units = float(ray.cluster_resources().get(unit, 0.0))
        per_trial, concurrent = trial_share(sweep, base, cluster_units)
        client = MlflowClient(tracking_uri=tracking_uri)
        parent = client.create_run(
            experiment_id(client, experiment, tracking_uri),
            run_name=sweep.name,
            tags={"hfedmoe.sweep": "parent"},
        )
        parent_id = parent.info.run_id
        (sweep_dir / "sweep.yaml").write_text(Path(path).read_text())
        client.log_artifact(parent_id, str(sweep_dir / "sweep.yaml"))
        footprints = _Footprints()

        def resources(params: dict[str, Any]):
            cfg = trial_config(sweep, base_raw, params)
            bundles = trial_bundles(cfg, per_trial, footprints(cfg))
            return tune.PlacementGroupFactory(bundles, strategy="PACK")

        trainable = tune.with_parameters(
            _trial,
            sweep=sweep,
            base=base_raw,
            per_trial=per_trial,
            parent_run_id=parent_id,
            tracking_uri=tracking_uri,
            experiment=experiment,
            sweep_dir=str(sweep_dir),
            plugins=plugins,
        )
        scheduler = None
        if sweep.asha is not None:
            scheduler = ASHAScheduler(
                time_attr="round",
                max_t=base.federation.rounds,
                grace_period=sweep.asha.grace_period,
                reduction_factor=sweep.asha.reduction_factor,
            )
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                num_samples=sweep.num_samples,
                max_concurrent_trials=concurrent,
                scheduler=scheduler,
                metric="accuracy",
                mode="max",
            ),
            run_config=tune.RunConfig(
                name=sweep_dir.name,
                storage_path=str(storage / "tune"),
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                verbose=1 if progress else 0,
            ),
        )
        grid = tuner.fit()
        rows = [_row(sweep, result) for result in grid]
        best = max(
            (r for r in rows if r.get("final_accuracy") is not None),
            key=lambda r: r["final_accuracy"],
            default=None,
        )
        _finish_parent(client, parent_id, sweep, base_raw, sweep_dir, rows, best)
        return SweepResult(sweep_dir, parent_id, rows, best)
    finally:
        if started_ray:
            ray.shutdown()


class TuneReport(Callback):
    """Reports every round to Tune, with the trial's earlier rounds when it was retried."""

    def __init__(self, trial_id: str, target: float | None, attempt: int) -> None:
        self.trial_id = trial_id
        self.target = target
        self.attempt = attempt  # 1 on the first try, 2 on Tune's first retry, ...
        self.started = time.perf_counter()
        self.startup_seconds: float | None = None
        self.seen: list[RoundMetrics] = []

    def on_run_begin(self, run: Run) -> None:
        self.seen = list(run.history.rounds)  # a retried trial keeps its earlier rounds

    def after_round(self, run: Run, metrics: RoundMetrics) -> bool:
        from ray import tune

        if self.startup_seconds is None:  # data, model, actors: all before the first round
            self.startup_seconds = time.perf_counter() - self.started - metrics.wall_seconds
        self.seen.append(metrics)
        progress = _progress(self.seen, self.target, self.trial_id)
        tune.report({**progress, "startup_seconds": self.startup_seconds, "attempts": self.attempt})
        return False


def _trial(
    params: dict[str, Any],
    sweep: SweepConfig,
    base: dict[str, Any],
    per_trial: float,
    parent_run_id: str,
    tracking_uri: str,
    experiment: str,
    sweep_dir: str,
    plugins: list[str],
) -> None:
    """One trial: a federation on the trial's placement group, reporting every round."""
    from ray import tune

    from hfedmoe.launch import launch
    from hfedmoe.platform.checkpoint import load_checkpoint

    trial_id = tune.get_context().get_trial_id()
    load_plugins(plugins)  # this process may be new: the config names their classes
    cfg = trial_config(sweep, base, params)
    label = " ".join(f"{key.rsplit('.', 1)[-1]}={_label(value)}" for key, value in params.items())
    cfg = cfg.model_copy(
        update={
            "name": f"{trial_id.rsplit('_', 1)[-1]} {label}",
            "tracking": cfg.tracking.model_copy(
                update={"enabled": True, "uri": tracking_uri, "experiment": experiment}
            ),
        }
    )
    run_dir = Path(sweep_dir) / "trials" / trial_id
    # A retried trial continues from its last completed round, and counts its attempts.
    resume = run_dir if load_checkpoint(run_dir) is not None else None
    attempts_file = Path(sweep_dir) / "trials" / f"{trial_id}.attempts"
    attempt = int(attempts_file.read_text()) + 1 if attempts_file.is_file() else 1
    attempts_file.parent.mkdir(parents=True, exist_ok=True)
    attempts_file.write_text(str(attempt))
    device, capacity = client_share(cfg, per_trial)
    target = sweep.target_accuracy or cfg.federation.target_accuracy
    launch(
        None if resume else cfg,
        run_dir=run_dir,
        resume=resume,
        progress=False,
        parent_run_id=parent_run_id,
        callbacks=[TuneReport(trial_id, target, attempt)],
        placement=(device, capacity, 0.0),
        plugins=plugins,
    )


def _progress(seen: list[RoundMetrics], target: float | None, trial_id: str) -> dict[str, Any]:
    accuracies = [m for m in seen if m.accuracy is not None]
    reached = next((m for m in accuracies if target is not None and m.accuracy >= target), None)
    last = seen[-1]
    return {
        "round": last.round + 1,
        "accuracy": accuracies[-1].accuracy if accuracies else 0.0,
        "final_accuracy": accuracies[-1].accuracy if accuracies else None,
        "rounds_to_target": None if reached is None else reached.round + 1,
        "simulated_seconds_to_target": None if reached is None else reached.simulated_seconds,
        "simulated_seconds": last.simulated_seconds,
        "client_failures": sum(m.sampled - m.succeeded for m in seen),
        "hfedmoe_trial_id": trial_id,
    }


def _row(sweep: SweepConfig, result) -> dict[str, Any]:
    metrics = result.metrics or {}
    row: dict[str, Any] = {
        "trial": metrics.get("hfedmoe_trial_id") or Path(result.path).name,
        "status": "ERROR" if result.error else "OK",
    }
    for key in sweep.search:
        value = (result.config or {}).get(key)
        row[key] = value if isinstance(value, str | int | float) else _label(value)
    for key in (
        "round",
        "final_accuracy",
        "rounds_to_target",
        "simulated_seconds_to_target",
        "simulated_seconds",
        "client_failures",
        "startup_seconds",
        "time_total_s",
        "attempts",
    ):
        value = metrics.get(key)
        row[key] = (
            None if value is None or (isinstance(value, float) and np.isnan(value)) else value
        )
    row["error"] = str(result.error).splitlines()[0][:200] if result.error else ""
    return row


def _finish_parent(client, parent_id, sweep, base_raw, sweep_dir: Path, rows, best) -> None:
    table = sweep_dir / "trials.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    client.log_artifact(parent_id, str(table))
    print(format_table(rows))
    if best is not None:
        params = {k: best[k] for k in sweep.search}
        resolved = trial_config(sweep, base_raw, params)
        best_file = sweep_dir / "best_config.yaml"
        best_file.write_text(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False))
        client.log_artifact(parent_id, str(best_file))
        client.log_metric(parent_id, "best_final_accuracy", float(best["final_accuracy"]))
        print(f"best: {params} -> final accuracy {best['final_accuracy']:.4f} ({best_file})")
    failed = sum(1 for r in rows if r["status"] != "OK")
    client.log_metric(parent_id, "failed_trials", float(failed))
    retried = sum(1 for r in rows if (r.get("attempts") or 1) > 1)
    client.log_metric(parent_id, "retried_trials", float(retried))
    client.set_terminated(parent_id, status="FINISHED")


def format_table(rows: list[dict[str, Any]]) -> str:
    """The trials as an aligned plain-text table."""
    if not rows:
        return "(no trials)"
    columns = [c for c in rows[0] if c != "error"] + ["error"]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
