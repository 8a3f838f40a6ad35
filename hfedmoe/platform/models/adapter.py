"""One interface over MoE classifiers and causal LMs: routing capture, expert access,
masked training.

A model family plugs in by describing its MoE layers as ``MoELayer`` records (where the
router is, how to read its output, where each expert's tensors live). Everything else,
routing statistics, expert get/set, the model state that travels between server and
clients, and the per-batch trainable-expert mask, is written once here.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hfedmoe.platform.budgets.cost import ModelFootprint
from hfedmoe.platform.models.experts import BackwardPlan, NF4Weight
from hfedmoe.platform.models.heads import CausalLM
from hfedmoe.platform.records import BatchRouting, ModelState

# Reads a router module's forward output: (router logits [..., E], the top-k expert ids the
# experts compute [..., k], whether each slot really routes its token [..., k]; False where
# a capacity-limited router drops a token, which the experts then compute with weight 0).
RouterReader = Callable[[object], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def read_topk_router(output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (logits, weights, top-k ids) router, which routes every token it computes."""
    logits, _weights, top_k_index = output
    return logits, top_k_index, torch.ones_like(top_k_index, dtype=torch.bool)


class FusedExperts:
    """Experts stored as rows of stacked parameters, e.g. gate_up_proj [E, 2I, d].

    For training, each expert's rows become a separate leaf tensor that shares storage
    with the stacked parameter: autograd can then skip the weight gradient of any expert,
    and an optimiser step on the leaf writes straight into the model.
    """

    def __init__(self, owner: nn.Module, names: list[str]) -> None:
        self.owner = owner
        self.names = names
        self.num_experts = int(getattr(owner, names[0]).shape[0])

    def stacked(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self.owner, n) for n in self.names}

    def tensors(self, expert: int) -> dict[str, torch.Tensor]:
        return {n: p.data[expert] for n, p in self.stacked().items()}

    def rows(self, experts: list[int]) -> dict[str, torch.Tensor]:
        return {
            n: p.detach().index_select(0, torch.tensor(experts, dtype=torch.long, device=p.device))
            for n, p in self.stacked().items()
        }

    @torch.no_grad()
    def write(self, experts: list[int], tensors: dict[str, torch.Tensor]) -> None:
        for n, p in self.stacked().items():
            index = torch.tensor(experts, dtype=torch.long, device=p.device)
            p.index_copy_(0, index, tensors[n].to(p.device, p.dtype))

    def begin_training(self) -> list[dict[str, torch.Tensor]]:
        leaves = [
            {n: p.detach()[e].requires_grad_(True) for n, p in self.stacked().items()}
            for e in range(self.num_experts)
        ]
        for p in self.stacked().values():
            p.requires_grad_(False)
        self.owner._hfedmoe_leaves = leaves
        return leaves

    def end_training(self) -> None:
        self.owner._hfedmoe_leaves = None
        for p in self.stacked().values():
            p.requires_grad_(True)


class ModuleExperts:
    """Experts that are separate modules (SwitchTransformers); each parameter is a leaf."""

    def __init__(self, owner: nn.Module, modules: list[nn.Module]) -> None:
        self.owner = owner
        self.modules = modules
        self.names = [n for n, _ in modules[0].named_parameters()]
        self.num_experts = len(modules)

    def tensors(self, expert: int) -> dict[str, torch.Tensor]:
        return {n: p.data for n, p in self.modules[expert].named_parameters()}

    def rows(self, experts: list[int]) -> dict[str, torch.Tensor]:
        per_expert = [self.tensors(e) for e in experts]
        return {
            n: torch.stack([t[n] for t in per_expert])
            if per_expert
            else self.tensors(0)[n].new_zeros((0, *self.tensors(0)[n].shape))
            for n in self.names
        }

    @torch.no_grad()
    def write(self, experts: list[int], tensors: dict[str, torch.Tensor]) -> None:
        for row, e in enumerate(experts):
            for n, t in self.tensors(e).items():
                t.copy_(tensors[n][row])

    def begin_training(self) -> list[dict[str, torch.Tensor]]:
        leaves = [dict(m.named_parameters()) for m in self.modules]
        for expert in leaves:
            for p in expert.values():
                p.requires_grad_(True)
        return leaves

    def end_training(self) -> None:
        pass


