"""The CLIP model: what the paper's presets weigh, what `forward` promises, and that `tiny` can learn."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError

from training.cli import model_info
from training.loss import chunked_clip_loss, clip_loss
from training.model import (MAX_LOGIT_SCALE, MODEL_PRESETS, ModelConfig, create_model, flops_per_sample,
                            parameter_counts)
from training.tokenizer import train_tokenizer

# open_clip's docs/model_profile.csv: millions of parameters (image, text, total) and forward GFLOPs (image, text)
OPEN_CLIP_PROFILE = {
    "vit-b-32": ((87.85, 63.43, 151.28), (8.82, 5.96)),
    "vit-b-16": ((86.19, 63.43, 149.62), (35.13, 5.96)),
    "vit-l-14": ((303.97, 123.65, 427.62), (162.03, 13.3)),
}


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("tiny")


def _tokens(config: ModelConfig, batch: int, end_of_text_at: list[int], seed: int = 0) -> torch.Tensor:
    """Random token ids below the end-of-text id (vocab_size - 1), which sits at the given positions."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, config.vocab_size - 1, (batch, config.context_length), generator=generator)
    tokens[:, 0] = 1  # start of text
    for row, position in enumerate(end_of_text_at):
        tokens[row, position] = config.vocab_size - 1
        tokens[row, position + 1:] = 0
    return tokens


@pytest.mark.parametrize("preset", list(OPEN_CLIP_PROFILE))
def test_paper_presets_match_the_paper_in_parameters_and_flops(preset: str):
    (image, text, total), (image_gflops, text_gflops) = OPEN_CLIP_PROFILE[preset]
    counts = parameter_counts(create_model(preset, device="meta"))
    for name, expected in (("image", image), ("text", text), ("total", total)):
        assert counts[name] / 1e6 == pytest.approx(expected, rel=0.02), name
    flops = flops_per_sample(MODEL_PRESETS[preset])
    assert flops["image"] / 1e9 == pytest.approx(image_gflops, rel=0.02)
    assert flops["text"] / 1e9 == pytest.approx(text_gflops, rel=0.02)


def test_config_rejects_unknown_keys_and_bad_shapes():
    with pytest.raises(ValidationError):
        ModelConfig(image_width=3)
    with pytest.raises(ValidationError):
        ModelConfig(image_size=100, patch_size=32)
    with pytest.raises(ValidationError):
        MODEL_PRESETS["tiny"].derive(text_heads=3)
    with pytest.raises(ValidationError):  # frozen
        MODEL_PRESETS["tiny"].image_size = 64


def test_forward_returns_unit_embeddings_and_the_scale(tiny):
    config = tiny.config
    images = torch.randn(3, 3, config.image_size, config.image_size)
    image_emb, text_emb, logit_scale = tiny(images, _tokens(config, 3, [4, 9, config.context_length - 1]))
    assert image_emb.shape == text_emb.shape == (3, config.embed_dim)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert logit_scale.item() == pytest.approx(1 / 0.07)


def test_tokens_after_end_of_text_do_not_change_the_text_embedding(tiny):
    config = tiny.config
    padded = _tokens(config, 2, [5, 12])
    garbage = padded.clone()
    garbage[0, 6:] = torch.randint(2, config.vocab_size - 1, (config.context_length - 6,))
    garbage[1, 13:] = torch.randint(2, config.vocab_size - 1, (config.context_length - 13,))
    assert torch.allclose(tiny.encode_text(padded), tiny.encode_text(garbage), atol=1e-6)
    shortened = tiny.encode_text(padded[:, :16])  # a shorter context holding the same captions
    assert torch.allclose(tiny.encode_text(padded), shortened, atol=1e-5)


