"""Training-step throughput of a model preset on this machine's CPU, in fp32 and in bf16 autocast, and its MFU.

    python bench/train_step.py                                  # `small` preset, batch 128, 64 px
    python bench/train_step.py --preset tiny --batch-size 256 --steps 10
    python bench/train_step.py --compile                        # bf16 step with and without torch.compile

One step is forward, `clip_loss`, backward, AdamW and the logit-scale clamp, on random images and captions.
MFU (model FLOPs utilisation) = 3 x analytic forward FLOPs per sample x samples/s / peak, where the peak is a large
bf16 matmul timed in the same run (the fp32 matmul rate is printed beside it for reference).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from training.loss import clip_loss  # noqa: E402
from training.model import MODEL_PRESETS, create_model, flops_per_sample  # noqa: E402
from training.parallel import compile_blocks  # noqa: E402


def matmul_flops_per_second(dtype: torch.dtype, size: int = 4096, repeats: int = 3) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def samples_per_second(preset: str, batch_size: int, steps: int, bf16: bool,
                       compiled: bool = False, clock=time.perf_counter) -> tuple[float, float]:
    """Mean throughput over `steps` timed steps after one warm-up step; also returns the last loss."""
    torch.manual_seed(0)
    model = create_model(preset)
    if compiled:
        compile_blocks(model)  # as train_loop does with `compile: true` (the warm-up step compiles)
    config = model.config
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, config.image_size, config.image_size)
    tokens = torch.randint(2, config.vocab_size - 1, (batch_size, config.context_length))
    tokens[:, config.context_length // 2] = config.vocab_size - 1  # end of text halfway

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            image_emb, text_emb, logit_scale = model(images, tokens)
        loss = clip_loss(image_emb, text_emb, logit_scale)  # fp32 whatever the autocast
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale()
        return loss.item()

    step()
    start = clock()
    for _ in range(steps):
        loss = step()
    return batch_size * steps / (clock() - start), loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=list(MODEL_PRESETS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="compare bf16 steps with and without torch.compile")
    args = parser.parse_args()
    if args.compile:
        for name, compiled in (("eager", False), ("compiled", True), ("eager again", False)):
            # per CPU-second of this process: other jobs on a shared machine barely move it
            throughput, loss = samples_per_second(args.preset, args.batch_size, args.steps, True, compiled,
                                                  clock=time.process_time)
            print(f"{name:>12}: {throughput:7.1f} samples per CPU-second, loss {loss:.3f}", flush=True)
        return

    config = MODEL_PRESETS[args.preset]
    train_flops = 3 * flops_per_sample(config)["total"]  # forward + backward (twice the forward)
    bf16_peak = matmul_flops_per_second(torch.bfloat16)
    fp32_peak = matmul_flops_per_second(torch.float32)
    print(f"{args.preset}: {config.image_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{train_flops / 1e9:.2f} GFLOP per sample per step")
    print(f"peak matmul (4096^3): bf16 {bf16_peak / 1e9:.0f} GFLOP/s, fp32 {fp32_peak / 1e9:.0f} GFLOP/s")
    for name, bf16 in (("fp32", False), ("bf16 autocast", True)):
        throughput, loss = samples_per_second(args.preset, args.batch_size, args.steps, bf16)
        achieved = throughput * train_flops
        print(f"{name:>14}: {throughput:7.1f} samples/s, {achieved / 1e9:6.1f} GFLOP/s, "
              f"MFU {achieved / bf16_peak:6.1%} of bf16 peak ({achieved / fp32_peak:6.1%} of fp32), loss {loss:.3f}")


if __name__ == "__main__":
    main()
