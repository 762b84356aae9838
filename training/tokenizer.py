"""The caption tokenizers, two named kinds behind one `Tokenizer` interface (both run on Hugging Face `tokenizers`):

    byte-bpe  byte-level BPE trained on the captions of a data set (`train_tokenizer`), for from-scratch runs
    clip-bpe  OpenAI CLIP's 49,408-token BPE (`clip_tokenizer`), for released CLIP models: the same ids as
              open_clip's `tokenize` (CLIP's cleaning in Python, then the vendored merges in `assets/`)

byte-bpe: every caption becomes exactly `context_length` ids: start-of-text, the BPE tokens, end-of-text, then
padding with id 0. Captions too long are truncated so that end-of-text is still the last token. Text is normalised
(Unicode NFKC, lowercase, whitespace collapsed) before it is split. Id 0 is padding, id 1 start-of-text, and
end-of-text is the highest id of the vocabulary, which is how the text tower finds it (`tokens.argmax(-1)`, as in CLIP).

clip-bpe: text is cleaned as CLIP does (`ftfy.fix_text`, HTML entities unescaped twice, whitespace collapsed,
lowercased) and split into words with CLIP's pattern in Python (`clip_words`); the backend byte-encodes and merges
them; words end in `</w>`; start/end of text are 49406/49407 (the highest id), padding is id 0, and a caption too long
keeps its first 75 tokens and the end token.

The whole tokenizer, padding and truncation included, is one `tokenizer.json`, saved beside every checkpoint so that a
model is never read with the wrong vocabulary; its word-end marker says which kind it is (`Tokenizer.kind`).
"""

from __future__ import annotations

import functools
import gzip
import html
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import regex
import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

PAD, START_OF_TEXT, END_OF_TEXT = "<pad>", "<start_of_text>", "<end_of_text>"
FILE_NAME = "tokenizer.json"
CLIP_BPE_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
"""OpenAI CLIP's merges as open_clip ships them (MIT, see assets/bpe_simple_vocab_16e6.LICENSE)."""
CLIP_PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
"""CLIP's word pattern (open_clip's SimpleTokenizer); text is lowercased before it is split."""
TokenizerKind = Literal["byte-bpe", "clip-bpe"]


class Tokenizer:
    """Captions -> (B, context_length) LongTensor of token ids. Build with `train_tokenizer`, `clip_tokenizer` or
    `Tokenizer.load`; `kind` says which of the two it is."""

    pad_id = 0

    def __init__(self, backend: HFTokenizer):
        self.backend = backend
        padding = backend.padding
        # CLIP's BPE marks word ends ("a</w>"); the per-dataset byte-level BPE marks word starts instead
        self.kind: TokenizerKind = "clip-bpe" if getattr(backend.model, "end_of_word_suffix", None) else "byte-bpe"
        if padding is None or padding.get("length") is None or padding.get("pad_id") != self.pad_id:
            raise ValueError("not a clipforge tokenizer: expected fixed-length padding with id 0")
        if self.kind == "byte-bpe" and backend.token_to_id(PAD) != self.pad_id:
            raise ValueError("not a clipforge tokenizer: expected <pad> as id 0")
        self.context_length: int = padding["length"]
        self.start_of_text_id: int = backend.token_to_id(START_OF_TEXT)
        self.eot_id: int = backend.token_to_id(END_OF_TEXT)
        if self.eot_id != backend.get_vocab_size() - 1:
            raise ValueError("not a clipforge tokenizer: end-of-text must be the highest id")

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids run from 0 to vocab_size - 1 = eot_id)."""
        return self.backend.get_vocab_size()

    def encode_batch(self, texts: list[str]) -> torch.Tensor:
        """list of B captions -> (B, context_length) int64 ids."""
        if self.kind == "clip-bpe":  # cleaned and split into words here, see `clip_words`
            encodings = self.backend.encode_batch([clip_words(t) for t in texts], is_pretokenized=True)
        else:
            encodings = self.backend.encode_batch(list(texts))
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def encode(self, text: str) -> torch.Tensor:
        """One caption -> (context_length,) int64 ids."""
        return self.encode_batch([text])[0]

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Ids -> normalised text, special tokens and padding dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        ids = [i for i in ids if i != self.pad_id] if self.kind == "clip-bpe" else ids  # clip-bpe pads with "!"
        return self.backend.decode(ids, skip_special_tokens=True).strip()

    def save(self, directory: str | Path) -> Path:
        """Write `directory/tokenizer.json` (the directory is created) and return its path."""
        path = Path(directory) / FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a tokenizer saved by `save` from `directory` (or from the tokenizer.json path itself)."""
        path = Path(directory)
        if path.is_dir():
            path = path / FILE_NAME
        return cls(HFTokenizer.from_file(str(path)))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 49152, context_length: int = 77) -> Tokenizer:
    """Learn byte-level BPE merges from `texts` (any iterable of captions, read once).

    The vocabulary holds at most `vocab_size` ids (the paper's 49,152 by default): the 256 bytes, the learned
    merges and the three special tokens; a small corpus can yield fewer.
    """
    if vocab_size < 260:
        raise ValueError(f"vocab_size must be at least 260 (256 bytes and 3 special tokens), got {vocab_size}")
    if context_length < 2:
        raise ValueError(f"context_length must leave room for start- and end-of-text, got {context_length}")
    backend = HFTokenizer(models.BPE())
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # "cat" in any position is one token
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # end-of-text is added last, below, so that it gets the highest id
        special_tokens=[PAD, START_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable, so nothing is unknown
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.add_special_tokens([END_OF_TEXT])
    eot_id = backend.token_to_id(END_OF_TEXT)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{START_OF_TEXT} $A {END_OF_TEXT}",
        special_tokens=[(START_OF_TEXT, backend.token_to_id(START_OF_TEXT)), (END_OF_TEXT, eot_id)],
    )
    backend.enable_truncation(max_length=context_length)  # leaves room for the two special tokens
    backend.enable_padding(pad_id=Tokenizer.pad_id, pad_token=PAD, length=context_length)
    return Tokenizer(backend)


