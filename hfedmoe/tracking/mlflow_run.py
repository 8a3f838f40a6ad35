"""MLflow tracking of a federation: params, per-round metrics, artifacts.

One federation is one MLflow run: the flattened config as params, every round's metrics
with step = round (causal_lm adds perplexity and, per evaluation, a table of generated
answers: ``generations/round-NNNN.json``), and at the end the resolved config, the
learning curves, the expert usage heatmap, the selected-experts-vs-budget plot and the
history as JSON. A sweep's
trials are child runs of the sweep's parent run (tag ``mlflow.parentRunId``).

The default store is a sqlite file beside the run directory (``runs/mlflow.db`` for the
default layout), so all runs under one output directory compare in one MLflow UI; MLflow
3 refuses the plain file store, and an absolute sqlite path works from any working
directory and any Ray worker. Concurrent sweeps and clusters should use a server.

Tracking never stops training. A server that does not answer at the start is refused
(``tracking.on_error: fail``) or warned about (``continue``, the default) by
``check_tracking``, before anything starts. Every round's metrics are queued in
``<run_dir>/tracking/pending.jsonl`` until the store takes them, in order, at the next
round the server answers or at the end (creating the MLflow run then, if the server was
down at the start); each keeps its first timestamp, so a batch resent after a lost reply
is the same metric, which SQL stores keep once. ``hfedmoe export-mlflow RUN_DIR`` logs a
whole run from its directory alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hfedmoe.platform.budgets.drawing import budget_summary
from hfedmoe.platform.config import ExperimentConfig
from hfedmoe.platform.engine import Callback, Run
from hfedmoe.platform.errors import ConfigError
from hfedmoe.platform.records import History, RoundMetrics
from hfedmoe.tracking import plots

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
_PARAM_LIMIT = 500  # characters MLflow stores reliably in every backend
PROBE_TIMEOUT_S = 3.0
# MLflow retries a request 7 times with backoff 2 by default: ~4 minutes per call while
# a server is down. Rounds wait in the buffer instead, so a failed call may fail fast.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir).resolve().parent / 'mlflow.db')}"


def unreachable(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the tracking server at ``uri`` does not answer, or None when it does.

    Only http(s) URIs are probed (``/health``); a database URI is as reachable as its disk.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError as err:
        return f"/health answered HTTP {err.code}"
    except (OSError, ValueError) as err:
        return f"no answer within {timeout_s:.0f} s ({getattr(err, 'reason', err)})"


def check_tracking(cfg: ExperimentConfig) -> None:
    """Before anything starts: refuse (``on_error: fail``) or warn about an unreachable URI."""
    uri = cfg.tracking.uri
    problem = unreachable(uri) if cfg.tracking.enabled and uri else None
    if problem is None:
        return
    if cfg.tracking.on_error == "fail":
        raise ConfigError(
            f"tracking.uri {uri}: {problem}. Start that server (e.g. scripts/mlflow-server), "
            "correct tracking.uri, or set tracking.on_error=continue to train now and log "
            "when it answers"
        )
    log.warning(
        "tracking.uri %s: %s. Training anyway: each round's metrics wait in the run "
        "directory's tracking/pending.jsonl and go to MLflow when it answers "
        "(tracking.on_error=fail refuses to start instead)",
        uri,
        problem,
    )


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
    return f"{cfg.name}-{cfg.federation.strategy.name}-s{cfg.seed}"


def create_run(client: MlflowClient, cfg: ExperimentConfig, uri: str, tags: dict[str, str]) -> str:
    """A new MLflow run of ``cfg``; return its id."""
    tags = {"hfedmoe.strategy": cfg.federation.strategy.name, **tags}
    experiment = experiment_id(client, cfg.tracking.experiment, uri)
    return client.create_run(experiment, run_name=run_name(cfg), tags=tags).info.run_id


def log_params(client: MlflowClient, run_id: str, cfg: ExperimentConfig) -> None:
    """The flattened config as params (logging the same values again is allowed)."""
    params = [Param(k, v[:_PARAM_LIMIT]) for k, v in flatten(cfg.model_dump(mode="json")).items()]
    for start in range(0, len(params), 100):  # MLflow's per-batch limit
        client.log_batch(run_id, params=params[start : start + 100])


def round_values(metrics: RoundMetrics) -> dict[str, float]:
    """A round's metrics as MLflow takes them: finite floats, the round being the step."""
    return {
        key: float(value)
        for key, value in asdict(metrics).items()
        if key != "round" and value is not None and math.isfinite(float(value))
    }


