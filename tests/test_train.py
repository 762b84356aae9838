"""The training loop in one process (no Ray): schedule, weight decay groups, gradient accumulation that keeps the
contrastive batch whole, distributed data parallel equivalence, checkpoints and exact mid-epoch resume; activation
checkpointing, compile and FSDP2 with its sharded checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed import init_gloo, spawn
from tests.shards import write_dataset, write_tokenizer
from training.checkpoint import load_weights, read_state
from training.model import create_model
from training.parallel import apply_activation_checkpointing, compile_blocks
from training.train import TrainConfig, contrastive_step, learning_rate, parameter_groups, train_loop


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    rates = [learning_rate(step, 100, 1e-3, 10) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert learning_rate(100, 100, 1e-3, 10) == pytest.approx(0.0)


def test_no_weight_decay_on_norms_biases_embeddings_and_temperature() -> None:
    model = create_model("tiny")
    decay, no_decay = parameter_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "log_logit_scale" in no_decay_names and "text.token_embedding.weight" in no_decay_names
    assert any("ln" in n or "norm" in n for n in no_decay_names) and any(n.endswith("bias") for n in no_decay_names)
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.2  # matrices, conv kernels


def _batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    tokens = torch.randint(2, 1000, (n, 32), generator=generator)
    tokens[:, 10] = 1023  # end of text
    return images, tokens


def test_accumulation_of_k_micro_batches_equals_one_batch_k_times_larger() -> None:
    images, tokens = _batch(24)
    results = []
    for k in (1, 3):
        torch.manual_seed(0)
        model = create_model("tiny")
        config = TrainConfig(data="unused", preset="tiny", batch_size=24, accum_steps=k, precision="fp32")
        loss = contrastive_step(model, images, tokens, config, torch.device("cpu"))
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_one, grads_one), (loss_acc, grads_acc) = results
    assert loss_acc.item() == pytest.approx(loss_one.item(), abs=1e-5)
    for name, grad in grads_one.items():
        torch.testing.assert_close(grads_acc[name], grad, atol=2e-5, rtol=1e-4, msg=name)


def _ddp_losses(rank: int, world_size: int, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = create_model("tiny")
    config = TrainConfig(data="unused", preset="tiny", batch_size=16, precision="fp32")
    trained = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.2), lr=1e-3)
    losses = []
    for step in range(steps):
        images, tokens = _batch(16, seed=step)  # the same global batch for every world size
        local = slice(rank * 16 // world_size, (rank + 1) * 16 // world_size)
        optimizer.zero_grad()
        loss = contrastive_step(trained, images[local], tokens[local], config, torch.device("cpu"))
        optimizer.step()
        model.clamp_logit_scale()
        if world_size > 1:  # the global loss is the mean of the per-rank losses (see training.loss)
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(loss.item())
    return losses


def _ddp_process(rank: int, world_size: int, port: int, steps: int, out: str) -> None:
    """One of the gloo processes. DDP is gone before its process group: the other order can hang in DDP's teardown."""
    init_gloo(rank, world_size, port)
    losses = _ddp_losses(rank, world_size, steps)
    if rank == 0:
        Path(out).write_text(json.dumps(losses))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_workers_of_batch_b_train_like_one_worker_of_batch_2b(tmp_path: Path) -> None:
    """Same seed, same global batch: 2 gloo processes x 8 and 1 process x 16 give the same losses (tolerance 1e-4)."""
    one = _ddp_losses(0, 1, 4)
    spawn(_ddp_process, args=(4, str(tmp_path / "two.json")))
    two = json.loads((tmp_path / "two.json").read_text())
    assert one == pytest.approx(two, abs=1e-4)
    assert one[-1] != pytest.approx(one[0], abs=1e-3)  # the weights did move between steps


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train")
    return write_dataset(root / "shards", sizes=[40, 40, 40, 40]), write_tokenizer(root / "tokenizer")


def _run(dataset, output: Path, steps: int, resume_from: Path | None = None, prepare_model=None,
         **changes) -> list[Path]:
    shards, tokenizer = dataset
    config = TrainConfig(data=str(shards), output=str(output), preset="tiny", steps=steps, batch_size=16,
                         lr=2e-3, warmup_steps=5, checkpoint_every=5, log_every=1, loader_workers=0,
                         record_sample_keys=True, **changes)
    saved: list[Path] = []

    def report(metrics: dict, directory: Path | None) -> None:  # stands in for ray.train.report
        if directory is not None:
            target = output / directory.name
            import shutil

            shutil.copytree(directory, target, dirs_exist_ok=True)
            saved.append(target)

    train_loop(config, tokenizer, report, resume_from=resume_from, prepare_model=prepare_model)
    return saved


