"""The training data loader: every sample read by exactly one worker of one rank per epoch, exact mid-epoch resume,
corrupt samples skipped and counted, one loader for many epochs, and a segment that starts mid-shard reading only its
own bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

import training.data
from pipeline.manifest import read_manifest
from pipeline.ingest import json_safe
from tests.shards import COLOURS, caption_list, write_dataset, write_tokenizer
from training.data import make_loader, plan_epoch, sample_captions, steps_per_epoch
from training.tokenizer import Tokenizer
from training.transforms import device_crops, normalize


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return write_dataset(root / "shards", sizes=[37, 50, 13, 44, 29, 51]), write_tokenizer(root / "tokenizer")


def epoch_keys(dataset, *, rank, world_size, local_batch=8, loader_workers=2, epoch=0, start_step=0, seed=0,
               num_epochs=1):
    shards, tokenizer = dataset
    loader = make_loader(read_manifest(str(shards)), tokenizer_path=tokenizer, seed=seed, epoch=epoch, rank=rank,
                         world_size=world_size, local_batch=local_batch, image_size=32,
                         loader_workers=loader_workers, start_step=start_step, shuffle_buffer=20,
                         num_epochs=num_epochs)
    return [batch["keys"] for batch in loader]


@pytest.mark.parametrize("world_size, loader_workers", [(1, 0), (2, 2), (3, 1)])
def test_each_sample_read_once_per_epoch(dataset, world_size: int, loader_workers: int) -> None:
    manifest = read_manifest(str(dataset[0]))
    local_batch = 8
    steps = steps_per_epoch(manifest, world_size * local_batch)
    per_rank = [epoch_keys(dataset, rank=r, world_size=world_size, loader_workers=loader_workers)
                for r in range(world_size)]
    assert all(len(batches) == steps for batches in per_rank), "every rank yields the same number of steps"
    keys = [k for batches in per_rank for batch in batches for k in batch]
    assert len(keys) == len(set(keys)) == steps * world_size * local_batch
    assert len(keys) > manifest.num_samples - world_size * local_batch  # at most the last partial global batch waits


def test_epochs_are_shuffled_differently_and_reproducibly(dataset) -> None:
    first = epoch_keys(dataset, rank=0, world_size=1, epoch=0)
    assert first == epoch_keys(dataset, rank=0, world_size=1, epoch=0)
    second = epoch_keys(dataset, rank=0, world_size=1, epoch=1)
    assert first != second and sorted(map(tuple, first)) != sorted(map(tuple, second))


@pytest.mark.parametrize("start_step", [1, 4, 7])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(dataset, start_step: int) -> None:
    for rank in range(2):
        full = epoch_keys(dataset, rank=rank, world_size=2, loader_workers=2)
        resumed = epoch_keys(dataset, rank=rank, world_size=2, loader_workers=2, start_step=start_step)
        assert resumed == full[start_step:]


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    shards = write_dataset(tmp_path / "shards", sizes=[30, 30], corrupt={3, 17, 40})
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    loader = make_loader(read_manifest(str(shards)), tokenizer_path=tokenizer, seed=0, epoch=0, rank=0,
                         world_size=1, local_batch=8, image_size=32, loader_workers=0)
    batches = list(loader)
    assert len(batches) == 60 // 8  # still whole batches
    assert sum(b["skipped"] for b in batches) == 3
    keys = [k for b in batches for k in b["keys"]]
    assert "000000003" not in keys and "000000017" not in keys
    assert all(b["images"].shape == (8, 3, 32, 32) and b["tokens"].shape == (8, 32) for b in batches)
    assert all(b["images"].dtype == torch.uint8 for b in batches)  # normalised on the training device


@pytest.mark.parametrize("loader_workers, start_step", [(2, 0), (3, 2), (3, 7)])
def test_one_loader_for_several_epochs_yields_each_epoch_in_order(dataset, loader_workers, start_step) -> None:
    """Its processes live across epochs, yet the stream is the epochs' streams laid end to end (resumes included)."""
    expected = [*epoch_keys(dataset, rank=1, world_size=2, loader_workers=loader_workers, epoch=3,
                            start_step=start_step)]
    for epoch in (4, 5):
        expected += epoch_keys(dataset, rank=1, world_size=2, loader_workers=loader_workers, epoch=epoch)
    assert epoch_keys(dataset, rank=1, world_size=2, loader_workers=loader_workers, epoch=3,
                      start_step=start_step, num_epochs=3) == expected