def test_logit_scale_never_exceeds_100():
    model = create_model("tiny")
    optimizer = torch.optim.SGD([model.log_logit_scale], lr=10.0)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(MAX_LOGIT_SCALE) - 0.01)
    optimizer.zero_grad()
    (-model.log_logit_scale).backward()  # a step that pushes the scale up, far past the limit
    optimizer.step()
    assert model.log_logit_scale.exp() > MAX_LOGIT_SCALE
    assert model.logit_scale().item() <= MAX_LOGIT_SCALE  # clamped in forward too
    model.clamp_logit_scale()
    assert model.log_logit_scale.exp().item() <= MAX_LOGIT_SCALE + 1e-4


def test_bf16_autocast_forward_and_backward(tiny):
    config = tiny.config
    images = torch.randn(4, 3, config.image_size, config.image_size)
    tiny.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_emb, text_emb, logit_scale = tiny(images, _tokens(config, 4, [3, 5, 7, 9]))
        loss = chunked_clip_loss(image_emb, text_emb, logit_scale, chunk_size=3)
    assert image_emb.dtype == torch.bfloat16 and logit_scale.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.allclose(image_emb.float().norm(dim=-1), torch.ones(4), atol=1e-2)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tiny.parameters())


def test_model_info_command_lists_every_preset():
    assert list(model_info.params[0].type.choices) == list(MODEL_PRESETS)
    result = CliRunner().invoke(model_info, ["vit-b-32"])
    assert result.exit_code == 0, result.output
    assert "151.28M" in result.output and "87.85M" in result.output and "63.43M" in result.output


def _random_images_and_captions(image_size: int) -> tuple[torch.Tensor, list[str]]:
    """64 distinct images (uniform noise, as normalised pixels) and 64 distinct captions."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, image_size, image_size, generator=generator) * 2 - 1  # (64, 3, H, W) in [-1, 1]
    captions = [f"a {colour} {animal} {action} today"
                for colour in ("red", "green", "blue", "yellow")
                for animal in ("cat", "dog", "fox", "owl")
                for action in ("sleeping", "running", "eating", "swimming")]
    return images, captions


def test_tiny_preset_overfits_64_pairs_to_perfect_retrieval():
    torch.manual_seed(0)
    model = create_model("tiny")
    images, captions = _random_images_and_captions(model.config.image_size)
    tokenizer = train_tokenizer(captions, vocab_size=model.config.vocab_size,
                                context_length=model.config.context_length)
    tokens = tokenizer.encode_batch(captions)  # (64, context_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    labels = torch.arange(64)
    for _ in range(400):
        image_emb, text_emb, logit_scale = model(images, tokens)
        similarity = image_emb.detach() @ text_emb.detach().T  # (64, 64)
        if (similarity.argmax(1) == labels).all() and (similarity.argmax(0) == labels).all():
            break
        loss = clip_loss(image_emb, text_emb, logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale()
    similarity = model.encode_image(images, normalize=True) @ model.encode_text(tokens, normalize=True).T
    assert (similarity.argmax(dim=1) == labels).float().mean() == 1.0, "image -> text top-1"
    assert (similarity.argmax(dim=0) == labels).float().mean() == 1.0, "text -> image top-1"


def test_patch_dropout_drops_tokens_in_training_and_never_at_evaluation():
    torch.manual_seed(0)
    model = create_model("tiny")
    model.visual.patch_dropout = 0.5
    images = torch.randn(4, 3, 32, 32)
    seen = []  # tokens entering the first block
    model.visual.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    model.eval()
    with torch.no_grad():
        evaluated = model.encode_image(images)
        full = model.visual(images, patch_dropout=0.75)  # eval ignores even an explicit rate
        assert torch.equal(evaluated, full)
        model.train()
        reference = model.visual(images, patch_dropout=0.0)  # an explicit 0 keeps every patch in training too
        dropped = model.encode_image(images)
    assert seen == [17, 17, 17, 9]  # 16 patches + class token; half of the patches dropped only in training
    torch.testing.assert_close(reference, evaluated)
    assert not torch.allclose(dropped, evaluated)
