"""Tests for dsv3.tokenizer: the self-built DeepSeek-V3-style tokenizer."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dsv3.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    USER_TOKEN,
    filler_token,
    write_tokenizer,
)

VOCAB_SIZES = (512, 129280)

ROUND_TRIP_TEXTS = (
    "Hello, world!",
    "The weather is cold today; the soup is hot.",
    "  two leading spaces\n\ttab, then\n\nblank line\r\nand CRLF  ",
    "Grüße aus Köln, 東京の天気, naïve café, ∑ x² ≤ π, emoji 🙂👍🏽",
    "digits 0123456789 and symbols <>{}[]|\\/~`^@#$%&*",
)


@pytest.fixture(scope="module", params=VOCAB_SIZES, ids=lambda v: f"vocab{v}")
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, float]:
    """(out_dir, vocab_size, seconds write_tokenizer took)."""
    vocab_size: int = request.param
    out_dir = tmp_path_factory.mktemp(f"tok{vocab_size}")
    start = time.perf_counter()
    write_tokenizer(out_dir, vocab_size)
    return out_dir, vocab_size, time.perf_counter() - start


@pytest.fixture(scope="module")
def tok(written: tuple[Path, int, float]) -> PreTrainedTokenizerBase:
    out_dir, _, _ = written
    return AutoTokenizer.from_pretrained(str(out_dir))


@pytest.fixture(scope="module")
def vocab_size(written: tuple[Path, int, float]) -> int:
    return written[1]


def test_files_written(written: tuple[Path, int, float]) -> None:
    out_dir, _, seconds = written
    # Only the two files; no temp files left behind by the atomic writes.
    assert sorted(p.name for p in out_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert config["add_bos_token"] is True
    assert config["clean_up_tokenization_spaces"] is False
    assert isinstance(config["model_max_length"], int)
    assert isinstance(config["chat_template"], str)
    # Budget from the brief: the biggest config (129280) must stay small and fast.
    assert (out_dir / "tokenizer.json").stat().st_size < 8 * 1024 * 1024
    assert seconds < 3.0


def test_loads_with_full_vocab(tok: PreTrainedTokenizerBase, vocab_size: int) -> None:
    assert tok.is_fast
    assert len(tok) <= vocab_size
    # Padded with fillers, so the tokenizer covers exactly the model's id range.
    assert len(tok) == vocab_size


def test_special_token_ids(tok: PreTrainedTokenizerBase) -> None:
    assert tok.bos_token == BOS_TOKEN and tok.bos_token_id == 0
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == 1
    assert tok.pad_token == PAD_TOKEN
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]


def test_special_tokens_are_single_ids(tok: PreTrainedTokenizerBase) -> None:
    for token in SPECIAL_TOKENS:
        assert tok.encode(token, add_special_tokens=False) == [tok.convert_tokens_to_ids(token)]
    # Also when glued to surrounding text.
    ids = tok.encode(f"a{USER_TOKEN}b{ASSISTANT_TOKEN}c{EOS_TOKEN}", add_special_tokens=False)
    for token in (USER_TOKEN, ASSISTANT_TOKEN, EOS_TOKEN):
        assert ids.count(tok.convert_tokens_to_ids(token)) == 1


def test_encode_adds_single_bos(tok: PreTrainedTokenizerBase) -> None:
    ids = tok("The weather is cold.")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1
    assert tok.encode("x", add_special_tokens=False)[0] != tok.bos_token_id


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok: PreTrainedTokenizerBase, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == BOS_TOKEN + text


def test_chat_template_single_user_turn(tok: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"{BOS_TOKEN}{USER_TOKEN}hi{ASSISTANT_TOKEN}"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == [0, 2, *tok.encode("hi", add_special_tokens=False), 3]


def test_chat_template_two_turns_with_system(tok: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Will it rain?"},
        {"role": "assistant", "content": "Probably, take an umbrella."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    expected = (
        f"{BOS_TOKEN}You are a helpful assistant."
        f"{USER_TOKEN}Will it rain?"
        f"{ASSISTANT_TOKEN}Probably, take an umbrella.{EOS_TOKEN}"
        f"{USER_TOKEN}And tomorrow?"
        f"{ASSISTANT_TOKEN}"
    )
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == expected
    without_prompt = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert without_prompt == expected.removesuffix(ASSISTANT_TOKEN)

    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    bos, eos, user, assistant = 0, 1, 2, 3
    assert ids == [
        bos,
        *enc("You are a helpful assistant."),
        user,
        *enc("Will it rain?"),
        assistant,
        *enc("Probably, take an umbrella."),
        eos,
        user,
        *enc("And tomorrow?"),
        assistant,
    ]
    assert tok.decode(ids) == expected


def test_chat_template_rejects_unknown_role(tok: PreTrainedTokenizerBase) -> None:
    with pytest.raises(Exception, match="Unsupported chat role"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}], tokenize=False)


def test_every_id_in_range_decodes(tok: PreTrainedTokenizerBase, vocab_size: int) -> None:
    rng = random.Random(0)
    sample = sorted(
        {*range(0, 600), *range(0, vocab_size, 997), vocab_size - 1, *rng.sample(range(vocab_size), 500)}
        & set(range(vocab_size))
    )
    for token_id in sample:
        text = tok.decode([token_id])
        assert isinstance(text, str) and text, token_id
    assert isinstance(tok.decode(sample), str)


def test_fillers_decode_to_their_id_and_are_never_encoded(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 129280)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    for token_id in (5000, 100000, 129279):
        assert tok.decode([token_id]) == f"<｜tok_{token_id}｜>"
        assert token_id not in tok.encode(filler_token(token_id))
    assert tok.decode([5000, 6000]) == "<｜tok_5000｜><｜tok_6000｜>"


def test_custom_bos_eos_ids(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 600, bos_token_id=598, eos_token_id=599)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 600
    assert (tok.bos_token_id, tok.eos_token_id) == (598, 599)
    # The other specials take the lowest free ids.
    assert tok.convert_tokens_to_ids([USER_TOKEN, ASSISTANT_TOKEN, PAD_TOKEN]) == [0, 1, 2]
    assert tok.encode("hi")[0] == 598
    assert tok.decode(tok.encode("round trip\n"), skip_special_tokens=True) == "round trip\n"


def test_rewrite_is_deterministic(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 4096)
    first = (tmp_path / "tokenizer.json").read_bytes()
    write_tokenizer(tmp_path, 4096)
    assert (tmp_path / "tokenizer.json").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize(
    ("vocab_size", "bos", "eos"),
    [(100, 0, 1), (512, 0, 0), (512, 0, 512), (512, -1, 1)],
)
def test_invalid_arguments(tmp_path: Path, vocab_size: int, bos: int, eos: int) -> None:
    with pytest.raises(ValueError):
        write_tokenizer(tmp_path, vocab_size, bos_token_id=bos, eos_token_id=eos)
