"""B4: the paper's claims on real data, HFedMoE against its baselines and ablations.

AG News (the 7,600-row official test split from ../shared, re-split 80/20 with a seeded
stratified split), the upcycled pretrained MiniLM (8 experts per layer, top-2), 50
clients with Dirichlet(0.5) label skew, budgets drawn from the real AI Benchmark device
traces and bandwidth profiles, 3 seeds, seven strategies. Runs in the in-process
reference runner (bit-identical to the Ray runner; no actor overhead in CPU hours).
Every run is saved as it finishes, so an interrupted benchmark resumes where it stopped.

    python bench/b4_paper_claims.py [--data ../shared/data/ag_news] \
        [--traces ../shared/data/device_traces] [--seeds 0 1 2] [--memory-scale 0.25] \
        [--strategies ...] [--out bench/results/b4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from hfedmoe.platform.config import parse_config
from hfedmoe.platform.executors import run_in_process
from hfedmoe.tracking.mlflow_run import summarise

STRATEGIES = [
    "hfedmoe",
    "fedavg_full",
    "budget_random",
    "budget_top_usage",
    "hfedmoe_no_ib",
    "hfedmoe_plain_agg",
    "hfedmoe_no_gate_agg",
]
TARGET = 0.8


def config(strategy: str, seed: int, args: argparse.Namespace) -> dict:
    """The experiment; memory_scale 0.25 (the default) maps phone RAM onto this model's needs.

    The full fine-tuning step of the upcycled MiniLM (48 experts, AdamW, batch 8 x 64)
    needs ~1.18 GB and its shared part alone ~0.50 GB: with RAM x 0.25 a 4 GB phone can
    train about 35 experts, a 6 GB phone everything, a 1-2 GB phone nothing.
    """
    quick = args.quick
    return {
        "name": f"b4-{strategy}-s{seed}",
        "seed": seed,
        "data": {
            "source": "ag_news",
            "path": str(args.data),
            "max_length": 64,
            "max_test_samples": 120 if quick else 760,
            "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 8},
        },
        "model": {
            "kind": "upcycled",
            "num_experts": 8,
            "top_k": 2,
            "num_layers": 2 if quick else None,
        },
        "federation": {
            "strategy": strategy,
            "rounds": 2 if quick else 12,
            "num_clients": 50,
            "clients_per_round": 3 if quick else 6,
            "max_local_steps": 1 if quick else 3,
            "batch_size": 8,
            "lr": 1e-4,
            "eval_every": 1 if quick else 3,
            "target_accuracy": TARGET,
        },
        "hfedmoe": {"tau": 0.1, "beta": 0.1, "importance_mix": 0.5},
        "budgets": {
            "distribution": "traces",
            "traces_dir": str(args.traces),
            "memory_scale": args.memory_scale,
        },
        "tracking": {"enabled": False},
    }


def run_one(strategy: str, seed: int, args, out: Path) -> dict:
    path = out / f"{strategy}-s{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    cfg = parse_config(config(strategy, seed, args))
    started = time.perf_counter()
    history = run_in_process(cfg).history
    record = {
        "strategy": strategy,
        "seed": seed,
        "summary": summarise(history, TARGET),
        "rounds": [asdict(r) for r in history.rounds],
        "wall_seconds": time.perf_counter() - started,
    }
    path.write_text(json.dumps(record, indent=1))
    print(f"{strategy} seed {seed}: {record['summary']}", flush=True)
    return record


def mean_sd(values: list[float | None], digits: int = 3) -> str:
    """'mean ± sd' of the values given (None skipped), '-' when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(records: list[dict], strategies: list[str], target: float) -> str:
    lines = [
        f"| strategy | final accuracy | rounds to {target:g} (reached/seeds) "
        f"| sim. time to {target:g} (s) "
        "| failed clients / sampled | GB communicated |",
        "|---|---|---|---|---|---|",
    ]
    for strategy in strategies:
        runs = [r for r in records if r["strategy"] == strategy]
        if not runs:
            continue
        summaries = [r["summary"] for r in runs]
        reached = [s["rounds_to_target"] for s in summaries if s["rounds_to_target"] is not None]
        sampled = sum(m["sampled"] for r in runs for m in r["rounds"])
        lines.append(
            f"| {strategy} | {mean_sd([s['final_accuracy'] for s in summaries])} "
            f"| {mean_sd(reached)} ({len(reached)}/{len(runs)}) "
            f"| {mean_sd([s['simulated_seconds_to_target'] for s in summaries])} "
            f"| {sum(s['client_failures'] for s in summaries)} / {sampled} "
            f"| {statistics.mean(s['bytes_communicated'] for s in summaries) / 1e9:.2f} |"
        )
    return "\n".join(lines)


def plot(records: list[dict], path: Path, strategies: list[str], target: float) -> None:
    fig = Figure(figsize=(12, 4.2))
    by_round, by_time = fig.subplots(1, 2)
    for strategy in strategies:
        runs = [r for r in records if r["strategy"] == strategy]
        if not runs:
            continue
        evaluated = [[m for m in r["rounds"] if m["accuracy"] is not None] for r in runs]
        rounds = [m["round"] + 1 for m in evaluated[0]]
        accuracy = np.mean([[m["accuracy"] for m in e] for e in evaluated], axis=0)
        seconds = np.mean([[m["simulated_seconds"] for m in e] for e in evaluated], axis=0)
        style = "-" if strategy.startswith("hfedmoe") else "--"
        by_round.plot(rounds, accuracy, style, marker="o", label=strategy)
        by_time.plot(seconds / 3600, accuracy, style, marker="o", label=strategy)
    by_round.set(xlabel="round", ylabel="test accuracy (mean over seeds)")
    by_time.set(xlabel="simulated time (h)", ylabel="test accuracy (mean over seeds)")
    for ax in (by_round, by_time):
        ax.grid(alpha=0.3)
        ax.axhline(target, color="grey", linewidth=0.8)
    by_time.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/ag_news"))
    parser.add_argument("--traces", type=Path, default=Path("../shared/data/device_traces"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests")
    parser.add_argument(
        "--memory-scale", type=float, default=0.25, help="device RAM x this = the memory budget"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/b4"))
    args = parser.parse_args(argv)
    args.data, args.traces = args.data.resolve(), args.traces.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    records = [run_one(s, seed, args, args.out) for seed in args.seeds for s in args.strategies]
    report = table(records, args.strategies, TARGET)
    (args.out / "table.md").write_text(report + "\n")
    plot(records, args.out / "accuracy.png", args.strategies, TARGET)
    print(report)


if __name__ == "__main__":
    main()
