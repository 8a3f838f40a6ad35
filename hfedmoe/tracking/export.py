"""``hfedmoe export-mlflow RUN_DIR``: log a run to MLflow from its run directory alone.

For a run whose tracking server was down (or off): the params come from the directory's
``config.yaml``, every round's metrics from its latest checkpoint's history (or, without
checkpoints, ``artifacts/rounds.json``), and the artifacts from ``artifacts/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from hfedmoe.platform.checkpoint import load_checkpoint, run_config
from hfedmoe.platform.errors import ConfigError
from hfedmoe.platform.records import History, RoundMetrics
from hfedmoe.tracking.mlflow_run import (
    create_run,
    default_tracking_uri,
    log_generations,
    log_params,
    round_values,
    summarise,
    unreachable,
    write_artifacts,
)

_METRIC_LIMIT = 1000  # MLflow's metrics per log_batch


def run_history(run_dir: Path) -> History:
    """Every recorded round of a run directory."""
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is not None:
        return checkpoint.history
    rounds = Path(run_dir) / "artifacts" / "rounds.json"
    if not rounds.is_file():
        raise ConfigError(f"{run_dir}: neither a checkpoint nor artifacts/rounds.json to export")
    return History(rounds=[RoundMetrics(**r) for r in json.loads(rounds.read_text())])


def export_run(run_dir: Path, uri: str | None = None) -> str:
    """Log the run in ``run_dir`` as a new MLflow run at ``uri``; return its id.

    ``uri`` defaults to the run's tracking.uri, else the sqlite store beside the run.
    """
    run_dir = Path(run_dir).resolve()
    cfg = run_config(run_dir)
    history = run_history(run_dir)
    uri = uri or cfg.tracking.uri or default_tracking_uri(run_dir)
    problem = unreachable(uri)
    if problem is not None:
        raise ConfigError(f"--uri {uri}: {problem}")
    client = MlflowClient(tracking_uri=uri)
    run_id = create_run(client, cfg, uri, {"hfedmoe.exported_from": str(run_dir)})
    log_params(client, run_id, cfg)
    stamp = int(time.time() * 1000)
    metrics = [
        Metric(key, value, stamp, m.round)
        for m in history.rounds
        for key, value in round_values(m).items()
    ]
    for start in range(0, len(metrics), _METRIC_LIMIT):
        client.log_batch(run_id, metrics=metrics[start : start + _METRIC_LIMIT])
    for round_index, rows in sorted(history.generations.items()):
        log_generations(client, run_id, round_index, rows)
    artifacts = run_dir / "artifacts"
    finished = (artifacts / "rounds.json").is_file() or len(history.rounds) == cfg.federation.rounds
    if finished:
        summary = summarise(history, cfg.federation.target_accuracy)
        values = [Metric(k, float(v), stamp, 0) for k, v in summary.items() if v is not None]
        client.log_batch(run_id, metrics=values)
        if not (artifacts / "rounds.json").is_file():  # tracking was off: draw them now
            write_artifacts(cfg, history, run_dir, {})
        client.log_artifacts(run_id, str(artifacts))
    client.set_terminated(run_id, status="FINISHED" if finished else "KILLED")
    return run_id
