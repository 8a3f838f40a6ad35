"""One client's local round: route, score, select within budget, train only the selected.

For every batch the client runs the forward with routing capture, scores the experts of
the batch (eqs 3-14), picks at most C_budget of the routed ones (eq 15, or a baseline's
rule), and back-propagates into those experts only (see ``models.experts`` for the exact
and stop-gradient backward modes). It uploads only what it trained, and reports the statistics
the server needs (usage, eq 16; importance) and the modelled cost of the round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.optim.adam import adam

from hfedmoe.platform.aggregation import expert_usage
from hfedmoe.platform.budgets.cost import (
    ModelFootprint,
    client_round_seconds,
    compute_seconds,
    expert_capacity,
    step_memory_bytes,
    transfer_seconds,
)
from hfedmoe.platform.budgets.drawing import Budget
from hfedmoe.platform.config import ExperimentConfig
from hfedmoe.platform.data.tokenisation import TokenizedText, iterate_batches
from hfedmoe.platform.flops import StepFlops
from hfedmoe.platform.models.adapter import MoEAdapter
from hfedmoe.platform.records import ClientReport, ClientUpload, ModelState, ServerState, Variates
from hfedmoe.platform.selection import batch_importance
from hfedmoe.platform.strategies import build_strategy
from hfedmoe.platform.tasks import make_task


class ExpertAdamW:
    """AdamW whose state exists only for the tensors trained in the current step.

    An expert that leaves the active set loses its moments, so optimiser memory stays
    within the budget of C_budget experts (eq 15) instead of growing with every expert
    ever selected during the round. Keys are stable names such as "expert/0/3/w_in".
    The update itself is torch's fused AdamW kernel.
    """

    def __init__(
        self,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.state: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in self.state if k not in tensors]:
            del self.state[key]
        keyed = [(k, t) for k, t in tensors.items() if t.grad is not None]
        if not keyed:
            return
        for key, t in keyed:
            if key not in self.state:
                step = torch.zeros((), device=t.device)
                self.state[key] = (torch.zeros_like(t), torch.zeros_like(t), step)
        m, v, steps = zip(*(self.state[k] for k, _ in keyed), strict=True)
        params = [t for _, t in keyed]
        adam(
            params,
            [t.grad for t in params],
            list(m),
            list(v),
            [],
            list(steps),
            fused=True,
            amsgrad=False,
            beta1=self.betas[0],
            beta2=self.betas[1],
            lr=self.lr,
            weight_decay=self.weight_decay,
            eps=self.eps,
            maximize=False,
            decoupled_weight_decay=True,
        )
        for t in params:
            t.grad = None


def client_seed(seed: int, round_index: int, client_id: int) -> list[int]:
    """Entropy for a client's round: the same triple reproduces the same local training."""
    return [seed, round_index, client_id]


@dataclass
class _Tally:
    """What a client's local steps accumulate."""

    prob_sum: torch.Tensor  # [L, E] sum over samples of G_e(x), for eq 16
    importance_sum: torch.Tensor  # [L, E] sum over batches of s_b(e), eq 5
    trained: torch.Tensor  # [L, E] experts that received a gradient at least once
    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    selected: int = 0
    selected_max: int = 0
    routed: int = 0  # sum over steps of |E_union|
    admitted: float = 0.0  # sum over steps of min(step limit, |E_union|) / |E_union|
    flops: float = 0.0
    out_of_memory: bool = False  # a step's routed union did not fit (moe_all_routed)
    variates: Variates = field(default_factory=dict)  # change of the client's c_i (SCAFFOLD)


