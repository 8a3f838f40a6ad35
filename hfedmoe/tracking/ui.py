"""``hfedmoe ui``: an MLflow tracking server on loopback for a run or sweep store."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from hfedmoe.platform.errors import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_uri(store: str) -> str:
    """A sqlite file, a directory holding mlflow.db, or any MLflow backend URI."""
    if "://" in store:
        return store
    path = Path(store).expanduser().resolve()
    if path.is_dir():
        path = path / "mlflow.db"
    if not path.is_file():
        raise ConfigError(f"--store {store}: no MLflow database at {path}; run a federation first")
    return f"sqlite:///{path}"


def start_server(
    backend_uri: str, port: int | None = None, timeout_s: float = 90.0
) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` on 127.0.0.1 and wait until it answers; (process, url).

    MLflow's Host-header protection stays on: it answers requests addressed to localhost,
    so remote users reach it through an ssh tunnel or port forwarding, not a public bind.
    The process returned is the server's guard (``server_guard.py``): stopping it, or this
    process ending in any way, SIGKILL included, stops the server and all its children.
    """
    port = port or free_port()
    artifacts = None
    if backend_uri.startswith("sqlite:///"):
        artifacts = Path(backend_uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    command = [sys.executable, "-m", "hfedmoe.tracking.server_guard"]
    command += [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if artifacts is not None:
        command += ["--artifacts-destination", str(artifacts)]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    # A file, not a pipe: nobody reads the server's log once it runs, and a full pipe
    # would block it on its next write. The server keeps its own handle. The guard's stdin
    # is a pipe only this process writes to: its end of file means this process is gone.
    # Its own session: a Ctrl-C in the terminal reaches this process, which stops it.
    # MLflow 3's job runner (GenAI scorers and trace rollups, eight processes that each import
    # mlflow) serves nothing of a training run: off unless the user turns it on.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log.seek(0)
                err = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{err}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        return process, url
            except OSError:
                time.sleep(0.3)
    stop_server(process)  # its uvicorn and job-runner children too, not only the parent
    raise RuntimeError(f"mlflow server did not answer on {url} within {timeout_s:.0f} s")


def runs_table_urls(url: str) -> dict[str, str]:
    """Experiment name -> the page of its runs table, for every experiment with runs.

    MLflow 3's UI opens on its GenAI overview; training runs are compared on the runs tab.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    return {
        e.name: f"{url}/#/experiments/{e.experiment_id}/runs"
        for e in client.search_experiments()
        if client.search_runs([e.experiment_id], max_results=1)
    }


def stop_server(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """Stop the server this process started, its gunicorn/uvicorn/job-runner children with it.

    The guard stops the server's process group; anything still running after it exited
    (it was killed itself, say) is killed here.
    """
    import psutil

    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdin is not None:
        process.stdin.close()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
