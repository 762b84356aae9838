"""Fine-tuning recipes on an imported model: locked towers stay bit-identical, the rest trains, the result evaluates.

The "released" model is a small random CLIP written in open_clip's layout (CLIP's tokenizer, 77 tokens, 49,408 ids),
so these tests need neither a download nor open_clip itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training.checkpoint import load_weights
from training.convert import to_openai
from evaluation.evaluate import EvaluateConfig, evaluate
from training.model import CLIP, MODEL_PRESETS, ModelConfig
from training.train import TrainConfig, lock_tower, parameter_groups, train_loop
from tests.shards import write_dataset

SMALL_RELEASED = ModelConfig(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                             text_width=64, text_layers=2, text_heads=2, embed_dim=32, activation="quick_gelu")


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model saved as an open_clip training checkpoint would be (.safetensors in open_clip's names)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("released") / "open_clip_model.safetensors"
    save_file(to_openai(CLIP(SMALL_RELEASED).state_dict()), path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("finetune") / "shards", sizes=[32, 32])


def test_lock_leaves_the_last_blocks_and_the_top_trainable():
    model = CLIP(MODEL_PRESETS["tiny"])
    lock_tower(model.visual, unlocked_layers=1)
    trainable = {name for name, p in model.visual.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "ln_post.", "projection.")) for n in trainable)
    assert all(p.requires_grad for p in model.text.parameters())
    groups = parameter_groups(model, 0.2, tower_lr_scale=0.1)
    grouped = [p for group in groups for p in group["params"]]
    assert len(grouped) == sum(p.requires_grad for p in model.parameters())  # locked weights get no optimizer state
    scales = {id(p): group["lr_scale"] for group in groups for p in group["params"]}
    assert scales[id(model.log_logit_scale)] == 1.0 and scales[id(model.text.projection.weight)] == 1.0
    assert scales[id(model.text.blocks[0].attn.qkv.weight)] == 0.1
    assert len(parameter_groups(model, 0.2)) == 2  # one rate: decay / no decay, as before


def _fine_tune(released: Path, shards: Path, output: Path, **changes) -> Path:
    """Import `released` (as --init-from does) and train 6 steps in this process; returns the last checkpoint."""
    from training.convert import ImportConfig, import_checkpoint

    parent = output / "init"
    import_checkpoint(ImportConfig(source=str(released), output=str(parent)))
    config = TrainConfig(data=str(shards), output=str(output), init_from=str(parent), steps=6, batch_size=16,
                         lr=1e-3, warmup_steps=1, checkpoint_every=6, log_every=1, loader_workers=0,
                         precision="fp32", **changes)
    saved: list[Path] = []

    def report(metrics: dict, directory: Path | None) -> None:
        if directory is not None:
            saved.append(Path(shutil.copytree(directory, output / directory.name)))

    train_loop(config, parent, report, progress=False)
    return saved[-1]


def test_lock_image_fine_tune_keeps_the_image_tower_bit_identical_and_evaluates(released, shards, tmp_path: Path):
    checkpoint = _fine_tune(released, shards, tmp_path, lock_image=True, tower_lr=1e-4)
    parent, tokenizer = load_weights(tmp_path / "init")
    tuned, tuned_tokenizer = load_weights(checkpoint)
    assert tokenizer.kind == tuned_tokenizer.kind == "clip-bpe"
    for (name, before), after in zip(parent.visual.state_dict().items(), tuned.visual.state_dict().values()):
        assert torch.equal(before, after), f"locked visual.{name} changed"
    moved = [name for (name, before), after in zip(parent.text.state_dict().items(), tuned.text.state_dict().values())
             if not torch.equal(before, after)]
    assert "projection.weight" in moved and "blocks.0.attn.qkv.weight" in moved

    metrics = evaluate(EvaluateConfig(model=str(checkpoint), data=str(shards), output=str(tmp_path / "eval"),
                                      label_field="colour", templates="shapes", precision="fp32", report=False))
    assert metrics["zero_shot"]["num_classes"] == 8 and 0 <= metrics["zero_shot"]["acc@1"] <= 1
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["retrieval"]


@pytest.mark.slow
def test_clipforge_train_init_from_a_released_file_with_lock_image(released, shards, tmp_path: Path):
    """The command a user runs: a released file straight into --init-from, on Ray; the model it writes evaluates."""
    def clipforge(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=600)

    run = clipforge("train", "--data", str(shards), "--init-from", str(released), "--lock-image",
                    "--output", str(tmp_path / "run"), "--steps", "4", "--batch-size", "16", "--lr", "1e-3",
                    "--warmup-steps", "1", "--loader-workers", "0", "--precision", "fp32")
    assert run.returncode == 0, run.stderr[-2000:]
    parent, _ = load_weights(tmp_path / "run" / "init")
    tuned, tokenizer = load_weights(tmp_path / "run" / "model")
    assert tokenizer.kind == "clip-bpe"
    assert all(torch.equal(a, b) for a, b in zip(parent.visual.state_dict().values(),
                                                  tuned.visual.state_dict().values()))
    assert not torch.equal(parent.text.projection.weight, tuned.text.projection.weight)
    evaluation = clipforge("evaluate", "--model", str(tmp_path / "run" / "model"), "--data", str(shards),
                           "--output", str(tmp_path / "eval"), "--label-field", "colour", "--templates", "shapes")
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["zero_shot"]["num_classes"] == 8


def test_clip_bpe_is_a_named_choice_for_from_scratch_runs(tmp_path: Path):
    from pipeline.errors import UserError
    from training.ray_job import prepare_tokenizer, validate
    from training.tokenizer import Tokenizer

    with pytest.raises(UserError, match="49,408"):  # the tiny preset has 1,024 token embeddings
        validate(TrainConfig(data=str(tmp_path), preset="tiny", tokenizer="clip-bpe"))
    config = TrainConfig(data=str(tmp_path), output=str(tmp_path / "run"), preset="openai-vit-b-32",
                         tokenizer="clip-bpe")
    tokenizer = Tokenizer.load(prepare_tokenizer(config, manifest=None))
    assert (tokenizer.kind, tokenizer.vocab_size, tokenizer.context_length) == ("clip-bpe", 49408, 77)
