"""Training throughput on Ray Train: samples/s of the `small` preset and the share of step time spent waiting for
data, for several splits of the CPUs between torch threads and loader processes, and for 1 vs 2 Ray workers.

    python bench/train_throughput.py --data .clipforge/data/openmoji/train --steps 30

Runs `clipforge train` (a local Ray started on demand, precision auto unless --precision) and reads the run's
metrics.jsonl; the first log window (process start, first batches) is left out. The variants, as
(workers, CPUs per worker = torch threads, loader processes per worker):
  default          what `clipforge train` picks on this machine (loader_workers empty)
  2 loaders        the previous default: as many loader processes as cores, beside as many torch threads
  0 loaders        decoding in the training process itself
  1 thread         one torch thread and one loader process: the cores split between them
  2 workers        two Ray workers of one CPU each (DDP over gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {  # name -> extra options of `clipforge train`
    "default": [],
    "2 loaders": ["--loader-workers", "2"],
    "0 loaders": ["--loader-workers", "0"],
    "1 thread": ["--cpus-per-worker", "1", "--loader-workers", "1"],
    "2 workers": ["--num-workers", "2"],
}


def run(data: str, options: list[str], steps: int, batch_size: int, precision: str, output: Path) -> list[dict]:
    command = [sys.executable, "-m", "flows.cli", "train", "--data", data, "--output", str(output), "--preset",
               "small", "--steps", str(steps), "--batch-size", str(batch_size), "--log-every", "5",
               "--checkpoint-every", str(steps), "--warmup-steps", "5", "--precision", precision, *options]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".clipforge/data/openmoji/train",
                        help="shards written by clipforge ingest (`make demo` writes the default)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run")
    parser.add_argument("--batch-size", type=int, default=128, help="global contrastive batch")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    if not Path(args.data, "manifest.parquet").exists() and not args.data.startswith("s3://"):
        sys.exit(f"no dataset at {args.data}: run `make demo` first, or pass --data")

    print(f"small preset, batch {args.batch_size}, {args.steps} steps, precision {args.precision}, "
          f"{os.cpu_count()} CPUs; first log window excluded")
    for name in args.variants:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
            history = run(args.data, VARIANTS[name], args.steps, args.batch_size, args.precision,
                          Path(scratch) / "run")[1:]
        rate = statistics.median(h["samples_per_second"] for h in history)
        wait = statistics.median(h["data_wait_share"] for h in history)
        print(f"{name:>10}: {rate:6.1f} samples/s   data wait {wait:5.1%} of step time", flush=True)


if __name__ == "__main__":
    main()
