"""Typed, validated experiment configuration.

One YAML file describes one federation. Every field has a type and an allowed range;
a bad value is reported with its dotted path, the allowed range and the value given,
before any model is built or any actor started.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from hfedmoe.platform.budgets.profiles import EMBEDDED_DEVICES, EMBEDDED_NETWORKS
from hfedmoe.platform.errors import ConfigError
from hfedmoe.platform.tasks import TASKS

MODEL_KINDS = (
    "upcycled",
    "qwen3_moe",
    "mixtral",
    "olmoe",
    "deepseek_v2",
    "switch_transformers",
    "pretrained",
)

# How model.kind=upcycled makes its experts from the dense FFN (see models/upcycle.py).
ExpertInit = Literal["copy", "drop", "partition"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartitionConfig(_Section):
    """How the training split is divided among clients."""

    kind: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration over labels")
    shards_per_client: int = Field(2, ge=1, description="label shards per client (kind=shards)")
    min_size: int = Field(1, ge=0, description="smallest allowed client data set")
    allow_empty: bool = False
    samples_per_client: int | None = Field(
        None,
        ge=1,
        description="draw this many samples per client with replacement (for N above the "
        "corpus size); each client still gets its own Dirichlet label mix",
    )


class DataConfig(_Section):
    source: Literal["bbc_news", "ag_news", "huggingface", "files"] = "bbc_news"
    path: str | None = Field(
        None,
        description="ag_news: directory of the official CSVs (hub `ag_news` when unset); "
        "huggingface: dataset name; files: a csv/json/parquet file or directory",
    )
    split: str = Field("train", description="split read from huggingface/files sources")
    text_fields: list[str] = Field(default_factory=lambda: ["text"], min_length=1)
    label_field: str = "label"
    prompt_field: str = Field(
        "prompt",
        description="task causal_lm: column holding the prompt (instruction) of a pair; a "
        "files/huggingface dataset without it but with label_field becomes topic instructions",
    )
    response_field: str = Field(
        "response", description="task causal_lm: column holding the response the loss is on"
    )
    test_fraction: float = Field(0.2, gt=0, lt=1)
    max_test_samples: int | None = Field(None, ge=1)
    max_length: int = Field(64, ge=8, le=4096, description="tokens per sample")
    partition: PartitionConfig = PartitionConfig()

    @model_validator(mode="after")
    def _path_given_where_needed(self) -> DataConfig:
        if self.source in ("huggingface", "files") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if self.source == "bbc_news" and self.path:
            raise ValueError(
                "data.path is not read for data.source 'bbc_news' (the corpus is embedded); "
                "drop data.path, or set data.source to ag_news, huggingface or files"
            )
        return self


LoRATarget = Literal["experts", "shared_experts", "attention", "router"]


class LoRAConfig(_Section):
    """Parameter-efficient experts (models/lora.py): adapters train, the base stays frozen."""

    rank: int | None = Field(
        None, ge=1, description="None: train whole experts; r: a rank-r LoRA adapter per expert"
    )
    alpha: float = Field(16.0, gt=0, description="adapter scale alpha / rank, as in LoRA")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="on the inputs of peft-adapted linear targets (attention, shared_experts); "
        "the routed experts' adapters have none, as peft's own 3-D expert wrapper",
    )
    targets: list[LoRATarget] = Field(
        default_factory=lambda: ["experts", "attention"],
        description="experts: one adapter per routed expert (required); shared_experts, "
        "attention: peft LoRA on those linear layers; router: the router trains in full "
        "(d x E weights). Without attention adapters the backward stops at the lowest "
        "trained expert, and the modelled FLOPs are an upper bound",
    )
    aggregate: Literal["factors", "product"] = Field(
        "factors",
        description="factors: average A and B separately (FedIT); product: average each "
        "client's B A exactly and re-factor to rank r by truncated SVD",
    )

    @model_validator(mode="after")
    def _experts_adapted(self) -> LoRAConfig:
        if self.rank is not None and "experts" not in self.targets:
            raise ValueError(
                "model.lora.targets must include 'experts': HFedMoE selects which experts' "
                f"adapters train (got {self.targets})"
            )
        return self


class ModelConfig(_Section):
    kind: Literal[MODEL_KINDS] = "upcycled"  # type: ignore[valid-type]
    path: str | None = Field(
        None,
        description="upcycled: dense checkpoint (default: the bundled MiniLM); pretrained: hub "
        "id or local directory of an MoE checkpoint",
    )
    tokenizer: str | None = Field(None, description="default: the checkpoint's, else MiniLM's")
    trust_remote_code: bool = Field(
        False,
        description="pretrained: run Python code shipped with the checkpoint (auto_map). Only "
        "for checkpoints you trust: that code runs with your rights",
    )
    num_experts: int = Field(8, ge=2, le=512)
    top_k: int = Field(2, ge=1)
    num_layers: int | None = Field(
        None, ge=1, description="tiny models: layers; upcycled: keep only the first N layers"
    )
    hidden_size: int = Field(64, ge=8, description="tiny random-init models only")
    intermediate_size: int = Field(128, ge=8, description="tiny random-init models only")
    num_heads: int = Field(4, ge=1, description="tiny random-init models only")
    num_shared_experts: int = Field(
        1, ge=0, description="tiny deepseek_v2: always-on shared experts beside the routed ones"
    )
    vocab_size: int | None = Field(
        None, ge=2, description="tiny models: hash token ids into this many embeddings"
    )
    router_init_std: float = Field(0.02, ge=0, description="random router init (copy, drop)")
    expert_init: ExpertInit = Field(
        "copy",
        description="upcycled only: copy = identical copies of the dense FFN (sparse "
        "upcycling); drop = copies that each redraw a random model.drop_ratio of their "
        "neurons (Drop-Upcycling); partition = one expert per balanced cluster of the FFN's "
        "neurons, width I/num_experts, router from the clusters (MoEfication)",
    )
    drop_ratio: float = Field(
        0.5, gt=0, le=1, description="expert_init=drop: fraction of neurons each expert redraws"
    )
    freeze: list[str] = Field(
        default_factory=lambda: ["embed"],
        description="substrings of non-expert parameter names that clients never train "
        "(with model.lora everything but adapters, head and targeted router is frozen)",
    )
    lora: LoRAConfig = LoRAConfig()
    quantization: Literal["none", "nf4"] = Field(
        "none",
        description="nf4: the frozen routed experts stored in 4 bits through bitsandbytes "
        "(QLoRA); needs model.lora.rank",
    )

    @model_validator(mode="after")
    def _top_k_fits(self) -> ModelConfig:
        if self.top_k > self.num_experts:
            raise ValueError(
                f"model.top_k ({self.top_k}) must be at most model.num_experts ({self.num_experts})"
            )
        if self.kind == "pretrained" and not self.path:
            raise ValueError("model.path is required when model.kind is 'pretrained'")
        if self.expert_init != "copy" and self.kind != "upcycled":
            raise ValueError(
                f"model.expert_init={self.expert_init!r} builds experts from a dense "
                f"checkpoint, so it needs model.kind='upcycled' (got {self.kind!r}); "
                "remove model.expert_init or set model.kind: upcycled"
            )
        if self.quantization != "none" and self.lora.rank is None:
            raise ValueError(
                f"model.quantization={self.quantization!r} freezes the experts in 4 bits, so "
                "only adapters can train: set model.lora.rank (e.g. 8) or model.quantization: none"
            )
        return self


class ParamsError(ValueError):
    """A component's params failed its own model: ``field`` is the dotted path inside params."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ComponentRef(_Section):
    """A registered class and its parameters: written as a bare name or {name, params}.

    A bare name is kept as one when written back (sweeps and old configs keep working).
    """

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_serializer(mode="wrap")
    def _as_written(self, handler):
        return self.name if not self.params else handler(self)


