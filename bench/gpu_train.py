"""The real training path on every GPU of a node: samples/s per GPU, MFU, data wait and peak memory.

    python bench/gpu_train.py                                   # vit-b-32 and vit-b-16 at 224 px, all GPUs
    python bench/gpu_train.py --presets vit-b-32 --patch-dropout 0.5 --strategy fsdp
    python bench/gpu_train.py --smoke                           # CPU, `tiny` at 32 px, seconds of training (CI)

Nothing is synthetic: the bundled catalog is rendered at 224 px, served over loopback and ingested by `clipforge
ingest` (see bench/catalog_shards.py); `run_training` then trains on it with Ray Train, one worker per GPU (DDP or
FSDP2), the real loader (uint8 batches, pinned memory, persistent processes), bf16 autocast ("auto" precision), torch.compile and fused
AdamW. The figures are medians over the logged windows after the first (compilation and loader start-up). MFU is
3 x the analytic forward FLOPs of the tokens actually run (patch dropout lowers them) x samples/s per GPU, over the
GPU's datasheet dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.catalog_shards import catalog_shards  # noqa: E402
from training.model import MODEL_PRESETS, ModelConfig, _transformer_flops, flops_per_sample  # noqa: E402

# datasheet dense bf16 tensor-core peaks, FLOP/s (no sparsity)
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def datasheet_peak() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "CPU (no datasheet peak)", None
    name = torch.cuda.get_device_name(0)
    return name, next((peak for key, peak in PEAKS.items() if key in name), None)


def train_flops_per_sample(config: ModelConfig, patch_dropout: float) -> float:
    """3 x forward FLOPs of one pair, the image tower counted over the patches kept by patch dropout."""
    flops = flops_per_sample(config)
    patches = (config.image_size // config.patch_size) ** 2
    kept = max(1, round(patches * (1 - patch_dropout)))
    dropped = (_transformer_flops(patches + 1, config.vision_width, config.vision_layers, config.mlp_ratio)
               - _transformer_flops(kept + 1, config.vision_width, config.vision_layers, config.mlp_ratio))
    return 3 * (flops["total"] - dropped)


def run(preset: str, data: str, args: argparse.Namespace, gpus: int) -> dict[str, float]:
    from training.ray_job import run_training
    from training.train import TrainConfig

    device = {"device": "cuda" if gpus else "cpu"}
    workers = max(1, gpus)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-train-") as scratch:
        config = TrainConfig(
            data=data, output=str(Path(scratch) / "run"), preset=preset, steps=args.steps,
            batch_size=args.batch_size * workers, num_workers=workers, warmup_steps=5, log_every=args.log_every,
            checkpoint_every=args.steps, strategy=args.strategy, patch_dropout=args.patch_dropout,
            precision="auto", run_name=f"bench-{preset}-{os.getpid()}", tokenizer_vocab_size=args.vocab_size,
            **({"compile": False} if args.smoke else {}), **device,
        )
        run_training(config)
        history = [json.loads(line) for line in (Path(scratch) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = history[1:] or history  # the first window holds compilation and loader start-up
    per_gpu = statistics.median(h["samples_per_second"] for h in timed) / workers
    name, peak = datasheet_peak()
    model = MODEL_PRESETS[preset]
    return {
        "samples_per_second_per_gpu": per_gpu,
        "mfu": per_gpu * train_flops_per_sample(model, args.patch_dropout) / peak if peak else float("nan"),
        "data_wait_share": statistics.median(h["data_wait_share"] for h in timed),
        "peak_memory_gib": max((h.get("peak_memory_gib", float("nan")) for h in timed), default=float("nan")),
        "loss": timed[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["vit-b-32", "vit-b-16"], choices=list(MODEL_PRESETS))
    parser.add_argument("--data", default=None, help="a dataset written by clipforge ingest; default: the catalog")
    parser.add_argument("--workdir", default=".clipforge/bench")
    parser.add_argument("--batch-size", type=int, default=256, help="per GPU")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--patch-dropout", type=float, default=0.0)
    parser.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (default: the preset's)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset at 32 px, a few steps (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.presets, args.batch_size, args.steps, args.log_every, args.vocab_size = ["tiny"], 16, 6, 2, 512
    image_size = MODEL_PRESETS[args.presets[0]].image_size
    if any(MODEL_PRESETS[p].image_size != image_size for p in args.presets):
        sys.exit("--presets must share one image size")
    gpus = 0 if args.smoke else torch.cuda.device_count()
    if not gpus and not args.smoke:
        sys.exit("no CUDA GPU here: run with --smoke for the CPU check")
    data = args.data or catalog_shards(args.workdir, image_size, limit=200 if args.smoke else None)
    name, peak = datasheet_peak()
    print(f"{name} x {max(1, gpus)}, {args.strategy}, batch {args.batch_size} per GPU, {args.steps} steps, "
          f"patch dropout {args.patch_dropout}, data {data}; peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    for preset in args.presets:
        result = run(preset, data, args, gpus)
        print(f"{preset:>9}: {result['samples_per_second_per_gpu']:9.1f} samples/s per GPU   MFU "
              f"{result['mfu']:6.1%}   data wait {result['data_wait_share']:5.1%}   peak memory "
              f"{result['peak_memory_gib']:6.2f} GiB   loss {result['loss']:.3f}", flush=True)


if __name__ == "__main__":
    main()
