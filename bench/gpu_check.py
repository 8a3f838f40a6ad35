"""GPU check: client packing, enforced memory caps and model FLOP utilisation on one GPU.

One command on a GPU machine (about 5 minutes; every section writes its JSON as soon as it
ends, so a run cut short keeps what it measured):

    python bench/gpu_check.py OUT_DIR            # needs CUDA
    python bench/gpu_check.py OUT_DIR --dry-run  # CPU, tiny model, seconds (tests run it)

(a) packing.json: the same 8 clients (4 local steps each) trained by 1, 2, 4 and 8 client
    processes sharing the GPU (each holding 1, 1/2, 1/4, 1/8 of it, as Ray's fractional
    num_gpus would pack actors): aggregate training tokens/s and the round's wall time.
(b) memory.json: per strategy (every expert trained, a quarter of them) the modelled step
    memory (devices.step_memory_bytes) and, under caps enforced as the trainer enforces
    them (client.cap_gpu_memory: the budget x (1 + margin)), one client whose budget is
    half the model (must fail: OOM) and clients at 1x and 2x it (must succeed), with the
    allocator's measured peak against the model.
(c) mfu.json: one client step of a Qwen3-MoE with hidden 1024, 64 experts (top-8), in
    bf16 where supported: counted FLOPs / step time / the GPU's peak.
The dry run takes the same code paths on a tiny model on the CPU, without subprocesses;
on the CPU the memory verdict is the model's, as in a CPU simulation.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hfedmoe.platform.budgets.cost import step_memory_bytes
from hfedmoe.platform.client import ExpertAdamW, cap_gpu_memory
from hfedmoe.platform.config import ModelConfig
from hfedmoe.platform.models import build_adapter

MARGIN = 0.25  # runtime.gpu_memory_margin's default
# Dense bf16 peak FLOP/s by device name (vendor datasheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}

MODELS = {
    # (a), (b): a medium MoE whose clients each take a real share of the GPU.
    "client": dict(
        kind="qwen3_moe",
        num_experts=16,
        top_k=2,
        hidden_size=512,
        intermediate_size=1024,
        num_heads=8,
        num_layers=4,
        vocab_size=4096,
    ),
    # (c): hidden 1024, 64 fine-grained experts.
    "mfu": dict(
        kind="qwen3_moe",
        num_experts=64,
        top_k=8,
        hidden_size=1024,
        intermediate_size=512,
        num_heads=16,
        num_layers=8,
        vocab_size=8192,
    ),
    # --dry-run: everything tiny.
    "tiny": dict(
        kind="qwen3_moe",
        num_experts=8,
        top_k=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        num_layers=2,
        vocab_size=256,
    ),
}


def build(name: str, device: torch.device, dtype: torch.dtype = torch.float32):
    adapter = build_adapter(ModelConfig(**MODELS[name], freeze=["embed"]), num_labels=4, seed=0)
    adapter.model.to(device=device, dtype=dtype)
    return adapter


def make_batch(batch_size: int, length: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30000, (batch_size, length), generator=gen)
    labels = torch.randint(0, 4, (batch_size,), generator=gen)
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


def train_step(adapter, batch, optimizer: ExpertAdamW, trained_share: float) -> None:
    """One client step as LocalTrainer takes it: route, pick experts, exact backward, AdamW."""
    ids, mask, labels = batch
    with adapter.training(stop_gradient=False) as leaves:
        logits, routing = adapter.forward(ids, mask, capture_routing=True)
        active = routing.routed.any(dim=1)
        active[:, max(1, int(active.shape[1] * trained_share)) :] = False
        adapter.set_active_experts(active)
        tensors = leaves.for_step(active)
        loss = F.cross_entropy(logits.float(), labels)
        torch.autograd.backward(loss, inputs=list(tensors.values()))
        optimizer.step(tensors)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- (a) packing ---------------------------------------------------------------------
def client_worker(args: tuple) -> dict:
    """One client process: its share of the clients, one after another (a client actor)."""
    model, clients, steps, batch_size, length, fraction, device_name = args
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    adapter = build(model, device)
    batch = make_batch(batch_size, length, device)
    train_step(adapter, batch, ExpertAdamW(1e-5, 0.0), 1.0)  # warm-up, not timed
    synchronize(device)
    started = time.perf_counter()
    for _client in range(clients):
        optimizer = ExpertAdamW(1e-5, 0.0)  # every client starts a fresh optimiser
        for _ in range(steps):
            train_step(adapter, batch, optimizer, 1.0)
    synchronize(device)
    return {"started": started, "seconds": time.perf_counter() - started}


def packing(out: Path, device: torch.device, dry_run: bool) -> dict:
    model = "tiny" if dry_run else "client"
    clients, steps, batch_size, length = (2, 1, 2, 8) if dry_run else (8, 4, 8, 128)
    rows = []
    for workers in (1, 2) if dry_run else (1, 2, 4, 8):
        jobs = [
            (model, clients // workers, steps, batch_size, length, 1 / workers, str(device))
            for _ in range(workers)
        ]
        if dry_run:  # in-process, one after another: checks the code, not the sharing
            results = [client_worker(job) for job in jobs]
        else:
            with mp.get_context("spawn").Pool(workers) as pool:
                results = pool.map(client_worker, jobs)
        # The round runs from the first client's start to the last one's end.
        first = min(r["started"] for r in results)
        round_s = max(r["started"] + r["seconds"] - first for r in results)
        if dry_run:
            round_s = sum(r["seconds"] for r in results)
        tokens = clients * steps * batch_size * length
        rows.append(
            {
                "workers": workers,
                "gpu_fraction": 1 / workers,
                "round_s": round_s,
                "tokens_per_s": tokens / round_s,
                "per_worker_s": [r["seconds"] for r in results],
            }
        )
        print("packing", rows[-1], flush=True)
    return write(out / "packing.json", {"model": MODELS[model], "clients": clients, "rows": rows})


# ---- (b) memory caps -----------------------------------------------------------------
def memory_caps(out: Path, device: torch.device, dry_run: bool) -> dict:
    model = "tiny" if dry_run else "client"
    batch_size, length = (2, 8) if dry_run else (8, 128)
    adapter = build(model, device)
    batch = make_batch(batch_size, length, device)
    per_sample = adapter.measure_activation_bytes(batch[0], batch[1]) / batch_size
    fp = adapter.footprint(activation_bytes_per_sample=per_sample)
    rows = []
    for strategy, share in (("all_experts", 1.0), ("quarter_of_experts", 0.25)):
        trained = max(adapter.num_layers, int(fp.num_experts_total * share))
        modelled = step_memory_bytes(fp, trained, batch_size)
        for budget_factor in (0.5, 1.0, 2.0):
            budget = modelled * budget_factor
            row = {
                "strategy": strategy,
                "trained_experts": trained,
                "modelled_bytes": modelled,
                "budget_bytes": budget,
                "expected": "oom" if budget_factor < 1 else "ok",
            }
            if device.type == "cuda":
                row.update(capped_step(adapter, batch, share, budget, device))
            else:  # the CPU verdict is the model's, as LocalTrainer decides it there
                row.update(outcome="oom" if modelled > budget else "ok", measured_peak_bytes=None)
            row["as_expected"] = row["outcome"] == row["expected"]
            rows.append(row)
            print("memory", row, flush=True)
    result = {"model": MODELS[model], "batch": [batch_size, length], "margin": MARGIN}
    return write(out / "memory.json", {**result, "rows": rows})


def capped_step(adapter, batch, share: float, budget: float, device: torch.device) -> dict:
    torch.cuda.empty_cache()
    cap_gpu_memory(device, budget * (1 + MARGIN))
    outcome = "ok"
    try:
        train_step(adapter, batch, ExpertAdamW(1e-5, 0.0), share)
        synchronize(device)
    except torch.cuda.OutOfMemoryError:
        outcome = "oom"
    peak = float(torch.cuda.max_memory_allocated(device))
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    torch.cuda.empty_cache()
    return {"outcome": outcome, "measured_peak_bytes": peak, "cap_bytes": budget * (1 + MARGIN)}


# ---- (c) model FLOP utilisation ------------------------------------------------------
def mfu(out: Path, device: torch.device, dry_run: bool) -> dict:
    model = "tiny" if dry_run else "mfu"
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    batch_size, length = (2, 8) if dry_run else (8, 512)
    adapter = build(model, device, dtype)
    batch = make_batch(batch_size, length, device)
    optimizer = ExpertAdamW(1e-6, 0.0)
    for _ in range(1 if dry_run else 3):  # warm-up (kernel selection, allocator)
        train_step(adapter, batch, optimizer, 1.0)
    with FlopCounterMode(display=False) as counter:
        train_step(adapter, batch, optimizer, 1.0)
    repeats = 1 if dry_run else 10
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        train_step(adapter, batch, optimizer, 1.0)
    synchronize(device)
    step_s = (time.perf_counter() - started) / repeats
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if bf16 else None
    flops = float(counter.get_total_flops())
    result = {
        "model": MODELS[model],
        "batch": [batch_size, length],
        "dtype": str(dtype),
        "device": name,
        "step_s": step_s,
        "flops_per_step": flops,
        "achieved_flops_per_s": flops / step_s,
        "peak_flops_per_s": peak,
        "mfu": flops / step_s / peak if peak else None,
    }
    print("mfu", result, flush=True)
    return write(out / "mfu.json", result)


def write(path: Path, result: dict) -> dict:
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), **result}, indent=1))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="directory for the JSON reports")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, seconds")
    parser.add_argument("--sections", default="packing,memory,mfu")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run for the CPU check")
    device = torch.device("cpu" if args.dry_run else "cuda:0")
    args.out.mkdir(parents=True, exist_ok=True)
    sections = {"packing": packing, "memory": memory_caps, "mfu": mfu}
    report = {}
    for name in args.sections.split(","):
        report[name] = sections[name](args.out, device, args.dry_run)
    return report


if __name__ == "__main__":
    main()
