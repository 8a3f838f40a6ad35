"""The round loop's contract with callbacks, early stop, MLflow run status, and bad data input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from hfedmoe.cli import main
from hfedmoe.platform.callbacks import EarlyStop
from hfedmoe.platform.config import ConfigError, parse_config
from hfedmoe.platform.engine import Callback, run
from hfedmoe.platform.executors import InProcessExecutor, run_in_process
from hfedmoe.tracking.mlflow_run import MLflowTracking, run_name

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())


def tiny(**federation):
    raw = {**TINY, "tracking": {"enabled": False}}
    raw["federation"] = {**raw["federation"], **federation}
    return parse_config(raw)


class Recorder(Callback):
    def __init__(self, fail_after: int | None = None) -> None:
        self.events: list[str] = []
        self.fail_after = fail_after

    def on_run_begin(self, run) -> None:
        self.events.append(f"begin@{run.next_round}")

    def after_round(self, run, metrics) -> bool:
        self.events.append(f"round{metrics.round}")
        if metrics.round == self.fail_after:
            raise RuntimeError("a callback failed")
        return False

    def on_run_end(self, run, status) -> None:
        self.events.append(status)


def test_callbacks_see_every_round_then_the_end():
    recorder = Recorder()
    result = run_in_process(tiny(rounds=3), [recorder])
    assert recorder.events == ["begin@0", "round0", "round1", "round2", "FINISHED"]
    assert [r.round for r in result.history.rounds] == [0, 1, 2] and result.next_round == 3


def test_early_stop_ends_the_run_after_the_round_that_reached_the_target():
    cfg = tiny(rounds=4, target_accuracy=0.01, stop_at_target=True)
    recorder = Recorder()
    result = run_in_process(cfg, [EarlyStop(cfg.federation.target_accuracy), recorder])
    # Every callback still saw the round that asked to stop.
    assert recorder.events == ["begin@0", "round0", "FINISHED"]
    assert len(result.history.rounds) == 1


def test_stop_at_target_needs_a_target():
    with pytest.raises(ConfigError, match=r"stop_at_target needs federation\.target_accuracy"):
        tiny(stop_at_target=True)


def test_an_exception_ends_the_mlflow_run_as_failed(tmp_path):
    cfg = tiny(rounds=3).model_copy(update={"tracking": parse_config({}).tracking})
    cfg = cfg.model_copy(update={"name": "boom"})
    recorder = Recorder(fail_after=1)
    with pytest.raises(RuntimeError, match="a callback failed"):
        run(cfg, InProcessExecutor(), [MLflowTracking(), recorder], run_dir=tmp_path / "boom")
    assert recorder.events[-1] == "FAILED"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [failed] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert failed.info.status == "FAILED"
    assert failed.info.run_name == run_name(cfg) == "boom-hfedmoe-s11"
    steps = [m.step for m in client.get_metric_history(failed.info.run_id, "accuracy")]
    assert steps == [0, 1]  # rounds logged before the failure stay logged


def test_data_path_is_refused_for_the_embedded_corpus(tmp_path, capsys):
    code = main(["run", str(REPO / "configs" / "tiny.yaml"), "--set", "data.path=/tmp/x",
                 "--run-dir", str(tmp_path / "r")])  # fmt: skip
    assert code == 2
    assert "data.path is not read for data.source 'bbc_news'" in capsys.readouterr().err


def test_ag_news_offline_without_a_path_names_data_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is unreachable, as on this machine
    code = main(["run", str(REPO / "configs" / "tiny.yaml"), "--in-process",
                 "--set", "data.source=ag_news", "--run-dir", str(tmp_path / "r")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "set data.path to a directory holding the official train.csv and test.csv" in err


@pytest.mark.parametrize(
    "path", sorted(p for p in (REPO / "configs").glob("*.yaml") if "sweep" not in p.name)
)
def test_every_shipped_config_survives_its_own_dump(path):
    """A run directory keeps the resolved config; --resume and workers parse it again."""
    from hfedmoe.platform.config import load_config

    cfg = load_config(path)
    assert parse_config(cfg.model_dump(mode="json")) == cfg
