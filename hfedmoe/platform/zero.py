"""Client training on a DeepSpeed ZeRO engine with CPU offload (``federation.engine``).

For clients whose full training state does not fit their device: ZeRO moves AdamW's
moments (stage 1), the gradients (stage 2) and the parameters (stage 3) to host memory;
the memory model (``devices.step_memory_bytes``) counts what stays on the device. It
serves strategies that train a fixed set of tensors, fedavg_full and flex: ZeRO flattens
parameters into partitions, while HFedMoE's per-batch expert masks need each expert as a
tensor of its own (the config rejects the combination).

Each process is its own world of size 1 on a free MASTER_PORT, so any number of Ray
actors on one node run ZeRO side by side. A fresh model copy is wrapped per client round
(ZeRO-3 partitions the module it wraps in place); the trained weights are gathered back
into the process's adapter, from which the update is read as with the torch engine.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.nn.functional as F

from hfedmoe.platform.client import LocalTrainer, _Tally
from hfedmoe.platform.models import build_adapter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_world() -> None:
    """torch.distributed of world size 1 for this process (idempotent)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    on_gpu = torch.cuda.is_available()
    # Read by deepspeed at import time: pick the accelerator before importing it.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)


def zero_config(stage: int, batch_size: int, lr: float, weight_decay: float) -> dict:
    offload = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    zero: dict = {"stage": stage, "offload_optimizer": offload}
    if stage == 3:
        zero["offload_param"] = offload
    return {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
        },
        "zero_optimization": zero,
        # DeepSpeed clips at norm 1.0 unless told otherwise; the torch engine does not clip.
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }


class DeepSpeedTrainer(LocalTrainer):
    """LocalTrainer whose local steps run on a DeepSpeed ZeRO engine."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.zero_stage = self.cfg.federation.zero_stage
        init_single_process_world()

    def _local_steps(
        self, indices: np.ndarray, capacity: int, step_limit: int, rng: np.random.Generator
    ) -> _Tally:
        import deepspeed

        fed = self.cfg.federation
        batches = [
            {k: v.to(self.device) for k, v in b.items()} for b in self._batches(indices, rng)
        ]
        # FLOPs are the model's, engine-independent: count them before ZeRO patches torch.
        for batch in batches:
            self._calibrate(tuple(batch["input_ids"].shape), batch)
        train_experts = self.strategy.trains == "all"
        with torch.random.fork_rng():  # building seeds torch; keep the dropout stream intact
            work = build_adapter(
                self.cfg.model, self.adapter.num_labels, self.cfg.seed, self.task.head
            )
        work.load_state(self.adapter.state())
        work.model.to(self.device)
        trainable = set(work.shared_names + work.gate_names)
        for name, param in work.model.named_parameters():
            is_expert = name not in trainable and name not in work.frozen_names
            param.requires_grad_(name in trainable or (is_expert and train_experts))
        linear = F.linear  # ZeRO-3 replaces it process-wide and leaves it replaced
        engine, *_ = deepspeed.initialize(
            model=work.model,
            model_parameters=[p for p in work.model.parameters() if p.requires_grad],
            config=zero_config(self.zero_stage, fed.batch_size, fed.lr, fed.weight_decay),
        )
        shape = (work.num_layers, work.num_experts)
        tally = _Tally(
            prob_sum=torch.zeros(shape, dtype=torch.float64),
            importance_sum=torch.zeros(shape, dtype=torch.float64),
            trained=torch.zeros(shape, dtype=torch.bool),
        )
        active = torch.full(shape, train_experts)
        try:
            engine.train()
            for batch in batches:
                logits, routing = work.forward(
                    batch["input_ids"],
                    batch["attention_mask"],
                    capture_routing=True,
                    positions=self.task.positions(batch),
                )
                loss = self.task.loss(logits, batch)
                engine.backward(loss)
                engine.step()
                self._count(tally, batch, loss, routing, active, tuple(batch["input_ids"].shape))
            with deepspeed.zero.GatheredParameters(list(work.model.parameters())):
                self.adapter.load_state(work.state())
        finally:
            engine.destroy()
            torch.nn.functional.linear = linear
        return tally

    def _calibrate(self, shape: tuple[int, ...], batch) -> None:
        """FLOPs come from the process's own adapter, as with the torch engine."""
        if not self.flops.known(shape):
            with self.adapter.training(stop_gradient=self.stop_gradient) as leaves:
                self.flops.calibrate(
                    shape,
                    lambda: self._throwaway_step(batch, leaves),
                    self.task.predictions(batch),
                )
