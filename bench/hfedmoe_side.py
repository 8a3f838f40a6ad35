"""The hfedmoe side of B1 and B2: run one federation on a fresh local Ray, report timings.

Run by b1_flower.py and b2_scale.py in hfedmoe's .venv, one process per federation, so
start-up (interpreter, imports, ray.init, build_federation, client actors) is measured
from process start. Writes a JSON report to --out.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import psutil
from common import (
    CpuWindow,
    MiB,
    Spec,
    experiment_config,
    read_spec,
    scratch_dir,
    spawn_time,
    write_json,
)

import hfedmoe.platform.engine as engine
from hfedmoe.launch import launch
from hfedmoe.platform.config import parse_config
from hfedmoe.platform.engine import Callback


def time_build_federation(timings: dict[str, float]) -> None:
    """Record how long the engine's build_federation takes (data, model, N clients).

    Wraps the name the engine module calls, so the run itself is unchanged.
    """
    build = engine.build_federation

    def timed(cfg):
        started = time.perf_counter()
        built = build(cfg)
        timings["build_federation_s"] = time.perf_counter() - started
        return built

    engine.build_federation = timed


def run(spec: Spec, t0: float) -> dict[str, Any]:
    """Run the federation of ``spec``; return its rounds and start-up as a JSON-able dict."""
    scratch = scratch_dir("hfedmoe-bench-")
    cfg = parse_config(experiment_config(spec, str(scratch)))
    timings: dict[str, float] = {}
    time_build_federation(timings)
    me = psutil.Process()
    rounds: list[dict[str, Any]] = []
    cpu = CpuWindow(spec)

    class RoundTimes(Callback):
        def after_round(self, _run, metrics) -> bool:
            record_round(metrics)
            return False

    def record_round(metrics) -> None:
        rounds.append(
            {
                "round": metrics.round,
                "wall_s": metrics.wall_seconds,
                "client_compute_s": metrics.client_wall_seconds,
                "sampled": metrics.sampled,
                "succeeded": metrics.succeeded,
                "ended_at": time.time(),
                "driver_rss_mib": me.memory_info().rss / MiB,
            }
        )
        cpu.round_ended(metrics.round)

    try:
        launch(cfg, run_dir=scratch / "run", progress=False, callbacks=[RoundTimes()])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    finished = time.time()
    # RoundTimes runs after the round's checkpoint, so this is the first round's start
    # (plus that checkpoint's few milliseconds).
    first_round_start = rounds[0]["ended_at"] - rounds[0]["wall_s"]
    return {
        "platform": "hfedmoe",
        "spec": spec.__dict__,
        "versions": {
            name: importlib.metadata.version(name) for name in ("hfedmoe", "ray", "torch")
        },
        "aggregation": "hfedmoe strategy: eq 17 experts, eqs 19-21 gates, FedAvg for the "
        "rest, streamed into an aggregator actor",
        "concurrency": spec.concurrency,
        "startup_s": first_round_start - t0,
        "build_federation_s": timings.get("build_federation_s"),
        "shutdown_s": finished - rounds[-1]["ended_at"],
        "cpu_s_per_round": cpu.per_round(),
        "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rounds": rounds,
    }


def main() -> None:
    t0 = spawn_time()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="JSON file of a common.Spec")
    parser.add_argument("--out", required=True, help="where to write the JSON report")
    args = parser.parse_args()
    write_json(Path(args.out), run(read_spec(args.spec), t0))


if __name__ == "__main__":
    main()
