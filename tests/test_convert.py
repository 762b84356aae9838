"""Import / export exactness against the real libraries: OpenAI's format (read by open_clip's OpenAI loader), open_clip
and Hugging Face transformers, with random weights of the ViT-B/32 shape and of a small shape.

Every weight is perturbed with noise first, so a tensor mapped to the wrong place (or a transposed projection, or a
bias left at zero) changes the embeddings. Tolerance: 1e-4 max absolute difference in fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from flows.cli import cli
from training.checkpoint import load_model, read_state
from training.convert import ExportConfig, ImportConfig, export_checkpoint, import_checkpoint
from training.tokenizer import clip_tokenizer
from tests.references import import_open_clip, import_transformers

TOLERANCE = 1e-4
CAPTIONS = ["a grinning face", "a red heart on a white background", "flag: Côte d’Ivoire", "🧛🏾 vampire"]
SHAPES = {  # open_clip's model_cfg; the Hugging Face configs below are the same shapes
    "vit-b-32": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "small": {"embed_dim": 48, "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}},
}


@torch.no_grad()
def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for parameter in model.parameters():
        parameter.add_(torch.randn_like(parameter) * 0.02)
    return model.eval()


def _inputs(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, image_size, image_size, generator=generator), clip_tokenizer().encode_batch(CAPTIONS)


@torch.no_grad()
def _ours(checkpoint: Path, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    model, _ = load_model(str(checkpoint))
    return model.encode_image(images), model.encode_text(tokens), model.logit_scale()


@torch.no_grad()
def _open_clip_outputs(model, images, tokens) -> tuple[torch.Tensor, ...]:
    return model.encode_image(images), model.encode_text(tokens), model.logit_scale.exp()


@torch.no_grad()
def _hf_outputs(model, images, tokens) -> tuple[torch.Tensor, ...]:
    image = model.get_image_features(pixel_values=images)
    text = model.get_text_features(input_ids=tokens)
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))  # a tensor in transformers 5.x
    return image, text, model.logit_scale.exp()


def _assert_close(ours: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> None:
    for name, a, b in zip(("image", "text", "logit scale"), ours, reference):
        assert a.shape == b.shape, name
        difference = (a - b).abs().max().item()
        assert difference <= TOLERANCE, f"{name} embeddings differ by {difference}"


def _open_clip_model(open_clip, shape: str, quick_gelu: bool):
    config = SHAPES[shape]
    return _perturb(open_clip.model.CLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"],
                                         quick_gelu=quick_gelu))


def _hf_model(transformers, shape: str, activation: str):
    config = SHAPES[shape]
    vision, text = config["vision_cfg"], config["text_cfg"]
    hf_config = transformers.CLIPConfig(
        projection_dim=config["embed_dim"],
        text_config={"hidden_size": text["width"], "intermediate_size": 4 * text["width"],
                     "num_hidden_layers": text["layers"], "num_attention_heads": text["heads"],
                     "max_position_embeddings": text["context_length"], "vocab_size": text["vocab_size"],
                     "hidden_act": activation},
        vision_config={"hidden_size": vision["width"], "intermediate_size": 4 * vision["width"],
                       "num_hidden_layers": vision["layers"], "num_attention_heads": vision["width"] // 64,
                       "image_size": vision["image_size"], "patch_size": vision["patch_size"],
                       "hidden_act": activation})
    return _perturb(transformers.CLIPModel(hf_config))


def _torchscript_archive(state: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive whose state dict is `state`, as OpenAI ships its models (ViT-B-32.pt)."""

    class Archive(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Archive()
    for name, tensor in state.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_buffer(leaf, tensor.clone())
    torch.jit.script(root).save(str(path))


def _import_and_compare(source: Path, output: Path, images, tokens, expected) -> None:
    import_checkpoint(ImportConfig(source=str(source), output=str(output)))
    _assert_close(_ours(output, images, tokens), expected)


def _round_trip(checkpoint: Path, tmp_path: Path, images, tokens, expected) -> None:
    """Export to both formats and load each in its own library: the same embeddings again."""
    open_clip, transformers = import_open_clip(), import_transformers()
    export_checkpoint(ExportConfig(checkpoint=str(checkpoint), format="open_clip", output=str(tmp_path / "oc")))
    loaded = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    _assert_close(_open_clip_outputs(loaded, images, tokens), expected)
    export_checkpoint(ExportConfig(checkpoint=str(checkpoint), format="hf", output=str(tmp_path / "hf")))
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    _assert_close(_hf_outputs(hf, images, tokens), expected)
    hf_tokens = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(CAPTIONS[:2])["input_ids"]
    assert hf_tokens == [[i for i in row if i] for row in tokens[:2].tolist()]  # same ids, unpadded
    for exported in ("oc", "hf"):  # and both exports import back (open_clip's folder layout included)
        _import_and_compare(tmp_path / exported, tmp_path / f"back-{exported}", images, tokens, expected)


@pytest.mark.parametrize("shape", ["small", pytest.param("vit-b-32", marks=pytest.mark.slow)])
def test_openai_torchscript_and_plain_files_import_exactly(shape: str, tmp_path: Path):
    open_clip = import_open_clip()
    # OpenAI ships fp16 weights (and open_clip's OpenAI loader rounds to fp16 even when given fp32)
    state = {k: v.half() for k, v in _open_clip_model(open_clip, shape, quick_gelu=True).state_dict().items()}
    state |= {"input_resolution": torch.tensor(SHAPES[shape]["vision_cfg"]["image_size"]),  # OpenAI's metadata
              "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)}
    _torchscript_archive(state, tmp_path / "ViT.pt")
    reference = open_clip.openai.load_openai_model(str(tmp_path / "ViT.pt"), precision="fp32", device="cpu").eval()
    images, tokens = _inputs(SHAPES[shape]["vision_cfg"]["image_size"])
    expected = _open_clip_outputs(reference, images, tokens)

    info = import_checkpoint(ImportConfig(source=str(tmp_path / "ViT.pt"), output=str(tmp_path / "ours")))
    assert (info["format"], info["activation"]) == ("openai", "quick_gelu")  # QuickGELU without being told
    _assert_close(_ours(tmp_path / "ours", images, tokens), expected)
    assert read_state(tmp_path / "ours")["tokenizer"] == "clip-bpe"
    if shape == "small":
        torch.save(state, tmp_path / "plain.pt")  # the same weights as a plain state dict
        _import_and_compare(tmp_path / "plain.pt", tmp_path / "plain", images, tokens, expected)
        _round_trip(tmp_path / "ours", tmp_path, images, tokens, expected)


@pytest.mark.parametrize("shape", ["small", pytest.param("vit-b-32", marks=pytest.mark.slow)])
def test_open_clip_checkpoints_import_exactly(shape: str, tmp_path: Path):
    open_clip = import_open_clip()
    reference = _open_clip_model(open_clip, shape, quick_gelu=False)
    images, tokens = _inputs(SHAPES[shape]["vision_cfg"]["image_size"])
    expected = _open_clip_outputs(reference, images, tokens)
    state = reference.state_dict()
    # a training checkpoint: nested under state_dict, DDP's module. prefix, optimizer state beside it
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "epoch_3.pt")
    result = CliRunner().invoke(cli, ["import", str(tmp_path / "epoch_3.pt"), "--output", str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    _assert_close(_ours(tmp_path / "ours", images, tokens), expected)
    if shape == "small":
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
        _import_and_compare(tmp_path / "model.safetensors", tmp_path / "st", images, tokens, expected)
        _round_trip(tmp_path / "ours", tmp_path, images, tokens, expected)


@pytest.mark.parametrize("shape", ["small", pytest.param("vit-b-32", marks=pytest.mark.slow)])
def test_hugging_face_folders_import_exactly(shape: str, tmp_path: Path):
    transformers = import_transformers()
    reference = _hf_model(transformers, shape, "quick_gelu" if shape == "vit-b-32" else "gelu")
    reference.save_pretrained(tmp_path / "hf-source")
    images, tokens = _inputs(SHAPES[shape]["vision_cfg"]["image_size"])
    expected = _hf_outputs(reference, images, tokens)
    _import_and_compare(tmp_path / "hf-source", tmp_path / "ours", images, tokens, expected)
    _round_trip(tmp_path / "ours", tmp_path, images, tokens, expected)


def test_refuses_what_it_cannot_read(tmp_path: Path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    result = CliRunner().invoke(cli, ["import", str(tmp_path / "other.pt"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not an OpenAI / open_clip ViT state dict" in result.output

    # arbitrary objects are never unpickled (here a harmless one, as a training script might save its arguments)
    torch.save({"state_dict": {"x": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    result = CliRunner().invoke(cli, ["import", str(tmp_path / "pickled.pt"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "weights_only" in result.output
