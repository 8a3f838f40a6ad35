"""B8: every strategy in the paper's regime (distinct experts, budgets that bind).

The pretrained MiniLM with each FFN partitioned into 32 fine-grained experts (48 neurons,
router from the neuron clusters), top-4; 50 clients with Dirichlet(0.5) label skew; budgets
from the real AI Benchmark traces with `device_memory: headroom`: every phone holds the
model and a batch's activations, and its RAM x `--memory-scale` is what it has for the
gradients and AdamW state of the experts it trains. At the default scale a mean client can
train about 30% of the experts a batch routes to (0.5 GiB phones about 3%, 12 GiB phones
about 75%), so no client fits a batch's routed union and budget-unaware training fails.

AG News (../shared, the 7,600-row test split re-split 80/20): every registered strategy,
3 seeds. The embedded BBC News: four strategies, 2 seeds. In-process runner (bit-identical
to Ray), one torch thread per run. Each run is saved as it finishes; rerunning skips the
runs already saved, so the benchmark resumes where it stopped.

    python bench/b8_paper_regime.py [--data ../shared/data/ag_news] \
        [--traces ../shared/data/device_traces] [--memory-scale 0.005] [--rounds 30] \
        [--only ag_news|bbc_news] [--out bench/results/b8] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from b4_paper_claims import mean_sd, plot
from common import machine_info

from hfedmoe.platform.budgets.cost import expert_capacity
from hfedmoe.platform.config import parse_config
from hfedmoe.platform.executors import run_in_process
from hfedmoe.platform.federation import build_federation
from hfedmoe.tracking.mlflow_run import summarise

AG_NEWS_STRATEGIES = [
    "hfedmoe",
    "budget_top_usage",
    "budget_random",
    "moe_all_routed",
    "fedavg_full",
    "flex",
    "hfedmoe_no_ib",
    "hfedmoe_plain_agg",
    "hfedmoe_no_gate_agg",
]
BBC_STRATEGIES = ["hfedmoe", "budget_top_usage", "budget_random", "moe_all_routed"]
PLAN = {"ag_news": (AG_NEWS_STRATEGIES, [0, 1, 2]), "bbc_news": (BBC_STRATEGIES, [0, 1])}
TARGET = {"ag_news": 0.75, "bbc_news": 0.8}


def config(dataset: str, strategy: str, seed: int, args: argparse.Namespace) -> dict:
    quick = args.quick
    data = {
        "source": dataset,
        "max_length": 64,
        "max_test_samples": 60 if quick else 300,
        "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 8},
    }
    if dataset == "ag_news":
        data["path"] = str(args.data)
    return {
        "name": f"b8-{dataset}-{strategy}-s{seed}",
        "seed": seed,
        "data": data,
        "model": {
            "kind": "upcycled",
            "expert_init": args.expert_init,
            "num_experts": 8 if quick else args.num_experts,
            "top_k": 2 if quick else args.top_k,
            "num_layers": 2 if quick else None,
            "freeze": ["embed"],
        },
        "federation": {
            "strategy": strategy,
            "rounds": 2 if quick else args.rounds,
            "num_clients": 50,
            "clients_per_round": 3 if quick else 5,
            "max_local_steps": 1 if quick else 2,
            "batch_size": 8,
            "lr": 3e-4,
            "eval_every": 1 if quick else 2,
            "target_accuracy": TARGET[dataset],
        },
        "hfedmoe": {"tau": 1 / args.num_experts, "beta": 0.1, "importance_mix": 0.5},
        "budgets": {
            "distribution": "traces",
            "traces_dir": str(args.traces),
            "memory_scale": args.memory_scale,
            "device_memory": "headroom",
        },
        "tracking": {"enabled": False},
    }


def capacity_shares(raw: dict) -> dict:
    """C_budget of every client over the model's routable experts: the regime before training."""
    cfg = parse_config(raw)
    federation, _ = build_federation(cfg)
    fp, batch = federation.footprint, cfg.federation.batch_size
    shares = [
        expert_capacity(fp, m, batch, "global") / fp.num_experts_total
        for m in federation.budgets.memory_bytes
    ]
    return {
        "num_experts_total": fp.num_experts_total,
        "capacity_share_mean": statistics.mean(shares),
        "capacity_share_min": min(shares),
        "capacity_share_max": max(shares),
        "clients_with_no_expert": sum(s == 0 for s in shares),
    }


def run_saved(path: Path, raw: dict, target: float, labels: dict) -> dict:
    """Run a config in process and save its record at ``path``; a saved record is reused."""
    if path.is_file():
        return json.loads(path.read_text())
    started = time.perf_counter()
    history = run_in_process(parse_config(raw)).history
    record = {
        **labels,
        "config": raw,
        "summary": summarise(history, target),
        "rounds": [asdict(r) for r in history.rounds],
        "clients": [asdict(c) for c in history.clients],
        "wall_seconds": time.perf_counter() - started,
    }
    path.write_text(json.dumps(record, indent=1))
    return record


