"""The training data loader: every sample read by exactly one worker of one rank per epoch, exact mid-epoch resume,
corrupt samples skipped and counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.manifest import read_manifest
from tests.shards import write_dataset, write_tokenizer
from training.data import make_loader, steps_per_epoch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return write_dataset(root / "shards", sizes=[37, 50, 13, 44, 29, 51]), write_tokenizer(root / "tokenizer")


def epoch_keys(dataset, *, rank, world_size, local_batch=8, loader_workers=2, epoch=0, start_step=0, seed=0):
    shards, tokenizer = dataset
    loader = make_loader(read_manifest(str(shards)), tokenizer_path=tokenizer, seed=seed, epoch=epoch, rank=rank,
                         world_size=world_size, local_batch=local_batch, image_size=32,
                         loader_workers=loader_workers, start_step=start_step, shuffle_buffer=20)
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
