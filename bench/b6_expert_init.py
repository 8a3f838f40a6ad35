"""B6: expert initialisation. What do copy, drop and partition experts give selection?

For each model.expert_init in {copy, drop, partition}, E experts per layer and k in
{E/16, E/8, E/4, E/2}: the MoE built from the bundled MiniLM is fine-tuned centrally on BBC
News (a plain AdamW loop on the adapter, the same seed, data and steps for every cell),
then evaluated on a held-out stratified split. Reported per cell: held-out accuracy, the
router entropy (mean per-token softmax entropy over log E; 1 = uniform) at initialisation
and after training, and |E_union|, the distinct experts one batch of 8 x 64 held-out tokens
routes to (mean over layers), also at initialisation and after training.

Only routed experts are computed and updated (the adapter's per-expert leaves), but a
token still passes k full-width FFNs under copy and drop, so their cost grows with k; the
defaults (2 layers, 12 steps of 8 x 64 tokens, 160 train and 200 test texts, E = 32 and
64) take about 15 minutes on one core; --layers 6 about three times that.

    python bench/b6_expert_init.py [--layers 6] [--quick] [--out bench/results/b6-grid.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hfedmoe.platform.config import ModelConfig
from hfedmoe.platform.data.corpora import load_corpus, stratified_split
from hfedmoe.platform.data.tokenisation import (
    batch_tensors,
    default_tokenizer,
    iterate_batches,
    tokenize,
)
from hfedmoe.platform.models import build_adapter

INITS = ("copy", "drop", "partition")
K_FRACTIONS = (16, 8, 4, 2)  # k = E / fraction


def subsample(indices: np.ndarray, labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` of `indices`, stratified by label, sorted."""
    if count >= len(indices):
        return indices
    keep, _ = stratified_split(labels[indices], 1 - count / len(indices), seed)
    return np.sort(indices[keep])


