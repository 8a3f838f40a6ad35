"""B8 analysis: the routed union (the paper's Fig. 3), and whether IB scores find the experts
that matter, on B8's model (the partitioned MiniLM, 32 experts per layer, top-4, AG News).

1. |E_union| against batch size: distinct experts (over 6 layers x 32) that a batch of B
   samples routes to, on random training batches.
2. Failure rate against the memory budget: the share of steps whose routed union does not
   fit (budget-unaware MoE fine-tuning, `moe_all_routed`), and the share of the union a
   budget-aware client trains, over trace devices at several memory scales, for both
   `budgets.device_memory` mappings.
3. Which experts matter: a client trains every routed expert (2 steps, as in B8) from the
   initial model; each trained expert's update is then dropped in turn, and the loss
   increase on the client's data measured. Rank correlation with the batch IB score
   (eqs 5, 11, 14, averaged over the client's batches) and with plain usage, and the share
   of the total loss increase that the top 30% by each score keep.

    python bench/b8_analysis.py [--data ../shared/data/ag_news] [--clients 4] \
        [--out bench/results/b8] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from b8_paper_regime import config, regime_arguments
from common import machine_info
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from hfedmoe.platform.budgets.cost import expert_capacity, step_memory_bytes
from hfedmoe.platform.budgets.drawing import Budget, draw_budgets
from hfedmoe.platform.client import train_client
from hfedmoe.platform.config import parse_config
from hfedmoe.platform.federation import build_federation, make_trainer
from hfedmoe.platform.selection import ib_scores

BATCH_SIZES = [1, 2, 4, 8, 16, 32]
SCALES = [0.00125, 0.0025, 0.005, 0.01, 0.02, 0.04]


def unions(adapter, data, batch_size: int, batches: int, rng) -> np.ndarray:
    """|E_union| (all layers) of random batches."""
    sizes = []
    for _ in range(batches):
        rows = torch.from_numpy(rng.choice(len(data), batch_size, replace=False))
        with torch.no_grad():
            _, routing = adapter.forward(
                data.input_ids[rows], data.attention_mask[rows], capture_routing=True
            )
        sizes.append(int(routing.union.sum()))
    return np.array(sizes)


def failure_curves(fed, cfg, union_8: np.ndarray) -> dict:
    """Per memory scale and mapping: steps that fail training the whole union, and the
    mean share of the union a budget-aware step trains (0 for a client that cannot run)."""
    fp, batch = fed.footprint, cfg.federation.batch_size
    resident = step_memory_bytes(fp, 0, batch)
    full = step_memory_bytes(fp, fp.num_experts_total, batch)
    curves = {}
    for mapping in ("headroom", "total"):
        rows = []
        for scale in SCALES if mapping == "headroom" else [s * 40 for s in SCALES]:
            budgets_cfg = cfg.budgets.model_copy(
                update={"memory_scale": scale, "device_memory": mapping}
            )
            b = draw_budgets(budgets_cfg, 2000, 0, full, resident)
            capacity = np.array(
                [expert_capacity(fp, m, batch, "global") for m in b.memory_bytes], dtype=float
            )
            runs = np.array([m >= resident for m in b.memory_bytes])
            fits = capacity[:, None] >= union_8[None, :]
            admitted = np.where(runs[:, None], np.minimum(capacity[:, None], union_8) / union_8, 0)
            rows.append(
                {
                    "memory_scale": scale,
                    "all_routed_step_failure_rate": float(1 - fits.mean()),
                    "budget_aware_cannot_run": float(1 - runs.mean()),
                    "budget_aware_admitted_share": float(admitted.mean()),
                }
            )
        curves[mapping] = rows
    return curves


def expert_importance(fed, adapter, cfg, start, client: int) -> dict:
    """Drop each trained expert's update in turn: loss increase vs IB score and usage."""
    hp = cfg.hfedmoe
    adapter.load_state(start)
    shard = fed.shards[client]
    data = fed.train
    rows = torch.from_numpy(shard[:64])
    ids, mask, labels = data.input_ids[rows], data.attention_mask[rows], data.labels[rows]

    # Scores at the start model, per batch of 8 of the client's data, averaged.
    scores, usage = [], []
    with torch.no_grad():
        for lo in range(0, len(rows), 8):
            _, routing = adapter.forward(ids[lo : lo + 8], mask[lo : lo + 8], capture_routing=True)
            scores.append(ib_scores(routing.probs, hp.importance_mix, hp.beta).numpy())
            usage.append(routing.token_counts.numpy() / routing.token_counts.sum().item())
    ib, use = np.mean(scores, axis=0), np.mean(usage, axis=0)

    trainer = make_trainer(adapter, data, fed.footprint, cfg)
    unlimited = Budget("analysis", "analysis", 1e15, 1e12, 1e9, 1e9, None, 1.0)
    upload, _ = train_client(trainer, client, shard, unlimited, 0, start, 0)

    def loss() -> float:
        with torch.no_grad():
            logits, _ = adapter.forward(ids, mask)
            return float(torch.nn.functional.cross_entropy(logits, labels))

    trained = [
        (layer, int(e)) for layer, arrays in enumerate(upload.experts) for e in arrays["index"]
    ]
    # The client's model after training: the start plus its upload.
    local = copy.deepcopy(start)
    for group in ("shared", "gates"):
        getattr(local, group).update(getattr(upload, group))
    for layer, arrays in enumerate(upload.experts):
        for name, values in arrays.items():
            if name != "index":
                local.experts[layer][name][arrays["index"]] = values
    adapter.load_state(local)
    base = loss()
    before = adapter.state()  # to restore one expert at a time
    increase = []
    for layer, e in trained:
        experts = adapter.layers[layer].experts
        experts.write(
            [e], {n: torch.from_numpy(a[e : e + 1]) for n, a in start.experts[layer].items()}
        )
        increase.append(loss() - base)
        experts.write(
            [e], {n: torch.from_numpy(a[e : e + 1]) for n, a in before.experts[layer].items()}
        )
    increase = np.array(increase)
    ib_t = np.array([ib[layer, e] for layer, e in trained])
    use_t = np.array([use[layer, e] for layer, e in trained])
    keep = max(1, int(0.3 * len(trained)))
    positive = np.clip(increase, 0, None)
    oracle = np.sort(positive)[::-1][:keep].sum()

    def kept(score: np.ndarray) -> float:
        return float(positive[np.argsort(-score, kind="stable")[:keep]].sum() / oracle)

    rng = np.random.default_rng(client)
    return {
        "client": client,
        "trained_experts": len(trained),
        "loss_after_training": base,
        "loss_increase_mean": float(increase.mean()),
        "loss_increase_max": float(increase.max()),
        "spearman_ib": float(spearmanr(ib_t, increase).statistic),
        "spearman_usage": float(spearmanr(use_t, increase).statistic),
        "top30_kept_ib": kept(ib_t),
        "top30_kept_usage": kept(use_t),
        "top30_kept_random": float(np.mean([kept(rng.random(len(trained))) for _ in range(200)])),
    }


