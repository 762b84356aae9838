"""Peak memory and time of one forward + backward of the contrastive loss: dense `clip_loss` vs `chunked_clip_loss`.

    python bench/loss_memory.py                                # every N, both forms (several minutes on 2 cores)
    python bench/loss_memory.py --sizes 4096 16384 --chunk-size 2048

Each case runs in a fresh subprocess, so that one case's freed memory cannot hide the next one's peak. Memory is
the process's peak resident set (`ru_maxrss`) minus its resident set just before the loss, so it counts everything
the loss allocates, the two (N, D) input gradients included, and not the inputs themselves. A dense case is skipped
when its projected need (measured bytes per matrix element at the largest N that ran, or 5 fp32 N x N matrices if
none ran yet) exceeds 60% of the memory available (the machine may be shared: never provoke the OOM killer).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GIB = 1024**3


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":") for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def run_case(form: str, n: int, dim: int, chunk_size: int, repeats: int) -> dict:
    """In this process: one (or `repeats`) forward + backward at size n; returns seconds (best) and bytes (peak)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import torch

    from training.loss import chunked_clip_loss, clip_loss

    def loss_fn(image_emb, text_emb, logit_scale):
        if form == "dense":
            return clip_loss(image_emb, text_emb, logit_scale)
        return chunked_clip_loss(image_emb, text_emb, logit_scale, chunk_size=chunk_size)

    def embeddings(rows: int) -> torch.Tensor:
        x = torch.randn(rows, dim)
        return x.div_(x.norm(dim=-1, keepdim=True)).requires_grad_()  # in place: no temporary (rows, dim) copy

    torch.manual_seed(0)
    small = [embeddings(256), embeddings(256), torch.tensor(1 / 0.07, requires_grad=True)]
    loss_fn(*small).backward()  # warm up threads and kernels outside the measurement
    image_emb, text_emb = embeddings(n), embeddings(n)
    logit_scale = torch.tensor(1 / 0.07, requires_grad=True)
    rss_before = _current_rss()
    times = []
    for _ in range(repeats):
        image_emb.grad = text_emb.grad = logit_scale.grad = None
        start = time.perf_counter()
        loss = loss_fn(image_emb, text_emb, logit_scale)
        loss.backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"form": form, "n": n, "seconds": min(times), "peak_bytes": peak - rss_before, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--forms", nargs="+", default=["dense", "chunked"], choices=["dense", "chunked"])
    parser.add_argument("--case", nargs=2, metavar=("FORM", "N"), help=argparse.SUPPRESS)  # one case, internal
    args = parser.parse_args()
    if args.case:
        form, n = args.case[0], int(args.case[1])
        print(json.dumps(run_case(form, n, args.dim, args.chunk_size, repeats=2 if n <= 16384 else 1)))
        return

    import torch

    print(f"loss forward+backward, D={args.dim}, fp32, chunk_size={args.chunk_size}, "
          f"{torch.get_num_threads()} threads, {_available_memory() / GIB:.1f} GiB available")
    print(f"{'N':>7} {'form':>8} {'seconds':>9} {'peak memory':>12}  note")
    dense_bytes_per_element = 5 * 4  # until measured: logits, two log-softmaxes, their gradients, in fp32
    dense_seconds: dict[int, float] = {}
    for n in args.sizes:
        for form in args.forms:
            if form == "dense":
                need = dense_bytes_per_element * n * n
                if need > 0.6 * _available_memory():  # a shared machine: leave others room, never risk the OOM killer
                    print(f"{n:>7} {form:>8} {'-':>9} {'-':>12}  skipped: would need ~{need / GIB:.0f} GiB")
                    continue
            command = [sys.executable, __file__, "--case", form, str(n), "--dim", str(args.dim),
                       "--chunk-size", str(args.chunk_size)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{n:>7} {form:>8} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            note = ""
            if form == "dense":
                dense_seconds[n] = result["seconds"]
                dense_bytes_per_element = result["peak_bytes"] / (n * n)
                note = f"{dense_bytes_per_element:.1f} bytes per matrix element"
            elif n in dense_seconds:
                note = f"{result['seconds'] / dense_seconds[n]:.2f}x dense time"
            print(f"{n:>7} {form:>8} {result['seconds']:>9.2f} {result['peak_bytes'] / GIB:>10.3f} GiB  {note}",
                  flush=True)


if __name__ == "__main__":
    main()