class CountingFileSystem(LocalFileSystem):
    """The local filesystem, counting the bytes every read of an open file hands back (`cat_file` opens one too)."""

    bytes_read = 0

    def _open(self, path, mode="rb", **kwargs):
        stream = super()._open(path, mode, **kwargs)
        read = stream.read

        def counted(*args):
            data = read(*args)
            CountingFileSystem.bytes_read += len(data)
            return data

        stream.read = counted
        return stream


def _rank1_resumed(tmp_path, monkeypatch, with_index: bool) -> tuple[list[str], int, int]:
    """Rank 1 of 2 resumed at step 2: (keys it yields, bytes it read, bytes of its own samples)."""
    shards = write_dataset(tmp_path / f"shards-{with_index}", sizes=[30, 30], with_index=with_index)
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    manifest = read_manifest(str(shards))
    plans = plan_epoch(manifest, seed=0, epoch=0, rank=1, world_size=2, local_batch=4, loader_workers=1)
    assert plans[0].segments[0].start > 0  # the test's premise: rank 1's slice starts mid-shard

    monkeypatch.setattr(training.data, "_FILESYSTEMS", {(False, None): (os.getpid(), CountingFileSystem())})
    monkeypatch.setattr(training.data, "_LOCAL_OFFSETS", {})
    CountingFileSystem.bytes_read = 0
    loader = make_loader(manifest, tokenizer_path=tokenizer, seed=0, epoch=0, rank=1, world_size=2, local_batch=4,
                         image_size=32, loader_workers=0, start_step=2, shuffle_buffer=4)
    keys = [k for batch in loader for k in batch["keys"]]
    offsets = {Path(s.path).name: s.offsets for s in read_manifest(str(write_dataset(tmp_path / "i", [30, 30]))).shards}
    own = sum(offsets[Path(s.url).name][s.stop] - offsets[Path(s.url).name][s.start] for s in plans[0].segments)
    return keys, CountingFileSystem.bytes_read, own


