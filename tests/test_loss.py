"""The tiled and distributed forms of the contrastive loss equal the formula, in value and in gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed import init_gloo, spawn
from training.loss import _RowLogSumExp, chunked_clip_loss, clip_loss, distributed_clip_loss

TOLERANCE = 1e-5


def _random_batch(n: int, dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image_emb = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    text_emb = F.normalize(image_emb + 0.8 * torch.randn(n, dim, generator=generator), dim=-1)  # partly matched
    return image_emb, text_emb, torch.tensor(1 / 0.07)


def _value_and_grads(loss_fn, image_emb, text_emb, logit_scale, **kwargs) -> list[torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in (image_emb, text_emb, logit_scale)]
    loss = loss_fn(*leaves, **kwargs)
    loss.backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves]


def _assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for name, a, e in zip(["loss", "d/d image_emb", "d/d text_emb", "d/d logit_scale"], actual, expected):
        assert torch.allclose(a, e, atol=TOLERANCE, rtol=0), f"{name}: max difference {(a - e).abs().max():.2e}"


def test_clip_loss_is_the_formula():
    image_emb, text_emb, logit_scale = _random_batch(5)
    logits = logit_scale * image_emb @ text_emb.T
    by_hand = -(logits.log_softmax(dim=1).diag().mean() + logits.log_softmax(dim=0).diag().mean()) / 2
    assert torch.allclose(clip_loss(image_emb, text_emb, logit_scale), by_hand)


def test_loss_is_fp32_for_bf16_embeddings():
    image_emb, text_emb, logit_scale = _random_batch(8)
    loss = clip_loss(image_emb.bfloat16(), text_emb.bfloat16(), logit_scale)
    assert loss.dtype == torch.float32
    assert chunked_clip_loss(image_emb.bfloat16(), text_emb.bfloat16(), logit_scale, chunk_size=3).dtype == torch.float32


@pytest.mark.parametrize("n, chunk_size", [(64, 16), (100, 32), (257, 64), (50, 128), (1, 4)])
def test_chunked_loss_equals_formula(n: int, chunk_size: int):
    batch = _random_batch(n, seed=n)
    _assert_all_close(_value_and_grads(chunked_clip_loss, *batch, chunk_size=chunk_size),
                      _value_and_grads(clip_loss, *batch))


@pytest.mark.parametrize("chunk_size", [None, 24])
def test_distributed_loss_in_one_process_equals_formula(chunk_size: int | None):
    batch = _random_batch(70)
    _assert_all_close(_value_and_grads(distributed_clip_loss, *batch, chunk_size=chunk_size),
                      _value_and_grads(clip_loss, *batch))


def test_row_logsumexp_equals_dense():
    """The building block of local rows against gathered columns: an n x M tiled log-sum-exp."""
    rows, cols, scale = torch.randn(37, 16), torch.randn(53, 16), torch.tensor(3.0)
    weights = torch.randn(37)  # an arbitrary upstream gradient

    def tiled(r, c, s):
        return (_RowLogSumExp.apply(r, c, s, 10) * weights).sum()

    def dense(r, c, s):
        return (torch.logsumexp(s * r @ c.T, dim=1) * weights).sum()

    args = [t.double() for t in (rows, cols, scale)]  # fp64: the logits here are large, not unit-norm
    weights = weights.double()
    assert torch.autograd.gradcheck(lambda r, c, s: _RowLogSumExp.apply(r, c, s, 10),
                                    [a.clone().requires_grad_() for a in args])
    for a, e in zip(_value_and_grads(tiled, *args), _value_and_grads(dense, *args)):
        assert torch.allclose(a, e, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Two real processes (gloo on 127.0.0.1)

WORLD_SIZE, ROWS_PER_PROCESS, INPUT_DIM, EMBED_DIM = 2, 37, 12, 16


def _embed(projection: torch.nn.Linear, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for the two towers: one shared layer, so that DDP-style gradient averaging can be checked."""
    return F.normalize(projection(inputs), dim=-1), F.normalize(projection(inputs.flip(-1)), dim=-1)


def _worker(rank: int, world_size: int, port: int, chunk_size: int | None) -> None:
    init_gloo(rank, world_size, port)
    try:
        torch.manual_seed(0)  # the same global batch and weights on every process
        inputs = torch.randn(WORLD_SIZE * ROWS_PER_PROCESS, INPUT_DIM)
        projection = torch.nn.Linear(INPUT_DIM, EMBED_DIM)
        log_scale = torch.nn.Parameter(torch.tensor(2.5))

        # the reference: the formula on the concatenated batch, in this one process
        image_emb, text_emb = _embed(projection, inputs)
        expected_loss = clip_loss(image_emb, text_emb, log_scale.exp())
        expected_grads = torch.autograd.grad(expected_loss, [projection.weight, projection.bias, log_scale])

        # each process: its own shard; embeddings kept to check what reaches them
        shard = slice(rank * ROWS_PER_PROCESS, (rank + 1) * ROWS_PER_PROCESS)
        image_emb, text_emb = _embed(projection, inputs[shard])
        image_emb.retain_grad()
        text_emb.retain_grad()
        loss = distributed_clip_loss(image_emb, text_emb, log_scale.exp(), chunk_size=chunk_size)
        loss.backward()

        # what DDP does: average the gradients (and here the losses) over processes
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        assert torch.allclose(mean_loss / WORLD_SIZE, expected_loss, atol=TOLERANCE), (mean_loss, expected_loss)
        for parameter, expected in zip([projection.weight, projection.bias, log_scale], expected_grads):
            grad = parameter.grad.clone()
            dist.all_reduce(grad)
            assert torch.allclose(grad / WORLD_SIZE, expected, atol=TOLERANCE), (grad / WORLD_SIZE - expected).abs().max()

        # the documented convention: before DDP's 1/W, the embeddings hold W x the global loss's gradient
        reference = inputs.clone().requires_grad_(False)
        all_image_emb, all_text_emb = (t.detach().requires_grad_() for t in _embed(projection, reference))
        clip_loss(all_image_emb, all_text_emb, log_scale.exp().detach()).backward()
        assert torch.allclose(image_emb.grad, WORLD_SIZE * all_image_emb.grad[shard], atol=TOLERANCE)
        assert torch.allclose(text_emb.grad, WORLD_SIZE * all_text_emb.grad[shard], atol=TOLERANCE)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [None, 16], ids=["local-loss", "local-loss+chunked"])
def test_distributed_loss_in_two_processes_equals_formula_on_concatenated_batch(chunk_size: int | None):
    spawn(_worker, args=(chunk_size,), nprocs=WORLD_SIZE)
