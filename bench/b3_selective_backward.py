"""B3: selective backward. Does training fewer experts save time in proportion to FLOPs?

A medium Qwen3-MoE (hidden 512, 16 experts, top-2, 4 MoE layers, expert width 1024) at
batch 8 x 128 tokens. For 16, 8, 4 and 2 trainable experts per layer, in both backward
modes, it times the training step (forward + backward, and separately the optimizer)
and counts its FLOPs with torch.utils.flop_counter in a separate pass. The target: each
time ratio t(k)/t(16) within 1.15x of the FLOP ratio F(k)/F(16).

    python bench/b3_selective_backward.py [--quick] [--repeats 21] [--out bench/results/b3.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hfedmoe.platform.client import ExpertAdamW
from hfedmoe.platform.config import ModelConfig
from hfedmoe.platform.models import build_adapter

MODEL = dict(
    kind="qwen3_moe",
    num_experts=16,
    top_k=2,
    hidden_size=512,
    intermediate_size=1024,
    num_heads=8,
    num_layers=4,
    vocab_size=4096,  # hashed ids: a small frozen embedding, the MoE layers dominate
)


def step(adapter, batch, keep: int, stop_gradient: bool, optimizer) -> tuple[float, float]:
    """One training step with `keep` experts per layer trainable: (fwd+bwd s, optimizer s)."""
    ids, mask, labels = batch
    with adapter.training(stop_gradient=stop_gradient) as leaves:
        adapter.model.eval()  # no dropout: every configuration sees the same routing
        started = time.perf_counter()
        logits, routing = adapter.forward(ids, mask, capture_routing=True)
        active = torch.zeros_like(routing.routed.any(dim=1))
        active[:, :keep] = True
        adapter.set_active_experts(active)
        tensors = leaves.for_step(active)
        torch.autograd.backward(F.cross_entropy(logits, labels), inputs=list(tensors.values()))
        backward_done = time.perf_counter()
        optimizer.step(tensors)
        return backward_done - started, time.perf_counter() - backward_done


def counted_flops(adapter, batch, keep: int, stop_gradient: bool) -> float:
    ids, mask, labels = batch
    with adapter.training(stop_gradient=stop_gradient) as leaves:
        adapter.model.eval()
        with FlopCounterMode(display=False) as counter:
            logits, routing = adapter.forward(ids, mask, capture_routing=True)
            active = torch.zeros_like(routing.routed.any(dim=1))
            active[:, :keep] = True
            adapter.set_active_experts(active)
            tensors = leaves.for_step(active)
            loss = F.cross_entropy(logits, labels)
            torch.autograd.backward(loss, inputs=list(tensors.values()))
        for t in tensors.values():
            t.grad = None
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small model, for smoke tests")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", type=Path, default=Path("bench/results/b3.json"))
    args = parser.parse_args(argv)
    model = dict(MODEL)
    batch_size, length = 8, 128
    if args.quick:
        model.update(hidden_size=64, intermediate_size=128, num_layers=2)
        batch_size, length, args.repeats = 4, 32, 2
    adapter = build_adapter(ModelConfig(**model, freeze=["embed"]), num_labels=4, seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30000, (batch_size, length), generator=gen)
    batch = (ids, torch.ones_like(ids), torch.randint(0, 4, (batch_size,), generator=gen))
    experts = model["num_experts"]
    rows = []
    for stop_gradient in (False, True):
        for keep in (experts, experts // 2, experts // 4, experts // 8):
            optimizer = ExpertAdamW(lr=1e-5, weight_decay=0.0)
            step(adapter, batch, keep, stop_gradient, optimizer)  # warm-up
            times = [
                step(adapter, batch, keep, stop_gradient, optimizer) for _ in range(args.repeats)
            ]
            rows.append(
                {
                    "mode": "stop_gradient" if stop_gradient else "exact",
                    "trainable_per_layer": keep,
                    "fwd_bwd_s": statistics.median(t[0] for t in times),
                    "optimizer_s": statistics.median(t[1] for t in times),
                    "flops": counted_flops(adapter, batch, keep, stop_gradient),
                }
            )
    for row in rows:
        full = next(
            r for r in rows if r["mode"] == row["mode"] and r["trainable_per_layer"] == experts
        )
        row["time_ratio"] = row["fwd_bwd_s"] / full["fwd_bwd_s"]
        row["flop_ratio"] = row["flops"] / full["flops"]
        row["time_over_flop_ratio"] = row["time_ratio"] / row["flop_ratio"]
    result = {
        "benchmark": "B3 selective backward",
        "model": model,
        "batch": [batch_size, length],
        "repeats": args.repeats,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "rows": rows,
        "target_met": all(r["time_over_flop_ratio"] <= 1.15 for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    header = ["mode", "trainable/layer", "fwd+bwd (s)", "optimizer (s)", "GFLOP"]
    header += ["time ratio", "FLOP ratio", "time/FLOP ratio"]
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['trainable_per_layer']}/{experts} | {r['fwd_bwd_s']:.3f} | "
            f"{r['optimizer_s']:.3f} | {r['flops'] / 1e9:.1f} | {r['time_ratio']:.3f} | "
            f"{r['flop_ratio']:.3f} | {r['time_over_flop_ratio']:.3f} |"
        )
    print(f"target (time/FLOP ratio <= 1.15 everywhere) met: {result['target_met']}")


if __name__ == "__main__":
    main()
