"""Checkpoints: an append-only history, resume to the same bits, damaged checkpoints skipped."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import yaml

from hfedmoe.platform.callbacks import Checkpointer
from hfedmoe.platform.checkpoint import HISTORY, load_checkpoint
from hfedmoe.platform.config import ConfigError, parse_config
from hfedmoe.platform.engine import Callback, run
from hfedmoe.platform.executors import InProcessExecutor
from hfedmoe.platform.records import ClientRecord, ClientReport, History

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())


def tiny(rounds: int):
    raw = {**TINY, "tracking": {"enabled": False}}
    raw["federation"] = {**raw["federation"], "rounds": rounds}
    return parse_config(raw)


class Crash(Callback):
    """The driver dies after round ``at`` is checkpointed (placed after the Checkpointer)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def after_round(self, run, metrics) -> bool:
        if metrics.round == self.at:
            raise KeyboardInterrupt
        return False


def assert_same_state(a, b) -> None:
    for group in ("shared", "gates"):
        for name, value in getattr(a, group).items():
            np.testing.assert_array_equal(value, getattr(b, group)[name])
    for layer_a, layer_b in zip(a.experts, b.experts, strict=True):
        for name in layer_a:
            np.testing.assert_array_equal(layer_a[name], layer_b[name])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, object]:
    """A 3-round run with a checkpoint per round (KEEP=2: rounds 1 and 2 remain)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run(tiny(3), InProcessExecutor(), [Checkpointer()], run_dir=run_dir)
    return run_dir, result


def damaged_copy(finished, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    return run_dir


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(finished, tmp_path):
    run_dir = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(tiny(3), InProcessExecutor(), [Checkpointer(), Crash(at=0)], run_dir=run_dir)
    # A crash between the history append and the checkpoint leaves a record past it.
    stale = json.loads((run_dir / HISTORY).read_text().splitlines()[0])
    stale.update(round=1, metrics={**stale["metrics"], "round": 1, "train_loss": -1.0})
    with open(run_dir / HISTORY, "a") as f:
        f.write(json.dumps(stale) + "\n" + '{"round": 2, "metr')  # and a torn line
    resumed = run(tiny(3), InProcessExecutor(), [Checkpointer()], run_dir=run_dir, resume=True)

    whole = finished[1]
    assert [r.deterministic() for r in resumed.history.rounds] == [
        r.deterministic() for r in whole.history.rounds
    ]
    assert resumed.history.clients == whole.history.clients
    np.testing.assert_array_equal(np.stack(resumed.history.usage), np.stack(whole.history.usage))
    by_group, whole_by_group = resumed.history.usage_by_group(), whole.history.usage_by_group()
    assert list(by_group) == list(whole_by_group) == ["fast", "slow"]  # tiny.yaml's tiers
    for group, usage in whole_by_group.items():
        np.testing.assert_array_equal(by_group[group], usage)
    assert_same_state(resumed.state, whole.state)
    # What a second resume would read is the rerun, not the stale record.
    reloaded = load_checkpoint(run_dir)
    assert reloaded.round == 2
    assert [r.deterministic() for r in reloaded.history.rounds] == [
        r.deterministic() for r in whole.history.rounds
    ]


def test_progress_keeps_no_history(finished):
    run_dir, whole = finished
    progress = json.loads((run_dir / "checkpoints" / "round-00002" / "progress.json").read_text())
    assert set(progress) == {"round", "clock", "notes"}
    assert progress["clock"] == whole.clock
    assert len((run_dir / HISTORY).read_text().splitlines()) == 3


def truncate_state(latest: Path) -> None:
    path = latest / "state.safetensors"
    os.truncate(path, path.stat().st_size // 2)


def delete_progress(latest: Path) -> None:
    (latest / "progress.json").unlink()


@pytest.mark.parametrize("damage", [truncate_state, delete_progress])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(finished, tmp_path, caplog, damage):
    run_dir = damaged_copy(finished, tmp_path)
    damage(run_dir / "checkpoints" / "round-00002")
    with caplog.at_level(logging.WARNING, logger="hfedmoe.platform.checkpoint"):
        checkpoint = load_checkpoint(run_dir)
    assert checkpoint.round == 1 and checkpoint.path.name == "round-00001"
    assert [r.round for r in checkpoint.history.rounds] == [0, 1]
    assert checkpoint.clock == checkpoint.history.rounds[-1].simulated_seconds
    assert "round-00002" in caplog.text
    # The run continues from there and ends where the undamaged one did.
    resumed = run(tiny(3), InProcessExecutor(), [Checkpointer()], run_dir=run_dir, resume=True)
    assert_same_state(resumed.state, finished[1].state)


def test_garbage_in_latest_uses_the_newest_intact_checkpoint(finished, tmp_path, caplog):
    run_dir = damaged_copy(finished, tmp_path)
    (run_dir / "checkpoints" / "LATEST").write_bytes(b"\xff\x00garbage")
    with caplog.at_level(logging.WARNING, logger="hfedmoe.platform.checkpoint"):
        checkpoint = load_checkpoint(run_dir)
    # round-00002 was renamed into place, whole and fsynced, before LATEST was written.
    assert checkpoint.round == 2
    assert "LATEST" in caplog.text


def test_no_intact_checkpoint_is_an_error_naming_the_run(finished, tmp_path):
    run_dir = damaged_copy(finished, tmp_path)
    for directory in (run_dir / "checkpoints").glob("round-*"):
        truncate_state(directory)
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        load_checkpoint(run_dir)


class Unpickled:
    """Unpickling it creates ``marker``: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_a_checkpoint_is_never_unpickled(finished, tmp_path):
    run_dir = damaged_copy(finished, tmp_path)
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Unpickled(marker))
    pickle.loads(payload)  # the payload does what it should, were it unpickled
    assert marker.exists()
    marker.unlink()
    latest = run_dir / "checkpoints" / "round-00002"
    (latest / "state.safetensors").write_bytes(payload)
    (latest / "state.pt").write_bytes(payload)
    assert load_checkpoint(run_dir).round == 1  # read as a damaged checkpoint, skipped
    assert not marker.exists()


