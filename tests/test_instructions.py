"""Tests for causal-LM data: instruction pairs, their loaders, and tokenize_pairs."""

from __future__ import annotations

import copy
import json
import logging

import datasets
import numpy as np
import pytest
import torch

from hfedmoe.platform.config import DataConfig
from hfedmoe.platform.data import corpora, instructions, tokenisation
from hfedmoe.platform.data.instructions import InstructionPairs
from hfedmoe.platform.errors import ConfigError

# Chat templates small enough to check by hand. "[SEP]" ends each turn.
TURNS_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The generation prompt ends in "a" and the answer follows without a space: "a" + "yes"
# is one word, so the conversation's tokens do not start with the prompt's.
GLUED_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}q: {{ m['content'] }} "
    "{% else %}a{{ m['content'] }} [SEP]{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}a{% endif %}"
)
# The generation prompt says <bot> but the assistant's turn is rendered as <assistant>.
MISMATCHED_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<bot> {% endif %}"
)
SEPARATOR = ["#", "#", "#", "response", ":"]  # PLAIN_RESPONSE_SEPARATOR in MiniLM's tokens


@pytest.fixture(scope="module")
def tokenizer():
    return tokenisation.default_tokenizer()


def _with_template(tokenizer, template: str):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = template
    return chat


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' arrow cache inside the test's tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _pairs(prompts: list[str], responses: list[str]) -> InstructionPairs:
    return InstructionPairs("t", prompts, responses, np.zeros(len(prompts)), ["all"], False)


def _tokens(tokenizer, data: tokenisation.TokenizedPairs, row: int) -> list[str]:
    length = int(data.attention_mask[row].sum())
    return tokenizer.convert_ids_to_tokens(data.input_ids[row, :length])


def _response_tokens(tokenizer, data: tokenisation.TokenizedPairs, row: int) -> list[str]:
    targets = data.targets[row]
    return tokenizer.convert_ids_to_tokens(targets[targets != tokenisation.IGNORE_INDEX])


# --------------------------------------------------------------------------- InstructionPairs


def test_instruction_pairs_check_their_lengths():
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        InstructionPairs("t", ["a", "b"], ["x"], np.zeros(2), ["all"], False)
    with pytest.raises(ValueError, match=r"groups must lie in 0\.\.0"):
        InstructionPairs("t", ["a"], ["x"], np.array([1]), ["all"], False)
    assert InstructionPairs("t", ["a"], ["x"], [0], ["all"], False).groups.dtype == np.int64


def test_bbc_topic_instructions_are_deterministic_with_label_names():
    bbc = corpora.load_bbc_news()
    pairs = instructions.corpus_instructions(bbc)
    assert len(pairs) == 2225 and pairs.label_like
    assert pairs.group_names == ["business", "entertainment", "politics", "sports", "tech"]
    np.testing.assert_array_equal(pairs.groups, bbc.labels)
    assert pairs.prompts[0] == (
        "Name the topic of this article. Answer with one of: business, entertainment, "
        f"politics, sports, tech.\n\n{bbc.texts[0]}"
    )
    assert pairs.responses[0] == "business" and pairs.responses[-1] == "tech"
    assert all(
        pairs.group_names[g] == r for g, r in zip(pairs.groups, pairs.responses, strict=True)
    )
    again = instructions.corpus_instructions(corpora.load_bbc_news())
    assert (again.prompts, again.responses) == (pairs.prompts, pairs.responses)


# --------------------------------------------------------------------------- plain format