def _registered(part: str, ref: ComponentRef) -> type:
    """The class ``ref`` names in the registry of ``part``, its params validated by it."""
    # Imported here: the strategies import the config's types, never the other way at import.
    from hfedmoe.platform.strategies import REGISTRIES

    cls = REGISTRIES[part].lookup(ref.name)
    try:
        cls.Params(**ref.params)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        given = first.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        raise ParamsError(field, f"{first['msg']}{shown}") from None
    return cls


class FederationConfig(_Section):
    strategy: ComponentRef = Field(
        ComponentRef(name="hfedmoe"),
        description="a registered strategy (strategies/): which experts train, how uploads "
        "are weighted; a name or {name, params}",
    )
    client_update: ComponentRef = Field(
        ComponentRef(name="plain"),
        description="local-step correction: plain | fedprox {mu} | scaffold",
    )
    server_update: ComponentRef = Field(
        ComponentRef(name="fedavg"),
        description="server optimiser on aggregate - previous: fedavg | fedavgm {lr, "
        "momentum} | fedadam, fedyogi {lr, beta1, beta2, tau} | fedadagrad {lr, beta1, tau}",
    )
    rounds: int = Field(10, ge=1)
    num_clients: int = Field(20, ge=1)
    clients_per_round: int = Field(5, ge=1)
    local_epochs: int = Field(1, ge=1)
    max_local_steps: int | None = Field(None, ge=1, description="cap on batches per client round")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    backward: Literal["exact", "stop_gradient"] = "exact"
    engine: Literal["torch", "deepspeed"] = Field(
        "torch",
        description="deepspeed: ZeRO with CPU offload, for strategies that train a fixed set "
        "(fedavg_full, flex) on models whose full training state does not fit the device",
    )
    zero_stage: int = Field(
        2,
        ge=1,
        le=3,
        description="engine=deepspeed: 1 offloads AdamW moments, 2 also "
        "gradients, 3 also parameters",
    )
    eval_every: int = Field(1, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    target_accuracy: float | None = Field(
        None, gt=0, le=1, description="report rounds and simulated time to reach it"
    )
    stop_at_target: bool = Field(
        False, description="end the run once the evaluated accuracy reaches target_accuracy"
    )
    round_deadline_s: float | None = Field(
        None, gt=0, description="simulated seconds; slower clients' updates are dropped"
    )

    @field_validator("strategy", "client_update", "server_update")
    @classmethod
    def _registered(cls, ref: ComponentRef, info: ValidationInfo) -> ComponentRef:
        _registered(info.field_name, ref)
        return ref

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        from hfedmoe.platform.strategies import STRATEGIES  # see _registered

        fixed_set = ("all", "none")
        if self.engine == "deepspeed" and STRATEGIES[self.strategy.name].trains not in fixed_set:
            fixed = [n for n, s in STRATEGIES.items() if s.trains in fixed_set]
            raise ValueError(
                f"federation.engine=deepspeed supports {', '.join(fixed)}, not "
                f"{self.strategy.name}: ZeRO flattens parameters into partitions, while "
                "per-batch expert selection needs each expert as its own tensor; use "
                "engine=torch"
            )
        if self.engine == "deepspeed" and self.client_update.name != "plain":
            raise ValueError(
                f"federation.client_update={self.client_update.name} corrects each step's "
                "gradients, which the DeepSpeed engine does not expose; use engine=torch or "
                "client_update: plain"
            )
        if self.stop_at_target and self.target_accuracy is None:
            raise ValueError(
                "federation.stop_at_target needs federation.target_accuracy; set it or drop "
                "stop_at_target"
            )
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({self.clients_per_round}) must be at most "
                f"federation.num_clients ({self.num_clients})"
            )
        return self


