"""Budgets of many clients, drawn from a `BudgetConfig` as struct-of-arrays.

A client's budget is its memory, its sustained training throughput, and its network
bandwidth. `ClientBudgets` holds them as arrays, so that 100,000 clients cost a few arrays,
not 100,000 objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hfedmoe.platform.budgets.profiles import (
    DEFAULT_NETWORK,
    EMBEDDED_DEVICES,
    EMBEDDED_NETWORKS,
    SYNTHETIC_DEVICE,
    NetworkProfile,
    load_ai_benchmark,
    load_network_profiles,
    truncated_normal,
)
from hfedmoe.platform.config import BudgetConfig, TierConfig

# Ray gives a client's actor a power-of-two share of one CPU or GPU, at least this much.
MIN_RESOURCE_FRACTION = 1 / 8


@dataclass(frozen=True)
class Budget:
    """One client's budget (a row of `ClientBudgets`)."""

    tier: str
    device: str
    memory_bytes: float
    flops_per_s: float  # sustained training FLOP/s
    down_bytes_per_s: float
    up_bytes_per_s: float
    max_experts: int | None
    resource_fraction: float  # share of one CPU or GPU given to the client's Ray actor


@dataclass
class ClientBudgets:
    """Budgets of N clients as arrays indexed by client id."""

    tier_names: list[str]
    tier: np.ndarray  # int64 index into tier_names
    device_names: list[str]
    device: np.ndarray  # int64 index into device_names
    memory_bytes: np.ndarray  # float64
    flops_per_s: np.ndarray  # float64, sustained
    down_bytes_per_s: np.ndarray  # float64
    up_bytes_per_s: np.ndarray  # float64
    max_experts: np.ndarray  # int64, -1 for no cap
    resource_fraction: np.ndarray  # float64, a power of two in [1/8, 1]

    def __len__(self) -> int:
        return len(self.tier)

    def __getitem__(self, client: int) -> Budget:
        cap = int(self.max_experts[client])
        return Budget(
            tier=self.tier_names[self.tier[client]],
            device=self.device_names[self.device[client]],
            memory_bytes=float(self.memory_bytes[client]),
            flops_per_s=float(self.flops_per_s[client]),
            down_bytes_per_s=float(self.down_bytes_per_s[client]),
            up_bytes_per_s=float(self.up_bytes_per_s[client]),
            max_experts=None if cap < 0 else cap,
            resource_fraction=float(self.resource_fraction[client]),
        )


@dataclass(frozen=True)
class _Group:
    """What the clients of one tier share (bandwidth is drawn per client)."""

    name: str
    device: str
    memory_bytes: float
    flops_per_s: float
    max_experts: int  # -1 for no cap


