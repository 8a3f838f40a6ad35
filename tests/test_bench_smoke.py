"""Smoke tests of the benchmarks in bench/: tiny sizes, the JSON reports' keys and sanity.

B1 and B2 run as subprocesses, `python bench/X.py --quick` as a user runs them (the test
of the command-line entry): each platform side starts its own local Ray, independent of
the session's Ray fixture, since start-up is part of what they measure; one platform
process takes about 30 s on two cores. The other benchmarks run their `main(argv)` in
this process, from the checkout as their command lines do (B5's sweep on the session's
Ray), saving an interpreter and its torch imports each. The Flower half needs
bench/.venv-flower (bench/setup_flower_env.sh), which CI does not build. The summary
arithmetic is checked directly on made-up rounds.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
FLOWER_PYTHON = BENCH / ".venv-flower" / "bin" / "python"

sys.path.insert(0, str(BENCH))
import b1_flower  # noqa: E402
from common import summarise_rounds  # noqa: E402

ROUND_KEYS = {
    "round_wall_mean_s",
    "round_wall_p50_s",
    "client_compute_per_client_ms",
    "per_client_overhead_ms",
    "efficiency",
}


def run_bench(script: str, out: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--out", str(out), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| platform |" in done.stdout or "| N |" in done.stdout  # the markdown table
    return json.loads(out.read_text())


def assert_sane_row(row: dict, per_round: int) -> None:
    assert row.keys() >= ROUND_KEYS
    assert row["rounds"] == 1 and row["failed_clients"] == 0
    assert row["per_round"] == per_round
    assert 0 < row["round_wall_p50_s"] < 60
    assert 0 < row["client_compute_per_client_ms"] < 10_000
    # Clients' own compute never exceeds what the workers could do in the round's time.
    assert 0 < row["efficiency"] <= 1.05
    assert math.isfinite(row["per_client_overhead_ms"])
    assert 0 < row["startup_s"] < 300
    assert row["peak_tree_rss_mib"] > 100  # the driver plus Ray's processes
    assert all(r["sampled"] == per_round for r in row["rounds_raw"])


def assert_machine(payload: dict) -> None:
    assert {"cores", "memory_gib", "cpu_model", "date"} <= payload["machine"].keys()
    assert "--quick" in payload["command"]


@pytest.mark.slow
def test_b1_hfedmoe_half(tmp_path):
    payload = run_bench(
        "b1_flower.py", tmp_path / "b1.json", "--workloads", "a", "--platforms", "hfedmoe"
    )
    assert_machine(payload)
    assert payload["environments"]["hfedmoe"]["ray"]
    [row] = payload["results"]
    assert (row["platform"], row["workload"], row["num_clients"]) == ("hfedmoe", "a", 20)
    assert_sane_row(row, per_round=4)
    assert {"driver", "client_workers", "aggregator"} <= row["cpu_ms_per_client"].keys()
    assert payload["comparisons"] == [] and payload["targets"] == {}


@pytest.mark.slow
@pytest.mark.skipif(
    not FLOWER_PYTHON.exists(),
    reason="bench/.venv-flower not built (bench/setup_flower_env.sh); CI does not build it",
)
def test_b1_flower_half(tmp_path):
    payload = run_bench(
        "b1_flower.py", tmp_path / "b1.json", "--workloads", "a", "--platforms", "flower"
    )
    assert payload["environments"]["flower"]["flwr"]
    [row] = payload["results"]
    assert (row["platform"], row["workload"], row["num_clients"]) == ("flower", "a", 20)
    assert_sane_row(row, per_round=4)
    assert row["cpu_ms_per_client"]["client_workers"] > 0


@pytest.mark.slow
def test_b2_scale(tmp_path):
    # One N keeps the test to one platform process; the ratios then compare it to itself.
    payload = run_bench("b2_scale.py", tmp_path / "b2.json", "--num-clients", "40")
    assert_machine(payload)
    [row] = payload["results"]
    assert row["num_clients"] == 40
    assert_sane_row(row, per_round=4)
    assert row["setup_s"] > 0 and row["driver_rss_mib"] > 50
    assert row["driver_peak_rss_mib"] >= row["driver_rss_mib"] * 0.99
    ratios = payload["ratios"]
    assert (ratios["from_num_clients"], ratios["to_num_clients"]) == (40, 40)
    assert ratios["ratio_round_wall_mean_s"] == pytest.approx(1.0)
    assert payload["target"]["met"]


def test_round_summary_arithmetic():
    # Two clients' workers, K=4: 0.2 s of compute per round packs into 0.1 s; rounds of
    # 0.125 s leave 0.025 s of overhead, 6.25 ms per client, efficiency 0.8.
    rounds = [
        {"wall_s": 0.125, "client_compute_s": 0.2},
        {"wall_s": 0.125, "client_compute_s": 0.2},
    ]
    summary = summarise_rounds(rounds, per_round=4, concurrency=2)
    assert summary["round_wall_mean_s"] == pytest.approx(0.125)
    assert summary["per_client_overhead_ms"] == pytest.approx(6.25)
    assert summary["efficiency"] == pytest.approx(0.8)
    assert summary["client_compute_per_client_ms"] == pytest.approx(50.0)


def test_ratios_and_targets():
    def row(platform, workload, wall, efficiency=0.5):
        return {
            "platform": platform,
            "workload": workload,
            "per_round": 100,
            "round_wall_mean_s": wall,
            "round_wall_p50_s": wall,
            "per_client_overhead_ms": wall,
            "startup_s": 1.0,
            "peak_tree_rss_mib": 1000.0,
            "efficiency": efficiency,
        }

    rows = [
        row("hfedmoe", "a", 1.0),
        row("flower", "a", 6.0),
        row("hfedmoe", "b", 2.0, efficiency=0.95),
        row("flower", "b", 3.0),
    ]
    comparisons = b1_flower.add_ratios(rows)
    assert [c["ratio_round_wall_mean"] for c in comparisons] == [6.0, 1.5]
    assert rows[1]["ratio_flower_over_hfedmoe"] == 6.0
    targets = b1_flower.check_targets(rows, comparisons)
    assert targets["a_k100_flower_over_hfedmoe"]["met"]
    assert targets["b_k100_hfedmoe_efficiency"]["met"]


@pytest.fixture
def bench_main(monkeypatch, capsys):
    """Run a benchmark's ``main(argv)`` with --quick here, as `python bench/X.py` runs from
    the checkout (relative paths), and return what it printed. The scripts pin torch's
    thread count for their own timing; the tests after them get theirs back."""
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()

    def call(script: str, *args: str) -> str:
        capsys.readouterr()  # only what the benchmark prints
        importlib.import_module(script).main(["--quick", *args])
        return capsys.readouterr().out

    yield call
    torch.set_num_threads(threads)


def test_b3_selective_backward(tmp_path, bench_main):
    bench_main("b3_selective_backward", "--out", str(tmp_path / "b3.json"))
    payload = json.loads((tmp_path / "b3.json").read_text())
    rows = {(r["mode"], r["trainable_per_layer"]): r for r in payload["rows"]}
    assert len(rows) == 8
    for mode in ("exact", "stop_gradient"):
        flops = [rows[(mode, k)]["flops"] for k in (16, 8, 4, 2)]
        assert flops == sorted(flops, reverse=True) and flops[-1] < flops[0]
    # Stop-gradient also skips the frozen experts' input gradient: fewer FLOPs than exact.
    assert rows[("stop_gradient", 2)]["flops"] < rows[("exact", 2)]["flops"]


@pytest.mark.slow
@pytest.mark.skipif(
    not (REPO.parent / "shared" / "data" / "ag_news" / "test.csv").is_file(),
    reason="../shared/data/ag_news is not beside the checkout",
)
def test_b4_paper_claims(tmp_path, bench_main):
    out = tmp_path / "b4"
    printed = bench_main(
        "b4_paper_claims", "--seeds", "0", "--strategies", "hfedmoe", "fedavg_full",
        "--out", str(out),
    )  # fmt: skip
    records = [json.loads((out / f"{s}-s0.json").read_text()) for s in ("hfedmoe", "fedavg_full")]
    assert all(0 <= r["summary"]["final_accuracy"] <= 1 for r in records)
    assert (out / "table.md").is_file() and (out / "accuracy.png").stat().st_size > 10_000
    assert "| hfedmoe |" in printed and "| fedavg_full |" in printed


@pytest.mark.slow
@pytest.mark.ray
def test_b5_sweep_cost(ray_address, tmp_path, bench_main):
    bench_main("b5_sweep_cost", "--out", str(tmp_path / "b5.json"))
    payload = json.loads((tmp_path / "b5.json").read_text())
    assert payload["trials"] == 2 and payload["failed_trials"] == 0
    assert 0 < payload["startup_share"] < 1
    assert payload["total_seconds"] > payload["trial_seconds_mean"]


def test_b6_expert_init(tmp_path, bench_main):
    bench_main("b6_expert_init", "--out", str(tmp_path / "b6.json"))
    cells = json.loads((tmp_path / "b6.json").read_text())["cells"]
    assert {c["expert_init"] for c in cells} == {"copy", "drop", "partition"}
    for cell in cells:
        assert 0.0 <= cell["accuracy"] <= 1.0
        assert 0.0 < cell["router_entropy_init"] <= 1.0 + 1e-9  # normalised by log E
        assert 1 <= cell["union_init"] <= cell["num_experts"]


def test_b7_expert_scaling(tmp_path, bench_main):
    bench_main("b7_expert_scaling", "--out", str(tmp_path / "b7.json"))
    rows = json.loads((tmp_path / "b7.json").read_text())["rows"]
    assert {(r["experts"], r["trained"]) for r in rows} == {
        (8, "all"),
        (8, "quarter"),
        (16, "all"),
        (16, "quarter"),
    }
    # Equal active FLOPs across E is the premise of the benchmark: within a few percent.
    flops = [r["gflop_per_step"] for r in rows if r["trained"] == "all"]
    assert max(flops) / min(flops) < 1.05
    assert all(r["before_step_s"] > 0 and r["after_step_s"] > 0 for r in rows)


@pytest.mark.slow
def test_b8_paper_regime(tmp_path, bench_main):
    out = tmp_path / "b8"
    printed = bench_main("b8_paper_regime", "--only", "bbc_news", "--out", str(out))
    regime = json.loads((out / "regime.json").read_text())["bbc_news"]
    assert 0 < regime["capacity_share_mean"] < 1  # the budgets bind
    runs = [json.loads(p.read_text()) for p in out.glob("bbc_news-*-s*.json")]
    assert {(r["strategy"], r["seed"]) for r in runs} == {
        (s, seed)
        for s in ("hfedmoe", "budget_top_usage", "budget_random", "moe_all_routed")
        for seed in (0, 1)
    }
    for run in runs:
        assert len(run["rounds"]) == 2 and all(m["sampled"] == 3 for m in run["rounds"])
    assert (out / "bbc_news-accuracy.png").stat().st_size > 10_000
    assert "| moe_all_routed | 2 |" in printed


@pytest.mark.slow
@pytest.mark.skipif(
    not (REPO.parent / "shared" / "data" / "ag_news" / "test.csv").is_file(),
    reason="../shared/data/ag_news is not beside the checkout",
)
def test_b8_analysis(tmp_path, bench_main):
    bench_main("b8_analysis", "--clients", "1", "--out", str(tmp_path))
    report = json.loads((tmp_path / "analysis.json").read_text())
    union = report["union_by_batch_size"]
    means = [union[str(b)]["mean"] for b in (1, 2, 4, 8, 16, 32)]
    assert means[0] < means[3] and max(means) <= union["experts_total"]  # grows with B
    failure = [r["all_routed_step_failure_rate"] for r in report["failure_curves"]["headroom"]]
    assert failure == sorted(failure, reverse=True)  # more memory, fewer failures
    [client] = report["expert_importance"]
    assert client["trained_experts"] > 0 and -1 <= client["spearman_ib"] <= 1
    assert (tmp_path / "union_and_failures.png").stat().st_size > 10_000


def test_b10_checkpoint_size(tmp_path, bench_main):
    bench_main("b10_checkpoint_size", "--out", str(tmp_path / "b10.json"))
    report = json.loads((tmp_path / "b10.json").read_text())
    assert report["rounds"] == 12 and len(report["rows"]) == 12
    # Rewriting the history would add one record (history_appended) per round, per round;
    # records differ only in the digits of their numbers, far less than a tenth of one.
    assert abs(report["bytes_per_round_slope"]) < 0.1 * report["history_appended_min"]


@pytest.mark.slow
@pytest.mark.skipif(
    not (REPO.parent / "shared" / "data" / "ag_news" / "test.csv").is_file(),
    reason="../shared/data/ag_news is not beside the checkout",
)
def test_b11_lora(tmp_path, bench_main):
    printed = bench_main("b11_lora", "--out", str(tmp_path))
    steps = json.loads((tmp_path / "steps.json").read_text())
    full, lora, qlora = steps["full"], steps["lora"], steps["qlora"]
    # Whole experts and LoRA: the modelled step is the tensors it holds. The footprint's
    # activations come from an unpadded batch; a padded one also saves its attention mask
    # (kilobytes, against ~100 MB).
    assert full["modelled_bytes"] == pytest.approx(full["measured_bytes"], rel=1e-3)
    assert lora["modelled_bytes"] == pytest.approx(lora["measured_bytes"], rel=1e-3)
    # QLoRA: modelled adds one layer's dequantized experts, a transient no tensor keeps.
    assert qlora["measured_bytes"] < qlora["modelled_bytes"] < lora["modelled_bytes"]
    assert qlora["measured"]["weights"] < lora["measured"]["weights"]
    assert lora["measured"]["adamw"] < full["measured"]["adamw"] / 5
    runs = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*-s0.json")}
    assert len(runs) == 6
    moved = {
        m: runs[f"{m}-hfedmoe-s0"]["summary"]["bytes_communicated"]
        for m in ("full", "lora", "qlora")
    }
    assert moved["lora"] == moved["qlora"] < moved["full"] / 5  # adapters and head only
    assert "| qlora | moe_all_routed | 1 |" in printed


def test_b13_causal_lm(tmp_path, bench_main):
    bench_main("b13_causal_lm", "--out", str(tmp_path))
    record = json.loads((tmp_path / "hfedmoe.json").read_text())
    rounds = record["rounds"]
    assert len(rounds) == 2 and all(r["perplexity"] > 1 for r in rounds)
    assert rounds[1]["test_loss"] < rounds[0]["test_loss"]
    assert 0 < record["chance_exact_match"] < 1
    assert (tmp_path / "table.md").read_text().startswith("| strategy | round |")