class HFedMoEConfig(_Section):
    """The method's hyper-parameters (Fang et al., arXiv 2601.00583, eqs 5, 14, 17-21)."""

    tau: float = Field(0.05, ge=0, le=1, description="usage threshold of eqs 17-18")
    beta: float = Field(0.1, ge=0, description="IB trade-off of eq 14")
    importance_mix: float = Field(0.5, ge=0, le=1, description="lambda of eq 5")
    normalise_gate_weights: bool = Field(True, description="eq 21: scale alphas to sum to 1")
    budget_scope: Literal["global", "per_layer"] = Field(
        "global",
        description="global: C_budget experts over all MoE layers (eq 15 as written); "
        "per_layer: C_budget experts in each MoE layer",
    )


class TierConfig(_Section):
    name: str
    proportion: float = Field(..., ge=0, le=1)
    device: str | None = Field(None, description="embedded device name: memory and speed")
    memory_fraction: float | None = Field(
        None,
        gt=0,
        description="memory cap as a fraction of the full fine-tuning step of this model",
    )
    flops_per_s: float | None = Field(None, gt=0, description="sustained training FLOP/s")
    network: str | None = Field(None, description="embedded network profile name")
    max_experts: int | None = Field(None, ge=0, description="explicit cap on C_budget")

    @model_validator(mode="after")
    def _memory_and_speed_given(self) -> TierConfig:
        if self.device is None and (self.memory_fraction is None or self.flops_per_s is None):
            raise ValueError(
                f"budgets.tiers[{self.name}]: give either `device` or both `memory_fraction` "
                "and `flops_per_s`"
            )
        for field_name, value, known in (
            ("device", self.device, EMBEDDED_DEVICES),
            ("network", self.network, EMBEDDED_NETWORKS),
        ):
            if value is not None and value not in known:
                raise ValueError(
                    f"budgets.tiers[{self.name}].{field_name}: unknown {value!r}; "
                    f"choose one of {', '.join(sorted(known))}"
                )
        return self


