"""Released CLIP weights in and out: OpenAI's, open_clip's and Hugging Face's layouts <-> clipforge checkpoints.

    read_source(SOURCE)           OpenAI's original checkpoint (TorchScript or a plain state dict), an open_clip
                                  checkpoint (.pt/.bin/.safetensors, with or without `state_dict` / `module.`, or an
                                  open_clip folder: open_clip_config.json + weights), a Hugging Face `CLIPModel`
                                  folder (config.json + model.safetensors or pytorch_model.bin) -> (CLIP, Tokenizer)
    import_checkpoint(config)     the same, written as a clipforge checkpoint (`clipforge import`)
    export_checkpoint(config)     `clipforge export --format open_clip|hf`:
    export_open_clip(...)         open_clip_config.json + open_clip_model.safetensors (+ tokenizer files):
                                  `open_clip.create_model("local-dir:DIR")`, or a built-in name with `pretrained=FILE`
    export_hf(...)                config.json + model.safetensors + tokenizer and preprocessor files:
                                  `transformers.CLIPModel.from_pretrained(DIR)`

The model shape is read from the weights (as OpenAI's `build_model` does) or from the folder's config. The only thing
weights do not say is the activation: OpenAI's models use QuickGELU (their TorchScript archives and state dicts carry
`input_resolution`, which is how they are told apart), open_clip's use exact GELU unless a `-quickgelu` config says
otherwise; `activation=` overrides the guess. Nothing is unpickled beyond tensors (`torch.load(weights_only=True)`);
TorchScript archives are read with `torch.jit.load`, which runs no Python pickles.

OpenAI and open_clip share one layout (`nn.MultiheadAttention`'s packed in-projection, projections as (width, embed)
parameters used as `x @ proj`); Hugging Face splits q/k/v and stores projections as `nn.Linear` weights.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.storage import StorageConfig
from training.checkpoint import load_model, save_checkpoint, upload_checkpoint
from training.model import CLIP, ModelConfig
from training.tokenizer import Tokenizer, clip_tokenizer, clip_vocabulary
from training.transforms import MEAN, STD

Activation = Literal["gelu", "quick_gelu"]
SourceFormat = Literal["openai", "open_clip", "hf"]

OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"
_OPEN_CLIP_WEIGHT_FILES = (OPEN_CLIP_WEIGHTS, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                           "open_clip_pytorch_model.pth")



class ImportConfig(Config):
    """`clipforge import`: a released CLIP's weights -> a clipforge checkpoint."""

    source: str
    """Local file or folder: OpenAI's .pt (TorchScript or state dict), an open_clip .pt/.bin/.safetensors or folder,
    a Hugging Face CLIPModel folder (config.json + weights)."""
    output: str
    """Where the clipforge checkpoint goes: a folder or s3://bucket/prefix."""
    activation: Literal["auto", "gelu", "quick_gelu"] = "auto"
    """MLP activation. auto: QuickGELU for OpenAI's files, the config's for open_clip / HF folders, else GELU."""
    storage: StorageConfig = StorageConfig()
    """How to reach object storage for an s3:// output."""


class ExportConfig(Config):
    """`clipforge export`: a clipforge checkpoint -> a folder open_clip or Hugging Face transformers loads."""

    checkpoint: str
    """The clipforge checkpoint: a folder or s3://bucket/prefix."""
    format: Literal["open_clip", "hf"] = "hf"
    """open_clip: open_clip_config.json + open_clip_model.safetensors; hf: a transformers CLIPModel folder."""
    output: str
    """Local folder to write (created)."""
    storage: StorageConfig = StorageConfig()
    """How to reach object storage for an s3:// checkpoint."""


# ---------------------------------------------------------------------------------------------------------------------
# names: clipforge <-> OpenAI / open_clip <-> Hugging Face (rules applied in order to each clipforge name)

