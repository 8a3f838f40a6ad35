"""Tracking never stops training: outages buffer, an unreachable server is refused or warned
about before the start, and a run directory alone re-imports into MLflow. Real servers."""

from __future__ import annotations

import http.client
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from hfedmoe.cli import main
from hfedmoe.launch import launch
from hfedmoe.platform.config import parse_config
from hfedmoe.platform.engine import Callback, run
from hfedmoe.platform.executors import InProcessExecutor
from hfedmoe.tracking.mlflow_run import HTTP_SETTINGS, MLflowTracking
from hfedmoe.tracking.ui import free_port, start_server, stop_server

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
LOGGED = ("train_loss", "accuracy", "bytes_down", "simulated_seconds")


def tiny(tmp_path: Path, rounds: int, **tracking):
    raw = {**TINY, "output_dir": str(tmp_path), "tracking": tracking}
    raw["federation"] = {**raw["federation"], "rounds": rounds}
    return parse_config(raw)


@pytest.fixture(autouse=True)
def fast_http(monkeypatch):
    """MLflowTracking sets its HTTP settings in os.environ; restore them after each test."""
    for name in HTTP_SETTINGS:
        monkeypatch.delenv(name, raising=False)


class Server:
    """An ``mlflow server`` on a fixed loopback port and sqlite store, stopped and restarted."""

    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "server").mkdir()
        self.store = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> None:
        self.process, url = start_server(self.store, self.port)
        assert url == self.url

    def stop(self) -> None:
        if self.process is not None:
            stop_server(self.process)
            self.process = None


@pytest.fixture
def server(tmp_path):
    """A server of the outage test's own: it stops and restarts it on the same port and
    store, and counts every run in that store, so the session's server cannot serve."""
    server = Server(tmp_path)
    yield server
    server.stop()


class Outages(Callback):
    """Before MLflowTracking sees a round: start or stop the server (same port and store)."""

    def __init__(self, server: Server, schedule: dict[int, str]) -> None:
        self.server, self.schedule = server, schedule

    def after_round(self, run, metrics) -> bool:
        action = self.schedule.get(metrics.round)
        if action is not None:
            getattr(self.server, action)()
        return False


def logged_once_in_order(client: MlflowClient, run_id: str, result) -> None:
    for key in LOGGED:
        metrics = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
        assert [(m.step, m.value) for m in metrics] == [
            (r.round, getattr(r, key)) for r in result.history.rounds
        ], key


def test_outages_buffer_rounds_and_send_each_once_in_order(server, tmp_path):
    # Down at the start (the MLflow run is created late), up for round 1, down for
    # round 2 (buffered), back on the same port and store for round 3.
    cfg = tiny(tmp_path, rounds=4, uri=server.url)
    run_dir = tmp_path / "run"
    outages = Outages(server, {1: "start", 2: "stop", 3: "start"})
    result = run(cfg, InProcessExecutor(), [outages, MLflowTracking()], run_dir=run_dir)

    client = MlflowClient(server.url)
    [logged] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert logged.info.run_id == result.notes["mlflow_run_id"]
    assert logged.info.status == "FINISHED"
    assert logged.data.params["federation.rounds"] == "4"
    logged_once_in_order(client, logged.info.run_id, result)
    assert not (run_dir / "tracking" / "pending.jsonl").exists()


