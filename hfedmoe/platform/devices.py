"""Device profiles, client budget distributions, and the memory and time model of a local step.

A client's budget is its memory (a training step that does not fit fails, OOM), its sustained
training throughput, and its network bandwidth. Budgets of many clients are drawn from a
`BudgetConfig` as struct-of-arrays (`ClientBudgets`), so that 100,000 clients cost a few arrays,
not 100,000 objects.

Units: bytes, FLOP/s, bytes/s, seconds. Device memory is binary (1 GB = 2**30 bytes), as DRAM
is sold; network speed is decimal (1 KB/s = 1000 bytes/s, 1 Mbit/s = 125,000 bytes/s), as
speed tests report it.

Precision of `DeviceProfile.peak_flops_per_s`: discrete and Jetson GPUs and the Raspberry Pi
give their FP32 peak (they train in FP32, `ModelFootprint.bytes_per_param = 4`); phones give
their FP16 GPU peak (phones train in FP16 on the GPU/NPU), which is also what the AI Benchmark
FP16 score is calibrated against.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hfedmoe.platform.config import BudgetConfig, TierConfig

logger = logging.getLogger(__name__)

GiB = 2**30
MBIT_PER_S = 1e6 / 8  # bytes/s in one Mbit/s
KB_PER_S = 1000.0  # bytes/s in one KB/s of the network traces (decimal, as speed tests report)

# Sustained training throughput as a fraction of peak: small-batch transformer training reaches
# roughly 20-40% of an accelerator's peak (memory-bound optimizer steps, small GEMMs, kernel
# launch overhead); 0.3 is a typical middle figure.
TRAINING_UTILISATION = 0.3

# FLOP/s of FP16 peak per point of AI Benchmark's FP16_Score, calibrated on the Google Pixel 4:
# Snapdragon 855 with an Adreno 640 GPU (384 ALUs at 585 MHz: 0.90 TFLOPS FP32, 1.80 TFLOPS
# FP16, twice the FP32 rate), FP16_Score 8883 in the trace file. The score is assumed to scale
# linearly with throughput, so 1.8e12 / 8883 ~ 2.0e8 FLOP/s per point.
FP16_SCORE_TO_FLOPS = 1.8e12 / 8883

# Network bandwidth is drawn from a normal truncated below at this fraction of its mean: no
# client is (nearly) offline, and wide profiles (std ~ mean) stay positive.
BANDWIDTH_FLOOR_FRACTION = 0.1

# Ray gives a client's actor a power-of-two share of one CPU or GPU, at least this much.
MIN_RESOURCE_FRACTION = 1 / 8

DEFAULT_NETWORK = "wifi"
SYNTHETIC_DEVICE = "synthetic"  # device name of tiers given by memory_fraction and flops_per_s


# ---- device profiles ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceProfile:
    """One device: memory, peak training FLOP/s (FP32 or FP16, see `source`), provenance."""

    name: str
    memory_bytes: int
    peak_flops_per_s: float
    source: str

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or not self.peak_flops_per_s > 0:
            raise ValueError(f"device {self.name!r}: memory and peak FLOP/s must be positive")

    @property
    def flops_per_s(self) -> float:
        """Sustained training throughput: peak times TRAINING_UTILISATION."""
        return self.peak_flops_per_s * TRAINING_UTILISATION


def _device(name: str, memory_gb: float, peak_tflops: float, source: str) -> DeviceProfile:
    return DeviceProfile(name, int(memory_gb * GiB), peak_tflops * 1e12, source)


EMBEDDED_DEVICES: dict[str, DeviceProfile] = {
    d.name: d
    for d in (
        _device(
            "jetson_agx_xavier",
            32,
            1.41,
            "FP32. NVIDIA Jetson AGX Xavier module data sheet: 32 GB LPDDR4x, 512-core Volta GPU "
            "at up to 1377 MHz; 512 x 2 FLOP x 1.377 GHz = 1.41 TFLOPS on CUDA cores",
        ),
        _device(
            "jetson_orin_nano",
            8,
            1.28,
            "FP32. NVIDIA Jetson Orin Nano 8GB data sheet: 8 GB LPDDR5, 1024-core Ampere GPU at "
            "625 MHz; 1024 x 2 FLOP x 0.625 GHz = 1.28 TFLOPS (2024 'Super' clocks: 2.09)",
        ),
        _device(
            "jetson_agx_orin",
            64,
            5.32,
            "FP32. NVIDIA Jetson AGX Orin 64GB data sheet: 64 GB LPDDR5, 2048-core Ampere GPU at "
            "1.3 GHz; 5.32 TFLOPS FP32",
        ),
        _device(
            "raspberry_pi_5",
            8,
            0.1536,
            "FP32, approximate. Raspberry Pi 5 product brief: 8 GB LPDDR4X, 4x Cortex-A76 at "
            "2.4 GHz; trains on the CPU: 4 cores x 16 FLOP/cycle (two 128-bit NEON FMA pipes) "
            "x 2.4 GHz = 154 GFLOPS, derived, not published",
        ),
        _device(
            "pixel_8",
            8,
            1.6,
            "FP16, approximate. Google Pixel 8 spec sheet: 8 GB RAM, Tensor G3 with a Mali-G715 "
            "MP7 GPU at 890 MHz; 7 cores x 256 FP16 FLOP/cycle x 0.89 GHz ~ 1.6 TFLOPS, the "
            "per-core rate assumed from Mali-G710 (Arm and Google publish no FLOPS)",
        ),
        _device(
            "galaxy_s24",
            8,
            5.5,
            "FP16, approximate. Samsung Galaxy S24 spec sheet: 8 GB RAM; Snapdragon 8 Gen 3 "
            "variant (other markets ship Exynos 2400), Adreno 750 ~2.8 TFLOPS FP32 and twice "
            "that in FP16 (third-party estimates; Qualcomm publishes no FLOPS)",
        ),
        _device(
            "iphone_15_pro",
            8,
            2.15,
            "FP16, approximate. Apple iPhone 15 Pro: 8 GB RAM, A17 Pro with a 6-core GPU, "
            "768 ALUs at ~1.4 GHz ~ 2.15 TFLOPS, FP16 at the FP32 rate on Apple GPUs "
            "(third-party estimate; Apple publishes no FLOPS)",
        ),
        _device(
            "rtx_3060",
            12,
            12.74,
            "FP32. NVIDIA GeForce RTX 3060 specifications: 12 GB GDDR6, 3584 CUDA cores at "
            "1.78 GHz boost; 12.74 TFLOPS FP32",
        ),
        _device(
            "rtx_4090",
            24,
            82.6,
            "FP32. NVIDIA GeForce RTX 4090 specifications: 24 GB GDDR6X, 16384 CUDA cores at "
            "2.52 GHz boost; 82.6 TFLOPS FP32",
        ),
        _device(
            "a100_40gb",
            40,
            19.5,
            "FP32. NVIDIA A100 Tensor Core GPU data sheet: 40 GB HBM2; 19.5 TFLOPS FP32 "
            "(TF32 Tensor Cores, 156 TFLOPS, are not strict FP32)",
        ),
    )
}

_RAM_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GB|MB)\s*$", re.IGNORECASE)
_RAM_UNIT_BYTES = {"GB": GiB, "MB": 2**20}


def _parse_ram(value: Any) -> int | None:
    """'8GB' or '0.75GB' or '512MB' -> bytes; None when unparsable or not positive."""
    match = _RAM_PATTERN.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    memory = int(float(match.group(1)) * _RAM_UNIT_BYTES[match.group(2).upper()])
    return memory if memory > 0 else None


def _parse_number(value: Any, allow_zero: bool = False) -> float | None:
    """A finite positive (or, with allow_zero, non-negative) number from a number or numeric
    string; None otherwise."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        return None
    return number