_OPENAI_RULES = [
    (r"^visual\.patch_embed\.", "visual.conv1."), (r"^visual\.class_token$", "visual.class_embedding"),
    (r"^visual\.position_embedding$", "visual.positional_embedding"),
    (r"^visual\.projection\.weight$", "visual.proj"), (r"^visual\.blocks\.", "visual.transformer.resblocks."),
    (r"^text\.token_embedding\.", "token_embedding."), (r"^text\.position_embedding$", "positional_embedding"),
    (r"^text\.projection\.weight$", "text_projection"), (r"^text\.blocks\.", "transformer.resblocks."),
    (r"^text\.ln_final\.", "ln_final."), (r"^log_logit_scale$", "logit_scale"),
    (r"\.attn\.qkv\.weight$", ".attn.in_proj_weight"), (r"\.attn\.qkv\.bias$", ".attn.in_proj_bias"),
    (r"\.attn\.proj\.", ".attn.out_proj."), (r"\.mlp\.fc\.", ".mlp.c_fc."), (r"\.mlp\.proj\.", ".mlp.c_proj."),
]
_HF_RULES = [
    (r"^visual\.patch_embed\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.class_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.position_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."), (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
    (r"^visual\.projection\.", "visual_projection."), (r"^visual\.blocks\.", "vision_model.encoder.layers."),
    (r"^text\.token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^text\.position_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^text\.ln_final\.", "text_model.final_layer_norm."), (r"^text\.projection\.", "text_projection."),
    (r"^text\.blocks\.", "text_model.encoder.layers."), (r"^log_logit_scale$", "logit_scale"),
    (r"\.ln_1\.", ".layer_norm1."), (r"\.ln_2\.", ".layer_norm2."), (r"\.attn\.qkv\.", ".self_attn.qkv."),
    (r"\.attn\.proj\.", ".self_attn.out_proj."), (r"\.mlp\.fc\.", ".mlp.fc1."), (r"\.mlp\.proj\.", ".mlp.fc2."),
]
_TRANSPOSED = {"visual.projection.weight", "text.projection.weight"}  # OpenAI: (width, embed) used as x @ proj


def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def to_openai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A clipforge state dict in OpenAI's / open_clip's names and layout."""
    return {_rename(name, _OPENAI_RULES): (t.T if name in _TRANSPOSED else t).contiguous() for name, t in state.items()}


def from_openai(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """OpenAI's / open_clip's state dict -> clipforge's, for a model of `config` (unknown names are a UserError)."""
    names = {_rename(name, _OPENAI_RULES): name for name in _state_names(config)}
    return _take(state, names, lambda name, t: t.T if name in _TRANSPOSED else t, "OpenAI / open_clip")


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A clipforge state dict in Hugging Face `CLIPModel`'s names (q, k and v split)."""
    out = {}
    for name, tensor in state.items():
        renamed = _rename(name, _HF_RULES)
        if ".self_attn.qkv." in renamed:  # (3C, C) / (3C,) -> q, k, v
            for part, chunk in zip("qkv", tensor.chunk(3)):
                out[renamed.replace(".qkv.", f".{part}_proj.")] = chunk.contiguous()
        else:
            out[renamed] = tensor.contiguous()
    return out


def from_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face `CLIPModel` state dict -> clipforge's (q, k, v packed back into one projection)."""
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a buffer older files carry
    for key in [k for k in state if ".self_attn.q_proj." in k]:
        packed = torch.cat([state.pop(key.replace(".q_proj.", f".{p}_proj.")) for p in "qkv"])
        state[key.replace(".q_proj.", ".qkv.")] = packed
    names = {_rename(name, _HF_RULES): name for name in _state_names(config)}
    return _take(state, names, lambda name, t: t, "Hugging Face")


def _state_names(config: ModelConfig) -> list[str]:
    with torch.device("meta"):  # names only: no memory
        return list(CLIP(config).state_dict())


def _take(state: dict[str, torch.Tensor], names: dict[str, str], transform, source: str) -> dict[str, torch.Tensor]:
    missing = sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        raise UserError(f"not a supported {source} CLIP ViT state dict: missing {missing[:4]}, unexpected "
                        f"{unexpected[:4]} (ResNet towers, custom text towers and SigLIP are not supported)")
    return {names[key]: transform(names[key], tensor).float().contiguous() for key, tensor in state.items()}


# ---------------------------------------------------------------------------------------------------------------------
# shapes from weights or configs


def config_from_openai(state: dict[str, torch.Tensor], activation: Activation) -> ModelConfig:
    """The `ModelConfig` of an OpenAI / open_clip ViT state dict, read from its tensor shapes (as `build_model`)."""
    if "visual.conv1.weight" not in state or "visual.layer1.0.conv1.weight" in state:
        raise UserError("not an OpenAI / open_clip ViT state dict (no visual.conv1.weight; ResNet towers are not "
                        "supported)")
    vision_width, _, patch_size, _ = state["visual.conv1.weight"].shape
    grid = round(math.sqrt(state["visual.positional_embedding"].shape[0] - 1))
    text_width = state["ln_final.weight"].shape[0]
    mlp_ratio = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vision_width
    text_mlp_ratio = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width
    if mlp_ratio != text_mlp_ratio:
        raise UserError(f"towers with different MLP ratios ({mlp_ratio}, {text_mlp_ratio}) are not supported")

    def layers(prefix: str) -> int:
        return len({k.split(".")[len(prefix.split("."))] for k in state if k.startswith(prefix + ".")})

    return ModelConfig(
        image_size=patch_size * grid, patch_size=patch_size, vision_width=vision_width,
        vision_layers=layers("visual.transformer.resblocks"), vision_heads=vision_width // 64,
        text_width=text_width, text_layers=layers("transformer.resblocks"), text_heads=text_width // 64,
        vocab_size=state["token_embedding.weight"].shape[0], context_length=state["positional_embedding"].shape[0],
        embed_dim=state["text_projection"].shape[1], mlp_ratio=mlp_ratio, activation=activation)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face `CLIPConfig` (its config.json as a dict)."""
    text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
    defaults = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    text, vision = {**defaults, **text}, {**defaults, **vision}
    if text["hidden_act"] != vision["hidden_act"] or text["hidden_act"] not in ("gelu", "quick_gelu"):
        raise UserError(f"unsupported activations {text['hidden_act']!r} / {vision['hidden_act']!r}")
    if text["layer_norm_eps"] != 1e-5 or vision["layer_norm_eps"] != 1e-5:
        raise UserError("only layer_norm_eps 1e-5 (every released CLIP's) is supported")
    vision_ratio = vision.get("intermediate_size", 3072) / vision.get("hidden_size", 768)
    text_ratio = text.get("intermediate_size", 2048) / text.get("hidden_size", 512)
    if vision_ratio != text_ratio:
        raise UserError(f"towers with different MLP ratios ({vision_ratio}, {text_ratio}) are not supported")
    return ModelConfig(
        image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 32),
        vision_width=vision.get("hidden_size", 768), vision_layers=vision.get("num_hidden_layers", 12),
        vision_heads=vision.get("num_attention_heads", 12), text_width=text.get("hidden_size", 512),
        text_layers=text.get("num_hidden_layers", 12), text_heads=text.get("num_attention_heads", 8),
        vocab_size=text.get("vocab_size", 49408), context_length=text.get("max_position_embeddings", 77),
        embed_dim=hf.get("projection_dim", 512), mlp_ratio=vision_ratio, activation=text["hidden_act"])


# ---------------------------------------------------------------------------------------------------------------------
# reading sources


def _load_tensors(path: Path) -> dict[str, Any]:
    """A weights file as a dict, unpickling nothing but tensors and plain containers."""
    if path.suffix == ".safetensors":
        return load_file(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            torchscript = any(n.split("/", 2)[1:2] == ["code"] for n in archive.namelist())
        if torchscript:  # OpenAI's released .pt files are TorchScript archives
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - anything beyond tensors is refused, whatever the error
        raise UserError(f"{path} does not hold plain weights (torch.load(weights_only=True): "
                        f"{str(err).splitlines()[0]})") from None


def _unwrap_state(loaded: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Training checkpoints nest the weights (`state_dict`, `model`) and DDP / compile prefix their names."""
    for key in ("state_dict", "model", "module"):
        if isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    state = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _read_weights(source: str | Path) -> tuple[SourceFormat, Path, dict[str, torch.Tensor]]:
    """Which layout `source` (file or folder) holds, its weights file, and its state dict (read once)."""
    path = Path(source)
    if path.is_dir():
        if (path / OPEN_CLIP_CONFIG).exists():
            source_format: SourceFormat = "open_clip"
            weights = next((path / n for n in _OPEN_CLIP_WEIGHT_FILES if (path / n).exists()), None)
        elif (path / HF_CONFIG).exists():
            source_format = "hf"
            weights = next((path / n for n in (HF_WEIGHTS, "pytorch_model.bin") if (path / n).exists()), None)
        else:
            raise UserError(f"{path} is neither a Hugging Face CLIPModel folder (config.json) nor an open_clip one "
                            f"({OPEN_CLIP_CONFIG})")
        if weights is None:
            raise UserError(f"{path} holds no single {source_format} weights file (sharded weights are not supported)")
        return source_format, weights, _unwrap_state(_load_tensors(weights))
    if not path.is_file():
        raise UserError(f"{source} does not exist")
    state = _unwrap_state(_load_tensors(path))
    if any(k.startswith("vision_model.") for k in state):  # HF weights: config.json must lie beside them
        return "hf", path, state
    return ("openai" if "input_resolution" in state else "open_clip"), path, state


def detect_format(source: str | Path) -> SourceFormat:
    """Which layout `source` (file or folder) holds."""
    return _read_weights(source)[0]


def read_source(source: str | Path, activation: Activation | None = None) -> tuple[CLIP, Tokenizer, dict[str, Any]]:
    """The model and tokenizer held by a released-CLIP `source`, and what was read (format, activation, file)."""
    path = Path(source)
    source_format, weights, raw = _read_weights(path)
    if source_format == "hf":
        config = config_from_hf(json.loads((weights.parent / HF_CONFIG).read_text()))
        if activation:
            config = config.derive(activation=activation)
        state = from_hf(raw, config)
    else:
        if path.is_dir():  # an open_clip folder: its config says whether the model uses QuickGELU
            model_cfg = json.loads((path / OPEN_CLIP_CONFIG).read_text()).get("model_cfg", {})
            activation = activation or ("quick_gelu" if model_cfg.get("quick_gelu") else "gelu")
        activation = activation or ("quick_gelu" if source_format == "openai" else "gelu")
        raw = {k: v for k, v in raw.items() if k not in ("input_resolution", "context_length", "vocab_size",
                                                         "attn_mask")}  # OpenAI's metadata, a non-weight buffer
        config = config_from_openai(raw, activation)
        state = from_openai(raw, config)
    model = CLIP(config)
    model.load_state_dict(state)
    info = {"format": source_format, "source": str(path), "weights": str(weights), "activation": config.activation}
    return model.eval(), clip_tokenizer(config.context_length), info


def import_checkpoint(config: ImportConfig) -> dict[str, Any]:
    """Write the released CLIP at `config.source` as a clipforge checkpoint at `config.output`; returns what was read."""
    model, tokenizer, info = read_source(config.source, None if config.activation == "auto" else config.activation)
    with tempfile.TemporaryDirectory(prefix="clipforge-import-") as scratch:
        local = save_checkpoint(Path(scratch) / "model", model, tokenizer, state={"imported_from": info})
        output = upload_checkpoint(local, config.output, config.storage)
    return {**info, "output": output, "config": model.config.model_dump()}


def export_checkpoint(config: ExportConfig) -> Path:
    """Write the checkpoint in the asked format; returns the output folder."""
    model, tokenizer = load_model(config.checkpoint, config.storage)
    write = export_open_clip if config.format == "open_clip" else export_hf
    return write(model, tokenizer, config.output)


def is_released_source(location: str) -> bool:
    """Whether `location` is a local released-CLIP file or folder rather than a clipforge checkpoint."""
    path = Path(location)
    return path.is_file() or (path.is_dir() and not (path / "model_config.json").exists()
                              and any((path / n).exists() for n in (HF_CONFIG, OPEN_CLIP_CONFIG)))


# ---------------------------------------------------------------------------------------------------------------------
# exporting


def _write_tokenizer_files(tokenizer: Tokenizer, directory: Path, model_config: ModelConfig) -> None:
    """clip-bpe: vocab.json and merges.txt as Hugging Face's CLIPTokenizer reads them (open_clip has them built in;
    our tokenizer.json is left out, as transformers would prefer it and it lacks CLIP's Python-side cleaning).
    byte-bpe: our tokenizer.json, which PreTrainedTokenizerFast reads as it is."""
    if tokenizer.kind != "clip-bpe":
        tokenizer.save(directory)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": tokenizer.context_length,
                  "bos_token": "<start_of_text>", "eos_token": "<end_of_text>", "pad_token": "<pad>"}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return
    vocab, merges = clip_vocabulary()
    hf_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # same ids, HF's spelling
    vocab = {hf_names.get(token, token): index for token, index in vocab.items()}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_config.context_length,
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "do_lower_case": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def export_open_clip(model: CLIP, tokenizer: Tokenizer, output: str | Path) -> Path:
    """An open_clip folder: `create_model("local-dir:OUTPUT")`, or `create_model(NAME, pretrained=OUTPUT/
    open_clip_model.safetensors)` with the built-in NAME of the same shape (e.g. ViT-B-32-quickgelu)."""
    config, output = model.config, Path(output)
    output.mkdir(parents=True, exist_ok=True)
    save_file(to_openai(model.state_dict()), output / OPEN_CLIP_WEIGHTS)
    model_cfg = {
        "embed_dim": config.embed_dim, "quick_gelu": config.activation == "quick_gelu",
        "vision_cfg": {"image_size": config.image_size, "layers": config.vision_layers, "width": config.vision_width,
                       "head_width": config.vision_width // config.vision_heads, "patch_size": config.patch_size,
                       "mlp_ratio": config.mlp_ratio},
        "text_cfg": {"context_length": config.context_length, "vocab_size": config.vocab_size,
                     "width": config.text_width, "heads": config.text_heads, "layers": config.text_layers,
                     "mlp_ratio": config.mlp_ratio},
    }
    preprocess = {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    (output / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                      indent=2))
    _write_tokenizer_files(tokenizer, output, config)
    return output


