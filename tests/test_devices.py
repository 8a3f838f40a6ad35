"""Device profiles, trace loading, the step memory/time model and budget drawing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from hfedmoe.platform.budgets.cost import (
    ModelFootprint,
    client_round_seconds,
    compute_seconds,
    expert_capacity,
    fits,
    full_step_memory_bytes,
    step_memory_bytes,
    transfer_seconds,
)
from hfedmoe.platform.budgets.drawing import (
    budget_summary,
    draw_budgets,
    largest_remainder_counts,
    resource_fractions,
)
from hfedmoe.platform.budgets.profiles import (
    EMBEDDED_DEVICES,
    EMBEDDED_NETWORKS,
    FP16_SCORE_TO_FLOPS,
    TRAINING_UTILISATION,
    GiB,
    NetworkProfile,
    load_ai_benchmark,
    load_network_profiles,
    parse_ai_benchmark,
    parse_network_profiles,
)
from hfedmoe.platform.config import BudgetConfig, TierConfig

TRACES_DIR = Path(
    os.environ.get(
        "HFEDMOE_TRACES_DIR",
        Path(__file__).resolve().parents[1].parent / "shared" / "data" / "device_traces",
    )
)
AI_BENCHMARK = TRACES_DIR / "ai_benchmark_devices.json"
NETWORKS = TRACES_DIR / "network_speed_profiles.json"
needs_traces = pytest.mark.skipif(
    not (AI_BENCHMARK.is_file() and NETWORKS.is_file()),
    reason=f"device traces not found in {TRACES_DIR} (set HFEDMOE_TRACES_DIR)",
)

# total 1000 params, 100 shared trainable, 50 per expert, 10 experts over 2 layers,
# 8 activation bytes per sample, 4 bytes per parameter.
SMALL = ModelFootprint(
    total_params=1000,
    shared_trainable_params=100,
    params_per_expert=50,
    num_experts_total=10,
    num_moe_layers=2,
    activation_bytes_per_sample=8,
)
BATCH = 4
# weights 1000*4 = 4000; activations 8*4 = 32; trained state (100 + n*50) * 4 * 3
MEM_0 = 4000 + 100 * 4 * 3 + 32  # 5232
MEM_3 = 4000 + (100 + 3 * 50) * 4 * 3 + 32  # 7032
MEM_10 = 4000 + (100 + 10 * 50) * 4 * 3 + 32  # 11232


def tiers_cfg(*tiers: TierConfig, **kwargs) -> BudgetConfig:
    return BudgetConfig(tiers=list(tiers), **kwargs)


THREE_TIERS = tiers_cfg(
    TierConfig(name="edge", proportion=0.5, device="jetson_agx_xavier"),
    TierConfig(name="phone", proportion=0.3, device="pixel_8", network="lte", max_experts=2),
    TierConfig(name="weak", proportion=0.2, memory_fraction=0.5, flops_per_s=1e11),
)


# ---- step memory and capacity -----------------------------------------------------------------
def test_step_memory_hand_computed():
    assert (MEM_0, MEM_3, MEM_10) == (5232, 7032, 11232)
    assert step_memory_bytes(SMALL, 0, BATCH) == MEM_0
    assert step_memory_bytes(SMALL, 3, BATCH) == MEM_3
    assert step_memory_bytes(SMALL, 10, BATCH) == MEM_10
    assert full_step_memory_bytes(SMALL, BATCH) == MEM_10
    # bytes_per_param scales weights and trained state, not activations
    half = ModelFootprint(1000, 100, 50, 10, 2, 8, bytes_per_param=2)
    assert step_memory_bytes(half, 0, BATCH) == 1000 * 2 + 100 * 2 * 3 + 32


def test_capacity_at_exact_boundaries():
    assert expert_capacity(SMALL, MEM_3, BATCH, "global") == 3
    assert expert_capacity(SMALL, MEM_3 - 1, BATCH, "global") == 2
    assert expert_capacity(SMALL, MEM_10, BATCH, "global") == 10
    assert expert_capacity(SMALL, 10 * MEM_10, BATCH, "global") == 10  # clipped to all experts
    assert fits(SMALL, MEM_3, 3, BATCH) and not fits(SMALL, MEM_3 - 1, 3, BATCH)


def test_capacity_per_layer_and_max_experts():
    assert expert_capacity(SMALL, MEM_3, BATCH, "per_layer") == 1  # 3 // 2 layers
    assert expert_capacity(SMALL, MEM_10, BATCH, "per_layer") == 5  # 10 // 2 = all of a layer
    assert expert_capacity(SMALL, 10 * MEM_10, BATCH, "per_layer") == 5
    assert expert_capacity(SMALL, MEM_3, BATCH, "global", max_experts=2) == 2
    assert expert_capacity(SMALL, MEM_3, BATCH, "global", max_experts=5) == 3  # cap not binding
    assert expert_capacity(SMALL, MEM_10, BATCH, "per_layer", max_experts=4) == 4
    assert expert_capacity(SMALL, MEM_3, BATCH, "global", max_experts=0) == 0


def test_base_that_does_not_fit_gives_zero_and_fails():
    assert expert_capacity(SMALL, MEM_0, BATCH, "global") == 0
    assert fits(SMALL, MEM_0, 0, BATCH)
    assert expert_capacity(SMALL, MEM_0 - 1, BATCH, "global") == 0
    assert not fits(SMALL, MEM_0 - 1, 0, BATCH)
    assert expert_capacity(SMALL, 0, BATCH, "per_layer") == 0


def test_capacity_is_exact_with_fractional_activations():
    # Large counts and non-integer activation bytes make the float division land on either
    # side of a boundary; every boundary must still hold exactly.
    fp = ModelFootprint(199_334_860, 87_157_448, 1_661_119, 159, 3, 0.6903829972566786)
    for batch in (1, 3, 7):
        for n in range(fp.num_experts_total + 1):
            memory = step_memory_bytes(fp, n, batch)
            assert expert_capacity(fp, memory, batch, "global") == n
            assert expert_capacity(fp, np.nextafter(memory, 0), batch, "global") == max(n - 1, 0)


def test_capacity_without_expert_params_and_bad_arguments():
    no_experts = ModelFootprint(1000, 100, 0, 10, 2, 8)
    assert expert_capacity(no_experts, MEM_0, BATCH, "global") == 10
    with pytest.raises(ValueError, match="scope"):
        expert_capacity(SMALL, MEM_3, BATCH, "layer")
    with pytest.raises(ValueError, match="max_experts"):
        expert_capacity(SMALL, MEM_3, BATCH, "global", max_experts=-1)
    with pytest.raises(ValueError, match="multiple of"):
        ModelFootprint(1000, 100, 50, 9, 2, 8)


# ---- time model -------------------------------------------------------------------------------
def test_time_model_sums():
    assert compute_seconds(6e12, 2e12) == 3.0
    assert transfer_seconds(1e6, 5e5) == 2.0
    # download 1e6 B at 5e5 B/s = 2 s, compute 6e12 at 2e12 = 3 s, upload 3e6 at 1e6 = 3 s
    assert client_round_seconds(6e12, 1e6, 3e6, 2e12, 5e5, 1e6) == 2.0 + 3.0 + 3.0


# ---- embedded profiles ------------------------------------------------------------------------
def test_embedded_devices_figures():
    required = {
        "jetson_agx_xavier": 32,
        "jetson_orin_nano": 8,
        "jetson_agx_orin": 64,
        "raspberry_pi_5": 8,
        "rtx_3060": 12,
        "rtx_4090": 24,
        "a100_40gb": 40,
    }
    for name, gib in required.items():
        assert EMBEDDED_DEVICES[name].memory_bytes == gib * GiB
    phones = [d for d in EMBEDDED_DEVICES.values() if d.source.startswith("FP16")]
    assert len(phones) >= 3
    for name, device in EMBEDDED_DEVICES.items():
        assert device.name == name
        assert device.source.startswith(("FP32", "FP16"))
        assert device.flops_per_s == pytest.approx(TRAINING_UTILISATION * device.peak_flops_per_s)
    assert TRAINING_UTILISATION == 0.3
    assert EMBEDDED_DEVICES["jetson_agx_xavier"].peak_flops_per_s == pytest.approx(1.41e12)


def test_network_sample_truncated_below_at_a_tenth_of_the_mean():
    wide = NetworkProfile("wide", down_mean=100.0, down_std=1000.0, up_mean=50.0, up_std=500.0)
    down, up = wide.sample(np.random.default_rng(0), 10_000)
    assert down.shape == up.shape == (10_000,)
    # Truncated (redrawn), not clipped: nothing piles up on the floor, mass just above it stays.
    assert down.min() > 10.0 and up.min() > 5.0
    assert (down < 20.0).any()
    fixed = NetworkProfile("fixed", 7.0, 0.0, 3.0, 0.0)
    down, up = fixed.sample(np.random.default_rng(0), 5)
    assert (down == 7.0).all() and (up == 3.0).all()
    narrow = EMBEDDED_NETWORKS["ethernet"].sample(np.random.default_rng(1), 20_000)[0]
    assert narrow.mean() == pytest.approx(EMBEDDED_NETWORKS["ethernet"].down_mean, rel=0.01)
    assert {"ethernet", "wifi", "lte", "3g"} <= set(EMBEDDED_NETWORKS)


# ---- trace parsing (synthetic rows; the real file is read by path below) -----------------------
def test_parse_ai_benchmark_odd_values():
    rows = [
        {"Model": "calib", "CPU": "soc", "RAM": "6GB", "FP16_Score": "8883"},
        {"Model": " padded ", "RAM": "0.75GB", "FP16_Score": " 100 "},
        {"Model": "small", "RAM": "512MB", "FP16_Score": 50},
        {"Model": "calib", "RAM": "8GB", "FP16_Score": "1000"},  # repeated name
        {"Model": "", "RAM": "4GB", "FP16_Score": "10"},
        {"Model": "noram", "RAM": "N/A", "FP16_Score": "10"},
        {"Model": "noscore", "RAM": "4GB", "FP16_Score": "-"},
        {"Model": "zeroscore", "RAM": "4GB", "FP16_Score": "0"},
        {"Model": "missing", "RAM": "4GB"},
        "not a dict",
    ]
    profiles, skipped = parse_ai_benchmark(rows)
    assert [p.name for p in profiles] == ["calib", "padded", "small", "calib #2"]
    assert skipped == {
        "no Model": 1,
        "unparsable RAM": 1,
        "missing or non-positive FP16_Score": 3,
        "not a record": 1,
    }
    # Calibration: score 8883 (Snapdragon 855 / Adreno 640) is 1.8 TFLOPS FP16 peak.
    assert profiles[0].peak_flops_per_s == pytest.approx(1.8e12)
    assert profiles[0].memory_bytes == 6 * GiB
    assert profiles[1].memory_bytes == int(0.75 * GiB)
    assert profiles[2].memory_bytes == 512 * 2**20
    assert profiles[1].peak_flops_per_s == pytest.approx(100 * FP16_SCORE_TO_FLOPS)


def test_parse_network_profiles_converts_kb_and_skips_bad_entries():
    raw = {
        "a": {"down_u": 1000, "down_sigma": 100, "up_u": "500", "up_sigma": 0},
        "no_field": {"down_u": 1000, "down_sigma": 100, "up_u": 500},
        "zero_mean": {"down_u": 0, "down_sigma": 1, "up_u": 5, "up_sigma": 1},
        "negative": {"down_u": 10, "down_sigma": -1, "up_u": 5, "up_sigma": 1},
        "text": {"down_u": "fast", "down_sigma": 1, "up_u": 5, "up_sigma": 1},
    }
    profiles, skipped = parse_network_profiles(raw)
    assert profiles == [NetworkProfile("a", 1e6, 1e5, 5e5, 0.0)]  # KB/s * 1000 = bytes/s
    assert skipped == {"missing field": 1, "non-numeric, negative or zero-mean value": 3}


@needs_traces
def test_real_traces_load():
    rows = json.loads(AI_BENCHMARK.read_text())
    profiles, skipped = parse_ai_benchmark(rows)
    # The file has 333 rows, all usable: every RAM string parses (including fractional ones
    # such as 0.5GB) and every FP16_Score is a positive number.
    assert len(rows) == 333 and skipped == {}
    assert len(load_ai_benchmark(AI_BENCHMARK)) == 333
    assert len({p.name for p in profiles}) == len(profiles)  # repeated models disambiguated
    memory = np.array([p.memory_bytes for p in profiles])
    # Plausible phone RAM; the file spans 2009-2019 phones, the oldest with 0.5 GB.
    assert memory.min() >= 256 * 2**20 and memory.max() <= 24 * GiB
    flops = np.array([p.flops_per_s for p in profiles])
    assert (flops > 0).all()
    networks = load_network_profiles(NETWORKS)
    assert len(networks) == 19
    # KB/s -> bytes/s: mean downloads of mobile links, between 100 kB/s and 1 GB/s.
    assert all(1e5 < n.down_mean < 1e9 and n.up_mean > 0 for n in networks)


# ---- drawing budgets --------------------------------------------------------------------------
def test_largest_remainder_counts():
    # quotas 3.5, 2.1, 1.4 -> floors 3, 2, 1 (6); the one left over goes to .5, the largest part
    assert largest_remainder_counts(np.array([0.5, 0.3, 0.2]), 7).tolist() == [4, 2, 1]
    assert largest_remainder_counts(np.array([0.5, 0.3, 0.2]), 10).tolist() == [5, 3, 2]
    # equal parts: ties go to the earlier tier
    assert largest_remainder_counts(np.full(3, 1 / 3), 4).tolist() == [2, 1, 1]


def test_tier_counts_and_values():
    b = draw_budgets(THREE_TIERS, 7, seed=0, full_step_bytes=MEM_10)
    assert len(b) == 7 and b.tier_names == ["edge", "phone", "weak"]
    assert np.bincount(b.tier, minlength=3).tolist() == [4, 2, 1]
    edge = b[int(np.flatnonzero(b.tier == 0)[0])]
    assert edge.device == "jetson_agx_xavier" and edge.memory_bytes == 32 * GiB
    assert edge.flops_per_s == pytest.approx(0.3 * 1.41e12)
    assert edge.max_experts is None
    phone = b[int(np.flatnonzero(b.tier == 1)[0])]
    assert phone.max_experts == 2 and phone.memory_bytes == 8 * GiB
    weak = b[int(np.flatnonzero(b.tier == 2)[0])]
    assert weak.memory_bytes == 0.5 * MEM_10 and weak.flops_per_s == 1e11
    assert weak.device == "synthetic"
    assert b.max_experts.dtype == np.int64 and b.memory_bytes.dtype == np.float64


def test_tier_figures_win_over_the_device_and_memory_scale_applies_to_devices():
    cfg = tiers_cfg(
        TierConfig(
            name="own", proportion=0.5, device="rtx_3060", memory_fraction=0.25, flops_per_s=5e9
        ),
        TierConfig(name="scaled", proportion=0.5, device="rtx_3060"),
        memory_scale=0.5,
    )
    b = draw_budgets(cfg, 4, seed=3, full_step_bytes=1000.0)
    own = b.tier == 0
    assert b.memory_bytes[own].tolist() == [250.0, 250.0]  # 0.25 * 1000, memory_scale unused
    assert b.flops_per_s[own].tolist() == [5e9, 5e9]
    assert b.memory_bytes[~own].tolist() == [6 * GiB, 6 * GiB]  # 12 GB * 0.5
    assert np.allclose(b.flops_per_s[~own], EMBEDDED_DEVICES["rtx_3060"].flops_per_s)


def test_draws_are_deterministic_per_seed():
    a = draw_budgets(THREE_TIERS, 500, seed=11, full_step_bytes=MEM_10)
    b = draw_budgets(THREE_TIERS, 500, seed=11, full_step_bytes=MEM_10)
    c = draw_budgets(THREE_TIERS, 500, seed=12, full_step_bytes=MEM_10)
    for field in ("tier", "memory_bytes", "flops_per_s", "down_bytes_per_s", "up_bytes_per_s"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.tier, c.tier)
    assert not np.array_equal(a.down_bytes_per_s, c.down_bytes_per_s)
    assert np.bincount(a.tier).tolist() == np.bincount(c.tier).tolist() == [250, 150, 100]


def test_bandwidth_follows_the_tier_network():
    b = draw_budgets(THREE_TIERS, 3000, seed=0, full_step_bytes=MEM_10)
    lte, wifi = EMBEDDED_NETWORKS["lte"], EMBEDDED_NETWORKS["wifi"]
    phone_down = b.down_bytes_per_s[b.tier == 1]
    edge_down = b.down_bytes_per_s[b.tier == 0]
    assert phone_down.min() >= 0.1 * lte.down_mean
    assert np.median(phone_down) == pytest.approx(lte.down_mean, rel=0.1)
    assert np.median(edge_down) == pytest.approx(wifi.down_mean, rel=0.1)  # default network


def test_dirichlet_concentration_controls_skew():
    tiers = [TierConfig(name=f"t{k}", proportion=0.25, device="rtx_3060") for k in range(4)]
    flat = tiers_cfg(*tiers, distribution="dirichlet", dirichlet_concentration=1e4)
    counts = np.bincount(draw_budgets(flat, 10_000, 0, 1.0).tier, minlength=4)
    assert counts.sum() == 10_000 and np.abs(counts - 2500).max() < 200
    skewed = tiers_cfg(*tiers, distribution="dirichlet", dirichlet_concentration=0.01)
    for seed in range(10):
        counts = np.bincount(draw_budgets(skewed, 10_000, seed, 1.0).tier, minlength=4)
        assert counts.max() > 5000


def test_resource_fractions_are_rounded_powers_of_two():
    flops = np.array([8.0, 4.0, 3.0, 1.0, 0.5, 0.01])
    # shares 1, .5, .375, .125, .0625, .00125 -> log2 0, -1, -1.42, -3, -4, -9.6
    # -> round 0, -1, -1, -3, then clipped at -3
    assert resource_fractions(flops).tolist() == [1, 0.5, 0.5, 0.125, 0.125, 0.125]
    b = draw_budgets(THREE_TIERS, 100, seed=0, full_step_bytes=MEM_10)
    assert set(b.resource_fraction.tolist()) <= {0.125, 0.25, 0.5, 1.0}
    assert b.resource_fraction[np.argmax(b.flops_per_s)] == 1.0


def test_unknown_names_and_duplicate_tiers_are_config_errors():
    with pytest.raises(ValidationError, match=r"tiers\[odd\].device.*toaster.*jetson_agx_xavier"):
        TierConfig(name="odd", proportion=1.0, device="toaster")
    with pytest.raises(ValidationError, match=r"tiers\[odd\].network.*'5g'.*ethernet.*lte"):
        TierConfig(name="odd", proportion=1.0, device="raspberry_pi_5", network="5g")
    twice = TierConfig(name="same", proportion=0.5, device="rtx_3060")
    with pytest.raises(ValidationError, match="tier names must be unique"):
        tiers_cfg(twice, twice)


def test_empty_federation_raises():
    with pytest.raises(ValueError, match="num_clients"):
        draw_budgets(THREE_TIERS, 0, 0, 1.0)


def test_missing_traces_name_the_setting(tmp_path):
    cfg = BudgetConfig(distribution="traces", traces_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"budgets\.traces_dir"):
        draw_budgets(cfg, 5, 0, 1.0)


@needs_traces
def test_trace_budgets():
    cfg = BudgetConfig(distribution="traces", traces_dir=str(TRACES_DIR), memory_scale=0.5)
    b = draw_budgets(cfg, 2000, seed=0, full_step_bytes=1.0)
    devices = {p.name: p for p in load_ai_benchmark(AI_BENCHMARK)}
    assert b.tier_names == b.device_names == list(devices)
    for client in (0, 1, 1999):
        row = b[client]
        assert row.memory_bytes == 0.5 * devices[row.device].memory_bytes
        assert row.flops_per_s == devices[row.device].flops_per_s
        assert row.max_experts is None
    assert len(np.unique(b.tier)) > 250  # uniform over 333 devices
    assert (b.down_bytes_per_s > 0).all() and (b.up_bytes_per_s > 0).all()
    assert b.resource_fraction[np.argmax(b.flops_per_s)] == 1.0


@needs_traces
def test_headroom_budgets_add_the_resident_step_to_every_device():
    """device_memory: headroom gives each device the step that trains no expert plus its
    scaled memory, so C_budget grows with the device's memory instead of all-or-nothing."""
    resident = step_memory_bytes(SMALL, 0, BATCH)
    expert_state = 50 * 4 * 3  # an expert's gradient and two AdamW moments, fp32
    scale = 10.3 * expert_state / (12 * GiB)  # 12 GiB of RAM: room for 10.3 experts
    cfg = BudgetConfig(
        distribution="traces",
        traces_dir=str(TRACES_DIR),
        memory_scale=scale,
        device_memory="headroom",
    )
    b = draw_budgets(cfg, 500, seed=0, full_step_bytes=1.0, resident_bytes=resident)
    total = draw_budgets(
        cfg.model_copy(update={"device_memory": "total"}), 500, seed=0, full_step_bytes=1.0
    )
    np.testing.assert_array_equal(b.device, total.device)
    np.testing.assert_array_equal(b.memory_bytes, total.memory_bytes + resident)
    # Nobody fails and C_budget follows RAM; no trace device sits within 1% of an expert
    # of a boundary (RAM in GiB x 10.3 / 12 is never that close to an integer).
    devices = {p.name: p for p in load_ai_benchmark(AI_BENCHMARK)}
    ram_experts = np.array(
        [devices[b[c].device].memory_bytes / GiB * 10.3 / 12 for c in range(500)]
    )
    assert (np.abs(ram_experts - np.round(ram_experts)) > 0.01).all()
    assert all(fits(SMALL, m, 0, BATCH) for m in b.memory_bytes)
    capacity = [expert_capacity(SMALL, m, BATCH, "global") for m in b.memory_bytes]
    assert capacity == np.floor(ram_experts).astype(int).tolist()
    assert min(capacity) == 0 and max(capacity) == 10


def test_budget_summary_is_json_serialisable():
    b = draw_budgets(THREE_TIERS, 10, seed=0, full_step_bytes=MEM_10)
    summary = json.loads(json.dumps(budget_summary(b)))
    assert summary["num_clients"] == 10
    assert summary["tier_counts"] == {"edge": 5, "phone": 3, "weak": 2}
    assert summary["memory_bytes"]["min"] == 0.5 * MEM_10
    assert summary["memory_bytes"]["max"] == 32 * GiB
    assert sum(summary["resource_fraction_counts"].values()) == 10
