"""B9: a chaos soak of the Ray runtime, against the same run without faults.

The tiny Qwen3-MoE of the tests (configs/tiny.yaml) on a longer run: first without
faults, then with injected faults (crashed and stalled clients, lost aggregators, drawn
at random points) and a chaos monkey that kills client actors and the aggregator and
freezes client processes (SIGSTOP) at random moments. Reports the faults struck and
recovered, the time they cost, and whether the final weights and every deterministic
metric equal the fault-free run's (they must).

    python bench/b9_chaos_soak.py [--rounds 30] [--strikes 20] [--out bench/results/b9.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import yaml
from common import REPO, machine_info

from hfedmoe.actors.chaos import ChaosMonkey, random_faults
from hfedmoe.actors.executor import RayExecutor
from hfedmoe.platform.config import parse_config
from hfedmoe.platform.engine import run


def config(rounds: int, faults: dict | None = None) -> dict:
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["federation"].update(rounds=rounds, num_clients=24, clients_per_round=8)
    raw["runtime"] = {"retries": 20, "client_timeout_s": 10}
    raw["tracking"] = {"enabled": False}
    raw["faults"] = faults or {}
    return raw


def weights_equal(a, b) -> bool:
    groups = [(a.shared, b.shared), (a.gates, b.gates)]
    groups += list(zip(a.experts, b.experts, strict=True))
    return all(np.array_equal(x[k], y[k]) for x, y in groups for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--strikes", type=int, default=20)
    parser.add_argument("--mean-interval", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "b9.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.strikes, args.mean_interval = 3, 2, 1.0
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    clean_cfg = parse_config(config(args.rounds))
    crashes, hangs, aggregators = (1, 1, 1) if args.quick else (5, 3, 3)
    faults = random_faults(clean_cfg, 0, crashes, hangs, aggregators)
    chaos_cfg = parse_config(config(args.rounds, faults))

    started = time.perf_counter()
    clean = run(clean_cfg, RayExecutor())
    clean_s = time.perf_counter() - started
    executor = RayExecutor()
    started = time.perf_counter()
    with ChaosMonkey(executor, 0, args.mean_interval, args.strikes) as monkey:
        chaotic = run(chaos_cfg, executor)
    chaos_s = time.perf_counter() - started
    ray.shutdown()

    same_metrics = [r.deterministic() for r in clean.history.rounds] == [
        r.deterministic() for r in chaotic.history.rounds
    ]
    report = {
        "machine": machine_info(),
        "command": "python bench/b9_chaos_soak.py "
        + ("--quick" if args.quick else f"--rounds {args.rounds} --strikes {args.strikes}"),
        "rounds": args.rounds,
        "injected_faults": faults,
        "monkey_strikes": dict(collections.Counter(s.action for s in monkey.strikes)),
        "recovered_events": dict(collections.Counter(e.kind for e in executor.events)),
        "clients_retried": sum(len(e.retried) for e in executor.events),
        "clients_kept_in_failed_calls": sum(len(e.kept) for e in executor.events),
        "clients_given_up": sum(len(e.given_up) for e in executor.events),
        "events": [asdict(e) for e in executor.events],
        "fault_free_seconds": clean_s,
        "chaos_seconds": chaos_s,
        "time_overhead": chaos_s / clean_s,
        "weights_equal": weights_equal(clean.state, chaotic.state),
        "deterministic_metrics_equal": same_metrics,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("events", "machine")}, indent=1))


if __name__ == "__main__":
    main()