class BudgetConfig(_Section):
    distribution: Literal["tiers", "dirichlet", "traces"] = "tiers"
    tiers: list[TierConfig] = Field(default_factory=list)
    dirichlet_concentration: float = Field(
        1.0, gt=0, description="distribution=dirichlet: tier proportions ~ Dir(c * 1)"
    )
    traces_dir: str | None = Field(
        None, description="directory holding ai_benchmark_devices.json and network profiles"
    )
    memory_scale: float = Field(
        1.0,
        gt=0,
        description="multiplies device memory (devices and traces), to scale a "
        "small simulated model against real device capacities",
    )
    device_memory: Literal["total", "headroom"] = Field(
        "total",
        description="total: device memory x memory_scale must hold the whole training step; "
        "headroom: every device holds the model and a batch's activations, and device "
        "memory x memory_scale is what it has beyond that for trained parameters' "
        "gradients and AdamW state (the paper's setting, where phones run the model and "
        "differ in how much of it they can train)",
    )

    @model_validator(mode="after")
    def _distribution_complete(self) -> BudgetConfig:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"budgets.tiers: tier names must be unique (got {names})")
        if self.distribution in ("tiers", "dirichlet"):
            if not self.tiers:
                raise ValueError(
                    f"budgets.tiers must list at least one tier for {self.distribution}"
                )
            if self.distribution == "tiers":
                total = sum(t.proportion for t in self.tiers)
                if abs(total - 1.0) > 1e-6:
                    raise ValueError(
                        f"budgets.tiers proportions must sum to 1 (they sum to {total:g})"
                    )
        if self.distribution == "traces" and not self.traces_dir:
            raise ValueError("budgets.traces_dir is required when budgets.distribution is 'traces'")
        return self


class TaskConfig(_Section):
    """What the federation learns (tasks/): the head, the loss, the evaluation."""

    name: str = Field(
        "classification",
        description="classification: a classifier head, cross-entropy on the labels; "
        "causal_lm: the decoder's own LM head, next-token loss on the responses of "
        "prompt/response pairs (topic instructions from a classification corpus)",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the task's own settings (causal_lm: max_new_tokens, logged_generations)",
    )

    @model_validator(mode="after")
    def _registered(self) -> TaskConfig:
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; choose one of {', '.join(TASKS)}")
        try:
            TASKS[self.name].Params.model_validate(self.params)
        except ValidationError as err:
            problems = "; ".join(
                f"task.params.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in err.errors()
            )
            raise ValueError(problems) from None
        return self


class RuntimeConfig(_Section):
    """How the Ray runner places and supervises clients (ignored by the in-process runner)."""

    address: str | None = Field(
        None,
        description="Ray cluster address: HOST:PORT of its GCS, ray://HOST:PORT (Ray client), "
        "'auto' (the cluster running on this machine); unset: start Ray locally",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when the cluster has GPUs, else cpu"
    )
    max_actors: int | None = Field(
        None, ge=1, description="cap on client actors (default: from cluster CPUs and memory)"
    )
    actor_memory_gb: float | None = Field(
        None, gt=0, description="memory reserved per client actor (default: from the model size)"
    )
    client_timeout_s: float = Field(
        900.0, gt=0, description="one client's training running longer is lost (then retried)"
    )
    gpu_memory_margin: float = Field(
        0.25, ge=0, description="on GPUs the enforced cap is the budget times 1 + this"
    )
    retries: int = Field(1, ge=0, description="re-runs of a client whose actor died")

    @field_validator("address")
    @classmethod
    def _an_address(cls, address: str | None) -> str | None:
        if address is None or address in ("auto", "local") or host_port(address) is not None:
            return address
        raise ValueError(
            f"{address!r} is not a Ray address; give HOST:PORT (e.g. 10.0.0.5:6379, the head's "
            "GCS port), ray://HOST:10001, or auto for the cluster running on this machine; "
            "leave it unset to start Ray locally"
        )


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT`` or ``ray://HOST:PORT``, else None."""
    match = re.fullmatch(r"(?:ray://)?(\[[0-9a-fA-F:.]+\]|[\w.-]+):(\d{1,5})", address)
    if match is None or not 0 < int(match[2]) < 65536:
        return None
    return match[1].strip("[]"), int(match[2])


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = Field(
        None, description="MLflow tracking URI (default: sqlite:///<run_dir>/mlflow.db)"
    )
    experiment: str = "hfedmoe"
    on_error: Literal["fail", "continue"] = Field(
        "continue",
        description="tracking.uri unreachable at the start: continue (warn, train, log once "
        "it answers) or fail before training. An outage mid-run never stops training.",
    )

    @field_validator("uri")
    @classmethod
    def _a_tracking_uri(cls, uri: str | None) -> str | None:
        return None if uri is None else check_tracking_uri(uri)


