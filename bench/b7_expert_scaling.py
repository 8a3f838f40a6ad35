"""B7: training step time against the number of experts at equal active FLOPs.

Partitioned MiniLM (``model.expert_init: partition``; 6 layers, d 384): each layer's FFN
(width I = 1536) is split into E experts of width I/E, routed top-E/4, so every token
computes a quarter of the FFN's neurons at every E (MoEfication-style fine-grained
experts). Attention, embeddings and active expert FLOPs stay fixed while only the expert
count moves. Batch 8 x 64 tokens; one training step as LocalTrainer takes it:
forward with routing capture, exact backward into the trained experts, ExpertAdamW.

Two expert paths run in the same process, interleaved step by step, on the same model:
``before``, the per-expert loop of commit 523aefd (``routed_experts``: one small GEMM pair
and one autograd node per expert, a leaf per expert); ``after``, ``grouped_experts`` (one
autograd node per layer with grouped GEMMs). Trained experts: every routed one (``all``)
or the first quarter of each layer's (``quarter``, a binding budget).

    python bench/b7_expert_scaling.py [--quick] [--repeats 7] [--threads 2]
        [--out bench/results/b7.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hfedmoe.platform.client import ExpertAdamW
from hfedmoe.platform.config import ModelConfig
from hfedmoe.platform.models.experts import routed_experts
from hfedmoe.platform.models.upcycle import UpcycledFeedForward, upcycled_adapter

GROUPED_FORWARD = UpcycledFeedForward.forward


def per_expert_loop_forward(self: UpcycledFeedForward, hidden: torch.Tensor) -> torch.Tensor:
    """UpcycledFeedForward.forward as of commit 523aefd: a Python loop over the experts."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    _, weights, index = self.router(flat)

    def expert(e: int, x: torch.Tensor) -> torch.Tensor:
        w = self._hfedmoe_leaves[e] if self._hfedmoe_leaves is not None else None
        w = w or {name: getattr(self, name)[e] for name in self.expert_names}
        return F.linear(
            self.activation(F.linear(x, w["w_in"], w["b_in"])), w["w_out"], w.get("b_out")
        )

    out = routed_experts(
        flat, index, weights, self.num_experts, expert, self._hfedmoe_plan, self._hfedmoe_layer
    )
    if self.out_bias is not None:
        out = out + self.out_bias
    return out.view_as(hidden)


PATHS = {"before": per_expert_loop_forward, "after": GROUPED_FORWARD}


