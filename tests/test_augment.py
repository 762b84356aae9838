"""Style augmentations: each changes how a picture is drawn as it says, neutral draws change nothing, the draws are a
pure function of (seed, epoch, sample), and evaluation never applies them."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from pipeline.manifest import read_manifest
from tests.shards import _jpeg, write_dataset, write_tokenizer
from training.data import make_loader
from evaluation.embed import load_image
from training.train import TrainConfig
from training.transforms import NEUTRAL_STYLE, STYLE_AUGMENTATIONS, device_crops, eval_transform, normalize, style_draw

FULL = torch.tensor([[0, 0, 32, 32]], dtype=torch.int32)


def styled(images: torch.Tensor, **draw: float) -> torch.Tensor:
    """device_crops of whole (B, 3, 32, 32) uint8 images with one style draw (NEUTRAL_STYLE overridden by `draw`)."""
    names = ("angle", "hue", "saturation", "grey", "outline", "blur", "resolution")
    style = torch.tensor([[draw.get(n, v) for n, v in zip(names, NEUTRAL_STYLE)]] * len(images))
    return device_crops(images, FULL.expand(len(images), 4), 32, style)


def line_image() -> torch.Tensor:
    """A white 32 x 32 image with a dark vertical line one pixel wide at x = 10."""
    image = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    image[:, :, :, 10] = 0
    return image


def test_neutral_draws_change_nothing() -> None:
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(styled(images), device_crops(images, FULL.expand(3, 4), 32), atol=1e-5, rtol=0)
    torch.testing.assert_close(styled(images), normalize(images), atol=1e-4, rtol=0)


def test_each_augmentation_does_what_it_says() -> None:
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    grey = styled(images, grey=1)
    assert torch.allclose(grey[:, 0] * 0.26862954 + 0.48145466, grey[:, 1] * 0.26130258 + 0.4578275, atol=1e-4)

    red = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    red[:, 0] = 255
    turned = styled(red, hue=2 * math.pi / 3)  # a third of a turn about the grey axis moves red onto another primary
    assert any(torch.allclose(turned, normalize(red.roll(shift, dims=1)), atol=1e-3) for shift in (1, 2))

    dark = lambda x: (x.mean(1) < 0).sum().item()  # noqa: E731 - pixels darker than the mean colour
    assert dark(styled(line_image(), outline=1)) == 3 * 32  # thicker: the line is three pixels wide
    assert dark(styled(line_image(), outline=-1)) == 0  # thinner: a one-pixel line is gone
    blurred = styled(line_image(), blur=1)
    assert (blurred < normalize(line_image()).max() - 1e-3).all(1).sum().item() == 3 * 32  # spread over its neighbours
    assert dark(blurred) == 0  # and lighter

    turned = styled(line_image(), angle=math.pi / 2)  # a quarter turn: the vertical line lies horizontally
    assert torch.allclose(turned, normalize(line_image().rot90(1, dims=(2, 3))), atol=1e-3) or \
        torch.allclose(turned, normalize(line_image().rot90(-1, dims=(2, 3))), atol=1e-3)

    flat = torch.full((1, 3, 32, 32), 90, dtype=torch.uint8)
    torch.testing.assert_close(styled(flat, resolution=0.375), normalize(flat), atol=1e-4, rtol=0)
    torch.testing.assert_close(styled(flat, resolution=0.125), normalize(flat), atol=1e-4, rtol=0)
    assert not torch.allclose(styled(line_image(), resolution=0.375), normalize(line_image()), atol=0.1)


def test_draws_apply_only_what_is_named_and_do_not_depend_on_the_others() -> None:
    draws = [style_draw(random.Random(i), ("grey",)) for i in range(400)]
    assert all(d[:3] == NEUTRAL_STYLE[:3] and d[4:] == NEUTRAL_STYLE[4:] for d in draws)
    assert 40 < sum(d[3] for d in draws) < 120  # greyscale about one time in five
    every = [style_draw(random.Random(i), STYLE_AUGMENTATIONS) for i in range(400)]
    assert [d[3] for d in every] == [d[3] for d in draws]  # turning others on leaves grey's draws as they were
    assert all(sum(d[k] != NEUTRAL_STYLE[k] for d in every) > 40 for k in range(7))  # each one is drawn
    low = [style_draw(random.Random(i), ("lowres",))[6] for i in range(400)]
    assert 150 < sum(share <= 0.25 for share in low) < 250 and set(low) <= {1.0, 0.125, 0.1875, 0.25}


def test_the_loader_draws_styles_per_sample_reproducibly(tmp_path: Path) -> None:
    shards, tokenizer = write_dataset(tmp_path / "shards", sizes=[24, 24]), write_tokenizer(tmp_path / "tokenizer")

    def batches(augment: tuple[str, ...]) -> list[dict]:
        return list(make_loader(read_manifest(str(shards)), tokenizer_path=tokenizer, seed=0, epoch=1, rank=0,
                                world_size=1, local_batch=8, image_size=32, loader_workers=1, augment=augment))

    plain, first, again = batches(()), batches(STYLE_AUGMENTATIONS), batches(STYLE_AUGMENTATIONS)
    assert "style" not in plain[0] and first[0]["style"].shape == (8, 7)
    for a, b, c in zip(plain, first, again):
        assert torch.equal(b["style"], c["style"])  # the same epoch: the same draws
        assert a["keys"] == b["keys"] and torch.equal(a["crops"], b["crops"]) and torch.equal(a["tokens"], b["tokens"])
    assert len({tuple(row.tolist()) for b in first for row in b["style"]}) > 1


def test_evaluation_never_augments() -> None:
    """Evaluation and embedding read images through `load_image`: a centre crop, the same tensor every time."""
    data = _jpeg("red", 5, size=48)
    random.seed(1)
    torch.manual_seed(1)
    first, _ = load_image(data, 32, 1 << 20, 1 << 20)
    random.seed(2)
    torch.manual_seed(2)
    second, _ = load_image(data, 32, 1 << 20, 1 << 20)
    assert torch.equal(first, second) and torch.equal(first, eval_transform(data, 32))


def test_unknown_augmentations_are_refused() -> None:
    with pytest.raises(ValidationError, match="unknown augmentation.*sepia.*choose from colour"):
        TrainConfig(data="x", augment=["grey", "sepia"])