def test_plain_pair_by_hand(tokenizer):
    data = tokenisation.tokenize_pairs(
        _pairs(["Is the sky blue?", "hi"], ["Yes", "hello there"]), tokenizer, max_length=16
    )
    assert data.input_ids.shape == data.targets.shape == data.attention_mask.shape == (2, 16)
    assert _tokens(tokenizer, data, 0) == [
        "is",
        "the",
        "sky",
        "blue",
        "?",
        *SEPARATOR,
        "yes",
        "[SEP]",
    ]
    assert _tokens(tokenizer, data, 1) == ["hi", *SEPARATOR, "hello", "there", "[SEP]"]
    assert data.prompt_lengths.tolist() == [10, 6]
    assert data.attention_mask.sum(dim=1).tolist() == [12, 9]
    assert data.input_ids[1, 9:].tolist() == [tokenizer.pad_token_id] * 7
    assert _response_tokens(tokenizer, data, 0) == ["yes", "[SEP]"]
    assert _response_tokens(tokenizer, data, 1) == ["hello", "there", "[SEP]"]
    assert data.labels.tolist() == [0, 0] and len(data) == 2


def test_plain_format_prefers_bos_and_eos(tokenizer):
    gpt_like = copy.deepcopy(tokenizer)
    gpt_like.bos_token, gpt_like.eos_token = "[CLS]", "[MASK]"
    data = tokenisation.tokenize_pairs(_pairs(["hi"], ["yo"]), gpt_like, max_length=12)
    assert _tokens(gpt_like, data, 0) == ["[CLS]", "hi", *SEPARATOR, "yo", "[MASK]"]
    assert data.prompt_lengths.tolist() == [7]


# --------------------------------------------------------------------------- chat templates


def test_chat_template_pair_by_hand(tokenizer):
    chat = _with_template(tokenizer, TURNS_TEMPLATE)
    data = tokenisation.tokenize_pairs(_pairs(["Is the sky blue?"], ["Yes"]), chat, max_length=16)
    prompt = ["<", "user", ">", "is", "the", "sky", "blue", "?", "[SEP]", "<", "assistant", ">"]
    assert _tokens(chat, data, 0) == [*prompt, "yes", "[SEP]"]
    assert data.prompt_lengths.tolist() == [len(prompt)]
    # The prompt part is exactly what generation starts from.
    generation_prompt = chat.apply_chat_template(
        [{"role": "user", "content": "Is the sky blue?"}],
        add_generation_prompt=True,
        return_dict=False,
    )
    assert data.input_ids[0, : len(prompt)].tolist() == generation_prompt
    assert _response_tokens(chat, data, 0) == ["yes", "[SEP]"]


def test_chatml_template_with_control_tokens(tokenizer):
    """The ChatML format (Qwen's): the end-of-turn control token is a response target."""
    chat = _with_template(tokenizer, CHATML_TEMPLATE)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    data = tokenisation.tokenize_pairs(_pairs(["Sky colour?"], ["Blue."]), chat, max_length=16)
    prompt = [
        "<|im_start|>",
        "user",
        "sky",
        "colour",
        "?",
        "<|im_end|>",
        "<|im_start|>",
        "assistant",
    ]
    assert _tokens(chat, data, 0) == [*prompt, "blue", ".", "<|im_end|>"]
    assert _response_tokens(chat, data, 0) == ["blue", ".", "<|im_end|>"]


def test_chat_template_breaking_the_token_prefix_falls_back_to_texts(tokenizer, caplog):
    chat = _with_template(tokenizer, GLUED_TEMPLATE)
    glued = chat.apply_chat_template(
        [{"role": "user", "content": "sky?"}, {"role": "assistant", "content": "yes"}],
        return_dict=False,
    )
    assert "a" not in chat.convert_ids_to_tokens(glued), "the template must glue 'a' and 'yes'"
    with caplog.at_level(logging.WARNING, logger="hfedmoe.platform.data.tokenisation"):
        data = tokenisation.tokenize_pairs(_pairs(["sky?"], ["yes"]), chat, max_length=12)
    assert "1 of 1 pairs" in caplog.text
    assert _tokens(chat, data, 0) == ["q", ":", "sky", "?", "a", "yes", "[SEP]"]
    assert data.prompt_lengths.tolist() == [5]
    assert _response_tokens(chat, data, 0) == ["yes", "[SEP]"]