def parse_ai_benchmark(rows: list[Any]) -> tuple[list[DeviceProfile], dict[str, int]]:
    """AI Benchmark records -> device profiles, and the count of skipped rows per reason.

    Rows without a model name, with an unparsable RAM string, or with a missing, non-numeric
    or non-positive FP16_Score are skipped. A model name that repeats (SoC variants, re-runs)
    gets a ' #k' suffix so that names stay unique.
    """
    profiles: list[DeviceProfile] = []
    skipped: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for row in rows:
        if not isinstance(row, dict):
            skipped["not a record"] += 1
            continue
        name = str(row.get("Model") or "").strip()
        memory = _parse_ram(row.get("RAM"))
        score = _parse_number(row.get("FP16_Score"))
        if not name:
            skipped["no Model"] += 1
        elif memory is None:
            skipped["unparsable RAM"] += 1
        elif score is None:
            skipped["missing or non-positive FP16_Score"] += 1
        else:
            seen[name] += 1
            unique = name if seen[name] == 1 else f"{name} #{seen[name]}"
            cpu = str(row.get("CPU") or "?").strip()
            source = (
                f"FP16. AI Benchmark ranking (FLASH traces): {cpu}, FP16_Score {score:g} x "
                f"{FP16_SCORE_TO_FLOPS:.4g} FLOP/s per point"
            )
            profiles.append(DeviceProfile(unique, memory, score * FP16_SCORE_TO_FLOPS, source))
    return profiles, dict(skipped)