def trained_mask(routing, mode: str) -> torch.Tensor:
    union = routing.routed.any(dim=1)
    if mode == "all":
        return union
    quarter = torch.zeros_like(union)
    quarter[:, : max(1, union.shape[1] // 4)] = True
    return union & quarter


def step(adapter, batch, mode: str, optimizer: ExpertAdamW) -> dict[str, float]:
    """One training step: forward, selection, exact backward, optimiser (seconds each)."""
    ids, mask, labels = batch
    with adapter.training(stop_gradient=False) as leaves:
        adapter.model.eval()  # no dropout: both paths see the same function
        started = time.perf_counter()
        logits, routing = adapter.forward(ids, mask, capture_routing=True)
        forward_done = time.perf_counter()
        active = trained_mask(routing, mode)
        adapter.set_active_experts(active)
        tensors = leaves.for_step(active)
        torch.autograd.backward(F.cross_entropy(logits, labels), inputs=list(tensors.values()))
        backward_done = time.perf_counter()
        optimizer.step(tensors)
        done = time.perf_counter()
    return {
        "forward_s": forward_done - started,
        "backward_s": backward_done - forward_done,
        "optimizer_s": done - backward_done,
        "step_s": done - started,
    }


def counted_gflops(adapter, batch, mode: str) -> float:
    ids, mask, labels = batch
    with adapter.training(stop_gradient=False) as leaves:
        adapter.model.eval()
        with FlopCounterMode(display=False) as counter:
            logits, routing = adapter.forward(ids, mask, capture_routing=True)
            active = trained_mask(routing, mode)
            adapter.set_active_experts(active)
            tensors = leaves.for_step(active)
            loss = F.cross_entropy(logits, labels)
            torch.autograd.backward(loss, inputs=list(tensors.values()))
        for t in tensors.values():
            t.grad = None
    return counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 layers, E = 8 and 16, 1 repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experts", default="8,16,32,64,128")
    parser.add_argument("--modes", default="all,quarter")
    parser.add_argument("--out", type=Path, default=Path("bench/results/b7.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    experts = [int(e) for e in args.experts.split(",")]
    modes = args.modes.split(",")
    layers, batch_size, length = None, 8, 64
    if args.quick:
        experts, layers, batch_size, length, args.repeats = [8, 16], 2, 4, 16, 1
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch_size, length), generator=gen)
    batch = (ids, torch.ones_like(ids), torch.randint(0, 4, (batch_size,), generator=gen))
    load_before = os.getloadavg()
    rows = []
    for num_experts in experts:
        torch.manual_seed(0)
        cfg = ModelConfig(
            kind="upcycled",
            expert_init="partition",
            num_experts=num_experts,
            top_k=num_experts // 4,
            num_layers=layers,
        )
        adapter = upcycled_adapter(cfg, num_labels=4)
        width = adapter.layers[0].experts.stacked()["w_in"].shape[1]
        for mode in modes:
            times: dict[str, list[dict[str, float]]] = {path: [] for path in PATHS}
            optimizers = {path: ExpertAdamW(lr=1e-6, weight_decay=0.0) for path in PATHS}
            try:
                for repeat in range(args.repeats + 1):  # the first round warms up
                    for path, forward in PATHS.items():  # interleaved: same machine state
                        UpcycledFeedForward.forward = forward
                        measured = step(adapter, batch, mode, optimizers[path])
                        if repeat:
                            times[path].append(measured)
            finally:  # the class's own forward again, also for a caller in this process
                UpcycledFeedForward.forward = GROUPED_FORWARD
            row = {
                "experts": num_experts,
                "top_k": num_experts // 4,
                "expert_width": int(width),
                "trained": mode,
                "gflop_per_step": counted_gflops(adapter, batch, mode),
            }
            for path, measured in times.items():
                for key in measured[0]:
                    row[f"{path}_{key}"] = statistics.median(m[key] for m in measured)
                row[f"{path}_step_min_s"] = min(m["step_s"] for m in measured)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        base = next(
            r for r in rows if r["trained"] == row["trained"] and r["experts"] == experts[0]
        )
        for path in PATHS:
            row[f"{path}_vs_first"] = row[f"{path}_step_s"] / base[f"{path}_step_s"]
        row["speedup"] = row["before_step_s"] / row["after_step_s"]
    e64 = [r for r in rows if r["experts"] == 64 and experts[0] == 8]
    result = {
        "benchmark": "B7 expert scaling at equal active FLOPs",
        "model": "partitioned MiniLM: E experts of width 1536/E, top-E/4",
        "layers": layers or 6,
        "batch": [batch_size, length],
        "repeats": args.repeats,
        "statistic": "median step (forward + backward + optimizer) over repeats",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "rows": rows,
        "target": "after: E = 64 within 1.3x of E = 8",
        "target_met": bool(e64) and all(r["after_vs_first"] <= 1.3 for r in e64),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    header = ["trained", "E", "top-k", "width", "GFLOP", "before s", "after s"]
    header += ["before/first", "after/first", "speedup"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(
            f"| {r['trained']} | {r['experts']} | {r['top_k']} | {r['expert_width']} | "
            f"{r['gflop_per_step']:.1f} | {r['before_step_s']:.3f} | {r['after_step_s']:.3f} | "
            f"{r['before_vs_first']:.2f} | {r['after_vs_first']:.2f} | {r['speedup']:.2f} |"
        )
    print(f"target ({result['target']}) met: {result['target_met']}")


if __name__ == "__main__":
    main()
