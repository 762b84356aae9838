"""Patch dropout (FLIP) on the CPU: the image tower's forward+backward and the whole training step, with 0.5 and 0.75
of the patches dropped against none, in the same run.

    python bench/patch_dropout.py                      # vit-b-32, 224 px, batch 16, bf16 autocast, one thread
    python bench/patch_dropout.py --preset tiny --batch-size 64 --rounds 2   # seconds (a smoke run)

The rates are timed in interleaved rounds (none, 0.5, 0.75, none, ...) and each reports its median round. Throughput
is counted per CPU-second of this process (`time.process_time`, one torch thread by default), which load from other
jobs on a shared machine barely moves; wall-clock samples/s are printed beside it. A step is what `train_loop` runs: forward of both towers,
the contrastive loss, backward, gradient clipping, AdamW and the temperature clamp, on random images and captions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from training.loss import clip_loss  # noqa: E402
from training.model import MODEL_PRESETS, create_model  # noqa: E402
from training.train import parameter_groups  # noqa: E402

RATES = (0.0, 0.5, 0.75)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-b-32", choices=list(MODEL_PRESETS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per rate (after one warm-up round)")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast (for CPUs without AMX)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.preset).train()
    config = model.config
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.2), lr=1e-4)
    images = torch.randn(args.batch_size, 3, config.image_size, config.image_size)
    tokens = torch.randint(2, config.vocab_size - 1, (args.batch_size, config.context_length))
    tokens[:, config.context_length // 2] = config.vocab_size - 1
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32)  # noqa: E731

    def image_tower() -> None:
        with autocast():
            features = model.visual(images)
        features.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def whole_step() -> None:
        with autocast():
            image_emb, text_emb, logit_scale = model(images, tokens)
        clip_loss(image_emb, text_emb, logit_scale).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale()

    print(f"{args.preset}: {config.image_size} px, {(config.image_size // config.patch_size) ** 2} patches, batch "
          f"{args.batch_size}, {'fp32' if args.fp32 else 'bf16 autocast'}, {torch.get_num_threads()} thread(s), "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; median of {args.rounds} interleaved rounds")
    for name, work in (("image tower fwd+bwd", image_tower), ("whole step", whole_step)):
        cpu: dict[float, list[float]] = {rate: [] for rate in RATES}
        wall: dict[float, list[float]] = {rate: [] for rate in RATES}
        for round_ in range(args.rounds + 1):
            for rate in RATES:
                model.visual.patch_dropout = rate
                start, start_cpu = time.perf_counter(), time.process_time()
                work()
                if round_:  # round 0 warms up every shape
                    cpu[rate].append(time.process_time() - start_cpu)
                    wall[rate].append(time.perf_counter() - start)
        rates = {rate: args.batch_size / statistics.median(cpu[rate]) for rate in RATES}
        walls = {rate: args.batch_size / statistics.median(wall[rate]) for rate in RATES}
        print(f"{name:>20}: " + "   ".join(f"dropout {rate:.2f}: {rates[rate]:6.2f} samples/CPU-s "
                                            f"({rates[rate] / rates[0.0]:.2f}x; wall {walls[rate]:.2f}/s)"
                                            for rate in RATES), flush=True)


if __name__ == "__main__":
    main()
