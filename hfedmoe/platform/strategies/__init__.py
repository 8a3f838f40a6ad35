"""HFedMoE and its baselines as peers, one small class each (see ``base.Strategy``).

Importing this package registers the built-in strategies; ``STRATEGIES`` maps every
registered name to its class, and the config validates ``federation.strategy`` against it.
"""

from hfedmoe.platform.strategies import baselines, hfedmoe  # noqa: F401  (registers them)
from hfedmoe.platform.strategies.base import STRATEGIES, Strategy, make_strategy, register

__all__ = ["STRATEGIES", "Strategy", "make_strategy", "register"]
