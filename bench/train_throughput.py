"""Training throughput on Ray Train: samples/s of the `small` preset with 1 and 2 workers, and the share of step
time spent waiting for data.

    python bench/train_throughput.py --data .clipforge/data/openmoji-train --steps 30

Runs `clipforge train` (Ray started on demand, bf16 autocast, the loader's default 2 worker processes per training
worker) and reads the run's metrics.jsonl. The first log window (warm-up: process start, first batches) is left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(data: str, workers: int, steps: int, batch_size: int, output: Path) -> list[dict]:
    command = [sys.executable, "-m", "flows.cli", "train", "--data", data, "--output", str(output), "--preset",
               "small", "--steps", str(steps), "--batch-size", str(batch_size), "--num-workers", str(workers),
               "--log-every", "5", "--checkpoint-every", str(steps), "--warmup-steps", "5"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".clipforge/data/openmoji-train",
                        help="shards written by clipforge ingest (`make demo` writes the default)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run")
    parser.add_argument("--batch-size", type=int, default=128, help="global contrastive batch")
    args = parser.parse_args()
    if not Path(args.data, "manifest.parquet").exists() and not args.data.startswith("s3://"):
        sys.exit(f"no dataset at {args.data}: run `make demo` first, or pass --data")

    print(f"small preset, batch {args.batch_size}, {args.steps} steps, bf16 autocast; first log window excluded")
    for workers in (1, 2):
        with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
            history = run(args.data, workers, args.steps, args.batch_size, Path(scratch) / "run")[1:]
        rate = statistics.median(h["samples_per_second"] for h in history)
        wait = statistics.median(h["data_wait_share"] for h in history)
        print(f"{workers} worker(s): {rate:6.1f} samples/s   data wait {wait:5.1%} of step time")


if __name__ == "__main__":
    main()
