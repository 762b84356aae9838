"""The training data loader: WebDataset shards -> shuffled, augmented, tokenised batches, resumable mid-epoch.

Each epoch is planned from the ingest manifest (exact sample counts, never a guess):
1. the shards are shuffled by (seed, epoch) and laid end to end into one virtual sequence of N samples;
2. every training process (rank) takes a contiguous slice of `steps_per_epoch * local_batch` samples
   (steps_per_epoch = N // global_batch; the few samples past the last whole global batch wait for another epoch);
3. inside a rank, loader worker `w` produces batches w, w + W, w + 2W, ... (the order in which torch's DataLoader
   reads its workers), from its own contiguous sub-slice, through a shuffle buffer seeded by (seed, epoch, rank, w).
So each sample is read by exactly one loader worker of one rank per epoch, and the whole stream is a pure function of
(seed, epoch, world size, batch size, loader workers). Resuming at step s of an epoch skips, in each worker, the
samples of its batches before s without decoding them, so no sample is repeated or lost.

Each sample's random choices come from a generator seeded by (seed, epoch, sample key): its crop box, its style draw
(`training.transforms.style_draw`, when augmentations are on) and, where its json holds a list of captions
(`caption_field`), which caption it is read with this epoch. A resumed or re-run epoch repeats them exactly.

Corrupt samples (an image that does not decode) are skipped and counted in each batch's `skipped`; a worker short
of samples at the end of its slice because of them wraps around to the start of its slice (counted in `padded`).

Feeding a GPU: one DataLoader serves all the epochs of a run (`num_epochs`), so its processes live across epochs and
the next epoch's first batches are read while the last ones of this epoch train; worker roles are rotated per epoch so
that torch's round-robin still yields the steps in order. Processes hand over uint8 images (normalised on the device
with their random crop boxes, cut, resized and normalised on the device by `training.transforms.device_crops`),
into pinned memory when asked. A segment that starts inside a shard reads only
its own bytes: the manifest's per-shard sample offsets give its byte range, fetched in ranged reads through one
filesystem per process (old manifests without offsets: local shards are indexed on first use by reading their tar
headers; remote ones are read from the start as before).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds

from pipeline import storage
from pipeline.manifest import Manifest, tar_sample_offsets
from pipeline.shards import tar_samples
from pipeline.storage import StorageConfig
from training.tokenizer import Tokenizer
from training.transforms import style_draw, train_crop


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard, in tar order; bytes [first_byte, end_byte) of it when the shard is indexed."""

    url: str
    start: int
    stop: int
    first_byte: int | None = None
    end_byte: int | None = None


@dataclass(frozen=True)
class LoaderPlan:
    """What one loader worker of one rank reads in one epoch."""

    segments: tuple[Segment, ...]
    batches: int  # batches this worker yields in the whole epoch
    skip_batches: int  # of which this many were already consumed before a resume
    seed: int


def steps_per_epoch(manifest: Manifest, global_batch: int) -> int:
    if manifest.num_samples == 0:
        raise ValueError(f"{manifest.location} holds no samples: nothing to train on")
    steps = manifest.num_samples // global_batch
    if steps == 0:
        raise ValueError(f"{manifest.location} holds {manifest.num_samples} samples, fewer than one global batch "
                         f"of {global_batch}: lower the batch size")
    return steps


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def plan_epoch(manifest: Manifest, *, seed: int, epoch: int, rank: int, world_size: int, local_batch: int,
               loader_workers: int, start_step: int = 0, yielded_before: int = 0) -> list[LoaderPlan]:
    """The plan of every loader worker of `rank` for `epoch`, resuming after `start_step` steps of that epoch.

    Loader worker j of the returned list serves the batches of role (j + start_step - yielded_before) % W, so that
    torch's DataLoader, which reads its workers round-robin starting at worker 0 and has already yielded
    `yielded_before` batches of earlier epochs, yields step start_step of this epoch next.
    """
    shards = [s for s in manifest.shards if s.samples > 0]
    random.Random(_seed(seed, epoch, "shards")).shuffle(shards)
    steps = steps_per_epoch(manifest, world_size * local_batch)
    workers = max(1, loader_workers)

    # the virtual sequence: (cumulative start, shard) for each shard in epoch order
    starts, total = [], 0
    for shard in shards:
        starts.append(total)
        total += shard.samples

    def segments(begin: int, end: int) -> tuple[Segment, ...]:
        found = []
        for shard_start, shard in zip(starts, shards):
            lo, hi = max(begin, shard_start) - shard_start, min(end, shard_start + shard.samples) - shard_start
            if lo < hi:
                indexed = shard.offsets is not None and len(shard.offsets) == shard.samples + 1
                found.append(Segment(storage.join(manifest.location, shard.path), lo, hi,
                                     shard.offsets[lo] if indexed else None, shard.offsets[hi] if indexed else None))
        return tuple(found)

    role_batches = [len(range(role, steps, workers)) for role in range(workers)]
    plans_by_role = []
    cursor = rank * steps * local_batch
    for role in range(workers):
        size = role_batches[role] * local_batch
        consumed = len(range(role, min(start_step, steps), workers))
        plans_by_role.append(LoaderPlan(segments(cursor, cursor + size), role_batches[role], consumed,
                                        _seed(seed, epoch, rank, role)))
        cursor += size
    return [plans_by_role[(j + start_step - yielded_before) % workers] for j in range(workers)]