def plot(union: dict, curves: dict, path: Path, setting: float) -> None:
    fig = Figure(figsize=(12, 4.2))
    left, right = fig.subplots(1, 2)
    sizes = [union[str(b)] for b in BATCH_SIZES]
    left.errorbar(
        BATCH_SIZES, [s["mean"] for s in sizes], yerr=[s["sd"] for s in sizes], marker="o"
    )
    left.axhline(union["experts_total"], color="grey", linewidth=0.8, label="all experts")
    left.set(
        xscale="log", xlabel="batch size (samples of 64 tokens)", ylabel="|E_union| (6 layers)"
    )
    left.set_xticks(BATCH_SIZES, [str(b) for b in BATCH_SIZES])
    left.legend()
    rows = curves["headroom"]
    scales = [r["memory_scale"] for r in rows]
    right.plot(
        scales,
        [r["all_routed_step_failure_rate"] for r in rows],
        "o-",
        label="all-routed step fails",
    )
    right.plot(
        scales,
        [r["budget_aware_admitted_share"] for r in rows],
        "s--",
        label="budget-aware: share of union trained",
    )
    right.axvline(setting, color="grey", linewidth=0.8, label="B8 setting")
    right.set(
        xscale="log", xlabel="memory scale (device RAM x scale = headroom)", ylabel="rate / share"
    )
    right.set_xticks(scales, [f"{s:g}" for s in scales])
    right.minorticks_off()
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    regime_arguments(parser)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results/b8"))
    args = parser.parse_args(argv)
    args.data, args.traces = args.data.resolve(), args.traces.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    cfg = parse_config(config("ag_news", "moe_all_routed", 0, args))
    fed, adapter = build_federation(cfg)
    rng = np.random.default_rng(0)
    batches = 5 if args.quick else 30

    started = time.perf_counter()
    union = {"experts_total": fed.footprint.num_experts_total}
    samples = {}
    for b in BATCH_SIZES:
        samples[b] = unions(adapter, fed.train, b, batches, rng)
        union[str(b)] = {"mean": float(samples[b].mean()), "sd": float(samples[b].std())}
    curves = failure_curves(fed, cfg, samples[8])
    plot(union, curves, args.out / "union_and_failures.png", args.memory_scale)
    clients = sorted(range(len(fed.shards)), key=lambda c: -len(fed.shards[c]))[: args.clients]
    start = adapter.state()
    importance = [expert_importance(fed, adapter, cfg, start, c) for c in clients]
    report = {
        "machine": machine_info(),
        "command": "python bench/b8_analysis.py" + (" --quick" if args.quick else ""),
        "union_by_batch_size": union,
        "failure_curves": curves,
        "expert_importance": importance,
        "seconds": time.perf_counter() - started,
    }
    (args.out / "analysis.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
