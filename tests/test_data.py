"""Tests for hfedmoe.platform.data: corpora, splits, partitions, tokenisation, batching."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from hfedmoe.platform.data import corpora, partitioning, tokenisation

REPO = Path(__file__).resolve().parents[1]
AG_NEWS_DIR = Path(
    os.environ.get("HFEDMOE_AG_NEWS_DIR", str(REPO.parent / "shared" / "data" / "ag_news"))
)


@pytest.fixture(scope="module")
def bbc() -> corpora.TextCorpus:
    return corpora.load_bbc_news()


@pytest.fixture(scope="module")
def tokenizer():
    return tokenisation.default_tokenizer()


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' arrow cache inside the test's tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _skewed_labels(sizes: list[int], seed: int = 0) -> np.ndarray:
    """Labels with `sizes[c]` samples of class c, in shuffled order."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels)


def _mean_max_share(
    shards: partitioning.ClientShards, labels: np.ndarray, num_classes: int
) -> float:
    """Mean over non-empty clients of the share of their most common label."""
    hist = shards.label_histogram(labels, num_classes)
    hist = hist[hist.sum(axis=1) > 0]
    return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))


def _assert_exact_cover(shards: partitioning.ClientShards, pool_size: int) -> None:
    np.testing.assert_array_equal(np.sort(shards.indices), np.arange(pool_size))


# --------------------------------------------------------------------------- BBC News


def test_bbc_news_matches_the_bundled_folders(bbc):
    root = corpora._bundled_bbc_root()
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    assert len(bbc) == 2225
    assert bbc.num_classes == 5
    assert bbc.label_names == folders == sorted(bbc.label_names)
    expected_counts = [len(list((root / name).glob("*.txt"))) for name in folders]
    np.testing.assert_array_equal(np.bincount(bbc.labels), expected_counts)
    assert bbc.labels.dtype == np.int64
    assert np.all(np.diff(bbc.labels) >= 0), "classes are read folder by folder"


def test_bbc_news_texts_are_clean_and_decoded(bbc):
    assert all(text and text == " ".join(text.split()) for text in bbc.texts)
    # A wrong decoder shows up as replacement characters or utf-8 read as latin-1 ("Â£").
    assert not any("\ufffd" in text or "Â" in text for text in bbc.texts)
    assert sum("£" in text for text in bbc.texts) > 100


def test_bbc_news_loads_identically_twice(bbc):
    again = corpora.load_bbc_news()
    assert again.texts == bbc.texts
    np.testing.assert_array_equal(again.labels, bbc.labels)
    assert again.label_names == bbc.label_names


def test_bbc_loader_sorts_and_falls_back_to_latin1(tmp_path):
    (tmp_path / "zeta").mkdir()
    (tmp_path / "alpha").mkdir()
    (tmp_path / "zeta" / "2.txt").write_bytes(b"cost \xa35m")  # latin-1 pound sign
    (tmp_path / "zeta" / "1.txt").write_bytes("cost \u00a35m\n\n  more".encode())
    (tmp_path / "alpha" / "1.txt").write_text("first")
    corpus = corpora.load_bbc_news(tmp_path)
    assert corpus.label_names == ["alpha", "zeta"]
    assert corpus.texts == ["first", "cost £5m more", "cost £5m"]
    np.testing.assert_array_equal(corpus.labels, [0, 1, 1])


# --------------------------------------------------------------------------- AG News


