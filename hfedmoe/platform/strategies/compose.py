"""The one place a run's strategy and a round's aggregator are built from the config.

Used by the client trainer, the in-process executor and the Ray aggregator actor alike,
so every process composes the same selection rule, client update and server update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hfedmoe.platform.aggregation import RoundAggregator
from hfedmoe.platform.records import ModelState, ServerState
from hfedmoe.platform.strategies.base import REGISTRIES, Strategy

if TYPE_CHECKING:
    from hfedmoe.platform.config import ExperimentConfig


def strategy_classes(cfg: ExperimentConfig) -> list[type]:
    """The registered classes the config names: strategy, client update, server update."""
    fed = cfg.federation
    return [REGISTRIES[part].lookup(getattr(fed, part).name) for part in REGISTRIES]


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """The configured strategy, with its client and server updates, each with its params."""
    fed = cfg.federation
    strategy_cls, client_cls, server_cls = strategy_classes(cfg)
    return strategy_cls(
        cfg.hfedmoe,
        strategy_cls.Params(**fed.strategy.params),
        client_cls(client_cls.Params(**fed.client_update.params)),
        server_cls(server_cls.Params(**fed.server_update.params)),
    )


def round_aggregator(
    cfg: ExperimentConfig, strategy: Strategy, state: ModelState, server: ServerState
) -> RoundAggregator:
    """A round's aggregator from the global state and the strategy's server state."""
    return RoundAggregator(
        state,
        strategy,
        cfg.hfedmoe.tau,
        cfg.federation.round_deadline_s,
        lora_aggregate=cfg.model.lora.aggregate,
        server_state=server,
        num_clients=cfg.federation.num_clients,
    )