# ---------------------------------------------------------------------------------------------------------------------
# clip-bpe


def clip_clean(text: str) -> str:
    """CLIP's text cleaning, exactly as open_clip's `tokenize` does it: ftfy, HTML unescaped twice, whitespace
    collapsed (Python's notion of whitespace), lowercased."""
    import ftfy  # imported here: only clip-bpe needs it

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def clip_words(text: str) -> list[str]:
    """A caption cleaned and split into CLIP's words (the `regex` module's Unicode tables, as open_clip's: the
    `tokenizers` library's own regex engine knows fewer letters, e.g. none added in Unicode 16)."""
    return _clip_pattern().findall(clip_clean(text))


@functools.cache
def _clip_pattern() -> regex.Pattern:
    return regex.compile(CLIP_PATTERN, regex.IGNORECASE)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the order CLIP's first 256 ids follow)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (49,408 ids) and its 48,894 merges, built from the vendored merges file as CLIP does."""
    lines = gzip.open(CLIP_BPE_FILE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    characters = list(_bytes_to_unicode().values())
    tokens = [*characters, *(c + "</w>" for c in characters), *("".join(m) for m in merges), START_OF_TEXT,
              END_OF_TEXT]
    return {token: index for index, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer(context_length: int = 77) -> Tokenizer:
    """OpenAI CLIP's tokenizer (`clip-bpe`): start 49406, end 49407 (the highest id), padding with id 0."""
    vocab, merges = clip_vocabulary()
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                     end_of_word_suffix="</w>", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # words: clip_words
    backend.decoder = decoders.Sequence([decoders.Replace("</w>", "\u0120"), decoders.ByteLevel()])  # </w> -> " "
    backend.add_special_tokens([START_OF_TEXT, END_OF_TEXT])  # already in the vocabulary: keeps ids 49406, 49407
    backend.post_processor = processors.TemplateProcessing(
        single=f"{START_OF_TEXT} $A {END_OF_TEXT}",
        special_tokens=[(START_OF_TEXT, vocab[START_OF_TEXT]), (END_OF_TEXT, vocab[END_OF_TEXT])],
    )
    backend.enable_truncation(max_length=context_length)
    backend.enable_padding(pad_id=Tokenizer.pad_id, pad_token="!", length=context_length)
    return Tokenizer(backend)