class LocalTrainer:
    """Trains any client of a federation on one model instance (one per process)."""

    def __init__(
        self,
        adapter: MoEAdapter,
        train_data: TokenizedText,
        footprint: ModelFootprint,
        cfg: ExperimentConfig,
    ) -> None:
        self.adapter = adapter
        self.data = train_data
        self.footprint = footprint
        self.cfg = cfg
        self.strategy = build_strategy(cfg)
        self.task = make_task(cfg.task.name, cfg.task.params)
        self.stop_gradient = cfg.federation.backward == "stop_gradient"
        head = adapter.lm_head_params()
        self.flops = StepFlops(
            adapter.matmul_params_per_expert(),
            self.stop_gradient,
            adapter.adapter_params_per_expert(),
            head,
            head > 0 and adapter.lm_head_trains(),
        )
        self.device = next(adapter.model.parameters()).device
        self.zero_stage = 0  # device memory as the torch engine holds it (see zero.py)

    def train(
        self,
        client_id: int,
        indices: np.ndarray,
        budget: Budget,
        round_index: int,
        bytes_down: int,
    ) -> tuple[ClientUpload | None, ClientReport]:
        """One local round on the weights the adapter holds now (the global model).

        Returns the upload (None when the client ran out of memory) and the report.
        """
        started = time.perf_counter()
        upload, report = self._train(client_id, indices, budget, round_index, bytes_down)
        report.wall_seconds = time.perf_counter() - started
        return upload, report

    def _train(
        self, client_id: int, indices: np.ndarray, budget: Budget, round_index: int, bytes_down: int
    ) -> tuple[ClientUpload | None, ClientReport]:
        adapter, fp, hp = self.adapter, self.footprint, self.cfg.hfedmoe
        batch_size = self.cfg.federation.batch_size
        report = ClientReport(client_id, len(indices), bytes_down=bytes_down)
        report.capacity = expert_capacity(
            fp, budget.memory_bytes, batch_size, hp.budget_scope, budget.max_experts
        )
        # Eq 15's C_budget counts experts over all layers; per_layer scope means C per layer.
        layers = adapter.num_layers if hp.budget_scope == "per_layer" else 1
        report.step_limit = self.strategy.step_limit(report.capacity * layers, fp.num_experts_total)
        report.memory_bytes = step_memory_bytes(fp, report.step_limit, batch_size, self.zero_stage)
        if report.memory_bytes > budget.memory_bytes:
            # The device runs out of memory in its first step: the update is lost, and
            # the client spent the download.
            return None, _out_of_memory(report, budget)

        rng = np.random.default_rng(client_seed(self.cfg.seed, round_index, client_id))
        on_gpu = self.device.type == "cuda"
        dropout_seed = int(rng.integers(2**62))
        if on_gpu:
            torch.manual_seed(dropout_seed)
            margin = self.cfg.runtime.gpu_memory_margin
            cap_gpu_memory(self.device, budget.memory_bytes * (1 + margin))
        else:  # torch.manual_seed also queues a lazy CUDA seeding that formats a stack
            # trace on every call (~0.14 ms per client); the CPU generator state is the same.
            torch.default_generator.manual_seed(dropout_seed)
        try:
            tally = self._local_steps(indices, report.capacity, report.step_limit, rng)
        except torch.cuda.OutOfMemoryError:
            return None, _out_of_memory(report, budget)  # measured, under the enforced cap
        finally:
            if on_gpu:
                report.measured_peak_bytes = float(torch.cuda.max_memory_allocated(self.device))

        report.steps = tally.steps
        report.flops = tally.flops
        report.compute_seconds = compute_seconds(tally.flops, budget.flops_per_s)
        if tally.out_of_memory:
            # A step's routed union did not fit: the update is lost, the steps before it
            # and the download were spent (paper Fig. 3b).
            report.out_of_memory = True
            report.seconds = transfer_seconds(bytes_down, budget.down_bytes_per_s)
            report.seconds += report.compute_seconds
            return None, report
        report.loss = tally.loss_sum / max(tally.samples, 1)
        report.usage = expert_usage(tally.prob_sum.numpy(), tally.samples)  # the samples seen
        report.importance = (tally.importance_sum / max(tally.steps, 1)).numpy()
        report.trained = tally.trained.numpy()
        report.experts_per_step = tally.selected / max(tally.steps, 1)
        report.experts_per_step_max = tally.selected_max
        report.routed_per_step = tally.routed / max(tally.steps, 1)
        report.admitted_share = tally.admitted / max(tally.steps, 1)
        upload = ClientUpload(
            shared=adapter.named_arrays(adapter.shared_names),
            gates=adapter.named_arrays(adapter.gate_names),
            variates=tally.variates,
        )
        for layer in range(adapter.num_layers):
            index = np.flatnonzero(report.trained[layer])
            upload.experts.append({"index": index, **adapter.expert_rows(layer, index.tolist())})
        report.bytes_up = upload.num_bytes()
        report.seconds = client_round_seconds(
            tally.flops,
            bytes_down,
            report.bytes_up,
            budget.flops_per_s,
            budget.down_bytes_per_s,
            budget.up_bytes_per_s,
        )
        return upload, report

    def _local_steps(
        self, indices: np.ndarray, capacity: int, step_limit: int, rng: np.random.Generator
    ) -> _Tally:
        """The local steps; ``capacity`` is C_budget in the configured scope (eq 15),
        ``step_limit`` the experts a step can train within the client's memory."""
        adapter, strategy = self.adapter, self.strategy
        layers_by_experts = (adapter.num_layers, adapter.num_experts)
        tally = _Tally(
            prob_sum=torch.zeros(layers_by_experts, dtype=torch.float64),
            importance_sum=torch.zeros(layers_by_experts, dtype=torch.float64),
            trained=torch.zeros(layers_by_experts, dtype=torch.bool),
        )
        optimizer = ExpertAdamW(self.cfg.federation.lr, self.cfg.federation.weight_decay)
        with adapter.training(stop_gradient=self.stop_gradient) as leaves:
            for batch in self._batches(indices, rng):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                shape = tuple(batch["input_ids"].shape)
                if not self.flops.known(shape):
                    self.flops.calibrate(
                        shape,
                        lambda b=batch: self._throwaway_step(b, leaves),
                        self.task.predictions(batch),
                    )
                logits, routing = adapter.forward(
                    batch["input_ids"],
                    batch["attention_mask"],
                    capture_routing=True,
                    positions=self.task.positions(batch),
                )
                loss = self.task.loss(logits, batch)
                active = strategy.select_experts(routing, capacity, rng)
                if strategy.trains == "routed" and int(active.sum()) > step_limit:
                    tally.out_of_memory = True  # this step's routed union does not fit
                    break
                adapter.set_active_experts(active)
                step_tensors = leaves.for_step(active)
                torch.autograd.backward(loss, inputs=list(step_tensors.values()))
                strategy.correct_gradients(step_tensors)  # FedProx, SCAFFOLD; plain: none
                optimizer.step(step_tensors)
                self._count(tally, batch, loss, routing, active, shape)
            if not tally.out_of_memory:
                tally.variates = strategy.finish_local(
                    leaves.for_step(None), self.cfg.federation.lr
                )
        return tally

    def _count(self, tally: _Tally, batch, loss, routing, active, shape) -> None:
        size = int(batch["labels"].shape[0])
        tally.steps += 1
        tally.samples += size
        tally.loss_sum += float(loss.detach()) * size
        tally.flops += self.flops.total(
            shape, routing.pair_counts, active, self.task.predictions(batch)
        )
        tally.prob_sum += routing.probs.sum(dim=1).double()
        mix = self.cfg.hfedmoe.importance_mix
        tally.importance_sum += batch_importance(routing.probs, mix).double()
        # fedavg_full marks every expert active; only the routed ones receive a gradient.
        trained = active & routing.routed.any(dim=1)
        tally.trained |= trained
        selected = int(trained.sum())
        tally.selected += selected
        tally.selected_max = max(tally.selected_max, selected)
        routed = int(routing.union.sum())
        tally.routed += routed
        # The share of the routed union this step trains: what the budget admits of it
        # (1: nothing binds; budgeted selection trains min(C_budget, |E_union|)).
        tally.admitted += selected / routed if routed else 1.0

    def _throwaway_step(self, batch, leaves) -> tuple[torch.Tensor, torch.Tensor]:
        """A forward and backward for FLOP calibration only.

        It trains no expert, except with LoRA: a frozen base passes gradient only down to
        the lowest layer that trains something, so the calibration trains every expert to
        measure the backward through the whole depth. With attention adapters (trained
        every step) the modelled cost is then exact; with adapters on the experts alone it
        is an upper bound, exact for a step that trains every routed expert of the first
        layer. It runs on a forked RNG and its gradients are dropped, so training is the
        same whether or not this process had already calibrated the shape.
        """
        adapter = self.adapter
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            logits, routing = adapter.forward(
                batch["input_ids"],
                batch["attention_mask"],
                capture_routing=True,
                positions=self.task.positions(batch),
            )
            shape = (adapter.num_layers, adapter.num_experts)
            trained = torch.full(shape, adapter.lora, dtype=torch.bool)
            adapter.set_active_experts(trained)
            tensors = leaves.for_step(trained)
            loss = self.task.loss(logits, batch)
            torch.autograd.backward(loss, inputs=list(tensors.values()))
        for t in tensors.values():
            t.grad = None
        return routing.pair_counts, trained

    def _batches(self, indices: np.ndarray, rng: np.random.Generator):
        fed = self.cfg.federation
        steps = 0
        for _ in range(fed.local_epochs):
            for batch in iterate_batches(self.data, indices, fed.batch_size, rng):
                if fed.max_local_steps is not None and steps >= fed.max_local_steps:
                    return
                steps += 1
                yield batch


