"""Shared fixtures: one Ray instance and one MLflow server per session; offline Hugging Face."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

# Everything the tests load is local (bundled MiniLM, configs built from scratch).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HFEDMOE_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def ray_address() -> str:
    """Start one local Ray instance for the session and stop exactly it at the end.

    Tests never call `ray stop`: it would end every Ray process of the user.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@dataclass(frozen=True)
class MLflowServer:
    url: str
    port: int
    process: subprocess.Popen


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MLflowServer:
    """One real ``mlflow server`` (sqlite store, free loopback port) for the session.

    A start takes seconds on this machine; tests share it by logging to experiments of
    their own names. A test that stops or restarts a server, or counts every run in the
    store, starts its own instead.
    """
    from hfedmoe.tracking.ui import start_server, stop_server

    store = tmp_path_factory.mktemp("mlflow")
    process, url = start_server(f"sqlite:///{store / 'mlflow.db'}")
    yield MLflowServer(url, urlsplit(url).port, process)
    stop_server(process)
