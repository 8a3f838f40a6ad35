"""HFedMoE and its baselines as peers, one small class each (see ``base.Strategy``), and
the optimisation parts they compose with (``client_updates``, ``server_updates``).

Importing this package registers the built-in classes; ``STRATEGIES``, ``CLIENT_UPDATES``
and ``SERVER_UPDATES`` map every registered name to its class, and the config validates
``federation.strategy``, ``federation.client_update`` and ``federation.server_update``
against them. ``build_strategy`` and ``round_aggregator`` (``compose``) are the one place a
run's strategy and a round's aggregator are made from the config, on every executor.
"""

from hfedmoe.platform.strategies import baselines, client_updates, hfedmoe, server_updates  # noqa: F401
from hfedmoe.platform.strategies.base import (
    CLIENT_UPDATES,
    REGISTRIES,
    SERVER_UPDATES,
    STRATEGIES,
    ClientUpdate,
    ServerUpdate,
    Strategy,
    make_strategy,
    register,
)
from hfedmoe.platform.strategies.compose import build_strategy, round_aggregator, strategy_classes

__all__ = [
    "CLIENT_UPDATES",
    "REGISTRIES",
    "SERVER_UPDATES",
    "STRATEGIES",
    "ClientUpdate",
    "ServerUpdate",
    "Strategy",
    "build_strategy",
    "make_strategy",
    "register",
    "round_aggregator",
    "strategy_classes",
]