def largest_remainder_counts(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to `proportions` that sum to `total` (Hamilton's method):
    floor each quota, then give the leftover units to the largest fractional parts (ties: the
    earlier entry)."""
    p = np.asarray(proportions, dtype=np.float64)
    quotas = p / p.sum() * total
    counts = np.floor(quotas).astype(np.int64)
    leftover = total - int(counts.sum())
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[:leftover]] += 1
    return counts


def resource_fractions(flops_per_s: np.ndarray) -> np.ndarray:
    """Each client's share of one CPU or GPU for its Ray actor: its speed relative to the
    fastest client, rounded in log2 to a power of two in [1/8, 1]."""
    share = flops_per_s / flops_per_s.max()
    exponent = np.clip(np.round(np.log2(share)), math.log2(MIN_RESOURCE_FRACTION), 0)
    return 2.0**exponent


def _device_memory(cfg: BudgetConfig, device_bytes: float, resident_bytes: float) -> float:
    """A device's memory budget under `budgets.device_memory` (see BudgetConfig)."""
    scaled = device_bytes * cfg.memory_scale
    return scaled + resident_bytes if cfg.device_memory == "headroom" else scaled


def _tier_group(
    tier: TierConfig, cfg: BudgetConfig, full_step_bytes: float, resident_bytes: float
) -> tuple[_Group, NetworkProfile]:
    # TierConfig's validator guarantees known device and network names.
    device = EMBEDDED_DEVICES[tier.device] if tier.device else None
    network_name = tier.network or DEFAULT_NETWORK
    if tier.memory_fraction is not None:
        if not full_step_bytes > 0:
            raise ValueError(
                f"budgets.tiers[{tier.name}]: memory_fraction needs full_step_bytes > 0, "
                f"got {full_step_bytes}"
            )
        memory = tier.memory_fraction * full_step_bytes
    else:
        memory = _device_memory(cfg, device.memory_bytes, resident_bytes)
    # The config validator guarantees a device whenever memory_fraction or flops_per_s is unset.
    group = _Group(
        name=tier.name,
        device=tier.device or SYNTHETIC_DEVICE,
        memory_bytes=memory,
        flops_per_s=tier.flops_per_s if tier.flops_per_s is not None else device.flops_per_s,
        max_experts=-1 if tier.max_experts is None else tier.max_experts,
    )
    return group, EMBEDDED_NETWORKS[network_name]


def _assemble(
    rng: np.random.Generator, groups: list[_Group], group: np.ndarray, network: list[NetworkProfile]
) -> ClientBudgets:
    """Budgets from each client's group index and network profile; draws the bandwidths."""
    device_names = list(dict.fromkeys(g.device for g in groups))
    device_of_group = np.array([device_names.index(g.device) for g in groups], dtype=np.int64)
    flops = np.array([g.flops_per_s for g in groups], dtype=np.float64)[group]
    down = truncated_normal(
        rng, np.array([p.down_mean for p in network]), np.array([p.down_std for p in network])
    )
    up = truncated_normal(
        rng, np.array([p.up_mean for p in network]), np.array([p.up_std for p in network])
    )
    return ClientBudgets(
        tier_names=[g.name for g in groups],
        tier=group.astype(np.int64),
        device_names=device_names,
        device=device_of_group[group],
        memory_bytes=np.array([g.memory_bytes for g in groups], dtype=np.float64)[group],
        flops_per_s=flops,
        down_bytes_per_s=down,
        up_bytes_per_s=up,
        max_experts=np.array([g.max_experts for g in groups], dtype=np.int64)[group],
        resource_fraction=resource_fractions(flops),
    )


def _draw_tiered(
    cfg: BudgetConfig,
    num_clients: int,
    rng: np.random.Generator,
    full_step_bytes: float,
    resident_bytes: float,
) -> ClientBudgets:
    groups, networks = zip(
        *(_tier_group(t, cfg, full_step_bytes, resident_bytes) for t in cfg.tiers), strict=True
    )
    if cfg.distribution == "dirichlet":
        proportions = rng.dirichlet(np.full(len(groups), cfg.dirichlet_concentration))
    else:
        proportions = np.array([t.proportion for t in cfg.tiers])
    counts = largest_remainder_counts(proportions, num_clients)
    group = rng.permutation(np.repeat(np.arange(len(groups)), counts))
    return _assemble(rng, list(groups), group, [networks[k] for k in group])


def _draw_traces(
    cfg: BudgetConfig, num_clients: int, rng: np.random.Generator, resident_bytes: float
) -> ClientBudgets:
    if not cfg.traces_dir:
        raise FileNotFoundError("budgets.traces_dir is not set")
    traces_dir = Path(cfg.traces_dir)
    paths = (traces_dir / "ai_benchmark_devices.json", traces_dir / "network_speed_profiles.json")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"budgets.traces_dir={cfg.traces_dir!r}: {path} not found")
    devices = load_ai_benchmark(paths[0])
    networks = load_network_profiles(paths[1])
    device = rng.integers(0, len(devices), num_clients)
    network = rng.integers(0, len(networks), num_clients)
    groups = [
        _Group(
            d.name, d.name, _device_memory(cfg, d.memory_bytes, resident_bytes), d.flops_per_s, -1
        )
        for d in devices
    ]
    return _assemble(rng, groups, device, [networks[k] for k in network])


def draw_budgets(
    cfg: BudgetConfig,
    num_clients: int,
    seed: int,
    full_step_bytes: float,
    resident_bytes: float = 0.0,
) -> ClientBudgets:
    """Draw the budgets of `num_clients` clients; the same arguments give the same budgets.

    tiers: exactly round(proportion * N) clients per tier (largest remainder), in a seeded
    random order. dirichlet: tier proportions ~ Dir(concentration * 1), then as tiers. traces:
    a device of the AI Benchmark traces and a network profile per client, uniformly.
    `full_step_bytes` (see `full_step_memory_bytes`) scales tiers given by memory_fraction;
    `resident_bytes` (the step that trains no expert) is what `device_memory: headroom` adds
    to every device's scaled memory.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    rng = np.random.default_rng(seed)
    if cfg.distribution == "traces":
        return _draw_traces(cfg, num_clients, rng, resident_bytes)
    return _draw_tiered(cfg, num_clients, rng, full_step_bytes, resident_bytes)


def _spread(values: np.ndarray) -> dict[str, float]:
    return {
        "min": float(values.min()),
        "median": float(np.median(values)),
        "max": float(values.max()),
    }


def budget_summary(b: ClientBudgets) -> dict[str, Any]:
    """JSON-serialisable overview for logging: clients per tier, spread of memory and speed."""
    counts = np.bincount(b.tier, minlength=len(b.tier_names))
    fractions, fraction_counts = np.unique(b.resource_fraction, return_counts=True)
    return {
        "num_clients": len(b),
        "tier_counts": {name: int(c) for name, c in zip(b.tier_names, counts, strict=True)},
        "memory_bytes": _spread(b.memory_bytes),
        "flops_per_s": _spread(b.flops_per_s),
        "down_bytes_per_s": _spread(b.down_bytes_per_s),
        "up_bytes_per_s": _spread(b.up_bytes_per_s),
        "resource_fraction_counts": {
            f"{f:g}": int(c) for f, c in zip(fractions, fraction_counts, strict=True)
        },
    }