_FILESYSTEMS: dict[tuple, tuple[int, object]] = {}
_LOCAL_OFFSETS: dict[str, list[int]] = {}


def _filesystem(url: str, config: StorageConfig | None):
    """`storage.filesystem`, created once per process (per kind of location) and reused for every segment."""
    key = (storage.is_remote(url), config)
    pid, fs = _FILESYSTEMS.get(key, (None, None))
    if pid != os.getpid():  # a forked loader process never reuses its parent's client
        fs = storage.filesystem(url, config)[0]
        _FILESYSTEMS[key] = (os.getpid(), fs)
    return fs, url[len(storage.S3_SCHEME):].rstrip("/") if storage.is_remote(url) else storage.absolute(url)


class ByteRange(io.RawIOBase):
    """Bytes [begin, end) of a file, fetched in ranged reads of at most `chunk` bytes (one GET each on S3)."""

    def __init__(self, fs, path: str, begin: int, end: int, chunk: int = 8 << 20):
        super().__init__()
        self.fs, self.path, self.position, self.end, self.chunk = fs, path, begin, end, chunk
        self.pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.pending:
            if self.position >= self.end:
                return 0
            stop = min(self.position + self.chunk, self.end)
            self.pending = memoryview(self.fs.cat_file(self.path, start=self.position, end=stop))
            self.position = stop
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


def _byte_range(segment: Segment, fs, path: str) -> tuple[int, int] | None:
    """Where the segment's samples lie in its shard: from the manifest, or by indexing a local shard once."""
    if segment.first_byte is not None:
        return segment.first_byte, segment.end_byte
    if segment.start == 0 or storage.is_remote(segment.url):
        return None  # reading from the start costs nothing extra, or indexing would read the whole remote shard
    if path not in _LOCAL_OFFSETS:
        with fs.open(path, "rb") as stream:
            _LOCAL_OFFSETS[path] = tar_sample_offsets(stream)  # headers only: the data is seeked over
    offsets = _LOCAL_OFFSETS[path]
    return (offsets[segment.start], offsets[segment.stop]) if segment.stop < len(offsets) else None


def _read_segment(segment: Segment, config: StorageConfig | None, errors: list[Exception]) -> Iterator[dict]:
    """Raw samples ({"__key__", "jpg", "txt", ...} bytes) of one segment; nothing decoded."""
    fs, path = _filesystem(segment.url, config)

    def note(err: Exception) -> bool:
        errors.append(err)
        return True  # keep going

    byte_range = _byte_range(segment, fs, path)
    if byte_range is not None:  # only the segment's own bytes, starting at its first sample
        stream, first = ByteRange(fs, path, *byte_range), segment.start
    else:
        stream, first = fs.open(path, "rb"), 0
    with stream:
        for index, sample in enumerate(tar_samples(stream, segment.url, note), start=first):
            if index >= segment.stop:
                return
            if index >= segment.start:
                yield sample


