"""task: causal_lm: decoder LM heads, response-only loss, generation, federated runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.tracking import MlflowClient
from torch.utils.flop_counter import FlopCounterMode

from hfedmoe.platform.client import LocalTrainer
from hfedmoe.platform.config import ConfigError, ModelConfig, parse_config
from hfedmoe.platform.data.tokenisation import batch_tensors
from hfedmoe.platform.engine import run
from hfedmoe.platform.executors import InProcessExecutor, run_in_process
from hfedmoe.platform.federation import build_federation, measure_footprint
from hfedmoe.platform.models import build_adapter
from hfedmoe.platform.models.hf import hf_adapter, tiny_model
from hfedmoe.platform.records import History
from hfedmoe.platform.strategies import STRATEGIES
from hfedmoe.platform.tasks.causal_lm import (
    IGNORE,
    exact_matches,
    greedy_generate,
    next_token_loss,
    predicting_positions,
)

REPO = Path(__file__).resolve().parents[1]
# configs/tiny.yaml's model: a tiny random-init Qwen3-MoE, 4 experts, top-2, 2 layers.
TINY_MODEL = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["model"]
TIERS = [
    {"name": "slow", "proportion": 0.5, "memory_fraction": 1.5, "flops_per_s": 1.0e11},
    {"name": "fast", "proportion": 0.5, "memory_fraction": 1.5, "flops_per_s": 1.0e12},
]


def lm_config(**sections):
    raw = {
        "seed": 5,
        "threads": 1,
        "data": {"max_length": 40, "max_test_samples": 20},
        "task": {"name": "causal_lm", "params": {"logged_generations": 3}},
        "model": TINY_MODEL,
        "federation": {
            "rounds": 1,
            "num_clients": 6,
            "clients_per_round": 3,
            "max_local_steps": 2,
            "batch_size": 4,
            "lr": 3e-3,
            "eval_batch_size": 20,
        },
        "budgets": {"distribution": "tiers", "tiers": TIERS},
        "tracking": {"enabled": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(raw)


@pytest.fixture(scope="module")
def federation():
    return build_federation(lm_config())


# ---- loss, perplexity, generation ---------------------------------------------------------
def test_loss_counts_only_response_tokens():
    """One sample: prompt 3 tokens, response 2 + end; the loss is theirs alone."""
    torch.manual_seed(0)
    vocab = 11
    input_ids = torch.tensor([[1, 4, 5, 7, 8, 2, 0, 0]])
    targets = torch.tensor([[IGNORE, IGNORE, IGNORE, 7, 8, 2, IGNORE, IGNORE]])
    logits = torch.randn(1, 8, vocab)
    positions = predicting_positions(targets)
    # Position t predicts token t + 1: positions 2, 3, 4 predict 7, 8, 2.
    assert positions.tolist() == [[False, False, True, True, True, False, False, False]]
    log_probs = torch.log_softmax(logits[0], dim=-1)
    by_hand = -(log_probs[2, 7] + log_probs[3, 8] + log_probs[4, 2]) / 3
    loss = next_token_loss(logits[positions], targets)
    torch.testing.assert_close(loss, by_hand)
    # Changing prompt or padding logits changes nothing.
    logits[0, [0, 1, 5, 6, 7]] += 5 * torch.randn(5, vocab)
    torch.testing.assert_close(next_token_loss(logits[positions], targets), by_hand)
    assert input_ids.shape == targets.shape


def test_evaluation_is_token_mean_loss_and_its_perplexity(federation):
    fed, adapter = federation
    evaluation = fed.task.evaluate(adapter, fed.test, 7, fed.label_like)
    # The same from full [B, T, V] logits, summed over every target token of the test set.
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(fed.test), 7):
            batch = batch_tensors(fed.test, np.arange(start, min(start + 7, len(fed.test))))
            logits, _ = adapter.forward(batch["input_ids"], batch["attention_mask"])
            total += float(
                F.cross_entropy(
                    logits[:, :-1].transpose(1, 2), batch["targets"][:, 1:], reduction="sum"
                )
            )
            count += int((batch["targets"][:, 1:] != IGNORE).sum())
    # float32 logsumexp over V = 30522 per token: relative error ~1e-6.
    assert evaluation.loss == pytest.approx(total / count, rel=1e-5)
    assert evaluation.perplexity == pytest.approx(math.exp(evaluation.loss), rel=1e-12)
    assert fed.label_like and evaluation.accuracy is not None
    assert [set(r) for r in evaluation.generations] == [
        {"prompt", "reference", "generated", "exact_match"}
    ] * 3
    assert {r["reference"] for r in evaluation.generations} <= set(fed.label_names)


def test_greedy_generation_matches_transformers_and_scores_exact_matches(federation):
    fed, adapter = federation
    batch = batch_tensors(fed.test, np.arange(3))
    stop = torch.full((3,), int(batch["targets"][0][batch["targets"][0] != IGNORE][-1]))
    ours = greedy_generate(
        adapter,
        batch["input_ids"],
        batch["prompt_lengths"],
        stop,
        4,
        adapter.tokenizer.pad_token_id,
    )
    hf = adapter.model.model
    for row in range(3):
        prompt = batch["input_ids"][row : row + 1, : int(batch["prompt_lengths"][row])]
        with torch.no_grad():
            out = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=4,
                do_sample=False,
                eos_token_id=int(stop[0]),
                pad_token_id=adapter.tokenizer.pad_token_id,
            )
        assert ours[row] == out[0, prompt.shape[1] :].tolist()
    # A constructed case: the first two references are the generations, the third is not.
    references = [ours[0], ours[1], [*ours[2][:-1], ours[2][-1] + 1]]
    assert exact_matches(ours, references) == [True, True, False]


# ---- models ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "olmoe", "deepseek_v2"])
def test_each_decoder_family_has_its_own_lm_head(kind):
    cfg = ModelConfig(**{**TINY_MODEL, "kind": kind})
    adapter = build_adapter(cfg, 5, seed=0, head="lm")
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    logits, routing = adapter.forward(ids, torch.ones_like(ids), capture_routing=True)
    assert logits.shape == (1, 6, len(adapter.tokenizer))
    assert routing.probs.shape == (2, 1, 4)
    head = "model.lm_head.weight"
    assert head in adapter.shared_names and adapter.lm_head_trains()
    assert all("embed" in n for n in adapter.frozen_names)  # model.freeze: [embed]


def test_a_saved_causal_checkpoint_reloads_as_pretrained(tmp_path):
    source = build_adapter(ModelConfig(**TINY_MODEL), 5, seed=0, head="lm")
    source.model.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    adapter = build_adapter(ModelConfig(kind="pretrained", path=str(tmp_path)), 5, 1, head="lm")
    ids = torch.tensor([[101, 2023, 2003, 102]])
    with torch.no_grad():
        ours, _ = adapter.forward(ids, torch.ones_like(ids))
        theirs, _ = source.forward(ids, torch.ones_like(ids))
    torch.testing.assert_close(ours, theirs)


def test_encoders_and_hashed_vocabularies_are_refused_for_causal_lm():
    with pytest.raises(ConfigError, match=r"task.name='causal_lm'.*model.kind='upcycled'"):
        lm_config(model={"kind": "upcycled"})
    with pytest.raises(ConfigError, match="switch_transformers"):
        lm_config(model={"kind": "switch_transformers"})
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        lm_config(model={"vocab_size": 500})
    with pytest.raises(ConfigError, match=r"task\.params\.max_new_token"):
        lm_config(task={"name": "causal_lm", "params": {"max_new_token": 3}})
    with pytest.raises(ConfigError, match="unknown task 'lm'"):
        lm_config(task={"name": "lm"})


def test_routing_statistics_count_every_attended_token(federation):
    """Usage from a batch is the reduction over its attention-masked tokens, prompt and
    response alike (targets play no part)."""
    fed, adapter = federation
    batch = batch_tensors(fed.train, np.arange(4))
    mask = batch["attention_mask"]
    assert bool((mask.sum(dim=1) > batch["prompt_lengths"]).all())  # response tokens attended
    captured = []
    hooks = [
        layer.router.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
        for layer in adapter.layers
    ]
    with torch.no_grad():
        _, routing = adapter.forward(batch["input_ids"], mask, capture_routing=True)
    for hook in hooks:
        hook.remove()
    for layer, logits in enumerate(captured):
        probs = torch.softmax(logits.float(), dim=-1).reshape(*mask.shape, -1)
        for row in range(len(mask)):
            attended = probs[row, mask[row].bool()]
            torch.testing.assert_close(routing.probs[layer, row], attended.mean(dim=0))


# ---- memory and time models ----------------------------------------------------------------
def _small_vocab_adapter(vocab: int):
    cfg = ModelConfig(**TINY_MODEL)
    tokenizer = build_adapter(cfg, 5, 0, head="lm").tokenizer
    torch.manual_seed(0)
    model = tiny_model("qwen3_moe", cfg, vocab, tokenizer.pad_token_id, 5, head="lm")
    return hf_adapter(model, tokenizer, "qwen3_moe", 5, cfg)


def _predicted(batch) -> int:
    return int((batch["targets"][:, 1:] != IGNORE).sum())


def test_footprint_counts_the_lm_heads_logits(federation):
    """The measured activations grow by the log-softmax's [N, V] floats with the vocabulary."""
    fed, adapter = federation
    task = fed.task
    batch_size = fed.cfg.federation.batch_size
    full = measure_footprint(adapter, fed.train, batch_size, task)
    rows = task.footprint_rows(fed.train, batch_size)
    # The rows with the longest answers, so that every batch fits the budget.
    lengths = (fed.train.targets != IGNORE).sum(dim=1)
    assert int(lengths[rows].min()) == int(lengths.sort(descending=True).values[batch_size - 1])
    train = fed.train
    small_vocab = int(train.input_ids.max()) + 1
    small = measure_footprint(_small_vocab_adapter(small_vocab), train, batch_size, task)
    predicted = _predicted(batch_tensors(train, rows))
    grown = (full.activation_bytes_per_sample - small.activation_bytes_per_sample) * batch_size
    vocab = len(adapter.tokenizer)
    assert grown == predicted * (vocab - small_vocab) * 4  # float32 log-probabilities


