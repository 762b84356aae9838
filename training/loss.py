"""The contrastive (symmetric InfoNCE) loss, in three forms with the same value and the same gradients.

`clip_loss` is the formula as written: the N x N matrix of scaled cosine similarities, cross-entropy along its rows
(image -> text) and its columns (text -> image), averaged. Beside it:

- `chunked_clip_loss` never materialises the N x N matrix. It tiles it, keeps an online log-sum-exp per row and per
  column in forward, and recomputes each tile in backward (a custom `torch.autograd.Function`, as Inf-CL,
  arXiv 2410.17243), so memory grows linearly in N: four matmuls per tile against the dense form's three.
- `distributed_clip_loss` is open_clip's "local loss": each process computes only its own rows of the global
  matrix, against embeddings all-gathered from every process with gradients. With `chunk_size` it tiles those rows.

DDP convention. DDP averages gradients over the W processes. Each process therefore returns the mean over its *own*
rows (n = N / W of them), which is W times its share of the global loss: the mean of the W returned values is the
global loss, and the averaged gradients are the global loss's gradients. The all-gather's backward sums the
gradients that every process computed for a shard and hands each process its own shard's sum, so the gradient
that reaches a process's embeddings is W x d(global loss)/d(its embeddings) before DDP's 1/W. Every process must
hold the same number of samples.

Everything here runs in fp32 (embeddings are cast inside), whatever autocast the model ran under.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over (N, D) unit-length embeddings; pair i is (image_emb[i], text_emb[i])."""
    logits_per_image = logit_scale * image_emb.float() @ text_emb.float().T  # (N, N), row i: image i vs all texts
    labels = torch.arange(len(logits_per_image), device=logits_per_image.device)  # (N,)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


# ---------------------------------------------------------------------------------------------------------------
# Tiled log-sum-exp with recomputation in backward


def _tiles(length: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size)]


class _RowLogSumExp(torch.autograd.Function):
    """lse_i = log sum_j exp(scale * rows_i . cols_j), tile by tile: (n, D), (M, D), () -> (n,)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, chunk_size: int) -> torch.Tensor:
        lse = torch.full((len(rows),), -torch.inf, dtype=rows.dtype, device=rows.device)  # (n,)
        for r in _tiles(len(rows), chunk_size):
            scaled_rows = scale * rows[r]  # (br, D) scaling D columns here is cheaper than bc columns per tile
            for c in _tiles(len(cols), chunk_size):
                logits = scaled_rows @ cols[c].T  # (br, bc)
                lse[r] = torch.logaddexp(lse[r], torch.logsumexp(logits, dim=1))  # online merge of column tiles
        ctx.save_for_backward(rows, cols, scale, lse)
        ctx.chunk_size = chunk_size
        return lse

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor):
        rows, cols, scale, lse = ctx.saved_tensors
        grad_rows, grad_cols = torch.zeros_like(rows), torch.zeros_like(cols)
        grad_scale = torch.zeros((), dtype=rows.dtype, device=rows.device)  # sum_ij G_ij * (rows_i . cols_j)
        for r in _tiles(len(rows), ctx.chunk_size):
            scaled_rows = scale * rows[r]  # (br, D)
            for c in _tiles(len(cols), ctx.chunk_size):
                weights = (scaled_rows @ cols[c].T).sub_(lse[r, None]).exp_()  # (br, bc) softmax over j
                weights.mul_(grad_lse[r, None])  # G = d loss / d logits
                weighted_cols = weights @ cols[c]  # (br, D)
                grad_rows[r] += weighted_cols
                grad_cols[c] += weights.T @ rows[r]  # (bc, D)
                grad_scale += (rows[r] * weighted_cols).sum()
        return grad_rows.mul_(scale), grad_cols.mul_(scale), grad_scale, None


class _SymmetricLogSumExp(torch.autograd.Function):
    """Row and column log-sum-exps of the one matrix scale * a @ b.T, from one pass over its tiles.

    (N, D), (N, D), () -> (N,), (N,). Reading each tile once for both directions is what keeps the tiled loss
    within four matmuls per tile (one forward, three backward) of the dense loss's three.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, chunk_size: int):
        lse_rows = torch.full((len(a),), -torch.inf, dtype=a.dtype, device=a.device)  # (N,)
        lse_cols = torch.full((len(b),), -torch.inf, dtype=a.dtype, device=a.device)  # (N,)
        for r in _tiles(len(a), chunk_size):
            scaled_a = scale * a[r]  # (br, D)
            for c in _tiles(len(b), chunk_size):
                logits = scaled_a @ b[c].T  # (br, bc)
                lse_rows[r] = torch.logaddexp(lse_rows[r], torch.logsumexp(logits, dim=1))
                lse_cols[c] = torch.logaddexp(lse_cols[c], torch.logsumexp(logits, dim=0))
        ctx.save_for_backward(a, b, scale, lse_rows, lse_cols)
        ctx.chunk_size = chunk_size
        return lse_rows, lse_cols

    @staticmethod
    def backward(ctx, grad_rows_lse: torch.Tensor, grad_cols_lse: torch.Tensor):
        a, b, scale, lse_rows, lse_cols = ctx.saved_tensors
        grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
        grad_scale = torch.zeros((), dtype=a.dtype, device=a.device)
        for r in _tiles(len(a), ctx.chunk_size):
            scaled_a = scale * a[r]  # (br, D)
            for c in _tiles(len(b), ctx.chunk_size):
                logits = scaled_a @ b[c].T  # (br, bc)
                row_softmax = (logits - lse_rows[r, None]).exp_().mul_(grad_rows_lse[r, None])
                weights = logits.sub_(lse_cols[None, c]).exp_().mul_(grad_cols_lse[None, c])  # column softmax
                weights += row_softmax  # (br, bc) d loss / d logits
                weighted_b = weights @ b[c]  # (br, D)
                grad_a[r] += weighted_b
                grad_b[c] += weights.T @ a[r]  # (bc, D)
                grad_scale += (a[r] * weighted_b).sum()
        return grad_a.mul_(scale), grad_b.mul_(scale), grad_scale, None