def export_hf(model: CLIP, tokenizer: Tokenizer, output: str | Path) -> Path:
    """A Hugging Face folder: `transformers.CLIPModel.from_pretrained(OUTPUT)`, `CLIPProcessor` likewise."""
    config, output = model.config, Path(output)
    output.mkdir(parents=True, exist_ok=True)
    save_file(to_hf(model.state_dict()), output / HF_WEIGHTS, metadata={"format": "pt"})
    shared = {"hidden_act": config.activation, "layer_norm_eps": 1e-5, "projection_dim": config.embed_dim}
    hf_config = {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.embed_dim,
        "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "torch_dtype": "float32",
        "text_config": {**shared, "model_type": "clip_text_model", "vocab_size": config.vocab_size,
                        "hidden_size": config.text_width, "num_hidden_layers": config.text_layers,
                        "num_attention_heads": config.text_heads,
                        "intermediate_size": int(config.text_width * config.mlp_ratio),
                        "max_position_embeddings": config.context_length, "bos_token_id": tokenizer.start_of_text_id,
                        "eos_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.pad_id},
        "vision_config": {**shared, "model_type": "clip_vision_model", "hidden_size": config.vision_width,
                          "num_hidden_layers": config.vision_layers, "num_attention_heads": config.vision_heads,
                          "intermediate_size": int(config.vision_width * config.mlp_ratio),
                          "image_size": config.image_size, "patch_size": config.patch_size, "num_channels": 3},
    }
    (output / HF_CONFIG).write_text(json.dumps(hf_config, indent=2))
    size = config.image_size
    preprocessor = {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
                    "do_resize": True, "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
                    "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
                    "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD), "do_convert_rgb": True}
    (output / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    _write_tokenizer_files(tokenizer, output, config)
    return output
