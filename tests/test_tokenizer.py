"""The caption tokenizer: fixed-length ids with start, end-of-text last, padding 0, and a lossless save/load."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from training.tokenizer import Tokenizer, clip_tokenizer, train_tokenizer

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


# ---------------------------------------------------------------------------------------------------------------------
# clip-bpe: OpenAI CLIP's tokenizer, checked id for id against open_clip's


def _generated_captions(count: int, seed: int = 0) -> list[str]:
    """Unicode, emoji, punctuation, HTML entities, mojibake, odd whitespace and captions far past 77 tokens."""
    rng = random.Random(seed)
    pieces = ["a", "the", "grinning", "face", "with", "big", "eyes", "don't", "it's", "we'll", "rock'n'roll",
              "😀", "🧛🏾", "👨‍👩‍👧", "❤️", "🇨🇮", "#️⃣", "flag:", "Côte", "d’Ivoire", "naïve", "café", "Straße", "İstanbul",
              "ΣΊΣΥΦΟΣ", "東京", "日本語のテキスト", "한국어", "русский", "עברית", "العربية", "हिन्दी", "ไทย", "ﬁne", "ｆｕｌｌ",
              "“quoted”", "‘single’", "—", "…", "&amp;", "&lt;b&gt;", "&amp;amp;", "&#39;", "Ã©", "â€™", "\u00a0",
              "\t", "\n", "\u2003", "\u200b", "\x1c", "3.14", "1,000,000", "2026-12-01", "$5", "100%", "C++", "e-mail",
              "@user", "#tag", "http://example.com/a?b=c", "!!!", "?!", "...", "(x)", "[y]", "{z}", "<tag>", "ALL CAPS",
              "MiXeD", "x²", "½", "Ⅻ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0001f9d1\u200d\U0001f9b0", "\ufe0f", "'s", "'", "''", "a'b"]
    captions = []
    for index in range(count):
        if index % 10 == 0:  # very long: hundreds of tokens, truncated to 77 with the end token kept
            words = rng.choices(pieces, k=rng.randint(80, 400))
        elif index % 10 == 1:  # random code points from the whole Basic Multilingual Plane and the emoji planes
            words = ["".join(chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0x1F300, 0x1FAFF)]))
                             for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 6))]
        elif index % 10 == 2:  # punctuation runs
            words = ["".join(rng.choices("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", k=rng.randint(1, 8)))
                     for _ in range(rng.randint(1, 8))]
        else:
            words = rng.choices(pieces, k=rng.randint(1, 12))
        captions.append(rng.choice([" ", "", "  "]).join(words))
    return captions


def test_clip_bpe_gives_open_clips_ids_on_10000_captions():
    from pipeline.catalog import _fluent_drawings, _list_emoji, _openmoji_drawings
    from tests.references import import_open_clip

    open_clip = import_open_clip()
    bundled = [entry["caption"] for drawings in (_openmoji_drawings, _fluent_drawings)
               for entry in _list_emoji(drawings()[0])[0]]  # both bundled catalogs' captions
    captions = bundled + _generated_captions(10_000 - len(bundled) + 500)
    assert len(captions) >= 10_000
    ours = clip_tokenizer().encode_batch(captions)
    expected = open_clip.tokenize(captions)
    mismatched = [captions[i] for i in (ours != expected).any(dim=1).nonzero().flatten().tolist()]
    assert not mismatched, f"{len(mismatched)} captions differ, e.g. {mismatched[:3]!r}"
    assert (ours[:, -1] == clip_tokenizer().eot_id).sum() >= 100  # long captions were truncated, end token kept


def test_clip_bpe_layout_and_round_trip(tmp_path: Path):
    tokenizer = clip_tokenizer()
    tokens = tokenizer.encode("a grinning face")
    assert tokens[:6].tolist() == [49406, 320, 709, 4415, 1710, 49407] and (tokens[6:] == 0).all()
    assert (tokenizer.kind, tokenizer.vocab_size, tokenizer.context_length) == ("clip-bpe", 49408, 77)
    assert tokenizer.decode(tokens) == "a grinning face"
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.kind == "clip-bpe" and torch.equal(loaded.encode("Café &amp; ﬁne"), tokenizer.encode("Café &amp; ﬁne"))
    assert Tokenizer.load(train_tokenizer(CAPTIONS, vocab_size=400).save(tmp_path / "b").parent).kind == "byte-bpe"