def test_chat_template_that_does_not_extend_the_prompt_is_rejected(tokenizer):
    chat = _with_template(tokenizer, MISMATCHED_TEMPLATE)
    with pytest.raises(ConfigError, match=r"model\.tokenizer: .* prompt 'sky\?' .*chat_template"):
        tokenisation.tokenize_pairs(_pairs(["sky?"], ["yes"]), chat, max_length=12)


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize(
    ("template", "prefix", "suffix"),
    [
        (None, [], SEPARATOR),
        (TURNS_TEMPLATE, ["<", "user", ">"], ["[SEP]", "<", "assistant", ">"]),
    ],
)
def test_truncation_cuts_the_prompt_end_never_the_response(tokenizer, template, prefix, suffix):
    tok = _with_template(tokenizer, template) if template else tokenizer
    words = [f"word{i}" for i in range(60)]  # "word", "##N": two tokens each
    data = tokenisation.tokenize_pairs(_pairs([" ".join(words)], ["yes no"]), tok, max_length=20)
    room = 20 - len(prefix) - len(suffix) - 3  # response: yes no [SEP]
    kept = tokenizer.convert_ids_to_tokens(
        tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    )
    assert _tokens(tok, data, 0) == [*prefix, *kept[:room], *suffix, "yes", "no", "[SEP]"]
    assert data.prompt_lengths.tolist() == [20 - 3]
    assert _response_tokens(tok, data, 0) == ["yes", "no", "[SEP]"]


@pytest.mark.parametrize("template", [None, TURNS_TEMPLATE])
def test_sparse_long_prompt_is_encoded_whole_when_its_prefix_falls_short(tokenizer, template):
    # Runs of spaces: the character prefix tokenize_pairs encodes first holds too few tokens.
    tok = _with_template(tokenizer, template) if template else tokenizer
    sparse = ("x" + " " * 30) * 200
    data = tokenisation.tokenize_pairs(_pairs([sparse], ["yes"]), tok, max_length=32)
    assert int(data.attention_mask[0].sum()) == 32
    prompt = _tokens(tok, data, 0)[: int(data.prompt_lengths[0])]
    assert prompt.count("x") == 32 - 2 - (5 if template is None else 7)


@pytest.mark.parametrize("template", [None, TURNS_TEMPLATE])
def test_a_response_too_long_for_max_length_is_a_config_error(tokenizer, template):
    tok = _with_template(tokenizer, template) if template else tokenizer
    long_answer = " ".join(["yes"] * 12)
    with pytest.raises(
        ConfigError, match=r"data\.max_length=16: the response 'yes yes .* takes 13 tokens"
    ):
        tokenisation.tokenize_pairs(_pairs(["ok", "why?"], ["fine", long_answer]), tok, 16)


# --------------------------------------------------------------------------- batching


def test_batch_tensors_trims_targets_like_input_ids(tokenizer):
    pairs = _pairs(["a long question with many words in it", "hi", "yo"], ["yes", "no", "ok"])
    data = tokenisation.tokenize_pairs(pairs, tokenizer, max_length=32)
    lengths = data.attention_mask.sum(dim=1)
    batch = tokenisation.batch_tensors(data, np.array([2, 1]))
    assert list(batch) == ["input_ids", "attention_mask", "labels", "targets", "prompt_lengths"]
    width = int(lengths[[1, 2]].max())
    assert width < int(lengths[0]) < 32
    for key in ("input_ids", "attention_mask", "targets"):
        assert torch.equal(batch[key], getattr(data, key)[[2, 1], :width])
    assert batch["prompt_lengths"].tolist() == data.prompt_lengths[[2, 1]].tolist()
    batches = list(tokenisation.iterate_batches(data, np.arange(3), batch_size=2, rng=None))
    assert [b["targets"].shape for b in batches] == [(2, int(lengths[0])), (1, int(lengths[2]))]
    assert (
        torch.cat([b["prompt_lengths"] for b in batches]).tolist() == data.prompt_lengths.tolist()
    )


