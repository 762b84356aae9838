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

Corrupt samples (an image that does not decode) are skipped and counted in each batch's `skipped`; a worker short
of samples at the end of its slice because of them wraps around to the start of its slice (counted in `padded`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline import storage
from pipeline.manifest import Manifest
from pipeline.storage import StorageConfig
from training.tokenizer import Tokenizer
from training.transforms import train_transform


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard, in tar order."""

    url: str
    start: int
    stop: int


@dataclass(frozen=True)
class LoaderPlan:
    """What one loader worker of one rank reads in one epoch."""

    segments: tuple[Segment, ...]
    batches: int  # batches this worker yields in the whole epoch
    skip_batches: int  # of which this many were already consumed before a resume
    seed: int


def steps_per_epoch(manifest: Manifest, global_batch: int) -> int:
    steps = manifest.num_samples // global_batch
    if steps == 0:
        raise ValueError(f"{manifest.location} holds {manifest.num_samples} samples, fewer than one global batch "
                         f"of {global_batch}: lower the batch size")
    return steps


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def plan_epoch(manifest: Manifest, *, seed: int, epoch: int, rank: int, world_size: int, local_batch: int,
               loader_workers: int, start_step: int = 0) -> list[LoaderPlan]:
    """The plan of every loader worker of `rank` for `epoch`, resuming after `start_step` steps of that epoch.

    Loader worker j of the returned list serves the batches of role (j + start_step) % W, so that torch's
    DataLoader, which reads its workers round-robin starting at worker 0, yields global step start_step first.
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
            lo, hi = max(begin, shard_start), min(end, shard_start + shard.samples)
            if lo < hi:
                found.append(Segment(storage.join(manifest.location, shard.path), lo - shard_start, hi - shard_start))
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
    return [plans_by_role[(j + start_step) % workers] for j in range(workers)]


def tar_samples(stream, url: str, handler) -> Iterator[dict]:
    """Samples ({"__key__", "jpg", "txt", "json"} bytes) of one open tar stream, via webdataset's tar readers."""
    files = ({**f, "__url__": url} for f in tar_file_iterator(stream, handler=handler))
    return group_by_keys(files, handler=handler)


def _read_segment(segment: Segment, config: StorageConfig | None, errors: list[Exception]) -> Iterator[dict]:
    """Raw samples ({"__key__", "jpg", "txt", ...} bytes) of one segment; nothing decoded."""
    fs, path = storage.filesystem(segment.url, config)

    def note(err: Exception) -> bool:
        errors.append(err)
        return True  # keep going

    with fs.open(path, "rb") as stream:
        for index, sample in enumerate(tar_samples(stream, segment.url, note)):
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


class ShardBatches(torch.utils.data.IterableDataset):
    """Yields dicts {images (B, 3, S, S) float32, tokens (B, T) int64, keys [B], skipped, padded} for one epoch."""

    def __init__(self, plans: list[LoaderPlan], *, local_batch: int, image_size: int, tokenizer_path: str,
                 shuffle_buffer: int, crop_scale: tuple[float, float], seed: int, epoch: int,
                 storage_config: StorageConfig | None = None):
        super().__init__()
        self.plans, self.local_batch, self.image_size = plans, local_batch, image_size
        self.tokenizer_path, self.shuffle_buffer, self.crop_scale = tokenizer_path, shuffle_buffer, crop_scale
        self.seed, self.epoch, self.storage_config = seed, epoch, storage_config

    def _raw(self, plan: LoaderPlan, errors: list[Exception]) -> Iterator[dict]:
        def stream() -> Iterator[dict]:
            for segment in plan.segments:
                yield from _read_segment(segment, self.storage_config, errors)

        yield from _shuffled(stream(), self.shuffle_buffer, random.Random(plan.seed))

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        plan = self.plans[info.id if info is not None else 0]
        tokenizer = Tokenizer.load(self.tokenizer_path)
        errors: list[Exception] = []
        samples = self._raw(plan, errors)
        for _ in range(plan.skip_batches * self.local_batch):  # already trained on before the resume
            next(samples, None)
        produced, skipped, padded, wrapped = plan.skip_batches, 0, 0, False
        images, captions, keys = [], [], []
        while produced < plan.batches:
            sample = next(samples, None)
            if sample is None:  # slice exhausted early because of corrupt samples: wrap around
                if wrapped and not keys and skipped:
                    raise RuntimeError(f"no decodable sample in {plan.segments}")
                samples, wrapped = self._raw(plan, errors), True
                continue
            try:
                rng = random.Random(_seed(self.seed, self.epoch, sample["__key__"]))
                image = train_transform(sample["jpg"], self.image_size, rng, self.crop_scale)
                caption = sample["txt"].decode("utf-8")
            except Exception:  # noqa: BLE001 - a corrupt sample is skipped and counted, never fatal
                skipped += 1
                continue
            images.append(image)
            captions.append(caption)
            keys.append(sample["__key__"])
            padded += wrapped
            if len(images) == self.local_batch:
                yield {"images": torch.stack(images), "tokens": tokenizer.encode_batch(captions), "keys": keys,
                       "skipped": skipped + len(errors), "padded": padded}
                produced += 1
                images, captions, keys, skipped, padded = [], [], [], 0, 0
                errors.clear()


def make_loader(manifest: Manifest, *, tokenizer_path: str | Path, seed: int, epoch: int, rank: int,
                world_size: int, local_batch: int, image_size: int, loader_workers: int = 2, start_step: int = 0,
                shuffle_buffer: int = 1000, crop_scale: tuple[float, float] = (0.8, 1.0),
                storage_config: StorageConfig | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over one epoch of `manifest`'s shards for `rank`, starting after `start_step` steps."""
    plans = plan_epoch(manifest, seed=seed, epoch=epoch, rank=rank, world_size=world_size, local_batch=local_batch,
                       loader_workers=loader_workers, start_step=start_step)
    dataset = ShardBatches(plans, local_batch=local_batch, image_size=image_size, tokenizer_path=str(tokenizer_path),
                           shuffle_buffer=shuffle_buffer, crop_scale=crop_scale, seed=seed, epoch=epoch,
                           storage_config=storage_config)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=loader_workers,
                                       persistent_workers=False, prefetch_factor=4 if loader_workers else None)


def read_captions(manifest: Manifest, limit: int = 200_000, config: StorageConfig | None = None) -> Iterator[str]:
    """Up to `limit` captions of a dataset, in shard order (for training a tokenizer)."""
    count = 0
    for url in manifest.shard_urls():
        fs, path = storage.filesystem(url, config)
        with fs.open(path, "rb") as stream:
            for sample in tar_samples(stream, url, wds.warn_and_continue):
                if "txt" in sample:
                    yield sample["txt"].decode("utf-8")
                    count += 1
                    if count >= limit:
                        return