def load_ai_benchmark(path: Path) -> list[DeviceProfile]:
    """Device profiles from an AI Benchmark JSON list (see `parse_ai_benchmark`)."""
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of device records")
    profiles, skipped = parse_ai_benchmark(rows)
    if skipped:
        logger.warning(
            "%s: skipped %d of %d rows: %s", path, sum(skipped.values()), len(rows), skipped
        )
    if not profiles:
        raise ValueError(f"{path}: no usable device records")
    return profiles


# ---- network profiles --------------------------------------------------------------------------
def _truncated_normal(rng: np.random.Generator, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Per-element normal draws, redrawn while below BANDWIDTH_FLOOR_FRACTION of the mean.

    Rejection keeps the shape of the normal above the floor (clipping would pile mass on it);
    with the floor below the mean each draw is accepted with probability above 1/2.
    """
    floor = BANDWIDTH_FLOOR_FRACTION * mean
    x = rng.normal(mean, std)
    low = x < floor
    while low.any():
        x[low] = rng.normal(mean[low], std[low])
        low = x < floor
    return x


@dataclass(frozen=True)
class NetworkProfile:
    """Download and upload bandwidth, bytes/s, as normal distributions across clients."""

    name: str
    down_mean: float
    down_std: float
    up_mean: float
    up_std: float

    def __post_init__(self) -> None:
        if not (self.down_mean > 0 and self.up_mean > 0):
            raise ValueError(f"network {self.name!r}: mean bandwidths must be positive")
        if not (self.down_std >= 0 and self.up_std >= 0):
            raise ValueError(f"network {self.name!r}: standard deviations must be >= 0")

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n (download, upload) bandwidths, normals truncated below at 10% of the mean."""
        down = _truncated_normal(rng, np.full(n, self.down_mean), np.full(n, self.down_std))
        up = _truncated_normal(rng, np.full(n, self.up_mean), np.full(n, self.up_std))
        return down, up


def _network(name: str, down_mbit: float, up_mbit: float, rel_std: float) -> NetworkProfile:
    down, up = down_mbit * MBIT_PER_S, up_mbit * MBIT_PER_S
    return NetworkProfile(name, down, rel_std * down, up, rel_std * up)


# Approximate public figures. ethernet: gigabit LAN, ~940 Mbit/s TCP goodput each way.
# wifi: home broadband, roughly the Ookla Speedtest Global Index fixed-broadband medians
# (2024: ~90 down, ~45 up). lte: typical 4G speeds in OpenSignal/Ookla reports (~30 down,
# ~10 up). 3g: HSPA-class (~2 down, ~0.5 up). Spread across clients: std 5% of the mean on
# a LAN, 50% on shared wireless links.
EMBEDDED_NETWORKS: dict[str, NetworkProfile] = {
    n.name: n
    for n in (
        _network("ethernet", 940.0, 940.0, 0.05),
        _network("wifi", 90.0, 45.0, 0.5),
        _network("lte", 30.0, 10.0, 0.5),
        _network("3g", 2.0, 0.5, 0.5),
    )
}

_NETWORK_FIELDS = ("down_u", "down_sigma", "up_u", "up_sigma")


def parse_network_profiles(raw: Any) -> tuple[list[NetworkProfile], dict[str, int]]:
    """FLASH network profiles {id: {down_u, down_sigma, up_u, up_sigma} in KB/s} -> profiles
    in bytes/s (1 KB = 1000 bytes), and the count of skipped entries per reason.

    Entries that are not mappings, lack a field, or have a non-numeric or negative value or a
    zero mean are skipped.
    """
    if not isinstance(raw, dict):
        raise ValueError("network profiles: expected a JSON object of id -> profile")
    profiles: list[NetworkProfile] = []
    skipped: Counter[str] = Counter()
    for name, entry in raw.items():
        if not isinstance(entry, dict) or any(f not in entry for f in _NETWORK_FIELDS):
            skipped["missing field"] += 1
            continue
        # A zero standard deviation is a valid, constant profile; a zero mean is not.
        values = [_parse_number(entry[f], allow_zero=f.endswith("sigma")) for f in _NETWORK_FIELDS]
        if None in values:
            skipped["non-numeric, negative or zero-mean value"] += 1
            continue
        down_u, down_sigma, up_u, up_sigma = (v * KB_PER_S for v in values)
        profiles.append(NetworkProfile(str(name), down_u, down_sigma, up_u, up_sigma))
    return profiles, dict(skipped)


def load_network_profiles(path: Path) -> list[NetworkProfile]:
    """Network profiles from a FLASH network_speed_profiles.json (see `parse_network_profiles`)."""
    profiles, skipped = parse_network_profiles(json.loads(Path(path).read_text()))
    if skipped:
        logger.warning("%s: skipped %d profiles: %s", path, sum(skipped.values()), skipped)
    if not profiles:
        raise ValueError(f"{path}: no usable network profiles")
    return profiles


# ---- memory and time of one local step ---------------------------------------------------------
@dataclass(frozen=True)
class ModelFootprint:
    """Parameter counts and activation size that decide a training step's memory."""

    total_params: int  # every parameter, all resident during training
    shared_trainable_params: int  # non-expert parameters a client trains (attention, norms, ...)
    params_per_expert: int  # parameters of one expert (all experts have equal size)
    num_experts_total: int  # experts over all MoE layers (layers x experts per layer)
    num_moe_layers: int
    activation_bytes_per_sample: float  # saved-activation bytes of one sample at max length
    bytes_per_param: int = 4

    def __post_init__(self) -> None:
        counts = (self.total_params, self.shared_trainable_params, self.params_per_expert)
        if min(counts) < 0 or self.activation_bytes_per_sample < 0 or self.bytes_per_param < 1:
            raise ValueError(f"footprint sizes must be non-negative: {self}")
        if self.num_moe_layers < 1 or self.num_experts_total % self.num_moe_layers:
            raise ValueError(
                f"num_experts_total ({self.num_experts_total}) must be a multiple of "
                f"num_moe_layers ({self.num_moe_layers})"
            )


def step_memory_bytes(
    fp: ModelFootprint, trained_experts: int, batch_size: int, zero_stage: int = 0
) -> float:
    """Peak device memory of one training step that trains `trained_experts` experts.

    weights:       total_params * bytes_per_param (frozen parameters stay resident too)
    trained state: (shared_trainable + trained_experts * params_per_expert) * bytes_per_param
                   * 3 (the gradient plus AdamW's two moments)
    activations:   activation_bytes_per_sample * batch_size (saved for backward)

    zero_stage > 0 models DeepSpeed ZeRO with CPU offload: the moments leave the device
    (stage 1), then the gradients (stage 2), then the parameters (stage 3, which keeps
    about one MoE layer's share of them on the device while it computes).
    """
    weights = fp.total_params * fp.bytes_per_param
    if zero_stage >= 3:
        weights /= fp.num_moe_layers
    per_trained_param = {0: 3, 1: 1}.get(zero_stage, 0) * fp.bytes_per_param
    trained = fp.shared_trainable_params + trained_experts * fp.params_per_expert
    return weights + trained * per_trained_param + fp.activation_bytes_per_sample * batch_size


def full_step_memory_bytes(fp: ModelFootprint, batch_size: int) -> float:
    """Step memory with every expert trained (budget-unaware full fine-tuning)."""
    return step_memory_bytes(fp, fp.num_experts_total, batch_size)


def fits(
    fp: ModelFootprint,
    memory_bytes: float,
    trained_experts: int,
    batch_size: int,
    zero_stage: int = 0,
) -> bool:
    """Whether a step training `trained_experts` experts fits in `memory_bytes` (else: OOM)."""
    return step_memory_bytes(fp, trained_experts, batch_size, zero_stage) <= memory_bytes


def expert_capacity(
    fp: ModelFootprint,
    memory_bytes: float,
    batch_size: int,
    scope: str,
    max_experts: int | None = None,
) -> int:
    """C_budget: the most experts a client can train in one step within `memory_bytes`.

    scope "global" counts experts over all MoE layers; "per_layer" gives experts per layer
    (the global count // num_moe_layers, at most the layer's experts). `max_experts` caps the
    returned C_budget. Returns 0 also when not even the shared parameters fit: check `fits`
    with 0 experts to tell that client apart (it fails).
    """
    if scope not in ("global", "per_layer"):
        raise ValueError(f"scope must be 'global' or 'per_layer', got {scope!r}")
    if max_experts is not None and max_experts < 0:
        raise ValueError(f"max_experts must be >= 0 or None, got {max_experts}")
    n = _max_fitting_experts(fp, memory_bytes, batch_size)
    if scope == "per_layer":
        n //= fp.num_moe_layers
    return n if max_experts is None else min(n, max_experts)


def _max_fitting_experts(fp: ModelFootprint, memory_bytes: float, batch_size: int) -> int:
    """Largest n in [0, num_experts_total] whose step fits (0 when none does)."""
    if not fits(fp, memory_bytes, 0, batch_size):
        return 0
    per_expert = fp.params_per_expert * fp.bytes_per_param * 3
    if per_expert == 0:
        return fp.num_experts_total
    spare = memory_bytes - step_memory_bytes(fp, 0, batch_size)
    n = min(int(spare // per_expert), fp.num_experts_total)
    # Float division can land one off at an exact boundary; settle it with the model itself.
    while n < fp.num_experts_total and fits(fp, memory_bytes, n + 1, batch_size):
        n += 1
    while n > 0 and not fits(fp, memory_bytes, n, batch_size):
        n -= 1
    return n


def compute_seconds(flops: float, flops_per_s: float) -> float:
    """Seconds to execute `flops` at a sustained `flops_per_s`."""
    return flops / flops_per_s


def transfer_seconds(num_bytes: float, bytes_per_s: float) -> float:
    """Seconds to move `num_bytes` at `bytes_per_s`."""
    return num_bytes / bytes_per_s


def client_round_seconds(
    flops: float,
    bytes_down: float,
    bytes_up: float,
    flops_per_s: float,
    down_bytes_per_s: float,
    up_bytes_per_s: float,
) -> float:
    """Simulated wall-clock of a client round: download, then compute, then upload."""
    return (
        transfer_seconds(bytes_down, down_bytes_per_s)
        + compute_seconds(flops, flops_per_s)
        + transfer_seconds(bytes_up, up_bytes_per_s)
    )


# ---- budgets of many clients -------------------------------------------------------------------
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


def _tier_group(
    tier: TierConfig, full_step_bytes: float, memory_scale: float
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
        memory = device.memory_bytes * memory_scale
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
    down = _truncated_normal(
        rng, np.array([p.down_mean for p in network]), np.array([p.down_std for p in network])
    )
    up = _truncated_normal(
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
    cfg: BudgetConfig, num_clients: int, rng: np.random.Generator, full_step_bytes: float
) -> ClientBudgets:
    groups, networks = zip(
        *(_tier_group(t, full_step_bytes, cfg.memory_scale) for t in cfg.tiers), strict=True
    )
    if cfg.distribution == "dirichlet":
        proportions = rng.dirichlet(np.full(len(groups), cfg.dirichlet_concentration))
    else:
        proportions = np.array([t.proportion for t in cfg.tiers])
    counts = largest_remainder_counts(proportions, num_clients)
    group = rng.permutation(np.repeat(np.arange(len(groups)), counts))
    return _assemble(rng, list(groups), group, [networks[k] for k in group])


def _draw_traces(cfg: BudgetConfig, num_clients: int, rng: np.random.Generator) -> ClientBudgets:
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
        _Group(d.name, d.name, d.memory_bytes * cfg.memory_scale, d.flops_per_s, -1)
        for d in devices
    ]
    return _assemble(rng, groups, device, [networks[k] for k in network])


def draw_budgets(
    cfg: BudgetConfig, num_clients: int, seed: int, full_step_bytes: float
) -> ClientBudgets:
    """Draw the budgets of `num_clients` clients; the same arguments give the same budgets.

    tiers: exactly round(proportion * N) clients per tier (largest remainder), in a seeded
    random order. dirichlet: tier proportions ~ Dir(concentration * 1), then as tiers. traces:
    a device of the AI Benchmark traces and a network profile per client, uniformly.
    `full_step_bytes` (see `full_step_memory_bytes`) scales tiers given by memory_fraction.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    rng = np.random.default_rng(seed)
    if cfg.distribution == "traces":
        return _draw_traces(cfg, num_clients, rng)
    return _draw_tiered(cfg, num_clients, rng, full_step_bytes)


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