# --------------------------------------------------------------------------- loading pairs


def test_pairs_from_csv_and_jsonl_files(tmp_path, hf_cache):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text('prompt,response\n"Say hi, please",hi\nCount to 2,"1, 2"\n')
    pairs = instructions.load_instruction_pairs(
        "files", str(csv_path), "train", "prompt", "response"
    )
    assert pairs.prompts == ["Say hi, please", "Count to 2"]
    assert pairs.responses == ["hi", "1, 2"]
    assert pairs.group_names == ["all"] and pairs.groups.tolist() == [0, 0]
    assert not pairs.label_like
    rows = [
        {"instruction": "Add 1 and 2", "output": 3},
        {"instruction": "Capital of France?", "output": "Paris"},
    ]
    jsonl = tmp_path / "jsonl" / "part.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("\n".join(json.dumps(row) for row in rows))
    for source in ("files", "huggingface"):
        pairs = instructions.load_instruction_pairs(
            source, str(jsonl.parent), "train", "instruction", "output"
        )
        assert pairs.prompts == ["Add 1 and 2", "Capital of France?"]
        assert pairs.responses == ["3", "Paris"]


def test_missing_fields_name_the_setting_the_file_and_its_columns(tmp_path, hf_cache):
    path = tmp_path / "pairs.csv"
    path.write_text("question,answer\nwhy?,because\n")
    with pytest.raises(
        ConfigError, match=r"data\.prompt_field='prompt'.*pairs\.csv.*question, answer"
    ):
        instructions.load_instruction_pairs("files", str(path), "train", "prompt", "answer")
    with pytest.raises(ConfigError, match=r"data\.response_field='response'.*question, answer"):
        instructions.load_instruction_pairs("files", str(path), "train", "question", "response")
    path.write_text("question,answer\nwhy?,\n")
    with pytest.raises(ConfigError, match=r"data\.response_field='answer': row 0 .* no value"):
        instructions.load_instruction_pairs("files", str(path), "train", "question", "answer")
    with pytest.raises(FileNotFoundError, match=r"data\.path"):
        instructions.load_instruction_pairs("files", str(tmp_path / "none"), "train", "q", "a")


def test_load_instructions_chooses_topics_or_pairs(tmp_path, hf_cache):
    bbc = instructions.load_instructions(DataConfig())
    assert len(bbc) == 2225 and bbc.label_like and bbc.name == "bbc_news topics"
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("text,label\nstocks fell,markets\ngoal!,football\n")
    topics = instructions.load_instructions(DataConfig(source="files", path=str(labelled)))
    assert topics.label_like and topics.group_names == ["football", "markets"]
    assert topics.responses == ["markets", "football"] and topics.groups.tolist() == [1, 0]
    assert topics.prompts[1].endswith("Answer with one of: football, markets.\n\ngoal!")
    both = tmp_path / "both.csv"
    both.write_text("prompt,response,label\nq,r,x\n")
    pairs = instructions.load_instructions(DataConfig(source="huggingface", path=str(both)))
    assert not pairs.label_like and (pairs.prompts, pairs.responses) == (["q"], ["r"])
    neither = tmp_path / "neither.csv"
    neither.write_text("text,topic\nq,r\n")
    with pytest.raises(ConfigError, match=r"data\.prompt_field='prompt'.*text, topic"):
        instructions.load_instructions(DataConfig(source="files", path=str(neither)))


def test_an_unreachable_hub_dataset_is_a_config_error(hf_cache, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"data\.path nobody/no-such-set: could not load"):
        instructions.load_instruction_pairs(
            "huggingface", "nobody/no-such-set", "train", "prompt", "response"
        )
