"""Device and network profiles: embedded ones and those read from real traces.

Units: bytes, FLOP/s, bytes/s. Device memory is binary (1 GB = 2**30 bytes), as DRAM is
sold; network speed is decimal (1 KB/s = 1000 bytes/s, 1 Mbit/s = 125,000 bytes/s), as
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
def truncated_normal(rng: np.random.Generator, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
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
        down = truncated_normal(rng, np.full(n, self.down_mean), np.full(n, self.down_std))
        up = truncated_normal(rng, np.full(n, self.up_mean), np.full(n, self.up_std))
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