class MLflowTracking(Callback):
    """Logs one federation to MLflow through an explicit client and run id.

    The run id is kept in the run's notes, so a resumed run keeps logging into the same
    MLflow run. The run ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C, SIGTERM).
    Rounds the store could not take wait in ``pending_path`` (see the module docstring).
    """

    def __init__(self, parent_run_id: str | None = None) -> None:
        self.parent_run_id = parent_run_id
        self.client: MlflowClient | None = None
        self.uri = ""
        self.run_id: str | None = None
        self.opened = False  # this process has (re)opened the MLflow run
        self.pending: list[dict[str, Any]] = []  # rounds the store has not taken yet
        self.pending_path: Path | None = None
        self.answering = True  # warn once per outage, not every round

    def on_run_begin(self, run: Run) -> None:
        for name, value in HTTP_SETTINGS.items():
            os.environ.setdefault(name, value)  # the user's own settings win
        self.uri = run.cfg.tracking.uri or default_tracking_uri(run.run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = run.notes.get("mlflow_run_id")
        self.pending_path = Path(run.run_dir) / "tracking" / "pending.jsonl"
        if self.pending_path.is_file():  # left by an earlier process of this run
            self.pending = [
                json.loads(line) for line in self.pending_path.read_text().split("\n") if line
            ]
        self._send(run)

    def after_round(self, run: Run, metrics: RoundMetrics) -> bool:
        stamp = int(time.time() * 1000)
        record = {"step": metrics.round, "timestamp": stamp, "metrics": round_values(metrics)}
        generations = run.history.generations.get(metrics.round)
        if generations:
            record["generations"] = generations
        self.pending.append(record)
        self._send(run)
        return False

    def on_run_end(self, run: Run, status: str) -> None:
        if status == "FINISHED":  # the run directory gets them whatever MLflow does
            artifacts = write_artifacts(run.cfg, run.history, run.run_dir, run_extras(run))
        if not self._send(run):
            log.warning(
                "MLflow at %s did not answer at the end: %d round(s) stay in %s. Log the "
                "whole run from its directory later: hfedmoe export-mlflow %s --uri %s",
                self.uri, len(self.pending), self.pending_path, run.run_dir, self.uri,
            )  # fmt: skip
            return
        try:
            try:
                if status == "FINISHED":
                    self._log_summary(run, artifacts)
            finally:
                self.client.set_terminated(self.run_id, status=status)
        except (MlflowException, OSError) as err:  # the metrics went; the run dir has the rest
            log.warning("MLflow at %s failed at the end (%s): %s", self.uri, status, err)

    def _send(self, run: Run) -> bool:
        """Open the MLflow run if not yet done, send the pending rounds in order; whether
        everything went. What did not stays pending, on disk too."""
        try:
            problem = unreachable(self.uri)  # a quick probe, not MLflow's slow retries
            if problem is not None:
                raise OSError(problem)
            if not self.opened:
                self._open(run)
            while self.pending:
                record = self.pending[0]
                values = [
                    Metric(key, value, record["timestamp"], record["step"])
                    for key, value in record["metrics"].items()
                ]
                self.client.log_batch(self.run_id, metrics=values)
                if "generations" in record:
                    log_generations(self.client, self.run_id, record["step"], record["generations"])
                self.pending.pop(0)
        except (MlflowException, OSError) as err:
            if self.answering:
                log.warning(
                    "MLflow at %s: %s. Training goes on; rounds wait in %s",
                    self.uri, err, self.pending_path,
                )  # fmt: skip
            self.answering = False
            return False
        finally:
            self._write_pending()
        if not self.answering:
            log.warning("MLflow at %s answers again; pending rounds sent", self.uri)
        self.answering = True
        return True

    def _open(self, run: Run) -> None:
        if self.run_id is None:  # a new run, or one whose server was down at the start
            tags = {} if self.parent_run_id is None else {PARENT_TAG: self.parent_run_id}
            self.run_id = create_run(self.client, run.cfg, self.uri, tags)
            run.notes["mlflow_run_id"] = self.run_id
        else:  # resuming: keep logging into the same run
            self.client.update_run(self.run_id, status="RUNNING")
        log_params(self.client, self.run_id, run.cfg)
        self.opened = True

    def _write_pending(self) -> None:
        if not self.pending:
            self.pending_path.unlink(missing_ok=True)
            return
        self.pending_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pending_path.with_name(f".{self.pending_path.name}.tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in self.pending))
        os.replace(tmp, self.pending_path)

    def _log_summary(self, run: Run, artifacts: Path) -> None:
        stamp = int(time.time() * 1000)
        summary = summarise(run.history, run.cfg.federation.target_accuracy)
        values = [Metric(k, float(v), stamp, 0) for k, v in summary.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=values)
        self.client.log_artifacts(self.run_id, str(artifacts))


def generations_file(round_index: int) -> str:
    return f"generations/round-{round_index:04d}.json"


def log_generations(
    client: MlflowClient, run_id: str, round_index: int, rows: list[dict[str, Any]]
) -> None:
    """An evaluation's generated answers as an MLflow table (prompt, reference, generated,
    exact match), one artifact per evaluated round."""
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    client.log_table(run_id, data=columns, artifact_file=generations_file(round_index))


def run_extras(run: Run) -> dict[str, Any]:
    """What a run's artifacts record besides its history: split, budgets, placement, memory."""
    fed = run.fed
    return {
        "split": fed.split,
        "budgets": budget_summary(fed.budgets),
        "placement": run.placement,
        "footprint": asdict(fed.footprint),
    }


def write_artifacts(
    cfg: ExperimentConfig, history: History, run_dir: Path, extra: dict[str, Any]
) -> Path:
    """Write the run's figures and records into run_dir/artifacts; return that folder."""
    out = Path(run_dir) / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    plots.learning_curves(history, out / "learning_curves.png")
    plots.usage_heatmap(history, out / "expert_usage.png")
    plots.usage_by_group_heatmap(history, out / "expert_usage_by_group.png")
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
