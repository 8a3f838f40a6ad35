"""Flower apps that simulate exactly an hfedmoe client's round, for B1.

The ClientApp calls the same code an hfedmoe client actor runs
(``hfedmoe.platform.client.train_client``): load the global weights into a
process-cached adapter, ``LocalTrainer.train`` on the client's shard and budget, return
the trained tensors and the measured ``wall_seconds``. Each Flower worker process builds
the federation (data, shards, budgets, model) once, from the same config and seed, so
client c has the same data and budget as hfedmoe's client c.

The server samples K of N nodes per round and aggregates with Flower's FedAvg (weighted
by samples); it times each round from configure_train to the end of aggregate_train.

Runs in bench/.venv-flower; imported by name (not as __main__) so Ray workers unpickle the
app's functions by reference and keep the module-level cache between messages.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from common import CpuWindow, Spec, experiment_config, read_spec
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from hfedmoe.platform.client import LocalTrainer
from hfedmoe.platform.config import ExperimentConfig, parse_config
from hfedmoe.platform.federation import Federation, build_federation, make_trainer
from hfedmoe.platform.records import ModelState

SPEC_ENV = "BENCH_SPEC"  # path of the Spec file; Ray workers inherit the driver's env


def bench_config(spec: Spec) -> ExperimentConfig:
    return parse_config(experiment_config(spec, tempfile.gettempdir()))


# ------------------------------------------------------------------------------ arrays


def to_record(state: ModelState) -> ArrayRecord:
    """A ModelState as one flat ArrayRecord: "shared/NAME", "gates/NAME", "experts/L/NAME"."""
    arrays = {f"shared/{k}": v for k, v in state.shared.items()}
    arrays.update({f"gates/{k}": v for k, v in state.gates.items()})
    for layer, tensors in enumerate(state.experts):
        arrays.update({f"experts/{layer}/{k}": v for k, v in tensors.items()})
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> ModelState:
    shared, gates, experts = {}, {}, defaultdict(dict)
    for key, array in record.items():
        group, name = key.split("/", 1)
        if group == "shared":
            shared[name] = array.numpy()
        elif group == "gates":
            gates[name] = array.numpy()
        else:
            layer, name = name.split("/", 1)
            experts[int(layer)][name] = array.numpy()
    return ModelState(shared, gates, [experts[i] for i in range(len(experts))])


# ------------------------------------------------------------------------------ client


@dataclass
class _Worker:
    fed: Federation
    trainer: LocalTrainer


_WORKER: _Worker | None = None  # one per Flower worker process, built on first message


def _worker() -> _Worker:
    """This process's federation and trainer, built once as an hfedmoe actor builds its own."""
    global _WORKER
    if _WORKER is None:
        cfg = bench_config(read_spec(os.environ[SPEC_ENV]))
        torch.set_num_threads(cfg.threads or 1)  # as ClientWorker: one thread per CPU held
        fed, adapter = build_federation(cfg)
        _WORKER = _Worker(fed, make_trainer(adapter, fed.train, fed.footprint, cfg))
    return _WORKER


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One hfedmoe client round: the body of train_client, inside Flower."""
    worker = _worker()
    client = int(context.node_config["partition-id"])
    round_index = int(msg.content["config"]["server-round"]) - 1
    state = from_record(msg.content["arrays"])
    worker.trainer.adapter.load_state(state)
    upload, report = worker.trainer.train(
        client, worker.fed.shards[client], worker.fed.budgets[client], round_index,
        state.num_bytes(),
    )  # fmt: skip
    if upload is None:
        raise RuntimeError(f"client {client} ran out of memory")
    metrics = MetricRecord(
        {
            "num-examples": report.num_samples,
            "wall-seconds": report.wall_seconds,
            "train-loss": report.loss,
        }
    )
    # FedAvg needs every client's full set of tensors; the untrained ones are unchanged.
    content = RecordDict({"arrays": to_record(worker.trainer.adapter.state()), "metrics": metrics})
    return Message(content, reply_to=msg)


# ------------------------------------------------------------------------------ server


class TimedFedAvg(FedAvg):
    """FedAvg that records each round's wall time and its clients' summed compute time."""

    def __init__(self, cpu: CpuWindow, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cpu = cpu
        self.rounds: list[dict[str, Any]] = []
        self._started: dict[int, tuple[float, float]] = {}

    def configure_train(self, server_round: int, arrays, config, grid: Grid) -> Iterable[Message]:
        self._started[server_round] = (time.time(), time.perf_counter())
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        aggregated = super().aggregate_train(server_round, replies)
        started_at, started = self._started[server_round]
        ok = [m for m in replies if m.has_content()]
        self.rounds.append(
            {
                "round": server_round - 1,  # 0-based, as hfedmoe's
                "wall_s": time.perf_counter() - started,
                "client_compute_s": sum(float(m.content["metrics"]["wall-seconds"]) for m in ok),
                "sampled": len(replies),
                "succeeded": len(ok),
                "started_at": started_at,
                "ended_at": time.time(),
            }
        )
        self.cpu.round_ended(server_round - 1)
        return aggregated


def make_strategy(spec: Spec) -> TimedFedAvg:
    """K of N nodes per round, no federated evaluation, FedAvg weighted by samples."""
    return TimedFedAvg(
        CpuWindow(spec),
        fraction_train=spec.per_round / spec.num_clients,
        min_train_nodes=spec.per_round,
        min_available_nodes=spec.num_clients,
        fraction_evaluate=0.0,
    )
