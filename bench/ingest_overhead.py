"""Ingest throughput: `clipforge ingest` against a plain img2dataset call on the same loopback URL list.

    python bench/ingest_overhead.py --images 3000

Serves N generated 256 px JPEGs over loopback HTTP, then times, alternately and `--repeats` times each:
- `clipforge ingest --urls list.parquet ...` (the CLI a user runs, everything included: reading and cleaning the list,
  img2dataset in its child process, bounded downloads, manifest and failures files);
- `img2dataset.download(...)` with the same list, processes, threads, shard size and resize settings.
Prints images/s of each (wall clock, process start included) and the pipeline's overhead over plain img2dataset.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.catalog import serve_directory


def make_images(folder: Path, count: int, size: int = 256) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)  # smooth colour field, like a photo
        image = Image.fromarray(base).resize((size, size), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buffer.getvalue())


PLAIN = """
import sys, img2dataset
img2dataset.download(url_list=sys.argv[1], output_folder=sys.argv[2], input_format="parquet", url_col="url",
    caption_col="caption", output_format="webdataset", image_size=64, resize_mode="center_crop",
    processes_count={processes}, thread_count={threads}, number_sample_per_shard={per_shard}, timeout=10,
    extract_exif=False, enable_wandb=False, min_image_size=32, max_aspect_ratio=3.0)
"""


def run(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="number of loopback images")
    parser.add_argument("--processes", type=int, default=2, help="download processes for both")
    parser.add_argument("--threads", type=int, default=16, help="threads per process for both")
    parser.add_argument("--samples-per-shard", type=int, default=500, help="shard size for both")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating")
    args = parser.parse_args()

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as scratch:
        root = Path(scratch)
        make_images(root / "site" / "images", args.images)
        with serve_directory(root / "site") as base_url:
            urls = [f"{base_url}/images/{i:06d}.jpg" for i in range(args.images)]
            pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(args.images)]}),
                           root / "list.parquet")
            plain = PLAIN.format(processes=args.processes, threads=args.threads, per_shard=args.samples_per_shard)
            timings: dict[str, list[float]] = {"img2dataset": [], "clipforge ingest": []}
            for repeat in range(args.repeats):
                for name in timings:
                    out = root / f"out-{name.split()[0]}-{repeat}"
                    if name == "img2dataset":
                        command = [sys.executable, "-c", plain, str(root / "list.parquet"), str(out)]
                    else:
                        command = [sys.executable, "-m", "flows.cli", "ingest", "--urls", str(root / "list.parquet"),
                                   "--output", str(out), "--processes", str(args.processes),
                                   "--threads", str(args.threads), "--samples-per-shard", str(args.samples_per_shard)]
                    timings[name].append(run(command, env))
                    shutil.rmtree(out, ignore_errors=True)

    print(f"{args.images} images of 256 px JPEG -> 64 px, {args.processes} processes x {args.threads} threads, "
          f"{args.samples_per_shard} per shard, median of {args.repeats}")
    rates = {}
    for name, seconds in timings.items():
        best = statistics.median(seconds)
        rates[name] = args.images / best
        print(f"{name:<18} {rates[name]:7.1f} images/s  ({', '.join(f'{s:.1f}' for s in seconds)} s)")
    overhead = rates["img2dataset"] / rates["clipforge ingest"] - 1
    print(f"overhead of clipforge ingest over plain img2dataset: {overhead:+.1%} (target: at most +10%)")


if __name__ == "__main__":
    main()