# MLflow 3's tracking stores (a server, a SQL database, Databricks); it refuses plain files.
_TRACKING_URI = re.compile(
    r"https?://[^/\s]+(/\S*)?"
    r"|sqlite:///\S+"
    r"|(postgresql|mysql|mssql)(\+\w+)?://\S+"
    r"|databricks(://\S+)?"
)


def check_tracking_uri(uri: str) -> str:
    """``uri`` if MLflow 3 can track to it, else a ValueError saying what it takes."""
    if _TRACKING_URI.fullmatch(uri):
        return uri
    if uri.startswith("file:") or "://" not in uri:
        problem = "is a file path to MLflow (no scheme://), and MLflow 3 refuses its file store"
    else:
        problem = "is not a tracking URI MLflow takes"
    raise ValueError(
        f"{uri!r} {problem}; give http(s)://HOST:PORT (an MLflow server), "
        "sqlite:///ABSOLUTE/PATH/mlflow.db, postgresql://..., mysql://... or databricks, "
        "or leave it unset for mlflow.db beside the run directories"
    )


class FaultConfig(_Section):
    """Injected faults, for robustness experiments and the runtime's own tests."""

    crash: list[tuple[int, int]] = Field(
        default_factory=list,
        description="(round, client): the client's actor process dies mid-task, first attempt",
    )
    corrupt: list[tuple[int, int]] = Field(
        default_factory=list, description="(round, client): the client's update turns into NaN"
    )
    hang: list[tuple[int, int]] = Field(
        default_factory=list,
        description="(round, client): the client stalls, first attempt, until its time limit",
    )
    aggregator_crash: list[int] = Field(
        default_factory=list,
        description="rounds whose first attempt loses the aggregator actor mid-round",
    )
    driver_crash: int | None = Field(
        None,
        description="the driver fails right after this round's checkpoint (a resumed run, "
        "or a retried sweep trial, continues after it and so does not fail again)",
    )


class ExperimentConfig(_Section):
    name: str = "hfedmoe"
    seed: int = Field(0, ge=0)
    threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads per client; equal counts make the Ray and "
        "in-process runners bit-identical (actors default to their CPU share, at least 1)",
    )
    output_dir: str = Field("runs", description="run directories are created under it")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    federation: FederationConfig = FederationConfig()
    hfedmoe: HFedMoEConfig = HFedMoEConfig()
    task: TaskConfig = TaskConfig()
    budgets: BudgetConfig = BudgetConfig(
        tiers=[TierConfig(name="full", proportion=1.0, memory_fraction=2.0, flops_per_s=1e12)]
    )
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    faults: FaultConfig = FaultConfig()

    @model_validator(mode="after")
    def _faults_in_range(self) -> ExperimentConfig:
        fed = self.federation
        for kind in ("crash", "corrupt", "hang"):
            for round_index, client in getattr(self.faults, kind):
                if not (0 <= round_index < fed.rounds and 0 <= client < fed.num_clients):
                    raise ValueError(
                        f"faults.{kind}: ({round_index}, {client}) names no round in "
                        f"[0, {fed.rounds}) and client in [0, {fed.num_clients})"
                    )
        crash = self.faults.driver_crash
        if crash is not None and not 0 <= crash < fed.rounds:
            raise ValueError(f"faults.driver_crash: {crash} names no round in [0, {fed.rounds})")
        for round_index in self.faults.aggregator_crash:
            if not 0 <= round_index < fed.rounds:
                raise ValueError(
                    f"faults.aggregator_crash: {round_index} names no round in [0, {fed.rounds})"
                )
        return self

    @model_validator(mode="after")
    def _model_has_an_lm_head(self) -> ExperimentConfig:
        if TASKS[self.task.name].head != "lm":
            return self
        if self.model.kind in ("upcycled", "switch_transformers"):
            raise ValueError(
                f"task.name={self.task.name!r} needs a decoder with its own LM head; "
                f"model.kind={self.model.kind!r} is an encoder: choose qwen3_moe, mixtral, "
                "olmoe, deepseek_v2 or a pretrained causal checkpoint"
            )
        if self.model.vocab_size is not None:
            raise ValueError(
                f"model.vocab_size hashes token ids, but task.name={self.task.name!r} "
                "generates and compares real tokens: drop model.vocab_size"
            )
        return self

    @model_validator(mode="after")
    def _lora_on_the_torch_engine(self) -> ExperimentConfig:
        if self.model.lora.rank is not None and self.federation.engine == "deepspeed":
            raise ValueError(
                "model.lora trains adapters of a few MB, which the torch engine holds on any "
                "device: set federation.engine: torch (ZeRO offload is for whole-model training)"
            )
        return self