@dataclass
class MoELayer:
    """One MoE block: its router, how to read it, and where its experts live."""

    name: str
    top_k: int
    router: nn.Module
    read_router: RouterReader
    experts: FusedExperts | ModuleExperts

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts


@dataclass
class TrainableTensors:
    """The leaves a local training session may update, by stable key."""

    shared: dict[str, torch.Tensor]
    gates: dict[str, torch.Tensor]
    experts: list[list[dict[str, torch.Tensor]]]  # [layer][expert] -> name -> leaf

    def for_step(self, active: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Keyed leaves trained this step; active: [L, E] bool, None for every expert."""
        chosen = {f"shared/{k}": t for k, t in self.shared.items()}
        chosen.update({f"gate/{k}": t for k, t in self.gates.items()})
        mask = None if active is None else active.tolist()  # one conversion, not L x E
        for layer, experts in enumerate(self.experts):
            for expert, tensors in enumerate(experts):
                if mask is None or mask[layer][expert]:
                    chosen.update({f"expert/{layer}/{expert}/{n}": t for n, t in tensors.items()})
        return chosen


class MoEAdapter:
    """A model ``model(input_ids, attention_mask) -> logits`` plus its MoE map: a sequence
    classifier (logits [B, C]) or a causal LM (logits [B, T, V], the task decides)."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[MoELayer],
        tokenizer,
        family: str,
        num_labels: int,
        freeze: list[str] | None = None,
        lora_targets: list[str] | None = None,
    ) -> None:
        """``lora_targets`` (model.lora.targets) puts the adapter in LoRA mode: experts are
        their adapters, and of the rest only adapters, head and (if targeted) router train."""
        if not layers:
            raise ValueError(f"{family}: the model has no MoE layer")
        self.model = model
        self.layers = layers
        self.tokenizer = tokenizer
        self.family = family
        self.num_labels = num_labels
        self.plan = BackwardPlan(len(layers), stop_gradient=False)
        self._capture: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        for index, layer in enumerate(layers):
            layer.router.register_forward_hook(self._router_hook(layer))
            _attach(layer, index, self.plan)
        self._expert_param_ids = {
            id(p) for layer in layers for p in _expert_parameters(layer.experts)
        }
        self._gate_param_ids = {id(p) for layer in layers for p in layer.router.parameters()}
        names = dict(model.named_parameters())
        self.lora = lora_targets is not None
        gates = [n for n, p in names.items() if id(p) in self._gate_param_ids]
        self.gate_names = gates if not self.lora or "router" in lora_targets else []
        others = [n for n, p in names.items() if id(p) not in self._expert_param_ids]
        others = [n for n in others if n not in gates]
        if self.lora:
            self.shared_names = [n for n in others if "lora_" in n or _is_head(n)]
        else:
            freeze = freeze or []
            self.shared_names = [n for n in others if not any(f in n for f in freeze)]
        trained = set(self.shared_names + self.gate_names)
        self.frozen_names = [n for n in others + gates if n not in trained]

    # ---- shape -----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> int:
        """Experts per MoE layer (equal across layers for every supported family)."""
        return self.layers[0].num_experts

    # ---- forward and routing ---------------------------------------------------------
    def _router_hook(self, layer: MoELayer):
        def hook(_module, _inputs, output):
            if self._capture is not None:
                logits, top_k_index, kept = layer.read_router(output)
                self._capture.append((logits.detach(), top_k_index.detach(), kept.detach()))

        return hook

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        capture_routing: bool = False,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, BatchRouting | None]:
        """Logits and, on request, this batch's routing reduced to samples (every
        non-padding token counts, see ``reduce_routing``).

        Classifiers: [B, C]. Causal LMs: [B, T, V], or [N, V] at the N ``positions``
        ([B, T] bool) where the task needs predictions (see ``heads.CausalLM``).
        """
        inputs = (input_ids, attention_mask) if positions is None else (
            input_ids, attention_mask, positions
        )  # fmt: skip
        if not capture_routing:
            return self.model(*inputs), None
        self._capture = []
        try:
            logits = self.model(*inputs)
            captured = self._capture
        finally:
            self._capture = None
        if len(captured) != self.num_layers:
            raise RuntimeError(
                f"{self.family}: captured {len(captured)} router outputs for "
                f"{self.num_layers} MoE layers"
            )
        return logits, reduce_routing(captured, attention_mask, self.num_experts)

    # ---- state that travels ----------------------------------------------------------
    def expert_rows(self, layer: int, experts: list[int]) -> dict[str, np.ndarray]:
        """The tensors of some experts of one layer, stacked: name -> [len(experts), ...]."""
        rows = self.layers[layer].experts.rows(experts)
        return {n: t.cpu().numpy() for n, t in rows.items()}

    def named_arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        params = dict(self.model.named_parameters())
        return {n: _to_numpy(params[n]) for n in names}

    def state(self) -> ModelState:
        return ModelState(
            shared=self.named_arrays(self.shared_names),
            gates=self.named_arrays(self.gate_names),
            experts=[
                self.expert_rows(i, list(range(self.num_experts))) for i in range(self.num_layers)
            ],
        )

    @torch.no_grad()
    def load_state(self, state: ModelState) -> None:
        params = dict(self.model.named_parameters())
        with warnings.catch_warnings():
            # Arrays from Ray's object store are read-only; they are only read here.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for group in (state.shared, state.gates):
                for name, value in group.items():
                    params[name].copy_(torch.from_numpy(value))
            for layer, arrays in zip(self.layers, state.experts, strict=True):
                everyone = list(range(layer.num_experts))
                layer.experts.write(everyone, {n: torch.from_numpy(a) for n, a in arrays.items()})

    # ---- training --------------------------------------------------------------------
    @contextlib.contextmanager
    def training(self, stop_gradient: bool) -> Iterator[TrainableTensors]:
        """Make shared, gate and per-expert leaves trainable; frozen parameters stay fixed."""
        params = dict(self.model.named_parameters())
        for name in self.frozen_names:
            params[name].requires_grad_(False)
        for name in self.shared_names + self.gate_names:
            params[name].requires_grad_(True)
        self.plan.stop_gradient = stop_gradient
        self.plan.clear()
        self.model.train()
        leaves = [layer.experts.begin_training() for layer in self.layers]
        try:
            yield TrainableTensors(
                shared={n: params[n] for n in self.shared_names},
                gates={n: params[n] for n in self.gate_names},
                experts=leaves,
            )
        finally:
            for layer in self.layers:
                layer.experts.end_training()
            self.plan.clear()
            self.model.eval()

    def set_active_experts(self, active: torch.Tensor) -> None:
        """active: [L, E] bool; experts outside it get no weight gradient this step."""
        for layer in range(self.num_layers):
            self.plan.set_active(layer, active[layer])

    # ---- sizes -----------------------------------------------------------------------
    def params_per_expert(self) -> int:
        return sum(t.numel() for t in self.layers[0].experts.tensors(0).values())

    def matmul_params_per_expert(self) -> int:
        """Weight-matrix elements of one expert's base (biases are adds, not matmul FLOPs)."""
        tensors = self.layers[0].experts.tensors(0)
        if self.lora:  # the frozen base, from the adapters' shapes: A [r, in], B [out, r]
            return sum(
                tensors[a].shape[-1] * tensors[a.replace("_A", "_B")].shape[0]
                for a in tensors
                if "_A" in a
            )
        return sum(t.numel() for t in tensors.values() if t.dim() >= 2)

    def lm_head_params(self) -> int:
        """Elements of a causal LM's output projection (V x d), 0 for classifiers."""
        if not isinstance(self.model, CausalLM):
            return 0
        return self.model.model.get_output_embeddings().weight.numel()

    def lm_head_trains(self) -> bool:
        """Whether clients train a causal LM's head (whole experts: yes unless model.freeze
        names it or it is tied to frozen embeddings; LoRA: never)."""
        head = self.model.model.get_output_embeddings().weight
        trained = dict(self.model.named_parameters())
        return any(trained[n] is head for n in self.shared_names)

    def adapter_params_per_expert(self) -> int:
        """Elements of one expert's LoRA adapters (0 when whole experts train)."""
        return self.params_per_expert() if self.lora else 0

    def weight_bytes(self) -> int:
        """Resident weights at their storage dtypes: parameters, and 4-bit bases (QLoRA).

        A 4-bit base also needs one layer's experts dequantized at a time (the GEMMs run in
        the base's dtype): that transient buffer is counted too.
        """
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        quantized = [m for m in self.model.modules() if isinstance(m, NF4Weight)]
        total += sum(b.nbytes for m in quantized for b in m.buffers())
        if quantized:
            total += max(
                sum(m.shape.numel() * m.dtype.itemsize for m in _nf4_of(layer.experts.owner))
                for layer in self.layers
            )
        return int(total)

    def footprint(self, activation_bytes_per_sample: float) -> ModelFootprint:
        params = dict(self.model.named_parameters())
        return ModelFootprint(
            weight_bytes=self.weight_bytes() if self.lora else None,
            total_params=sum(p.numel() for p in params.values()),
            shared_trainable_params=sum(
                params[n].numel() for n in self.shared_names + self.gate_names
            ),
            params_per_expert=self.params_per_expert(),
            num_experts_total=self.num_layers * self.num_experts,
            num_moe_layers=self.num_layers,
            activation_bytes_per_sample=activation_bytes_per_sample,
        )

    def measure_activation_bytes(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
    ) -> int:
        """Bytes autograd saves for backward in one training forward with everything trained.

        ``loss`` (logits -> scalar) is part of that forward where its saved tensors matter:
        a causal LM's cross-entropy keeps the log-softmax of its [N, V] logits (at the N
        ``positions`` the loss predicts from).
        Counted with saved-tensor hooks, each storage once (views share storage).
        """
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return t

        with self.training(stop_gradient=False):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits, _ = self.forward(input_ids, attention_mask, positions=positions)
                if loss is not None:
                    logits = loss(logits)
            del logits
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        return int(sum(b for ptr, b in seen.items() if ptr not in params))


