"""The training loader alone (no model) against webdataset's own plain decode pipeline, on the same shards, from a
folder and from SeaweedFS, in the same run: samples/s per CPU core.

    python bench/loader.py                                  # the catalog at 224 px (built on first use, see catalog_shards)
    python bench/loader.py --data .clipforge/bench/data/openmoji-224px --rounds 3

Both sides run in this one process with one torch thread and are measured in samples per CPU-second of the process
(`time.process_time`: samples/s per core, and barely moved by other jobs on a shared machine); wall-clock samples/s
are printed beside. The plain pipeline is
`wds.WebDataset(urls).decode("torchrgb8").to_tuple("jpg", "txt").batched(B)`: decode to uint8 tensors and batch,
nothing else. The training loader does more per sample (a random resized crop, tokenising the caption, exact
per-epoch planning) and hands over the same uint8 batches. Sides alternate over the rounds (median reported), so
load from other jobs falls on both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.catalog_shards import catalog_shards  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.manifest import read_manifest  # noqa: E402
from pipeline.storage import StorageConfig  # noqa: E402
from training.data import make_loader, read_captions  # noqa: E402
from training.tokenizer import train_tokenizer  # noqa: E402


def ours(location: str, tokenizer: Path, batch: int, image_size: int, config: StorageConfig) -> tuple[float, float]:
    manifest = read_manifest(location, config)
    loader = make_loader(manifest, tokenizer_path=tokenizer, seed=0, epoch=0, rank=0, world_size=1,
                         local_batch=batch, image_size=image_size, loader_workers=0, storage_config=config)
    start, count = (time.process_time(), time.perf_counter()), 0
    for item in loader:
        count += len(item["keys"])
    return count / (time.process_time() - start[0]), count / (time.perf_counter() - start[1])


def plain(location: str, batch: int, config: StorageConfig) -> tuple[float, float]:
    urls = read_manifest(location, config).shard_urls()
    if storage.is_remote(location):  # webdataset has no s3://: open through the same fsspec filesystem
        fs, _ = storage.filesystem(location, config)
        wds.gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192: fs.open(url, mode)
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("torchrgb8").to_tuple("jpg", "txt").batched(batch)
    start, count = (time.process_time(), time.perf_counter()), 0
    for images, _ in dataset:
        count += len(images)
    return count / (time.process_time() - start[0]), count / (time.perf_counter() - start[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="a dataset folder; default: the catalog at --image-size")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--limit", type=int, default=1500, help="emoji in the default dataset")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS half")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = args.data or catalog_shards(".clipforge/bench", args.image_size, args.limit)
    manifest = read_manifest(data)
    print(f"{data}: {manifest.num_samples} samples in {len(manifest.shards)} shards, batch {args.batch_size}, "
          f"one process, one thread; median of {args.rounds} alternating rounds", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as scratch:
        tokenizer = Path(scratch) / "tokenizer"
        train_tokenizer(read_captions(manifest), vocab_size=4096, context_length=77).save(tokenizer)
        sources = [("folder", data, StorageConfig())]
        server = None
        if not args.no_s3:
            from infra.seaweedfs import start_seaweedfs

            server = start_seaweedfs(Path(scratch) / "seaweedfs")
            config = StorageConfig(endpoint_url=server.endpoint_url, access_key_id=server.access_key,
                                   secret_access_key=server.secret_key)
            remote = "s3://clipforge/bench/shards"
            fs, path = storage.filesystem(remote, config)
            fs.put(data.rstrip("/") + "/", path, recursive=True)
            sources.append(("SeaweedFS", remote, config))
        try:
            for name, location, config in sources:
                timings = {"plain": [], "ours": []}
                for _ in range(args.rounds):
                    timings["plain"].append(plain(location, args.batch_size, config))
                    timings["ours"].append(ours(location, tokenizer, args.batch_size, args.image_size, config))
                (base, base_wall), (mine, mine_wall) = (
                    [statistics.median(t[i] for t in timings[side]) for i in (0, 1)] for side in ("plain", "ours"))
                print(f"{name:>10}: webdataset plain decode {base:7.1f} samples/CPU-s (wall {base_wall:6.1f}/s)   "
                      f"training loader {mine:7.1f} samples/CPU-s (wall {mine_wall:6.1f}/s)   ratio {mine / base:.2f}x",
                      flush=True)
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