def _history(checkpoint: Path) -> list[dict]:
    return [json.loads(line) for line in (checkpoint / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_checkpoints(dataset, tmp_path: Path) -> None:
    saved = _run(dataset, tmp_path / "run", steps=40)
    assert [p.name for p in saved] == [f"step_{s:08d}" for s in (5, 10, 15, 20, 25, 30, 35, 40)]
    history = _history(saved[-1])
    first, last = sum(h["loss"] for h in history[:5]) / 5, sum(h["loss"] for h in history[-5:]) / 5
    assert last < first - 0.3, (first, last)
    state = read_state(saved[-1])
    assert state["step"] == 40 and state["epoch"] == 4 and state["step_in_epoch"] == 0  # 10 steps per epoch
    model, tokenizer = load_weights(saved[-1])
    assert set(os.listdir(saved[-1])) >= {"model.safetensors", "optimizer.safetensors", "tokenizer.json",
                                          "state.json", "model_config.json", "metrics.jsonl"}


def test_resume_mid_epoch_repeats_and_skips_nothing(dataset, tmp_path: Path) -> None:
    straight = _run(dataset, tmp_path / "straight", steps=15)
    interrupted = _run(dataset, tmp_path / "interrupted", steps=5)  # stops at step 5, mid-epoch 0
    resumed = _run(dataset, tmp_path / "resumed", steps=15, resume_from=interrupted[-1])
    keys = lambda path: [(e["step"], e["keys"]) for e in map(json.loads, (path / "sample_keys.jsonl").read_text().splitlines())]
    assert keys(resumed[-1]) == keys(straight[-1])  # steps 1-5 from before the stop, 6-15 after it
    losses = lambda path: [h["loss"] for h in _history(path)]
    assert losses(resumed[-1]) == pytest.approx(losses(straight[-1]), abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# what is applied from outside: activation checkpointing, compile, FSDP2 (training.parallel)


def _losses(steps: int, prepare=lambda model: None, **changes) -> list[float]:
    torch.manual_seed(0)
    model = create_model("tiny")
    prepare(model)
    config = TrainConfig(data="unused", preset="tiny", batch_size=16, precision="fp32", **changes)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.2), lr=1e-3)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        losses.append(contrastive_step(model, *_batch(16, seed=step), config, torch.device("cpu")).item())
        optimizer.step()
    return losses


def test_activation_checkpointing_changes_memory_not_results() -> None:
    assert _losses(3, apply_activation_checkpointing) == pytest.approx(_losses(3), abs=1e-6)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager() -> None:
    """torch.compile (inductor's C++ backend on CPU) of every block: the same losses over a few steps."""
    eager = _losses(3)
    assert _losses(3, compile_blocks) == pytest.approx(eager, abs=1e-4)
    assert eager[-1] != pytest.approx(eager[0], abs=1e-3)  # the weights did move between steps


def _strategy_runs(rank: int, world_size: int, port: int, dataset: tuple[Path, Path], root: str) -> None:
    """In each of 2 gloo processes: 10 steps with DDP, 10 with FSDP2, and FSDP2 stopped at 5 then resumed to 10."""
    init_gloo(rank, world_size, port)
    ddp = lambda model: torch.nn.parallel.DistributedDataParallel(model)  # noqa: E731 - what Ray's prepare_model does
    _run(dataset, Path(root) / "ddp", steps=10, prepare_model=ddp, precision="fp32")
    _run(dataset, Path(root) / "fsdp", steps=10, strategy="fsdp", precision="fp32")
    _run(dataset, Path(root) / "stopped", steps=5, strategy="fsdp", precision="fp32")
    dist.barrier()  # every rank's part of the checkpoint is in place
    _run(dataset, Path(root) / "resumed", steps=10, strategy="fsdp", precision="fp32",
         resume_from=Path(root) / "stopped" / "step_00000005")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_resumes_exactly_from_its_sharded_checkpoint(dataset, tmp_path: Path) -> None:
    spawn(_strategy_runs, args=(dataset, str(tmp_path)))
    last = lambda name: tmp_path / name / "step_00000010"  # noqa: E731
    losses = lambda name: [h["loss"] for h in _history(last(name))]  # noqa: E731
    assert losses("fsdp") == pytest.approx(losses("ddp"), abs=1e-4)
    assert losses("resumed") == pytest.approx(losses("fsdp"), abs=1e-6)
    assert (tmp_path / "stopped" / "step_00000005" / "sharded" / "__1_0.distcp").exists()  # rank 1 wrote its part
    assert not (tmp_path / "fsdp" / "step_00000005" / "model.safetensors").exists()  # nothing gathered mid-run
    sharded, _ = load_weights(last("fsdp"))  # the single model file of the last step
    replicated, _ = load_weights(last("ddp"))
    for name, tensor in replicated.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], tensor, atol=1e-4, rtol=1e-3, msg=name)


def test_a_worker_error_reaches_the_user_as_its_own_line() -> None:
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from pipeline.errors import UserError
    from training.ray_job import _root_cause

    try:
        raise UserError("data has no manifest.parquet")
    except UserError as err:
        wrapped = RayTaskError("train_fn", "Traceback ...", err)  # how Ray carries a worker's exception
    failure = WorkerGroupError("rank 0 and 1 failed", {1: RuntimeError("later rank"), 0: wrapped})
    cause = _root_cause(failure)
    assert isinstance(cause, UserError) and str(cause) == "data has no manifest.parquet"


def test_local_locations_become_absolute_for_workers_that_run_elsewhere(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(data="shards/train", init_from="runs/parent/model")
    assert config.data == str(tmp_path / "shards" / "train") and config.init_from == str(tmp_path / "runs/parent/model")
    assert TrainConfig(data="s3://bucket/shards").data == "s3://bucket/shards"