def run_one(dataset: str, strategy: str, seed: int, args, out: Path) -> dict:
    path = out / f"{dataset}-{strategy}-s{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    raw = config(dataset, strategy, seed, args)
    labels = {"dataset": dataset, "strategy": strategy, "seed": seed}
    record = run_saved(path, raw, TARGET[dataset], labels)
    print(f"{dataset} {strategy} seed {seed}: {record['summary']}", flush=True)
    return record


def table(records: list[dict], strategies: list[str], target: float) -> str:
    """Outcome and the quantities that show the regime binds, per strategy over seeds."""
    lines = [
        f"| strategy | runs | final accuracy | rounds to {target:g} (reached) "
        f"| sim. h to {target:g} | failed / sampled | admitted share (sd over clients) "
        "| routed per step | routing consistency (eq 18) | GB moved |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for strategy in strategies:
        runs = [r for r in records if r["strategy"] == strategy]
        if not runs:
            continue
        summaries = [r["summary"] for r in runs]
        reached = [s["rounds_to_target"] for s in summaries if s["rounds_to_target"] is not None]
        hours = [
            s["simulated_seconds_to_target"] / 3600
            for s in summaries
            if s["simulated_seconds_to_target"] is not None
        ]
        trained = [m for r in runs for m in r["rounds"] if m["succeeded"]]
        sampled = sum(m["sampled"] for r in runs for m in r["rounds"])
        admitted = mean_sd([m["admitted_share"] for m in trained], 2)
        spread = statistics.mean(m["admitted_share_sd"] for m in trained) if trained else None
        lines.append(
            f"| {strategy} | {len(runs)} | {mean_sd([s['final_accuracy'] for s in summaries])} "
            f"| {mean_sd(reached, 1)} ({len(reached)}/{len(runs)}) | {mean_sd(hours, 2)} "
            f"| {sum(s['client_failures'] for s in summaries)} / {sampled} "
            f"| {admitted} ({'-' if spread is None else f'{spread:.2f}'}) "
            f"| {mean_sd([m['routed_per_step'] for m in trained], 1)} "
            f"| {mean_sd([m['routing_consistency'] for m in trained], 3)} "
            f"| {statistics.mean(s['bytes_communicated'] for s in summaries) / 1e9:.2f} |"
        )
    return "\n".join(lines)


def regime_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments `config` reads; b8_analysis takes the same, so both see one regime."""
    parser.add_argument("--data", type=Path, default=Path("../shared/data/ag_news"))
    parser.add_argument("--traces", type=Path, default=Path("../shared/data/device_traces"))
    parser.add_argument("--memory-scale", type=float, default=0.005)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--expert-init", default="partition", choices=["partition", "drop"])
    parser.add_argument("--num-experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    regime_arguments(parser)
    parser.add_argument("--only", choices=sorted(PLAN), help="run one data set's share only")
    parser.add_argument("--out", type=Path, default=Path("bench/results/b8"))
    parser.add_argument("--strategies", nargs="+", help="a subset of the plan's strategies")
    parser.add_argument("--seeds", type=int, help="only the first N of the plan's seeds")
    args = parser.parse_args(argv)
    # This call's plan: PLAN itself stays whole for the next call in the same process.
    plan = {
        dataset: (
            [s for s in strategies if not args.strategies or s in args.strategies],
            seeds[: args.seeds] if args.seeds else seeds,
        )
        for dataset, (strategies, seeds) in PLAN.items()
    }
    args.data, args.traces = args.data.resolve(), args.traces.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # one core per run: the other stays free, and runs compare fairly

    regime_path = args.out / "regime.json"
    if not regime_path.is_file():
        regime = {d: capacity_shares(config(d, "hfedmoe", 0, args)) for d in plan}
        regime["machine"] = machine_info()
        regime_path.write_text(json.dumps(regime, indent=1))
    # Seed by seed, so that an interrupted benchmark has every strategy at equal seeds.
    datasets = [args.only] if args.only else list(plan)
    order = [
        (d, s, seed)
        for seed in range(max(len(plan[d][1]) for d in datasets))
        for d in datasets
        for s in plan[d][0]
        if seed < len(plan[d][1])
    ]
    records = [run_one(d, s, seed, args, args.out) for d, s, seed in order]
    for dataset in datasets:
        strategies = plan[dataset][0]
        mine = [r for r in records if r["dataset"] == dataset]
        report = table(mine, strategies, TARGET[dataset])
        (args.out / f"{dataset}-table.md").write_text(report + "\n")
        plot(mine, args.out / f"{dataset}-accuracy.png", strategies, TARGET[dataset])
        print(f"\n{dataset}\n{report}")


if __name__ == "__main__":
    main()
