"""The caption tokenizer: fixed-length ids with start, end-of-text last, padding 0, and a lossless save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.tokenizer import Tokenizer, train_tokenizer

CAPTIONS = [f"A {size} {colour} {thing}, seen from {side}"
            for size in ("small", "big") for colour in ("red", "green", "blue")
            for thing in ("face", "heart", "vampire") for side in ("the left", "above")]
CAPTIONS += ["😀 grinning face", "vampire: medium-dark skin tone", "flag: Côte d’Ivoire"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(CAPTIONS, vocab_size=400, context_length=24)


def test_batch_is_fixed_length_with_start_end_and_zero_padding(tokenizer):
    tokens = tokenizer.encode_batch(["a red heart", "😀 grinning face", ""])
    assert tokens.dtype == torch.long and tokens.shape == (3, 24)
    assert (tokens[:, 0] == tokenizer.start_of_text_id).all()
    ends = (tokens == tokenizer.eot_id).int().argmax(dim=1)
    for row, end in zip(tokens, ends.tolist()):
        assert (row[end + 1:] == 0).all() and (row[1:end] != 0).all()
    assert ends[2] == 1  # the empty caption is start, end, padding
    assert (tokens.argmax(dim=1) == ends).all()  # the model finds end-of-text as the highest id


def test_truncation_keeps_end_of_text_last(tokenizer):
    tokens = tokenizer.encode(" ".join(["vampire"] * 50))
    assert tokens.shape == (24,)
    assert tokens[-1] == tokenizer.eot_id and (tokens != 0).all()


def test_text_is_normalised(tokenizer):
    assert torch.equal(tokenizer.encode("A  RED\tHeart "), tokenizer.encode("a red heart"))
    assert tokenizer.decode(tokenizer.encode("A Big Green Face")) == "a big green face"


def test_any_text_round_trips_through_bytes(tokenizer):
    for text in ["😀 grinning face", "flag: côte d’ivoire", "unseen wörds ☃"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vocabulary_size_and_end_of_text_is_highest_id(tokenizer):
    assert tokenizer.vocab_size <= 400
    assert tokenizer.eot_id == tokenizer.vocab_size - 1
    assert train_tokenizer(CAPTIONS * 20, vocab_size=300).vocab_size == 300  # enough text: exactly the size asked
    with pytest.raises(ValueError):
        train_tokenizer(CAPTIONS, vocab_size=100)


def test_defaults_are_the_papers():
    tokenizer = train_tokenizer(iter(CAPTIONS))  # any iterable, read once
    assert tokenizer.context_length == 77
    assert tokenizer.encode_batch(["a red heart"]).shape == (1, 77)


def test_save_and_load_give_the_same_ids(tokenizer, tmp_path: Path):
    path = tokenizer.save(tmp_path / "checkpoint")
    assert path.name == "tokenizer.json"
    loaded = Tokenizer.load(tmp_path / "checkpoint")
    assert (loaded.vocab_size, loaded.eot_id, loaded.context_length) == \
        (tokenizer.vocab_size, tokenizer.eot_id, tokenizer.context_length)
    assert torch.equal(loaded.encode_batch(CAPTIONS), tokenizer.encode_batch(CAPTIONS))