def routing_stats(adapter, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(router entropy / log E, distinct experts routed to per layer) on one batch."""
    # routing.probs averages each sample's token softmaxes; the entropy needs the tokens.
    logits: list[torch.Tensor] = []
    hooks = [
        layer.router.register_forward_hook(lambda _m, _i, out: logits.append(out[0].detach()))
        for layer in adapter.layers
    ]
    adapter.model.eval()
    try:
        with torch.no_grad():
            _, routing = adapter.forward(
                batch["input_ids"], batch["attention_mask"], capture_routing=True
            )
    finally:
        for hook in hooks:
            hook.remove()
    real = batch["attention_mask"].bool().flatten()
    entropies = []
    for layer_logits in logits:
        probs = torch.softmax(layer_logits.float(), dim=-1)[real]
        entropies.append(float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()))
    union = float(routing.routed.any(dim=1).sum(dim=-1).float().mean())
    return float(np.mean(entropies)) / math.log(adapter.num_experts), union


def accuracy(adapter, data, indices: np.ndarray, batch_size: int) -> float:
    adapter.model.eval()
    correct = 0
    with torch.no_grad():
        for batch in iterate_batches(data, indices, batch_size, rng=None):
            logits, _ = adapter.forward(batch["input_ids"], batch["attention_mask"])
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(indices)


def fine_tune(adapter, data, train: np.ndarray, args) -> float:
    """`args.steps` AdamW steps on batches of the train split; returns the last loss."""
    rng = np.random.default_rng(args.seed)
    loss = float("nan")
    with adapter.training(stop_gradient=False) as leaves:
        trainable = leaves.for_step(None)
        # Experts a batch does not route to get no gradient and AdamW skips them.
        optimizer = torch.optim.AdamW(list(trainable.values()), lr=args.lr)
        step = 0
        while step < args.steps:
            for batch in iterate_batches(data, train, args.batch_size, rng):
                logits, _ = adapter.forward(batch["input_ids"], batch["attention_mask"])
                loss_t = F.cross_entropy(logits, batch["labels"])
                optimizer.zero_grad(set_to_none=True)
                loss_t.backward()
                optimizer.step()
                loss = float(loss_t.detach())
                step += 1
                if step == args.steps:
                    break
    return loss


def run_cell(init: str, num_experts: int, top_k: int, data, split, num_labels: int, args):
    train, test, probe = split
    cfg = ModelConfig(
        kind="upcycled",
        num_experts=num_experts,
        top_k=top_k,
        num_layers=args.layers,
        expert_init=init,
        freeze=["embed"],
    )
    started = time.perf_counter()
    adapter = build_adapter(cfg, num_labels, seed=args.seed)
    built = time.perf_counter()
    entropy0, union0 = routing_stats(adapter, probe)
    last_loss = fine_tune(adapter, data, train, args)
    trained = time.perf_counter()
    entropy, union = routing_stats(adapter, probe)
    return {
        "expert_init": init,
        "num_experts": num_experts,
        "top_k": top_k,
        "accuracy": accuracy(adapter, data, test, args.eval_batch_size),
        "router_entropy_init": entropy0,
        "router_entropy": entropy,
        "union_init": union0,
        "union": union,
        "last_train_loss": last_loss,
        "params_per_expert": adapter.params_per_expert(),
        "build_s": built - started,
        "train_s": trained - built,
    }


def markdown(cells: list[dict]) -> str:
    lines = [
        "| init | E | k | accuracy | router H/log E (init -> trained) "
        "| E_union of 8x64 tokens (init -> trained) | params/expert | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        lines.append(
            f"| {c['expert_init']} | {c['num_experts']} | {c['top_k']} | {c['accuracy']:.3f} "
            f"| {c['router_entropy_init']:.2f} -> {c['router_entropy']:.2f} "
            f"| {c['union_init']:.1f} -> {c['union']:.1f} | {c['params_per_expert']:,} "
            f"| {c['train_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--experts", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--layers", type=int, default=2, help="first N MiniLM layers")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-samples", type=int, default=160)
    parser.add_argument("--test-samples", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/b6-grid.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.experts, args.layers, args.steps = [16], 1, 2
        args.train_samples, args.test_samples, args.max_length = 16, 16, 16
    torch.set_num_threads(args.threads)

    corpus = load_corpus("bbc_news", None, "train", ["text"], "label")
    labels = np.asarray(corpus.labels)
    train, test = stratified_split(labels, 0.2, args.seed)
    train = subsample(train, labels, args.train_samples, args.seed)
    test = subsample(test, labels, args.test_samples, args.seed)
    used = np.concatenate([train, test])
    texts = [corpus.texts[i] for i in used]
    data = tokenize(texts, labels[used], default_tokenizer(), args.max_length)
    train_rows, test_rows = np.arange(len(train)), np.arange(len(train), len(used))
    probe = batch_tensors(data, test_rows[:8])  # the 8 x max_length routing probe
    split = (train_rows, test_rows, probe)

    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"
    }
    # Resumable: a report of the same fine-tuning settings keeps its cells (the grid may
    # differ), and the report is rewritten after every cell.
    done: dict[tuple, dict] = {}
    if args.out.is_file():
        previous = json.loads(args.out.read_text())
        same = ("layers", "steps", "batch_size", "max_length", "train_samples", "test_samples")
        if all(previous["settings"].get(k) == settings[k] for k in (*same, "lr", "seed")):
            done = {_key(c): c for c in previous["cells"]}
    cells = []
    for num_experts in args.experts:
        for fraction in K_FRACTIONS:
            top_k = max(1, num_experts // fraction)
            for init in args.inits:
                cell = done.get((init, num_experts, top_k))
                if cell is None:
                    cell = run_cell(init, num_experts, top_k, data, split, corpus.num_classes, args)
                    print(json.dumps(cell), flush=True)
                cells.append(cell)
                report = {
                    "benchmark": "b6_expert_init",
                    "machine": platform.machine(),
                    "processor": platform.processor(),
                    "threads": args.threads,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "settings": settings,
                    "train_size": len(train),
                    "test_size": len(test),
                    "cells": cells,
                }
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(cells))


def _key(cell: dict) -> tuple:
    return cell["expert_init"], cell["num_experts"], cell["top_k"]


if __name__ == "__main__":
    main()