def test_a_segment_that_starts_mid_shard_reads_only_its_own_bytes(tmp_path, monkeypatch) -> None:
    keys, bytes_read, own = _rank1_resumed(tmp_path, monkeypatch, with_index=True)
    assert len(keys) == (60 // 8 - 2) * 4
    assert bytes_read == own  # not one byte of the samples before its start (nor after its end)


def test_old_datasets_without_the_index_read_the_same_samples(tmp_path, monkeypatch) -> None:
    """A dataset ingested before the index existed: local shards are indexed from their tar headers on first use."""
    indexed, _, _ = _rank1_resumed(tmp_path, monkeypatch, with_index=True)
    keys, _, _ = _rank1_resumed(tmp_path, monkeypatch, with_index=False)
    assert keys == indexed


def test_device_crops_cut_the_drawn_box_and_normalise() -> None:
    """The loader hands over whole uint8 images and a box per sample; the device cuts, resizes and normalises."""
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    same_size = torch.tensor([[0, 0, 64, 64], [10, 20, 32, 32]], dtype=torch.int32)
    whole = device_crops(images, same_size[:1].expand(2, 4), 64)
    torch.testing.assert_close(whole, normalize(images), atol=1e-4, rtol=0)  # the full box is the identity
    cut = device_crops(images, same_size, 32)
    torch.testing.assert_close(cut[1], normalize(images[1, :, 20:52, 10:42]), atol=1e-4, rtol=0)  # a pure crop


# ---------------------------------------------------------------------------------------------------------------------
# Several captions per image


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("captioned")
    return (write_dataset(root / "shards", sizes=[37, 50, 13, 44], caption_lists=True),
            write_tokenizer(root / "tokenizer"))


def epoch_captions(captioned, *, epoch=0, seed=0, start_step=0, caption_field="captions", loader_workers=2,
                   num_epochs=1) -> list[tuple[str, tuple[int, ...]]]:
    """(key, token ids) of every sample the loader yields, in order."""
    shards, tokenizer = captioned
    loader = make_loader(read_manifest(str(shards)), tokenizer_path=tokenizer, seed=seed, epoch=epoch, rank=0,
                         world_size=1, local_batch=8, image_size=32, loader_workers=loader_workers,
                         start_step=start_step, shuffle_buffer=20, caption_field=caption_field, num_epochs=num_epochs)
    return [(key, tuple(ids.tolist())) for batch in loader for key, ids in zip(batch["keys"], batch["tokens"])]


def which_caption(captioned, key: str, ids: tuple[int, ...]) -> int:
    """Index of the sample's caption (in its list) that `ids` encode."""
    number = sum([37, 50, 13, 44][:int(key[:5])]) + int(key[5:])
    tokenizer = Tokenizer.load(captioned[1])
    encoded = [tuple(tokenizer.encode(c).tolist()) for c in caption_list(COLOURS[number % len(COLOURS)], number)]
    assert ids in encoded, f"{key} was read with a caption outside its list"
    return encoded.index(ids)


def test_caption_lists_are_drawn_per_epoch_from_the_epoch_seed(captioned) -> None:
    epochs = [dict(epoch_captions(captioned, epoch=e)) for e in range(3)]
    choices = {key: [which_caption(captioned, key, epoch[key]) for epoch in epochs]
               for key in set.intersection(*(set(e) for e in epochs))}
    assert {c for picks in choices.values() for c in picks} == {0, 1, 2}  # every caption of the lists is used
    changed = sum(len(set(picks)) > 1 for picks in choices.values())
    assert changed > len(choices) / 2  # most samples are read with another caption in some epoch (chance: 8/9)
    assert epoch_captions(captioned, epoch=1) == list(epochs[1].items())  # the same epoch again: the same captions
    other_seed = dict(epoch_captions(captioned, epoch=1, seed=1))
    assert any(other_seed[k] != epochs[1][k] for k in other_seed if k in epochs[1])


def test_without_a_caption_field_every_sample_reads_its_caption(captioned) -> None:
    assert all(which_caption(captioned, key, ids) == 0
               for key, ids in epoch_captions(captioned, epoch=2, caption_field=None))


@pytest.mark.parametrize("start_step", [2, 5])
def test_a_resumed_epoch_reads_the_same_captions(captioned, start_step: int) -> None:
    full = epoch_captions(captioned, epoch=1, num_epochs=2)
    steps = len(full) // 8 // 2
    resumed = epoch_captions(captioned, epoch=1, start_step=start_step, num_epochs=2)
    assert resumed == full[start_step * 8:] and len(full) == 2 * steps * 8


def test_a_list_column_reaches_the_loader_through_ingest_json() -> None:
    """Ingest stores a list column as JSON text (img2dataset's json writer takes scalars); the loader reads it back."""
    column = json_safe(pa.chunked_array([[["a red square", "red square"], None]]))
    assert column.to_pylist() == ['["a red square", "red square"]', None]
    sample = {"txt": b"a red square", "json": json.dumps({"captions": column.to_pylist()[0]}).encode()}
    assert sample_captions(sample, "captions") == ["a red square", "red square"]
    assert sample_captions({"txt": b"only this", "json": b"{}"}, "captions") == ["only this"]