def _write_ag_news(directory: Path, files: dict[str, list[list[str]]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "classes.txt").write_text("Red\nGreen\nBlue\n")
    for name, rows in files.items():
        with (directory / name).open("w", newline="") as handle:
            csv.writer(handle, quoting=csv.QUOTE_ALL).writerows(rows)


def test_ag_news_csv_format_on_synthetic_files(tmp_path):
    _write_ag_news(
        tmp_path,
        {
            "train.csv": [["3", "Title, one", 'He said "hi"\\then left']],
            "test.csv": [["1", "Cost", "about \\$5 or #36;6\\\\New paragraph"]],
        },
    )
    corpus = corpora.load_ag_news_csv(tmp_path)
    assert corpus.label_names == ["Red", "Green", "Blue"]
    np.testing.assert_array_equal(corpus.labels, [2, 0])
    assert corpus.texts == [
        'Title, one. He said "hi" then left',
        "Cost. about $5 or #36;6 New paragraph",
    ]
    only_test = corpora.load_ag_news_csv(tmp_path, files=("test.csv",))
    np.testing.assert_array_equal(only_test.labels, [0])


def test_ag_news_csv_reports_missing_files_and_bad_rows(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.csv, test\.csv") as err:
        corpora.load_ag_news_csv(tmp_path)
    assert str(tmp_path) in str(err.value)
    _write_ag_news(tmp_path, {"test.csv": [["1", "ok", "fine"], ["4", "bad", "class"]]})
    with pytest.raises(ValueError, match=r"test\.csv row 2"):
        corpora.load_ag_news_csv(tmp_path)


def test_clean_ag_news_text_handles_escapes():
    assert corpora.clean_ag_news_text("a\\b  c\\\\d") == "a b c d"
    assert corpora.clean_ag_news_text("for \\$4.99 (#36;5)") == "for $4.99 (#36;5)"


@pytest.fixture(scope="module")
def ag_news_test() -> corpora.TextCorpus:
    if not (AG_NEWS_DIR / "test.csv").is_file():
        pytest.skip(f"AG News CSVs not found in {AG_NEWS_DIR} (set HFEDMOE_AG_NEWS_DIR)")
    return corpora.load_ag_news_csv(AG_NEWS_DIR, files=("test.csv",))


def test_ag_news_official_test_split(ag_news_test):
    assert len(ag_news_test) == 7600
    np.testing.assert_array_equal(np.bincount(ag_news_test.labels), [1900] * 4)
    assert ag_news_test.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert ag_news_test.label_names == (AG_NEWS_DIR / "classes.txt").read_text().split()
    assert not any("\\" in text for text in ag_news_test.texts)
    assert all(". " in text for text in ag_news_test.texts)


# --------------------------------------------------------------------------- Hugging Face / files


def test_load_hf_dataset_from_csv_maps_string_labels_sorted(tmp_path, hf_cache):
    path = tmp_path / "tiny.csv"
    path.write_text("title,body,topic\nA,one,zoo\nB,two,ant\nC,three,zoo\nD,four,mole\n")
    corpus = corpora.load_hf_dataset(str(path), "train", ["title", "body"], "topic")
    assert corpus.texts == ["A. one", "B. two", "C. three", "D. four"]
    assert corpus.label_names == ["ant", "mole", "zoo"]
    np.testing.assert_array_equal(corpus.labels, [2, 0, 2, 1])


def test_load_hf_dataset_from_json_dir_remaps_int_labels(tmp_path, hf_cache):
    rows = [{"text": "x", "label": 10}, {"text": "y", "label": 3}, {"text": "z", "label": 10}]
    (tmp_path / "part.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    corpus = corpora.load_hf_dataset(str(tmp_path), "train", ["text"], "label")
    assert corpus.label_names == ["3", "10"]  # numeric, not lexical, order
    np.testing.assert_array_equal(corpus.labels, [1, 0, 1])


def test_load_hf_dataset_keeps_class_label_names(tmp_path, hf_cache):
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    dataset = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}, features=features)
    dataset.to_parquet(str(tmp_path / "tiny.parquet"))
    corpus = corpora.load_hf_dataset(str(tmp_path / "tiny.parquet"), "train", ["text"], "label")
    assert corpus.label_names == ["neg", "pos"]
    np.testing.assert_array_equal(corpus.labels, [1, 0])


def test_load_hf_dataset_names_the_missing_field(tmp_path, hf_cache):
    path = tmp_path / "tiny.csv"
    path.write_text("sentence,label\nhello,a\n")
    with pytest.raises(ValueError, match=r"field\(s\) text not found.*sentence, label"):
        corpora.load_hf_dataset(str(path), "train", ["text"], "label")
    with pytest.raises(ValueError, match="category"):
        corpora.load_hf_dataset(str(path), "train", ["sentence"], "category")


def test_load_hf_dataset_rejects_mixed_directories(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\nx,1\n")
    (tmp_path / "b.json").write_text('{"text": "y", "label": 2}\n')
    with pytest.raises(ValueError, match=r"a\.csv, b\.json"):
        corpora.load_hf_dataset(str(tmp_path), "train", ["text"], "label")


# --------------------------------------------------------------------------- load_corpus


def test_load_corpus_dispatches(tmp_path, hf_cache):
    assert len(corpora.load_corpus("bbc_news", None, "train", ["text"], "label")) == 2225
    path = tmp_path / "tiny.csv"
    path.write_text("text,label\nhello,b\nworld,a\n")
    corpus = corpora.load_corpus("files", str(path), "train", ["text"], "label")
    assert corpus.texts == ["hello", "world"]
    _write_ag_news(tmp_path / "ag", {"test.csv": [["2", "T", "D"]]})
    ag = corpora.load_corpus("ag_news", str(tmp_path / "ag"), "train", ["text"], "label")
    assert (ag.texts, ag.labels.tolist()) == (["T. D"], [1])


def test_load_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="bbc_news, ag_news, huggingface, files"):
        corpora.load_corpus("imdb", None, "train", ["text"], "label")
    missing = tmp_path / "nowhere"
    for source in ("ag_news", "files"):
        with pytest.raises(FileNotFoundError, match=r"data\.path") as err:
            corpora.load_corpus(source, str(missing), "train", ["text"], "label")
        assert str(missing) in str(err.value)
    with pytest.raises(ValueError, match=r"data\.path is required"):
        corpora.load_corpus("huggingface", None, "train", ["text"], "label")


# --------------------------------------------------------------------------- stratified split


def test_stratified_split_small_hand_case():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2 + [3])
    train, test = corpora.stratified_split(labels, 0.2, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[test], minlength=4), [2, 1, 1, 0])
    np.testing.assert_array_equal(np.bincount(labels[train], minlength=4), [8, 4, 1, 1])


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_stratified_split_is_a_stratified_partition(fraction):
    labels = _skewed_labels([400, 90, 37, 5, 2])
    train, test = corpora.stratified_split(labels, fraction, seed=3)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    class_sizes = np.bincount(labels)
    test_counts = np.bincount(labels[test], minlength=len(class_sizes))
    assert np.all(np.abs(test_counts - fraction * class_sizes) <= 1)
    assert np.all(test_counts >= 1) and np.all(test_counts < class_sizes)