def test_a_client_record_is_its_report_plus_round_tier_and_trained_count():
    report = ClientReport(7, 30, trained=np.array([[True, False], [True, True]]))
    # A distinct value in every field the record shares with the report.
    shared = [f for f in fields(ClientRecord) if f.name in {g.name for g in fields(ClientReport)}]
    for number, f in enumerate(shared, start=1):
        setattr(report, f.name, "oom" if f.name == "failure" else number)
    record = ClientRecord.from_report(report, round_index=4, tier="slow")
    assert {f.name: getattr(record, f.name) for f in shared} == {
        f.name: getattr(report, f.name) for f in shared
    }
    assert (record.round, record.client, record.tier, record.experts_trained) == (4, 7, "slow", 3)
    # What the record has beyond the report is exactly what from_report is given.
    assert {f.name for f in fields(ClientRecord)} - {f.name for f in shared} == {
        "round", "client", "tier", "experts_trained"
    }  # fmt: skip
    assert ClientRecord.from_report(ClientReport(1, 5), 0, "fast").experts_trained == 0


def test_a_history_written_before_the_newer_client_fields_still_loads(finished):
    run_dir, whole = finished
    newer = {"memory_bytes", "routed_per_step", "admitted_share", "measured_peak_bytes"}
    records = []
    for line in (run_dir / HISTORY).read_text().splitlines():
        record = json.loads(line)
        record["clients"] = [
            {k: v for k, v in c.items() if k not in newer} for c in record["clients"]
        ]
        del record["group_usage"]
        records.append(record)
    old = History.from_round_records(records)
    assert [c.client for c in old.clients] == [c.client for c in whole.history.clients]
    assert [c.loss for c in old.clients] == [c.loss for c in whole.history.clients]
    assert all(c.admitted_share == 0.0 and c.measured_peak_bytes is None for c in old.clients)
