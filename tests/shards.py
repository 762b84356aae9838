"""Small WebDataset datasets written directly (no download), in the layout `clipforge ingest` produces."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from pipeline.manifest import IngestSummary, ShardInfo, tar_sample_offsets, write_manifest
from training.tokenizer import train_tokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 30),
       "purple": (140, 50, 170), "orange": (245, 140, 20), "white": (250, 250, 250), "black": (20, 20, 20)}


def _jpeg(colour: str, index: int, size: int = 40) -> bytes:
    image = Image.new("RGB", (size, size), RGB[colour])
    for x in range(index % 7, size, 7):  # a per-sample pattern, so images differ within a colour
        for y in range(0, size, 5):
            image.putpixel((x, y), (index * 37 % 256, index * 91 % 256, index * 53 % 256))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def caption_list(colour: str, number: int) -> list[str]:
    """The `captions` of sample `number` in `write_dataset(..., caption_lists=True)`: its caption first."""
    return [f"a {colour} square number {number}", f"{colour} square {number}", f"square {number} in {colour}"]


def write_dataset(folder: Path, sizes: list[int], corrupt: set[int] = frozenset(), with_index: bool = True,
                  caption_lists: bool = False) -> Path:
    """Shards of `sizes[i]` samples each, keys "SSSSSIIII", captions "a <colour> square number <n>".

    `caption_lists=True` adds a json field `captions` (three captions, stored as ingest stores a list column: JSON text).

    Samples whose global number is in `corrupt` get bytes that are not an image. `with_index=False` leaves the per-shard
    sample offsets out of the manifest, as in datasets ingested before they existed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shards, number = [], 0
    for shard, size in enumerate(sizes):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(size):
                key = f"{shard:05d}{index:04d}"
                colour = COLOURS[number % len(COLOURS)]
                image = b"not a jpeg at all" if number in corrupt else _jpeg(colour, number)
                _add(tar, f"{key}.jpg", image)
                _add(tar, f"{key}.txt", f"a {colour} square number {number}".encode())
                fields = {"colour": colour, "number": number}
                if caption_lists:
                    fields["captions"] = json.dumps(caption_list(colour, number))
                _add(tar, f"{key}.json", json.dumps(fields).encode())
                number += 1
        with open(path, "rb") as f:
            offsets = tar_sample_offsets(f) if with_index else None
        shards.append(ShardInfo(shard=shard, path=path.name, samples=size, attempted=size, failed=0,
                                bytes=path.stat().st_size, offsets=offsets))
    summary = IngestSummary(input_rows=number, successes=number, shards=len(shards),
                            bytes=sum(s.bytes for s in shards))
    write_manifest(str(folder), shards, summary)
    return folder


def write_tokenizer(folder: Path, context_length: int = 32, vocab_size: int = 400) -> Path:
    captions = [f"a {c} square number {n}" for n in range(200) for c in COLOURS[:1]] + COLOURS
    train_tokenizer(captions, vocab_size=vocab_size, context_length=context_length).save(folder)
    return folder


def write_pairs(folder: Path, shards: list[list[tuple[bytes, str]]]) -> Path:
    """A dataset of given (image bytes, caption) pairs, shard by shard; keys "SSSSSIIII"."""
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for shard, pairs in enumerate(shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index, (image, caption) in enumerate(pairs):
                _add(tar, f"{shard:05d}{index:04d}.jpg", image)
                _add(tar, f"{shard:05d}{index:04d}.txt", caption.encode())
        with open(path, "rb") as f:
            offsets = tar_sample_offsets(f)
        infos.append(ShardInfo(shard=shard, path=path.name, samples=len(pairs), attempted=len(pairs), failed=0,
                               bytes=path.stat().st_size, offsets=offsets))
    total = sum(len(p) for p in shards)
    write_manifest(str(folder), infos, IngestSummary(input_rows=total, successes=total, shards=len(infos)))
    return folder