def test_stratified_split_depends_on_the_seed_only(bbc):
    first = corpora.stratified_split(bbc.labels, 0.2, seed=7)
    same = corpora.stratified_split(bbc.labels, 0.2, seed=7)
    other = corpora.stratified_split(bbc.labels, 0.2, seed=8)
    np.testing.assert_array_equal(first[1], same[1])
    assert len(first[1]) == len(other[1]) and not np.array_equal(first[1], other[1])
    with pytest.raises(ValueError, match="test_fraction"):
        corpora.stratified_split(bbc.labels, 1.0, seed=0)


def test_split_record_is_json_and_identifies_the_split(bbc):
    train, test = corpora.stratified_split(bbc.labels, 0.2, seed=0)
    record = corpora.split_record(bbc.labels, train, test, seed=0, test_fraction=0.2)
    assert json.loads(json.dumps(record)) == record
    assert record == corpora.split_record(bbc.labels, train, test, seed=0, test_fraction=0.2)
    assert record["train_size"] + record["test_size"] == 2225
    assert record["test_class_counts"] == np.bincount(bbc.labels[test]).tolist()
    assert sum(record["train_class_counts"]) == len(train)
    other = corpora.stratified_split(bbc.labels, 0.2, seed=1)
    assert (
        corpora.split_record(bbc.labels, *other, seed=1, test_fraction=0.2)["sha256"]
        != (record["sha256"])
    )
    # Moving one index across the boundary changes the hash even though the union is equal.
    moved = corpora.split_record(bbc.labels, train[:-1], np.sort([*test, train[-1]]), 0, 0.2)
    assert moved["sha256"] != record["sha256"]


# --------------------------------------------------------------------------- ClientShards


def test_client_shards_csr_layout():
    shards = partitioning.ClientShards.from_lists(
        [np.array([4, 2]), np.array([], dtype=int), np.array([7])]
    )
    assert len(shards) == 3
    np.testing.assert_array_equal(shards.offsets, [0, 2, 2, 3])
    np.testing.assert_array_equal(shards.sizes, [2, 0, 1])
    np.testing.assert_array_equal(shards[0], [4, 2])
    np.testing.assert_array_equal(shards[-1], [7])
    assert np.shares_memory(shards[0], shards.indices)
    with pytest.raises(IndexError):
        shards[3]
    labels = np.array([0, 0, 1, 0, 2, 0, 0, 1])
    np.testing.assert_array_equal(
        shards.label_histogram(labels, 3), [[0, 1, 1], [0, 0, 0], [0, 1, 0]]
    )
    with pytest.raises(ValueError, match="offsets"):
        partitioning.ClientShards(np.arange(3), np.array([0, 2]))


# --------------------------------------------------------------------------- partitioners

LABELS = _skewed_labels([300, 250, 150, 100])

