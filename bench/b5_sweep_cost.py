"""B5: what a sweep costs on this machine: total time, time per trial, start-up share.

A real `hfedmoe sweep` of 8 trials (tau x strategy x seed) of the tiny Qwen3-MoE config,
3 rounds each, Ray started by the sweep itself, MLflow into a sqlite store. Per trial it
reads Tune's total time and the trial's start-up (data, model, client actors: everything
before its first round); the start-up share is their ratio. Sweep overhead is the total
wall time not covered by trials running.

    python bench/b5_sweep_cost.py [--quick] [--out bench/results/b5.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def sweep_file(directory: Path, quick: bool) -> Path:
    search = {
        "hfedmoe.tau": {"grid": [0.1, 0.2]},
        "federation.strategy": {"grid": ["hfedmoe", "budget_random"]},
        "seed": {"grid": [0, 1]},
    }
    if quick:
        search = {"hfedmoe.tau": {"grid": [0.1, 0.2]}}
    sweep = {
        "name": "b5",
        "base": str(REPO / "configs" / "tiny.yaml"),
        "overrides": {"federation.rounds": 1 if quick else 3},
        "search": search,
        "storage_path": str(directory / "sweeps"),
    }
    path = directory / "b5.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 trials of 1 round")
    parser.add_argument("--out", type=Path, default=Path("bench/results/b5.json"))
    args = parser.parse_args(argv)
    from hfedmoe.tuning.sweep import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = run_sweep(sweep_file(Path(tmp), args.quick), progress=False)
        total = time.perf_counter() - started
    rows = result.rows
    trial_times = [r["time_total_s"] for r in rows if r["time_total_s"] is not None]
    startups = [r["startup_seconds"] for r in rows if r["startup_seconds"] is not None]
    summary = {
        "benchmark": "B5 sweep cost",
        "trials": len(rows),
        "failed_trials": sum(1 for r in rows if r["status"] != "OK"),
        "total_seconds": total,
        "trial_seconds_mean": statistics.mean(trial_times),
        "trial_seconds_max": max(trial_times),
        "startup_seconds_mean": statistics.mean(startups),
        "startup_share": statistics.mean(startups) / statistics.mean(trial_times),
        "outside_trials_seconds": total - sum(trial_times),  # trials ran one at a time here
        "rows": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, default=str))
    columns = ["trials", "total (s)", "per trial, mean (s)", "start-up, mean (s)"]
    columns += ["start-up share", "outside trials (s)"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {summary['trials']} | {total:.1f} | {summary['trial_seconds_mean']:.1f} | "
        f"{summary['startup_seconds_mean']:.1f} | {summary['startup_share']:.2f} | "
        f"{summary['outside_trials_seconds']:.1f} |"
    )


if __name__ == "__main__":
    main()