def test_an_unreachable_server_neither_delays_nor_stops_training(tmp_path, caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = tiny(tmp_path, rounds=2, uri=uri)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        result = launch(cfg, run_dir=tmp_path / "run", in_process=True, progress=False)
    elapsed = time.monotonic() - started
    # MLflow's default retries alone: 7 retries, backoff 2 s * 2**n: 2 * (2**7 - 1) = 254 s
    # per call. Two tiny rounds take seconds; a minute is ample on a shared machine.
    assert elapsed < 60
    assert f"tracking.uri {uri}" in caplog.text and "tracking.on_error=fail" in caplog.text
    pending = (tmp_path / "run" / "tracking" / "pending.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in pending] == [0, 1]
    assert len(result.history.rounds) == 2 and "mlflow_run_id" not in result.notes
    assert (tmp_path / "run" / "artifacts" / "rounds.json").is_file()


def test_on_error_fail_refuses_an_unreachable_server_before_the_start(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    code = main(["run", str(REPO / "configs" / "tiny.yaml"), "--in-process",
                 "--set", f"tracking.uri={uri}", "--set", "tracking.on_error=fail",
                 "--run-dir", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert f"tracking.uri {uri}: no answer" in err and "tracking.on_error=continue" in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_export_mlflow_reimports_a_run_directory(tmp_path, capsys):
    cfg = tiny(tmp_path, rounds=3, enabled=False)
    result = launch(cfg, run_dir=tmp_path / "run", in_process=True, progress=False)
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    (tmp_path / "fresh").mkdir()
    assert main(["export-mlflow", str(tmp_path / "run"), "--uri", uri]) == 0
    assert "MLflow run" in capsys.readouterr().out

    client = MlflowClient(uri)
    [exported] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert exported.info.status == "FINISHED"
    assert exported.data.params["federation.rounds"] == "3"
    assert exported.data.params["model.num_experts"] == "4"
    logged_once_in_order(client, exported.info.run_id, result)
    artifacts = {a.path for a in client.list_artifacts(exported.info.run_id)}
    assert {"rounds.json", "learning_curves.png", "config.yaml"} <= artifacts


def test_the_ui_server_listens_on_loopback_only_and_refuses_foreign_host_headers(mlflow_server):
    # The session's server: started by the same start_server as `hfedmoe ui`.
    server = mlflow_server
    processes = [psutil.Process(server.process.pid)]
    processes += processes[0].children(recursive=True)
    listening = {
        c.laddr.ip
        for p in processes
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {"127.0.0.1"}

    def status(host: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1",
                           headers={"Host": host})  # fmt: skip
        return connection.getresponse().status

    # DNS rebinding: a page of evil.example resolving to 127.0.0.1 must get nothing.
    # MLflow 3.17: 403 "Invalid Host header - possible DNS rebinding attack detected".
    assert status("evil.example:5000") == 403
    assert status(f"127.0.0.1:{server.port}") == 200


def test_the_cluster_mlflow_script_binds_loopback_with_host_protection_on():
    script = (REPO / "scripts" / "mlflow-server").read_text()
    command = script[script.index("exec ") :]
    assert "--host 127.0.0.1" in command
    assert "--disable-security-middleware" not in script and "--allowed-hosts" not in script


def _serving_ui(tmp_path: Path) -> tuple[subprocess.Popen, int, list[psutil.Process]]:
    """A real ``hfedmoe ui`` on a store made here; (process, port, its process tree)."""
    store = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").search_experiments()  # creates the store's schema
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "hfedmoe.cli", "ui", "--store", str(store), "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = ui.stdout.readline()  # printed once the server answers
    assert f"http://127.0.0.1:{port}" in line, line
    tree = psutil.Process(ui.pid).children(recursive=True)
    assert any("mlflow" in " ".join(p.cmdline()) and "server" in p.cmdline() for p in tree)
    return ui, port, tree


def _gone(tree: list[psutil.Process], port: int, timeout_s: float) -> bool:
    """Whether every process of ``tree`` ended and nothing listens on ``port`` any more."""
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    with socket.socket() as probe:
        refused = probe.connect_ex(("127.0.0.1", port)) != 0
    return not alive and refused


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_the_ui_stops_its_server_and_every_child_on_a_signal(tmp_path, signum):
    ui, port, tree = _serving_ui(tmp_path)
    ui.send_signal(signum)
    assert ui.wait(timeout=60) == 128 + signum  # 143 for SIGTERM
    assert _gone(tree, port, timeout_s=10)


def test_a_killed_ui_takes_its_server_down_too(tmp_path):
    """SIGKILL runs no handler: the server's guard sees the ui's end of its stdin close."""
    ui, port, tree = _serving_ui(tmp_path)
    ui.kill()
    ui.wait()
    assert _gone(tree, port, timeout_s=30)  # the guard's grace (5 s) and the group's exit