PARTITIONERS = {
    "iid": lambda seed: partitioning.partition_iid(len(LABELS), 12, seed),
    "dirichlet": lambda seed: partitioning.partition_dirichlet(LABELS, 12, 0.5, seed, min_size=10),
    "shards": lambda seed: partitioning.partition_shards(LABELS, 12, 2, seed),
}


@pytest.mark.parametrize("kind", sorted(PARTITIONERS))
def test_partitioners_cover_the_pool_once_and_are_seeded(kind):
    build = PARTITIONERS[kind]
    shards = build(0)
    assert len(shards) == 12
    _assert_exact_cover(shards, len(LABELS))
    assert shards.sizes.min() >= (10 if kind == "dirichlet" else 1)
    again, other = build(0), build(1)
    np.testing.assert_array_equal(shards.indices, again.indices)
    np.testing.assert_array_equal(shards.offsets, again.offsets)
    assert not np.array_equal(shards.indices, other.indices)


def test_partition_iid_hand_case():
    shards = partitioning.partition_iid(10, 3, seed=0)
    assert sorted(shards.sizes.tolist()) == [3, 3, 4]
    _assert_exact_cover(shards, 10)
    with pytest.raises(ValueError, match="min_size=4"):
        partitioning.partition_iid(10, 3, seed=0, min_size=4)
    assert partitioning.partition_iid(2, 3, seed=0, min_size=0).sizes.tolist() == [1, 1, 0]


def test_dirichlet_skew_falls_as_alpha_grows():
    # Empty clients are allowed so that the tiny alpha is not redrawn towards balance.
    skewed = partitioning.partition_dirichlet(
        LABELS, 20, 0.05, seed=0, min_size=0, allow_empty=True
    )
    balanced = partitioning.partition_dirichlet(LABELS, 20, 100.0, seed=0)
    skewed_share = _mean_max_share(skewed, LABELS, 4)
    assert skewed_share > 0.9
    assert _mean_max_share(balanced, LABELS, 4) < 0.5
    _assert_exact_cover(skewed, len(LABELS))


def test_dirichlet_impossible_requests_explain_the_fix():
    with pytest.raises(ValueError, match="samples_per_client") as err:
        partitioning.partition_dirichlet(LABELS, 100, 0.5, seed=0, min_size=10)
    assert "min_size" in str(err.value) and "fewer clients" in str(err.value)
    # Four classes at a tiny alpha land on about four clients: 10 non-empty clients never happen.
    with pytest.raises(ValueError, match="5 tries") as err:
        partitioning.partition_dirichlet(LABELS, 10, 0.001, seed=0, max_retries=5)
    assert "alpha" in str(err.value)


def test_dirichlet_allow_empty_with_zero_min_size():
    shards = partitioning.partition_dirichlet(
        LABELS, 10, 0.001, seed=0, min_size=0, allow_empty=True
    )
    assert shards.sizes.min() == 0
    _assert_exact_cover(shards, len(LABELS))
    # allow_empty=False lifts min_size=0 to 1, so the same request fails.
    with pytest.raises(ValueError):
        partitioning.partition_dirichlet(LABELS, 10, 0.001, seed=0, min_size=0, max_retries=5)


def test_shards_limit_labels_per_client():
    labels = _skewed_labels([30, 30, 30, 30])
    shards = partitioning.partition_shards(labels, 6, 2, seed=0)
    hist = shards.label_histogram(labels, 4)
    assert np.all((hist > 0).sum(axis=1) <= 2)
    assert np.all(shards.sizes == 20)
    _assert_exact_cover(shards, len(labels))
    # Uneven pools still deal every sample; shard sizes differ by at most one.
    uneven = partitioning.partition_shards(_skewed_labels([17, 9, 5]), 4, 3, seed=0)
    _assert_exact_cover(uneven, 31)
    assert uneven.sizes.max() - uneven.sizes.min() <= 3
    with pytest.raises(ValueError, match="at least 24 samples"):
        partitioning.partition_shards(np.zeros(20, dtype=int), 6, 4, seed=0)


def test_resampled_builds_many_clients():
    labels = _skewed_labels([500, 300, 150, 50])
    shards = partitioning.partition_resampled(labels, 100_000, 16, alpha=0.1, seed=0)
    assert len(shards) == 100_000
    assert np.all(shards.sizes == 16)
    assert shards.indices.min() >= 0 and shards.indices.max() < len(labels)
    assert _mean_max_share(shards, labels, 4) > 0.8
    again = partitioning.partition_resampled(labels, 100_000, 16, alpha=0.1, seed=0)
    other = partitioning.partition_resampled(labels, 100_000, 16, alpha=0.1, seed=1)
    np.testing.assert_array_equal(again.indices, shards.indices)
    assert not np.array_equal(other.indices, shards.indices)


