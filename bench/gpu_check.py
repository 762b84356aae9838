"""A short check of the model and the loss on one CUDA GPU: training steps, the tiled loss at large N, and NCCL.

    python bench/gpu_check.py            # a few minutes at most on one H100/H200

Needs only torch and this repository (run from its root or anywhere: the repo is put on the path). It
1. builds `small` and `vit-b-32`, runs bf16-autocast AdamW steps with `chunked_clip_loss` and prints samples/s,
   loss and MFU against a bf16 matmul timed here;
2. compares `clip_loss` and `chunked_clip_loss` (value, gradients, time, peak memory) at N = 16,384 and 65,536;
3. starts a one-process NCCL group and checks the differentiable all-gather and `distributed_clip_loss`.
It exits with an error when CUDA is absent, and with an assertion error when a check fails.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from training.loss import all_gather_with_grad, chunked_clip_loss, clip_loss, distributed_clip_loss  # noqa: E402
from training.model import create_model, flops_per_sample  # noqa: E402


def bf16_matmul_peak(size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def train_steps(preset: str, batch_size: int, steps: int, peak: float) -> None:
    torch.manual_seed(0)
    model = create_model(preset).cuda()
    config = model.config
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(batch_size, 3, config.image_size, config.image_size, device="cuda")
    tokens = torch.randint(2, config.vocab_size - 1, (batch_size, config.context_length), device="cuda")
    tokens[:, config.context_length // 2] = config.vocab_size - 1

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            image_emb, text_emb, logit_scale = model(images, tokens)
        loss = chunked_clip_loss(image_emb, text_emb, logit_scale, chunk_size=4096)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale()
        return loss.detach()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    torch.cuda.synchronize()
    throughput = batch_size * steps / (time.perf_counter() - start)
    mfu = throughput * 3 * flops_per_sample(config)["total"] / peak
    assert all(torch.isfinite(loss) for loss in losses), losses
    print(f"{preset:>9} batch {batch_size}: {throughput:9.0f} samples/s, MFU {mfu:5.1%}, "
          f"loss {losses[0].item():.4f} -> {losses[-1].item():.4f}, logit scale {model.logit_scale().item():.2f}",
          flush=True)


def loss_case(loss_fn, image_emb, text_emb, logit_scale) -> tuple[list[torch.Tensor], float, float]:
    leaves = [t.clone().requires_grad_() for t in (image_emb, text_emb, logit_scale)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loss = loss_fn(*leaves)
    loss.backward()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base
    return [loss.detach()] + [leaf.grad for leaf in leaves], seconds, peak


def compare_losses(n: int, dim: int = 512) -> None:
    generator = torch.Generator(device="cuda").manual_seed(n)
    image_emb = F.normalize(torch.randn(n, dim, device="cuda", generator=generator), dim=-1)
    text_emb = F.normalize(image_emb + torch.randn(n, dim, device="cuda", generator=generator), dim=-1)
    logit_scale = torch.tensor(1 / 0.07, device="cuda")

    def chunked(*args):
        return chunked_clip_loss(*args, chunk_size=8192)

    loss_case(chunked, image_emb[:1024], text_emb[:1024], logit_scale)  # warm-up
    loss_case(clip_loss, image_emb[:1024], text_emb[:1024], logit_scale)
    tiled, tiled_s, tiled_peak = loss_case(chunked, image_emb, text_emb, logit_scale)
    try:
        dense, dense_s, dense_peak = loss_case(clip_loss, image_emb, text_emb, logit_scale)
    except torch.cuda.OutOfMemoryError:
        print(f"loss N={n}: dense out of memory | chunked {tiled_s * 1e3:7.1f} ms {tiled_peak / 2**30:6.2f} GiB")
        return
    differences = [(a - b).abs().max().item() for a, b in zip(tiled, dense)]
    print(f"loss N={n}: dense {dense_s * 1e3:7.1f} ms {dense_peak / 2**30:6.2f} GiB | chunked {tiled_s * 1e3:7.1f} ms "
          f"{tiled_peak / 2**30:6.2f} GiB ({tiled_s / dense_s:.2f}x time) | max differences "
          + " ".join(f"{d:.1e}" for d in differences), flush=True)
    assert max(differences[1:]) < 1e-5 and differences[0] < 1e-4 * abs(dense[0].item()), differences


def check_nccl() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        x = torch.randn(8, 4, device="cuda", requires_grad=True)
        gathered = all_gather_with_grad(x)
        (gathered * 3).sum().backward()  # backward goes through reduce-scatter on NCCL
        assert torch.equal(gathered, x) and torch.allclose(x.grad, torch.full_like(x, 3.0))
        image_emb = F.normalize(torch.randn(512, 64, device="cuda"), dim=-1)
        text_emb = F.normalize(torch.randn(512, 64, device="cuda"), dim=-1)
        scale = torch.tensor(1 / 0.07, device="cuda")
        for chunk_size in (None, 100):
            a = distributed_clip_loss(image_emb, text_emb, scale, chunk_size=chunk_size)
            assert torch.allclose(a, clip_loss(image_emb, text_emb, scale), atol=1e-5)
        print(f"nccl: one-process group ({dist.get_backend()}), all-gather with gradients and "
              f"distributed_clip_loss ok", flush=True)
    finally:
        dist.destroy_process_group()


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_check: CUDA is not available (torch.cuda.is_available() is False); run this on a GPU machine")
    torch.backends.cuda.matmul.allow_tf32 = False  # the loss comparison is meant in true fp32
    peak = bf16_matmul_peak()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 matmul {peak / 1e12:.0f} TFLOP/s",
          flush=True)
    train_steps("small", batch_size=1024, steps=20, peak=peak)
    train_steps("vit-b-32", batch_size=256, steps=10, peak=peak)
    for n in (16384, 65536):
        compare_losses(n)
    check_nccl()
    print("gpu_check: all checks passed")


if __name__ == "__main__":
    main()