def test_step_flops_count_the_lm_head_per_predicted_position(federation):
    fed, adapter = federation
    trainer = LocalTrainer(adapter, fed.train, fed.footprint, fed.cfg)
    d, vocab = adapter.model.model.config.hidden_size, len(adapter.tokenizer)
    # Forward, input gradient and (the head trains) weight gradient: 3 x 2 d V each.
    assert trainer.flops.per_prediction == 6 * d * vocab
    first = batch_tensors(fed.train, np.arange(4))
    # The same shape with one target fewer: the head runs on one position less.
    targets = first["targets"].clone()
    targets[0, int(first["prompt_lengths"][0])] = IGNORE
    second = {**first, "targets": targets}
    assert _predicted(second) == _predicted(first) - 1
    shape = tuple(first["input_ids"].shape)
    with adapter.training(stop_gradient=False) as leaves:
        trainer.flops.calibrate(
            shape, lambda: trainer._throwaway_step(first, leaves), _predicted(first)
        )
        with FlopCounterMode(display=False) as counter:
            pair_counts, active = trainer._throwaway_step(second, leaves)
    modelled = trainer.flops.total(shape, pair_counts, active, _predicted(second))
    assert modelled == counter.get_total_flops()


# ---- federated runs ------------------------------------------------------------------------
def test_federated_causal_lm_lowers_held_out_loss_round_over_round():
    cfg = lm_config(federation={"rounds": 3, "max_local_steps": 3})
    history = run_in_process(cfg).history
    losses = [r.test_loss for r in history.rounds]
    assert losses[0] > losses[1] > losses[2], losses
    assert all(r.perplexity == pytest.approx(math.exp(r.test_loss)) for r in history.rounds)
    assert all(r.routed_per_step > 0 and 0 < r.admitted_share <= 1 for r in history.rounds)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_runs_a_causal_lm_round(strategy):
    cfg = lm_config(federation={"strategy": strategy, "eval_batch_size": 20})
    [metrics] = run_in_process(cfg).history.rounds
    assert metrics.succeeded + metrics.failed_oom == 3
    assert math.isfinite(metrics.test_loss) and metrics.perplexity > 1


