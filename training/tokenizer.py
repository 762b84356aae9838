"""The caption tokenizer: byte-level BPE (Hugging Face `tokenizers`) trained on the captions of a data set.

Every caption becomes exactly `context_length` ids: start-of-text, the BPE tokens, end-of-text, then padding with id
0. Captions too long are truncated so that end-of-text is still the last token. Text is normalised (Unicode NFKC,
lowercase, whitespace collapsed) before it is split. Id 0 is padding, id 1 start-of-text, and end-of-text is the
highest id of the vocabulary, which is how the text tower finds it (`tokens.argmax(-1)`, as in CLIP).

The whole tokenizer, normalisation, padding and truncation included, is one `tokenizer.json`, saved beside every
checkpoint so that a model is never read with the wrong vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

PAD, START_OF_TEXT, END_OF_TEXT = "<pad>", "<start_of_text>", "<end_of_text>"
FILE_NAME = "tokenizer.json"


class Tokenizer:
    """Captions -> (B, context_length) LongTensor of token ids. Build with `train_tokenizer` or `Tokenizer.load`."""

    pad_id = 0
    start_of_text_id = 1

    def __init__(self, backend: HFTokenizer):
        self.backend = backend
        padding = backend.padding
        if padding is None or padding.get("length") is None or backend.token_to_id(PAD) != self.pad_id:
            raise ValueError("not a clipforge tokenizer: expected fixed-length padding with <pad> as id 0")
        self.context_length: int = padding["length"]
        self.eot_id: int = backend.token_to_id(END_OF_TEXT)
        if self.eot_id != backend.get_vocab_size() - 1:
            raise ValueError("not a clipforge tokenizer: end-of-text must be the highest id")

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids run from 0 to vocab_size - 1 = eot_id)."""
        return self.backend.get_vocab_size()

    def encode_batch(self, texts: list[str]) -> torch.Tensor:
        """list of B captions -> (B, context_length) int64 ids."""
        encodings = self.backend.encode_batch(list(texts))
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def encode(self, text: str) -> torch.Tensor:
        """One caption -> (context_length,) int64 ids."""
        return self.encode_batch([text])[0]

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Ids -> normalised text, special tokens and padding dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
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
        special_tokens=[(START_OF_TEXT, Tokenizer.start_of_text_id), (END_OF_TEXT, eot_id)],
    )
    backend.enable_truncation(max_length=context_length)  # leaves room for the two special tokens
    backend.enable_padding(pad_id=Tokenizer.pad_id, pad_token=PAD, length=context_length)
    return Tokenizer(backend)