def _model_at(model: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    """The model class at ``path`` (field names, list indices, dict keys) inside ``model``."""
    node: Any = model
    for part in (*path, None):
        while get_origin(node) is Union or type(node).__name__ == "UnionType":  # X | None
            members = [a for a in get_args(node) if a is not type(None)]
            node = members[0] if len(members) == 1 else None
        if part is None:
            break
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            node = field.annotation if field is not None else None
        elif get_origin(node) in (list, dict):
            node = get_args(node)[-1]  # list[X] or dict[K, X]: part is an index or key
        else:
            return None
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def validation_message(err: ValidationError, model: type[BaseModel]) -> str:
    """Every problem of ``err`` on one line: the dotted field, what is wrong, the value or
    the keys allowed there (``model`` is the validated class)."""
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        field = ".".join(str(p) for p in loc)
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, ParamsError):  # a component's own params model failed
            problems.append(f"{field}.params.{cause.field}: {cause}")
            continue
        given = e.get("input")
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            allowed = f"; allowed: {', '.join(parent.model_fields)}" if parent else ""
            problems.append(f"{field}: unknown key{allowed}")
        elif e["type"] == "missing":
            parent = _model_at(model, loc[:-1])
            info = parent.model_fields.get(str(loc[-1])) if parent else None
            what = f" ({info.description})" if info is not None and info.description else ""
            problems.append(f"{field}: missing; add it{what}")
        else:
            message = e["msg"].removeprefix("Value error, ")
            if isinstance(given, dict):  # a section's own check: its message names the fields
                problems.append(message)
            else:
                shown = "" if repr(given) in message else f" (got {given!r})"
                problems.append(f"{field}: {message}{shown}")
    return "; ".join(problems)


def parse_config(raw: dict[str, Any], source: str = "invalid configuration") -> ExperimentConfig:
    """Validate a plain mapping; raise ConfigError naming each bad field and its range.

    ``source`` begins the message: the file the mapping came from, where there is one.
    """
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {validation_message(err, ExperimentConfig)}") from None


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in ``path``; a syntax error is a ConfigError naming the line."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark, context = err.problem_mark, err.context_mark
        where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        opened = ""
        if err.context and context is not None:
            opened = f" ({err.context} from line {context.line + 1}, column {context.column + 1})"
        raise ConfigError(
            f"{where}: not valid YAML, {err.problem}{opened}; correct the {what} there (an "
            "unclosed bracket or quote, a tab, or a key out of line are the usual causes)"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}); correct the {what}") from None


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one `--set a.b.c=value` override in place."""
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file, apply dotted overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = read_yaml(path, "config") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return parse_config(raw, f"{path} (with --set)" if overrides else str(path))


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or Path(value).expanduser().exists()


def check_paths(cfg: ExperimentConfig) -> None:
    """Fail before anything starts if a path the config names does not exist."""
    checks = []
    if cfg.data.path and cfg.data.source in ("ag_news", "files"):
        checks.append(("data.path", cfg.data.path))
    if cfg.budgets.distribution == "traces" and cfg.budgets.traces_dir:
        checks.append(("budgets.traces_dir", cfg.budgets.traces_dir))
    for field_name, value in (
        ("model.path", cfg.model.path),
        ("model.tokenizer", cfg.model.tokenizer),
    ):
        if value and _looks_local(value):
            checks.append((field_name, value))
    if cfg.budgets.distribution == "traces" and cfg.budgets.traces_dir:
        for name in ("ai_benchmark_devices.json", "network_speed_profiles.json"):
            checks.append(("budgets.traces_dir", str(Path(cfg.budgets.traces_dir) / name)))
    for field_name, value in checks:
        if not Path(value).expanduser().exists():
            raise ConfigError(
                f"{field_name}: {value} does not exist; give an existing path "
                f"(relative paths are resolved from {Path.cwd()})"
            )