@pytest.mark.parametrize(
    "model", [{"lora": {"rank": 4}}, {"lora": {"rank": 4}, "quantization": "nf4"}]
)
def test_lora_and_qlora_causal_lm_rounds_train_adapters_not_the_lm_head(model):
    cfg = lm_config(model=model)
    _, adapter = build_federation(cfg)
    assert "model.lm_head.weight" in adapter.frozen_names and not adapter.lm_head_trains()
    assert all("lora_" in n for n in adapter.shared_names)
    result = run(cfg, InProcessExecutor())
    [metrics] = result.history.rounds
    assert metrics.succeeded == 3 and metrics.experts_trained > 0
    assert set(result.state.shared) == set(adapter.shared_names)


def test_resumed_causal_lm_run_ends_where_the_uninterrupted_one_does(tmp_path):
    from hfedmoe.launch import launch

    cfg = lm_config(federation={"rounds": 2}, output_dir=str(tmp_path))
    whole = launch(cfg, run_dir=tmp_path / "whole", in_process=True, progress=False)
    crashing = lm_config(federation={"rounds": 2}, faults={"driver_crash": 0})
    with pytest.raises(Exception, match="driver_crash"):
        launch(crashing, run_dir=tmp_path / "cut", in_process=True, progress=False)
    resumed = launch(resume=tmp_path / "cut", in_process=True, progress=False)
    assert [r.deterministic() for r in resumed.history.rounds] == [
        r.deterministic() for r in whole.history.rounds
    ]
    assert resumed.history.generations == whole.history.generations
    for name, value in whole.state.shared.items():
        np.testing.assert_array_equal(value, resumed.state.shared[name])


