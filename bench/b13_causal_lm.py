"""B13: causal-LM fine-tuning (task: causal_lm) of a decoder MoE, configs/instruct.yaml.

A tiny random-init Qwen3-MoE with its own LM head learns BBC News as topic instructions
("name the topic of this article"), federated with HFedMoE under two budget tiers (the
slow one admits 3 of the 8 experts a step). Every round evaluates the held-out token
loss, its perplexity and the exact match of the greedy answer against the topic; chance
is answering the most frequent test topic. Reported per round: losses, perplexity,
exact match, wall and simulated seconds, routed experts per step and the admitted share.
Raw JSON per strategy in --out.

    python bench/b13_causal_lm.py [--rounds 15] [--strategies hfedmoe budget_random] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from common import machine_info

from hfedmoe.platform.config import load_config
from hfedmoe.platform.executors import run_in_process

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "instruct.yaml"


def run_one(strategy: str, args: argparse.Namespace) -> dict:
    overrides = {"federation.strategy": strategy, "federation.rounds": args.rounds}
    if args.quick:
        overrides.update({"federation.max_local_steps": 2, "data.max_test_samples": 20})
    cfg = load_config(CONFIG, overrides)
    started = time.perf_counter()
    run = run_in_process(cfg)
    wall = time.perf_counter() - started
    counts = np.bincount(run.fed.test.labels.numpy(), minlength=len(run.fed.label_names))
    return {
        "strategy": strategy,
        "config": cfg.model_dump(mode="json"),
        "wall_seconds_total": wall,
        "chance_exact_match": float(counts.max() / counts.sum()),
        "test_samples": int(counts.sum()),
        "rounds": [asdict(r) for r in run.history.rounds],
        "generations": {str(k): v for k, v in run.history.generations.items()},
        "machine": machine_info(),
    }


def table(records: list[dict]) -> str:
    lines = [
        "| strategy | round | train loss | test loss | perplexity | exact match | wall s "
        "| simulated s | routed/step | admitted |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for record in records:
        for r in record["rounds"]:
            cells = [
                record["strategy"],
                str(r["round"] + 1),
                f"{r['train_loss']:.3f}",
                f"{r['test_loss']:.3f}",
                f"{r['perplexity']:.2f}",
                f"{r['accuracy']:.2f}",
                f"{r['wall_seconds']:.1f}",
                f"{r['round_seconds']:.2f}",
                f"{r['routed_per_step']:.2f}",
                f"{r['admitted_share']:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--strategies", nargs="+", default=["hfedmoe", "budget_random"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/b13"))
    parser.add_argument("--quick", action="store_true", help="2 rounds, 2 steps, 20 tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.strategies = 2, args.strategies[:1]
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for strategy in args.strategies:
        record = run_one(strategy, args)
        (args.out / f"{strategy}.json").write_text(json.dumps(record, indent=1))
        records.append(record)
    report = table(records)
    (args.out / "table.md").write_text(report + "\n")
    print(report)
    for record in records:
        print(
            f"{record['strategy']}: chance {record['chance_exact_match']:.2f} over "
            f"{record['test_samples']} test samples, {record['wall_seconds_total']:.0f} s"
        )


if __name__ == "__main__":
    main()
