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

from hfedmoe.platform.budgets.drawing import budget_summary
from hfedmoe.platform.config import ExperimentConfig
from hfedmoe.platform.engine import Callback, Run
from hfedmoe.platform.records import History, RoundMetrics
from hfedmoe.tracking import plots

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


def run_name(cfg: ExperimentConfig) -> str:
    """What the MLflow UI lists a run as: the experiment name, strategy and seed."""
    return f"{cfg.name}-{cfg.federation.strategy}-s{cfg.seed}"


class MLflowTracking(Callback):
    """Logs one federation to MLflow through an explicit client and run id.

    The run id is kept in the run's notes, so a resumed run keeps logging into the same
    MLflow run. The run ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C, SIGTERM).
    """

    def __init__(self, parent_run_id: str | None = None) -> None:
        self.parent_run_id = parent_run_id
        self.client: MlflowClient | None = None
        self.run_id: str | None = None

    def on_run_begin(self, run: Run) -> None:
        cfg = run.cfg
        uri = cfg.tracking.uri or default_tracking_uri(run.run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run.notes.get("mlflow_run_id")
        if self.run_id is not None:  # resuming: keep logging into the same run
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"hfedmoe.strategy": cfg.federation.strategy}
        if self.parent_run_id is not None:
            tags[PARENT_TAG] = self.parent_run_id
        experiment = experiment_id(self.client, cfg.tracking.experiment, uri)
        self.run_id = self.client.create_run(
            experiment, run_name=run_name(cfg), tags=tags
        ).info.run_id
        run.notes["mlflow_run_id"] = self.run_id
        params = [
            Param(k, v[:_PARAM_LIMIT]) for k, v in flatten(cfg.model_dump(mode="json")).items()
        ]
        for start in range(0, len(params), 100):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def after_round(self, run: Run, metrics: RoundMetrics) -> bool:
        stamp = int(time.time() * 1000)
        values = [
            Metric(key, float(value), stamp, metrics.round)
            for key, value in asdict(metrics).items()
            if key != "round" and value is not None and math.isfinite(float(value))
        ]
        self.client.log_batch(self.run_id, metrics=values)
        return False

    def on_run_end(self, run: Run, status: str) -> None:
        if self.run_id is None:
            return
        try:
            if status == "FINISHED":
                self._log_summary(run)
        finally:
            self.client.set_terminated(self.run_id, status=status)

    def _log_summary(self, run: Run) -> None:
        cfg, fed = run.cfg, run.fed
        stamp = int(time.time() * 1000)
        summary = summarise(run.history, cfg.federation.target_accuracy)
        values = [Metric(k, float(v), stamp, 0) for k, v in summary.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=values)
        extra = {
            "split": fed.split,
            "budgets": budget_summary(fed.budgets),
            "placement": run.placement,
            "footprint": asdict(fed.footprint),
        }
        self.client.log_artifacts(
            self.run_id, str(write_artifacts(cfg, run.history, run.run_dir, extra))
        )


def write_artifacts(
    cfg: ExperimentConfig, history: History, run_dir: Path, extra: dict[str, Any]
) -> Path:
    """Write the run's figures and records into run_dir/artifacts; return that folder."""
    out = Path(run_dir) / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    plots.learning_curves(history, out / "learning_curves.png")
    plots.usage_heatmap(history, out / "expert_usage.png")
    plots.selected_vs_budget(history, out / "selected_vs_budget.png")
    (out / "rounds.json").write_text(json.dumps([asdict(r) for r in history.rounds], indent=1))
    (out / "clients.json").write_text(json.dumps([asdict(c) for c in history.clients]))
    for name, payload in extra.items():
        (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    return out


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