def test_generations_table_goes_to_mlflow_per_evaluation(tmp_path):
    from hfedmoe.launch import launch

    cfg = lm_config(federation={"rounds": 2}, tracking={"enabled": True})
    launch(cfg, run_dir=tmp_path / "run", in_process=True, progress=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [logged] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run_id = logged.info.run_id
    steps = [m.step for m in client.get_metric_history(run_id, "perplexity")]
    assert steps == [0, 1]
    tables = {a.path for a in client.list_artifacts(run_id, "generations")}
    assert tables == {"generations/round-0000.json", "generations/round-0001.json"}
    local = client.download_artifacts(run_id, "generations/round-0001.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    assert table["columns"] == ["prompt", "reference", "generated", "exact_match"]
    assert len(table["data"]) == 3


def test_history_records_without_the_new_fields_still_load():
    """A history.jsonl record of an older version: no perplexity, no generations."""
    history = run_in_process(lm_config()).history
    record = history.last_round_record()
    assert record["generations"]
    record.pop("generations")
    record["metrics"].pop("perplexity")
    old = History.from_round_records([record])
    assert old.rounds[0].perplexity is None and old.generations == {}


@pytest.mark.slow
def test_classification_as_generation_on_bbc_beats_chance():
    """5 BBC topics as instructions; exact match of the greedy answer against the topic.

    Chance here is always answering the most frequent test topic; the threshold is that
    rate plus four binomial standard deviations of it over the test set.
    """
    cfg = lm_config(
        seed=0,
        data={"max_length": 48, "max_test_samples": 100, "partition": {"alpha": 1.0}},
        # Random-init: the embeddings train too, and learn the topic words.
        model={**TINY_MODEL, "hidden_size": 64, "intermediate_size": 64, "freeze": []},
        federation={
            "rounds": 10,
            "num_clients": 4,
            "clients_per_round": 4,
            "max_local_steps": 10,
            "batch_size": 8,
            "lr": 5e-3,
            "eval_every": 10,
            "eval_batch_size": 50,
        },
    )
    run_state = run_in_process(cfg)
    fed = run_state.fed
    counts = np.bincount(fed.test.labels.numpy(), minlength=len(fed.label_names))
    n = int(counts.sum())
    chance = counts.max() / n
    threshold = chance + 4 * math.sqrt(chance * (1 - chance) / n)
    accuracy = run_state.history.final_accuracy()
    assert accuracy > threshold, (accuracy, threshold)


# ---- Ray: the executor and a sweep -----------------------------------------------------------
@pytest.mark.ray
def test_ray_causal_lm_run_is_bit_identical_to_in_process(ray_address, tmp_path):
    from hfedmoe.launch import launch

    cfg = lm_config(federation={"rounds": 2}, runtime={"client_timeout_s": 120})
    expected = run_in_process(cfg)
    result = launch(cfg, run_dir=tmp_path / "ray", progress=False)
    assert [r.deterministic() for r in result.history.rounds] == [
        r.deterministic() for r in expected.history.rounds
    ]
    assert result.history.generations == expected.history.generations
    for group in ("shared", "gates"):
        for name, value in getattr(expected.state, group).items():
            np.testing.assert_array_equal(value, getattr(result.state, group)[name])
    for ours, theirs in zip(expected.state.experts, result.state.experts, strict=True):
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name])


@pytest.mark.ray
def test_a_sweep_of_causal_lm_trials_reports_exact_match(ray_address, tmp_path):
    from hfedmoe.tuning.sweep import run_sweep

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(lm_config().model_dump(mode="json")))
    sweep = {
        "name": "lm-sweep",
        "base": str(base),
        # One trial proves the path (trial sizing by the task's footprint, exact match
        # reported to Tune); more trials would only repeat it.
        "search": {"federation.strategy": {"grid": ["hfedmoe"]}},
        "storage_path": str(tmp_path / "sweeps"),
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    result = run_sweep(path, progress=False)
    [row] = result.rows
    assert row["status"] == "OK" and 0 <= row["final_accuracy"] <= 1