def _out_of_memory(report: ClientReport, budget: Budget) -> ClientReport:
    report.out_of_memory = True
    report.seconds = transfer_seconds(report.bytes_down, budget.down_bytes_per_s)
    return report


def cap_gpu_memory(device: torch.device, memory_bytes: float) -> None:
    """Enforce the client's memory budget on the GPU this process uses, and reset the peak.

    The cap is the modelled budget plus ``runtime.gpu_memory_margin``: the model counts
    tensors, while the device also holds the allocator's slack and library workspaces.
    A client that runs out under the cap fails as on a device; on GPUs that verdict can
    therefore differ from a CPU run's, which only the model decides.
    """
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, memory_bytes / total), device)
    torch.cuda.reset_peak_memory_stats(device)


def train_client(
    trainer: LocalTrainer,
    client_id: int,
    indices: np.ndarray,
    budget: Budget,
    round_index: int,
    state: ModelState,
    bytes_down: int,
    server: ServerState | None = None,
    variates: Variates | None = None,
) -> tuple[ClientUpload | None, ClientReport]:
    """A client's round on any executor: from the global state the round started with.

    ``server`` is the strategy's ``client_view`` of the server state and ``variates`` the
    client's own kept control variates (SCAFFOLD; both travel with the job, so they count
    in the bytes it downloads).
    """
    server, variates = server or {}, variates or {}
    bytes_down += sum(a.nbytes for a in [*server.values(), *variates.values()])
    trainer.adapter.load_state(state)
    trainer.strategy.start_local(state, server, variates)
    return trainer.train(client_id, indices, budget, round_index, bytes_down)