def chunked_clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, chunk_size: int = 2048
) -> torch.Tensor:
    """`clip_loss` without the N x N matrix: tiles of chunk_size x chunk_size, memory linear in N."""
    image_emb, text_emb = image_emb.float(), text_emb.float()
    positive = logit_scale * (image_emb * text_emb).sum(dim=-1)  # (N,) the diagonal, i.e. the labels' logits
    lse_per_image, lse_per_text = _SymmetricLogSumExp.apply(image_emb, text_emb, logit_scale, chunk_size)
    return ((lse_per_image - positive).mean() + (lse_per_text - positive).mean()) / 2


# ---------------------------------------------------------------------------------------------------------------
# Several processes


class _AllGather(torch.autograd.Function):
    """Concatenate every process's (n, D) tensor into (W * n, D); backward sums each shard's gradient over processes."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, tensor.contiguous())
        return torch.cat(shards)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        if dist.get_backend() == "nccl":  # reduce-scatter moves 1/W of the data; all-reduce works on any backend
            shard = torch.empty(grad.shape[0] // world_size, *grad.shape[1:], dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(shard, grad.contiguous())
            return shard
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world_size)[rank]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(n, D) on each of W processes -> (W * n, D) on every process, differentiable."""
    return _AllGather.apply(tensor)


def distributed_clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """This process's rows of the global loss over every process's batch ("local loss"); see the module docstring.

    Returns the mean over local rows: the mean over processes equals `clip_loss` on the concatenated batch, and
    DDP's gradient averaging yields its gradients. Without an initialised process group this is the one-process
    loss. `chunk_size` tiles the local rows against the gathered columns (never materialising n x N).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if chunk_size is None:
            return clip_loss(image_emb, text_emb, logit_scale)
        return chunked_clip_loss(image_emb, text_emb, logit_scale, chunk_size)
    image_emb, text_emb = image_emb.float(), text_emb.float()
    all_image_emb = all_gather_with_grad(image_emb)  # (N, D), N = W * n
    all_text_emb = all_gather_with_grad(text_emb)  # (N, D)
    if chunk_size is None:
        logits_per_image = logit_scale * image_emb @ all_text_emb.T  # (n, N) our rows of the global matrix
        logits_per_text = logit_scale * text_emb @ all_image_emb.T  # (n, N) our columns, transposed
        labels = dist.get_rank() * len(image_emb) + torch.arange(len(image_emb), device=image_emb.device)  # (n,)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    positive = logit_scale * (image_emb * text_emb).sum(dim=-1)  # (n,)
    lse_per_image = _RowLogSumExp.apply(image_emb, all_text_emb, logit_scale, chunk_size)  # (n,)
    lse_per_text = _RowLogSumExp.apply(text_emb, all_image_emb, logit_scale, chunk_size)  # (n,)
    return ((lse_per_image - positive).mean() + (lse_per_text - positive).mean()) / 2