def test_resampled_uniform_follows_the_pool():
    labels = _skewed_labels([800, 200])
    shards = partitioning.partition_resampled(labels, 5000, 8, alpha=None, seed=0)
    assert np.all(shards.sizes == 8)
    share = np.bincount(labels[shards.indices]) / len(shards.indices)
    np.testing.assert_allclose(share, [0.8, 0.2], atol=0.02)


def test_partition_dispatch():
    iid = partitioning.partition(LABELS, 12, "iid", seed=4)
    np.testing.assert_array_equal(
        iid.indices, partitioning.partition_iid(len(LABELS), 12, 4).indices
    )
    shards = partitioning.partition(LABELS, 12, "shards", shards_per_client=3, seed=4)
    np.testing.assert_array_equal(
        shards.indices, partitioning.partition_shards(LABELS, 12, 3, 4).indices
    )
    resampled = partitioning.partition(LABELS, 2000, "dirichlet", samples_per_client=5, seed=0)
    assert len(resampled) == 2000 and np.all(resampled.sizes == 5)
    uniform = partitioning.partition(LABELS, 2000, "iid", samples_per_client=5, seed=0)
    assert _mean_max_share(uniform, LABELS, 4) < _mean_max_share(resampled, LABELS, 4)
    with pytest.raises(ValueError, match="not 'shards'"):
        partitioning.partition(LABELS, 10, "shards", samples_per_client=5, seed=0)
    with pytest.raises(ValueError, match="iid, dirichlet, shards"):
        partitioning.partition(LABELS, 10, "random", seed=0)
    assert (
        partitioning.partition(
            LABELS[:3], 5, "iid", min_size=0, allow_empty=True, seed=0
        ).sizes.min()
        == 0
    )
    with pytest.raises(ValueError, match="min_size"):
        partitioning.partition(LABELS[:3], 5, "iid", min_size=0, seed=0)


# --------------------------------------------------------------------------- tokens and batches

TEXTS = ["the quick brown fox jumps over the lazy dog", "hi", "one two three", "a b"]
TEXT_LABELS = np.array([3, 1, 0, 2])


def test_tokenize_shapes_labels_and_chunking(tokenizer):
    tokens = tokenisation.tokenize(TEXTS, TEXT_LABELS, tokenizer, max_length=8)
    assert len(tokens) == 4
    assert tokens.input_ids.shape == tokens.attention_mask.shape == (4, 8)
    assert tokens.input_ids.dtype == tokens.attention_mask.dtype == torch.int64
    np.testing.assert_array_equal(tokens.labels.numpy(), TEXT_LABELS)
    assert tokens.attention_mask[0].sum() == 8, "the long text is truncated to max_length"
    assert tokens.attention_mask[1].sum() == 3, "[CLS] hi [SEP]"
    chunked = tokenisation.tokenize(TEXTS, TEXT_LABELS, tokenizer, max_length=8, chunk_size=3)
    assert torch.equal(chunked.input_ids, tokens.input_ids)
    assert torch.equal(chunked.attention_mask, tokens.attention_mask)


def test_batch_tensors_trims_to_the_longest_row(tokenizer):
    tokens = tokenisation.tokenize(TEXTS, TEXT_LABELS, tokenizer, max_length=16)
    lengths = tokens.attention_mask.sum(dim=1)
    batch = tokenisation.batch_tensors(tokens, np.array([3, 1]))
    width = int(lengths[[3, 1]].max())
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, width)
    assert width < 16
    assert torch.equal(batch["input_ids"], tokens.input_ids[[3, 1], :width])
    assert batch["labels"].tolist() == [2, 1]
    full = tokenisation.batch_tensors(tokens, torch.tensor([0, 1]))
    assert full["input_ids"].shape[1] == int(lengths[0])


def test_batch_tensors_trims_left_padding():
    left = tokenisation.default_tokenizer()
    left.padding_side = "left"
    tokens = tokenisation.tokenize(TEXTS, TEXT_LABELS, left, max_length=16)
    batch = tokenisation.batch_tensors(tokens, np.array([1, 3]))
    assert batch["attention_mask"].shape == (2, 4)
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]
    assert batch["attention_mask"][0].tolist() == [0, 1, 1, 1]


