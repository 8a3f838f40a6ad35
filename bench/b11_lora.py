"""B11: whole experts vs LoRA vs QLoRA experts on one federation, in B8's regime.

B8's setting (partitioned MiniLM, 6 x 32 experts of width 48, top-4; 50 clients,
Dirichlet(0.5) over AG News; trace budgets with `device_memory: headroom` at the same
memory scale), trained three ways:

* full: every selected expert trains whole (fp32 weights, gradients, AdamW moments);
* lora: rank-8 adapters per expert and on attention, frozen fp32 base;
* qlora: the same adapters over experts stored in 4 bits (NF4, bitsandbytes).

Each with `hfedmoe` (selection within C_budget) and `moe_all_routed` (budget-unaware: a
step trains its whole routed union, and fails when that does not fit), 2 seeds. Reported:
C_budget and the share of the routed union it admits, clients that fail, bytes per round,
wall time per step, accuracy and simulated time to a target; and, per mode, one step's
modelled memory beside the bytes of the tensors it really holds (weights and 4-bit
buffers, saved activations, gradients, AdamW moments). Runs are saved as they finish and
skipped when rerun.

    python bench/b11_lora.py [--data ../shared/data/ag_news] [--rounds 20] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from b4_paper_claims import mean_sd, plot
from b8_paper_regime import config as b8_config
from b8_paper_regime import regime_arguments, run_saved
from common import machine_info

from hfedmoe.platform.budgets.cost import step_memory_bytes
from hfedmoe.platform.client import ExpertAdamW
from hfedmoe.platform.config import parse_config
from hfedmoe.platform.data.tokenisation import iterate_batches
from hfedmoe.platform.federation import build_federation

MODES = {
    "full": {"lr": 3e-4, "model": {}},
    # LoRA's usual learning rate is about ten times full fine-tuning's.
    "lora": {"lr": 1e-3, "model": {"lora": {"rank": 8}}},
    "qlora": {"lr": 1e-3, "model": {"lora": {"rank": 8}, "quantization": "nf4"}},
}
STRATEGIES = ["hfedmoe", "moe_all_routed"]
SEEDS = [0, 1]
TARGET = 0.7


def config(mode: str, strategy: str, seed: int, args: argparse.Namespace) -> dict:
    raw = b8_config("ag_news", strategy, seed, args)
    raw["name"] = f"b11-{mode}-{strategy}-s{seed}"
    raw["model"].update(MODES[mode]["model"])
    raw["federation"]["lr"] = MODES[mode]["lr"]
    raw["federation"]["target_accuracy"] = TARGET
    return raw


def measured_step(raw: dict) -> dict:
    """One client step's modelled memory beside the bytes of the tensors it holds."""
    cfg = parse_config(raw)
    fed, adapter = build_federation(cfg)
    fp, batch_size = fed.footprint, cfg.federation.batch_size
    budget = fed.budgets.memory_bytes
    rng = np.random.default_rng(0)
    batch = next(iterate_batches(fed.train, fed.shards[0], batch_size, rng))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    optimizer = ExpertAdamW(1e-4, 0.0)
    seconds = []
    with adapter.training(stop_gradient=False) as leaves:
        for _ in range(3):  # the first step also allocates; the median of three is reported
            started = time.perf_counter()
            saved.clear()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits, routing = adapter.forward(
                    batch["input_ids"], batch["attention_mask"], capture_routing=True
                )
            active = routing.union  # the budget-unaware step: the whole routed union
            adapter.set_active_experts(active)
            tensors = leaves.for_step(active)
            loss = F.cross_entropy(logits, batch["labels"])
            torch.autograd.backward(loss, inputs=list(tensors.values()))
            grads = sum(t.grad.nbytes for t in tensors.values() if t.grad is not None)
            optimizer.step(tensors)
            seconds.append(time.perf_counter() - started)
    moments = sum(m.nbytes + v.nbytes for m, v, _ in optimizer.state.values())
    params = {p.untyped_storage().data_ptr() for p in adapter.model.parameters()}
    activations = sum(b for ptr, b in saved.items() if ptr not in params)
    weights = sum(p.nbytes for p in adapter.model.parameters())
    weights += sum(b.nbytes for b in adapter.model.buffers())
    union = int(active.sum())
    return {
        "union": union,
        "wall_seconds_per_step": statistics.median(seconds),
        "modelled_bytes": step_memory_bytes(fp, union, batch_size),
        "measured_bytes": weights + activations + grads + moments,
        "measured": {
            "weights": weights,
            "activations": activations,
            "gradients": grads,
            "adamw": moments,
        },
        "trained_params_per_expert": fp.params_per_expert,
        "budget_mean_bytes": float(statistics.mean(budget)),
    }