def reduce_routing(
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    attention_mask: torch.Tensor,
    num_experts: int,
) -> BatchRouting:
    """Per-token router logits and top-k ids -> per-sample G_e(x) and routed sets.

    Pair counts include padding and dropped tokens (the experts compute them); routed sets
    and token counts include only tokens that are real and really routed.
    """
    batch, seq = attention_mask.shape
    valid = attention_mask.to(torch.float32).unsqueeze(-1)  # [B, S, 1]
    real = attention_mask.bool().unsqueeze(-1)
    counts = valid.sum(dim=1).clamp_min(1.0)  # [B, 1]
    probs, routed, token_counts, pair_counts = [], [], [], []
    for logits, top_k_index, kept in captured:
        pair_counts.append(torch.bincount(top_k_index.reshape(-1), minlength=num_experts))
        p = torch.softmax(logits.float().reshape(batch, seq, num_experts), dim=-1)
        probs.append((p * valid).sum(dim=1) / counts)
        hits = torch.zeros(batch, seq, num_experts, dtype=torch.bool, device=p.device)
        hits.scatter_(-1, top_k_index.reshape(batch, seq, -1), kept.reshape(batch, seq, -1))
        hits &= real
        routed.append(hits.any(dim=1))
        token_counts.append(hits.sum(dim=(0, 1)))
    # Selection and bookkeeping are small host-side work: keep the statistics on the CPU.
    return BatchRouting(
        probs=torch.stack(probs).cpu(),
        routed=torch.stack(routed).cpu(),
        token_counts=torch.stack(token_counts).cpu(),
        pair_counts=torch.stack(pair_counts).cpu(),
    )


# Non-expert parameters that train in LoRA mode besides adapters: the new classifier head.
# A causal LM's own head (lm_head, V x d) is the checkpoint's and stays frozen, as in QLoRA.
HEAD_PATTERNS = ("classifier.", "score.")


def _is_head(name: str) -> bool:
    return any(pattern in name for pattern in HEAD_PATTERNS)


def _nf4_of(owner: nn.Module) -> list[NF4Weight]:
    return [m for m in owner.children() if isinstance(m, NF4Weight)]


def _attach(layer: MoELayer, index: int, plan: BackwardPlan) -> None:
    """Give the module that computes the experts what the routed kernel reads."""
    owner = layer.experts.owner
    owner._hfedmoe_plan = plan
    owner._hfedmoe_layer = index
    owner._hfedmoe_leaves = None


def _expert_parameters(experts: FusedExperts | ModuleExperts) -> list[nn.Parameter]:
    if isinstance(experts, FusedExperts):
        return list(experts.stacked().values())
    return [p for m in experts.modules for p in m.parameters()]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()
