"""The shard reader: every sample of every listed shard in order, a broken shard reported and skipped, image members."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from pipeline.manifest import IngestSummary, ShardInfo, write_manifest
from pipeline.shards import iter_dataset, iter_shard, sample_image


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, keys: list[str]) -> int:
    """A shard of `keys`, each with a png, a caption and a json, written by webdataset's TarWriter; its size."""
    with wds.TarWriter(str(path)) as sink:
        for number, key in enumerate(keys):
            sink.write({"__key__": key, "png": png((number, 0, 0)), "txt": f"caption {key}", "json": {"n": number}})
    return path.stat().st_size


def write_dataset(folder: Path, shards: list[list[str] | bytes]) -> Path:
    """One shard per entry: sample keys (a good shard), or raw bytes (a broken one, listed with 2 samples)."""
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for number, content in enumerate(shards):
        path = folder / f"{number:05d}.tar"
        if isinstance(content, bytes):
            path.write_bytes(content)
            samples = 2
        else:
            write_shard(path, content)
            samples = len(content)
        infos.append(ShardInfo(shard=number, path=path.name, samples=samples, attempted=samples, failed=0,
                               bytes=path.stat().st_size))
    total = sum(s.samples for s in infos)
    write_manifest(str(folder), infos, IngestSummary(input_rows=total, successes=total, shards=len(infos)))
    return folder


def test_iter_dataset_reads_every_sample_in_shard_order(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "data", [["a0", "a1"], [], ["c0", "c1", "c2"]])
    samples = list(iter_dataset(str(dataset)))
    assert [s["__key__"] for s in samples] == ["a0", "a1", "c0", "c1", "c2"]
    assert samples[2]["__url__"] == str(dataset / "00002.tar")
    assert samples[3]["txt"] == b"caption c1" and samples[3]["json"] == b'{"n": 1}'
    assert Image.open(io.BytesIO(sample_image(samples[3]))).getpixel((0, 0)) == (1, 0, 0)


def test_a_broken_shard_is_reported_and_the_rest_still_read(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    write_shard(good, ["t0", "t1", "t2", "t3"])
    cut = good.read_bytes()[: good.stat().st_size // 2]  # a shard that ends mid-sample
    dataset = write_dataset(tmp_path / "data", [["a0"], b"\x00garbage, not a tar" * 40, ["c0"], cut, ["e0"]])
    broken: list[tuple[str, Exception]] = []
    keys = [s["__key__"] for s in iter_dataset(str(dataset), on_error=lambda url, err: broken.append((url, err)))]
    assert keys[:2] == ["a0", "c0"] and keys[-1] == "e0"
    assert set(keys[2:-1]) <= {"t0", "t1", "t2"}  # what the cut shard held before the cut
    assert [url for url, _ in broken] == [str(dataset / "00001.tar"), str(dataset / "00003.tar")]
    with pytest.raises(tarfile.TarError):
        list(iter_dataset(str(dataset)))  # without on_error the fault is raised


def test_iter_shard_handler_sees_broken_members(tmp_path: Path) -> None:
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("k.txt", b"one"), ("k.txt", b"again"), ("m.txt", b"two")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="duplicate"):
        list(iter_shard(str(path)))
    seen: list[Exception] = []
    keys = [s["__key__"] for s in iter_shard(str(path), handler=lambda err: seen.append(err) or True)]
    assert keys[-1] == "m" and len(seen) == 1


def test_sample_image_is_the_first_image_member() -> None:
    assert sample_image({"__key__": "k", "txt": b"t", "webp": b"W", "jpg": b"J"}) == b"W"
    assert sample_image({"__key__": "k", "txt": b"t", "json": b"{}"}) is None