def run_one(mode: str, strategy: str, seed: int, args, out: Path) -> dict:
    path = out / f"{mode}-{strategy}-s{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    raw = config(mode, strategy, seed, args)
    record = run_saved(path, raw, TARGET, {"mode": mode, "strategy": strategy, "seed": seed})
    print(f"{mode} {strategy} seed {seed}: {record['summary']}", flush=True)
    return record


def _mean(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f}" if values else "-"


def table(records: list[dict], steps: dict) -> str:
    lines = [
        f"| mode | strategy | runs | final accuracy | rounds to {TARGET:g} (reached) "
        f"| sim. h to {TARGET:g} | failed / sampled | C_budget (mean) | admitted share "
        "| client step MB (modelled, mean) | MB per round | s per union step "
        "| union step: modelled / measured MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        step = steps[mode]
        for strategy in STRATEGIES:
            runs = [r for r in records if r["mode"] == mode and r["strategy"] == strategy]
            if not runs:
                continue
            reached = [r["summary"]["rounds_to_target"] for r in runs]
            reached = [x for x in reached if x is not None]
            hours = [r["summary"]["simulated_seconds_to_target"] for r in runs]
            clients = [c for r in runs for c in r["clients"]]
            ok = [c for c in clients if c["failure"] is None]
            rounds = [m for r in runs for m in r["rounds"]]
            cells = [
                mode,
                strategy,
                str(len(runs)),
                mean_sd([r["summary"]["final_accuracy"] for r in runs]),
                f"{_mean(reached)} ({len(reached)}/{len(runs)})",
                _mean([h / 3600 for h in hours if h is not None]),
                f"{sum(c['failure'] is not None for c in clients)} / {len(clients)}",
                _mean([c["capacity"] for c in clients]),
                _mean([c["admitted_share"] for c in ok]),
                _mean([c["memory_bytes"] / 1e6 for c in clients]),
                _mean([(m["bytes_down"] + m["bytes_up"]) / 1e6 for m in rounds]),
                f"{step['wall_seconds_per_step']:.3f}",
                f"{step['modelled_bytes'] / 1e6:.1f} / {step['measured_bytes'] / 1e6:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    regime_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("bench/results/b11"))
    parser.set_defaults(rounds=20)
    args = parser.parse_args(argv)
    args.data, args.traces = args.data.resolve(), args.traces.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    steps_path = args.out / "steps.json"
    if not steps_path.is_file():
        steps = {m: measured_step(config(m, "hfedmoe", 0, args)) for m in MODES}
        steps["machine"] = machine_info()
        steps_path.write_text(json.dumps(steps, indent=1))
    steps = json.loads(steps_path.read_text())
    records = [
        run_one(mode, strategy, seed, args, args.out)
        for strategy in STRATEGIES
        for seed in (SEEDS[:1] if args.quick else SEEDS)
        for mode in MODES
    ]
    report = table(records, steps)
    (args.out / "table.md").write_text(report + "\n")
    print(report)
    for mode in MODES:
        step = steps[mode]
        print(f"{mode}: union {step['union']}, measured {step['measured']}")
    hfedmoe = [r for r in records if r["strategy"] == "hfedmoe"]
    for r in hfedmoe:
        r["strategy"] = r["mode"]  # plot() groups by strategy
    plot(hfedmoe, args.out / "accuracy.png", list(MODES), TARGET)


if __name__ == "__main__":
    main()