def test_tokenize_uses_eos_when_there_is_no_pad_token():
    tok = tokenisation.default_tokenizer()
    tok.pad_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        tokenisation.tokenize(["hi"], np.array([0]), tok, max_length=8)
    tok.eos_token = "[SEP]"
    tokens = tokenisation.tokenize(["hi"], np.array([0]), tok, max_length=8)
    assert tok.pad_token == "[SEP]"
    assert tokens.input_ids[0, 3:].tolist() == [tok.sep_token_id] * 5
    assert tokens.attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_iterate_batches_order_and_sizes(tokenizer):
    texts = [f"sample number {i}" for i in range(10)]
    tokens = tokenisation.tokenize(texts, np.arange(10), tokenizer, max_length=8)
    indices = np.array([9, 7, 5, 3, 1, 0, 2])
    batches = list(tokenisation.iterate_batches(tokens, indices, batch_size=3, rng=None))
    assert [len(b["labels"]) for b in batches] == [3, 3, 1]
    assert torch.cat([b["labels"] for b in batches]).tolist() == indices.tolist()
    shuffled = [
        torch.cat(
            [b["labels"] for b in tokenisation.iterate_batches(tokens, indices, 3, rng)]
        ).tolist()
        for rng in (np.random.default_rng(0), np.random.default_rng(0))
    ]
    assert shuffled[0] == shuffled[1] != indices.tolist()
    assert sorted(shuffled[0]) == sorted(indices.tolist())


def test_tokenize_of_long_texts_equals_encoding_them_whole(tokenizer):
    # Ordinary words: the cut prefix already fills max_length tokens.
    prose = " ".join(f"word{i} and more text" for i in range(400))
    # Few tokens per character: runs of spaces leave the prefix with too few tokens, so
    # tokenize must fall back to encoding the whole text.
    sparse = ("x" + " " * 30) * 200
    texts = [prose, sparse, "short text"]
    labels = np.zeros(3, dtype=np.int64)
    got = tokenisation.tokenize(texts, labels, tokenizer, max_length=32)
    whole = tokenizer(
        texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt"
    )
    torch.testing.assert_close(got.input_ids, whole["input_ids"])
    torch.testing.assert_close(got.attention_mask, whole["attention_mask"])
    assert int(got.attention_mask[1].sum()) == 32  # the sparse text did fill max_length


# --------------------------------------------------------------------------- causal-LM pairs


def test_pair_routing_counts_prompt_and_response_tokens_loss_only_response(tokenizer):
    """Routing statistics average over prompt + response + end; the loss sees response + end."""
    from hfedmoe.platform.data.instructions import InstructionPairs
    from hfedmoe.platform.models.adapter import reduce_routing

    pairs = InstructionPairs("t", ["is the sky blue?"], ["yes"], np.zeros(1), ["all"], False)
    tokens = tokenisation.tokenize_pairs(pairs, tokenizer, max_length=16)
    # is the sky blue ? | # # # response : | yes [SEP] | 4 x [PAD]
    prompt, response, padding = 10, 2, 4
    assert tokens.prompt_lengths.tolist() == [prompt]
    assert tokens.attention_mask[0].tolist() == [1] * (prompt + response) + [0] * padding
    expected_targets = [-100] * prompt + tokens.input_ids[0, prompt:-padding].tolist()
    assert tokens.targets[0].tolist() == expected_targets + [-100] * padding
    assert tokenizer.convert_ids_to_tokens(tokens.targets[0, prompt:-padding]) == ["yes", "[SEP]"]

    # Router probabilities per token: prompt tokens, response tokens and padding each
    # prefer their own expert, so the sample's mean shows which tokens it averaged.
    by_part = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    part_of_token = torch.tensor([0] * prompt + [1] * response + [2] * padding)
    logits = by_part[part_of_token].log()  # [S, E]: softmax gives back by_part's rows
    top1 = part_of_token.unsqueeze(-1)  # each token routed to its part's expert
    captured = [(logits, top1, torch.ones_like(top1, dtype=torch.bool))]
    routing = reduce_routing(captured, tokens.attention_mask, num_experts=3)
    expected = (prompt * by_part[0] + response * by_part[1]) / (prompt + response)
    # float32 softmax and a 12-term mean: a few ulp of relative error.
    torch.testing.assert_close(routing.probs[0, 0], expected, rtol=1e-6, atol=1e-7)
    assert routing.routed[0, 0].tolist() == [True, True, False], "padding is not routed"
    assert routing.token_counts[0].tolist() == [prompt, response, 0]