def _shuffled(samples: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(len(buffer))
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def sample_captions(sample: dict, caption_field: str | None) -> list[str]:
    """A sample's captions: the list in its json's `caption_field` (a list, or the JSON text of one as ingest stores
    a list column) where it has one, else its txt alone."""
    listed = json.loads(sample["json"]).get(caption_field) if caption_field and "json" in sample else None
    if isinstance(listed, str):
        listed = json.loads(listed) if listed.startswith("[") else [listed]
    return [str(c) for c in listed] if listed else [sample["txt"].decode("utf-8")]


class ShardBatches(torch.utils.data.IterableDataset):
    """Yields dicts {images (B, 3, S, S) uint8, crops (B, 4) int32, tokens (B, T) int64, keys [B], skipped, padded}
    for one or more epochs (and style (B, 7) float32 when `augment` names any); `training.transforms.device_crops(
    images, crops, S, style)` gives the model's input.

    `plans[i]` holds the loader-worker plans of epoch `epochs[i]`; each worker runs its plan of every epoch in turn.
    """

    def __init__(self, plans: list[list[LoaderPlan]], epochs: list[int], *, local_batch: int, image_size: int,
                 tokenizer_path: str, shuffle_buffer: int, crop_scale: tuple[float, float], seed: int,
                 augment: tuple[str, ...] = (), caption_field: str | None = None,
                 storage_config: StorageConfig | None = None):
        super().__init__()
        self.plans, self.epochs, self.local_batch, self.image_size = plans, epochs, local_batch, image_size
        self.tokenizer_path, self.shuffle_buffer, self.crop_scale = tokenizer_path, shuffle_buffer, crop_scale
        self.seed, self.augment, self.caption_field, self.storage_config = seed, augment, caption_field, storage_config

    def _raw(self, plan: LoaderPlan, errors: list[Exception]) -> Iterator[dict]:
        def stream() -> Iterator[dict]:
            for segment in plan.segments:
                yield from _read_segment(segment, self.storage_config, errors)

        yield from _shuffled(stream(), self.shuffle_buffer, random.Random(plan.seed))

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        tokenizer = Tokenizer.load(self.tokenizer_path)
        for epoch, plans in zip(self.epochs, self.plans):
            yield from self._epoch(plans[worker], epoch, tokenizer)

    def _epoch(self, plan: LoaderPlan, epoch: int, tokenizer: Tokenizer) -> Iterator[dict]:
        errors: list[Exception] = []
        samples = self._raw(plan, errors)
        for _ in range(plan.skip_batches * self.local_batch):  # already trained on before the resume
            next(samples, None)
        produced, skipped, padded, wrapped = plan.skip_batches, 0, 0, False
        images, boxes, styles, captions, keys = [], [], [], [], []
        while produced < plan.batches:
            sample = next(samples, None)
            if sample is None:  # slice exhausted early because of corrupt samples: wrap around
                if wrapped and not keys and skipped:
                    raise RuntimeError(f"no decodable sample in {plan.segments}")
                samples, wrapped = self._raw(plan, errors), True
                continue
            try:
                rng = random.Random(_seed(self.seed, epoch, sample["__key__"]))
                image, box = train_crop(sample["jpg"], self.image_size, rng, self.crop_scale)  # cut on the device
                style = style_draw(rng, self.augment) if self.augment else None
                caption = rng.choice(sample_captions(sample, self.caption_field))
            except Exception:  # noqa: BLE001 - a corrupt sample is skipped and counted, never fatal
                skipped += 1
                continue
            images.append(image)
            boxes.append(box)
            styles.append(style)
            captions.append(caption)
            keys.append(sample["__key__"])
            padded += wrapped
            if len(images) == self.local_batch:
                images = torch.stack([i.permute(1, 2, 0) for i in images]).permute(0, 3, 1, 2)  # channels-last: a memcpy
                batch = {"images": images, "crops": torch.tensor(boxes, dtype=torch.int32),
                         "tokens": tokenizer.encode_batch(captions), "keys": keys, "skipped": skipped + len(errors),
                         "padded": padded}
                if self.augment:
                    batch["style"] = torch.tensor(styles, dtype=torch.float32)
                yield batch
                produced += 1
                images, boxes, styles, captions, keys, skipped, padded = [], [], [], [], [], 0, 0
                errors.clear()

def make_loader(manifest: Manifest, *, tokenizer_path: str | Path, seed: int, epoch: int, rank: int,
                world_size: int, local_batch: int, image_size: int, loader_workers: int = 2, start_step: int = 0,
                shuffle_buffer: int = 1000, crop_scale: tuple[float, float] = (0.8, 1.0),
                augment: tuple[str, ...] = (), caption_field: str | None = None,
                storage_config: StorageConfig | None = None, num_epochs: int = 1,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over epochs [epoch, epoch + num_epochs) of `manifest`'s shards for `rank`, starting after
    `start_step` steps of the first; its processes serve every epoch (images arrive as uint8)."""
    epoch_steps = steps_per_epoch(manifest, world_size * local_batch)
    epochs = list(range(epoch, epoch + num_epochs))
    plans = [plan_epoch(manifest, seed=seed, epoch=e, rank=rank, world_size=world_size, local_batch=local_batch,
                        loader_workers=loader_workers, start_step=start_step if e == epoch else 0,
                        yielded_before=0 if e == epoch else epoch_steps * (e - epoch) - start_step)
             for e in epochs]
    dataset = ShardBatches(plans, epochs, local_batch=local_batch, image_size=image_size,
                           tokenizer_path=str(tokenizer_path), shuffle_buffer=shuffle_buffer, crop_scale=crop_scale,
                           seed=seed, augment=augment, caption_field=caption_field, storage_config=storage_config)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=loader_workers, pin_memory=pin_memory,
                                       prefetch_factor=4 if loader_workers else None)


def read_captions(manifest: Manifest, limit: int = 200_000, config: StorageConfig | None = None,
                  caption_field: str | None = "captions") -> Iterator[str]:
    """Up to `limit` captions of a dataset in shard order, each of a `caption_field` list (to train a tokenizer)."""
    count = 0
    for url in manifest.shard_urls():
        fs, path = _filesystem(url, config)
        with fs.open(path, "rb") as stream:
            for sample in tar_samples(stream, url, wds.warn_and_continue):
                if "txt" not in sample:
                    continue
                for caption in sample_captions(sample, caption_field):
                    yield caption
                    count += 1
                    if count >= limit:
                        return
