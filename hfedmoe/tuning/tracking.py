"""MLflow tracking of a federation: params, per-round metrics, artifacts.

One federation is one MLflow run: the flattened config as params, every round's metrics
with step = round, and at the end the resolved config, the learning curves, the expert
usage heatmap, the selected-experts-vs-budget plot and the history as JSON. A sweep's
trials are child runs of the sweep's parent run (tag ``mlflow.parentRunId``).

The default store is a sqlite file beside the run directory (``runs/mlflow.db`` for the
default layout), so all runs under one output directory compare in one MLflow UI; MLflow
3 refuses the plain file store, and an absolute sqlite path works from any working
directory and any Ray worker. Concurrent sweeps and clusters should use a server.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from hfedmoe.platform.config import ExperimentConfig
from hfedmoe.platform.simulation import History, RoundMetrics
from hfedmoe.tuning import plots

PARENT_TAG = "mlflow.parentRunId"
_PARAM_LIMIT = 500  # characters MLflow stores reliably in every backend


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir).resolve().parent / 'mlflow.db')}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: config sections as dotted MLflow params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Get or create the experiment; a sqlite store keeps artifacts beside the database."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = str(Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    # The MLflow 3 UI opens unlabelled experiments in its GenAI layout; ours are training.
    tags = {"mlflow.experimentKind": "custom_model_development"}
    return client.create_experiment(name, artifact_location=location, tags=tags)


class RunTracker:
    """Logs one federation to MLflow through an explicit client and run id."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: Path,
        run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        self.uri = cfg.tracking.uri or default_tracking_uri(run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:  # resuming: keep logging into the same run
            self.run_id = run_id
            return
        all_tags = {"hfedmoe.strategy": cfg.federation.strategy}
        if parent_run_id is not None:
            all_tags[PARENT_TAG] = parent_run_id
        experiment = experiment_id(self.client, cfg.tracking.experiment, self.uri)
        run = self.client.create_run(experiment, run_name=cfg.name, tags=all_tags)
        self.run_id = run.info.run_id
        params = [
            Param(k, v[:_PARAM_LIMIT]) for k, v in flatten(cfg.model_dump(mode="json")).items()
        ]
        for start in range(0, len(params), 100):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_round(self, metrics: RoundMetrics) -> None:
        stamp = int(time.time() * 1000)
        values = [
            Metric(key, float(value), stamp, metrics.round)
            for key, value in asdict(metrics).items()
            if key != "round" and value is not None and math.isfinite(float(value))
        ]
        self.client.log_batch(self.run_id, metrics=values)

    def log_summary(self, summary: dict[str, float | None]) -> None:
        stamp = int(time.time() * 1000)
        values = [Metric(k, float(v), stamp, 0) for k, v in summary.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=values)

    def log_artifacts(
        self, cfg: ExperimentConfig, history: History, run_dir: Path, extra: dict[str, Any]
    ) -> None:
        """Write the run's figures and records into run_dir/artifacts and upload them."""
        out = Path(run_dir) / "artifacts"
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        )
        plots.learning_curves(history, out / "learning_curves.png")
        plots.usage_heatmap(history, out / "expert_usage.png")
        plots.selected_vs_budget(history, out / "selected_vs_budget.png")
        rounds = [asdict(r) for r in history.rounds]
        (out / "rounds.json").write_text(json.dumps(rounds, indent=1))
        (out / "clients.json").write_text(json.dumps([asdict(c) for c in history.clients]))
        for name, payload in extra.items():
            (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
        self.client.log_artifacts(self.run_id, str(out))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def summarise(history: History, target_accuracy: float | None) -> dict[str, float | None]:
    """Run-level numbers for tables: final accuracy, time to target, failures, traffic."""
    rounds_to, seconds_to = (None, None)
    if target_accuracy is not None:
        rounds_to, seconds_to = history.time_to_accuracy(target_accuracy)
    return {
        "final_accuracy": history.final_accuracy(),
        "rounds_to_target": None if rounds_to is None else rounds_to + 1,
        "simulated_seconds_to_target": seconds_to,
        "simulated_seconds_total": history.rounds[-1].simulated_seconds if history.rounds else 0.0,
        "client_failures": sum(
            r.failed_oom + r.failed_deadline + r.failed_non_finite + r.failed_lost
            for r in history.rounds
        ),
        "bytes_communicated": sum(r.bytes_down + r.bytes_up for r in history.rounds),
    }
