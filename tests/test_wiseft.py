"""WiSE-FT: the ends of the grid are the two models, and the choice respects the guardrail."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.checkpoint import load_model, save_checkpoint
from training.model import create_model
from training.tokenizer import train_tokenizer
from training.wiseft import GridPoint, choose_mixing_weight, grid_plot, interpolate, write_grid


def test_mixing_weight_0_is_the_parent_and_1_the_fine_tuned_model(tmp_path: Path):
    torch.manual_seed(0)
    parent, tuned = create_model("tiny").eval(), create_model("tiny").eval()
    tokenizer = train_tokenizer(["a red square", "a blue circle", "a green heart"] * 5, vocab_size=300,
                                context_length=32)
    save_checkpoint(tmp_path / "parent", parent, tokenizer)
    save_checkpoint(tmp_path / "tuned", tuned, tokenizer)
    grid = write_grid(str(tmp_path / "parent"), str(tmp_path / "tuned"), [0.0, 0.5, 1.0], str(tmp_path / "grid"))
    images, tokens = torch.randn(3, 3, 32, 32), tokenizer.encode_batch(["a red square", "a blue circle", "x"])
    with torch.no_grad():
        for weight, reference in ((0.0, parent), (1.0, tuned)):
            mixed, _ = load_model(grid[weight])
            assert torch.equal(mixed.encode_image(images), reference.encode_image(images))
            assert torch.equal(mixed.encode_text(tokens), reference.encode_text(tokens))
        half, _ = load_model(grid[0.5])
    middle = half.text.projection.weight
    assert torch.allclose(middle, (parent.text.projection.weight + tuned.text.projection.weight) / 2)
    assert torch.equal(interpolate(parent, tuned, 0.0).visual.class_token, parent.visual.class_token)


def _grid(*rows: tuple[float, float, float]) -> list[GridPoint]:
    return [GridPoint(mixing_weight=w, model=f"m{w}", domain=d, guardrail=g) for w, d, g in rows]


def test_the_best_domain_score_within_the_guardrail_is_chosen():
    points = _grid((0, 0.30, 0.50), (0.5, 0.40, 0.49), (1, 0.45, 0.40))
    choice = choose_mixing_weight(points, tolerance=0.02)
    assert (choice.chosen.mixing_weight, choice.promote) == (0.5, True)  # 1.0 is better but breaks the guardrail
    assert choose_mixing_weight(points, tolerance=0.2).chosen.mixing_weight == 1
    refused = choose_mixing_weight(_grid((0, 0.30, 0.50), (0.5, 0.29, 0.50), (1, 0.45, 0.30)), tolerance=0.02)
    assert not refused.promote and "keeping the promoted model" in refused.reason
    assert grid_plot(points, choice, "acc@1", "acc@1", 0.02).startswith(b"\x89PNG")
    with pytest.raises(ValueError):
        choose_mixing_weight(points[1:], tolerance=0.02)
