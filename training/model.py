"""The CLIP dual encoder: a Vision Transformer, a causal text Transformer, and a learnable temperature.

This module owns the network and nothing else: `ModelConfig` (the typed shape of a model) with its named presets,
`CLIP` (whose `forward` reads like the paper: encode, normalise, scale), `create_model(preset)`, and the analytic
`parameter_counts` / `flops_per_sample` used by `clipforge model-info` and the MFU benchmark. It is pure PyTorch:
distribution, mixed precision (`torch.autocast`) and compilation are applied from outside by the training code.

Reference: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2021).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import model_validator

from pipeline.config import Config

MAX_LOGIT_SCALE = 100.0
"""The temperature is never allowed to scale logits by more than this (the paper's clip, to keep training stable)."""


class ModelConfig(Config):
    """The shape of a CLIP model. Variation is a named preset (see `MODEL_PRESETS`), not a new flag."""

    image_size: int = 224
    """Side of the square input image in pixels; must be a multiple of `patch_size`."""
    patch_size: int = 32
    """Side of the square patches the image is cut into; each patch becomes one token of the image tower."""
    vision_width: int = 768
    """Width (channels) of the image tower's transformer."""
    vision_layers: int = 12
    """Number of transformer blocks in the image tower."""
    vision_heads: int = 12
    """Number of attention heads in the image tower; must divide `vision_width`."""
    text_width: int = 512
    """Width (channels) of the text tower's transformer."""
    text_layers: int = 12
    """Number of transformer blocks in the text tower."""
    text_heads: int = 8
    """Number of attention heads in the text tower; must divide `text_width`."""
    vocab_size: int = 49408
    """Number of token embeddings; must be at least the tokenizer's vocabulary size (CLIP's BPE has 49,408)."""
    context_length: int = 77
    """Maximum number of tokens per caption, start- and end-of-text tokens included."""
    embed_dim: int = 512
    """Dimension of the shared image-text embedding space that both towers project into."""
    mlp_ratio: float = 4.0
    """Hidden width of each transformer MLP as a multiple of the block's width."""
    activation: Literal["gelu", "quick_gelu"] = "gelu"
    """MLP non-linearity: exact GELU, or QuickGELU (x * sigmoid(1.702 x)), which OpenAI's released CLIPs use."""

    @model_validator(mode="after")
    def _check_divisibility(self) -> ModelConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"vision_width {self.vision_width} is not divisible by vision_heads {self.vision_heads}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}")
        return self

    def derive(self, **changes: object) -> ModelConfig:
        """A validated copy with some fields changed (presets are derived from one another this way)."""
        return ModelConfig.model_validate({**self.model_dump(), **changes})


# The paper's towers (CLIP paper, Table 20; counts checked against open_clip's docs/model_profile.csv in the tests).
_VIT_B_32 = ModelConfig()
MODEL_PRESETS: dict[str, ModelConfig] = {
    # unit tests: a forward-backward takes milliseconds on a CPU
    "tiny": _VIT_B_32.derive(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                             text_width=64, text_layers=2, text_heads=2, vocab_size=1024, context_length=32,
                             embed_dim=64),
    # the CPU demo: 64 px images (8x8 patches of 8 px), short emoji captions (the longest Unicode name, 19 tokens)
    "small": _VIT_B_32.derive(image_size=64, patch_size=8, vision_width=256, vision_layers=6, vision_heads=4,
                              text_width=256, text_layers=6, text_heads=4, vocab_size=8192, context_length=20,
                              embed_dim=256),
    "vit-b-32": _VIT_B_32,
    "vit-b-16": _VIT_B_32.derive(patch_size=16),
    "vit-l-14": _VIT_B_32.derive(patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                                 text_width=768, text_heads=12, embed_dim=768),
}
# OpenAI's released models (CLIP's clip-bpe tokenizer: 49,408 ids, 77 tokens); `clipforge import` reads their weights
MODEL_PRESETS |= {f"openai-{name}": MODEL_PRESETS[name].derive(activation="quick_gelu")
                  for name in ("vit-b-32", "vit-b-16", "vit-l-14")}
MODEL_PRESETS["openai-vit-l-14-336"] = MODEL_PRESETS["openai-vit-l-14"].derive(image_size=336)


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention` (flash / memory-efficient kernels)."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; released weights were trained with it."""
    return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)
        self.activation = quick_gelu if activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: two residual lines."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, causal: bool, activation: str = "gelu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class VisionTransformer(nn.Module):
    """Image tower: patches -> [class] + patch tokens -> transformer -> normed class token -> projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width, grid = config.vision_width, config.image_size // config.patch_size
        self.patch_embed = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_token = nn.Parameter(torch.empty(width))
        self.position_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)  # the paper's extra norm on patch + position embeddings
        self.blocks = nn.ModuleList(
            Block(width, config.vision_heads, config.mlp_ratio, causal=False, activation=config.activation)
            for _ in range(config.vision_layers)
        )
        self.ln_post = nn.LayerNorm(width)
        self.projection = nn.Linear(width, config.embed_dim, bias=False)
        self.patch_dropout = 0.0  # share of patch tokens dropped in training (FLIP); set by the training code

    def forward(self, images: torch.Tensor, patch_dropout: float | None = None) -> torch.Tensor:
        B, p = images.shape[0], self.patch_embed.kernel_size[0]
        patches = images.unfold(2, p, p).unfold(3, p, p)  # (B, 3, g, g, p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (B, g*g, 3*p*p), the kernel's order
        position = self.position_embedding[1:].expand(B, -1, -1)  # (B, g*g, C)
        rate = self.patch_dropout if patch_dropout is None else patch_dropout
        if self.training and rate > 0:  # FLIP: keep a random subset of patches per image, never at evaluation
            keep = max(1, round(patches.shape[1] * (1 - rate)))
            kept = torch.rand(patches.shape[:2], device=images.device).argsort(dim=1)[:, :keep]  # (B, keep)
            patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, patches.shape[2]))  # (B, keep, 3*p*p)
            position = position.gather(1, kept.unsqueeze(-1).expand(-1, -1, position.shape[2]))  # (B, keep, C)
        # the stride-p convolution as one matmul over the kept patches (the same weights; far faster on CPU)
        x = F.linear(patches, self.patch_embed.weight.flatten(1))  # (B, kept patches, C)
        x = x + position.to(x.dtype)
        class_token = self.class_token + self.position_embedding[0]
        class_token = class_token.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, C)
        x = torch.cat([class_token, x], dim=1)  # (B, T = kept patches + 1, C)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.projection(self.ln_post(x[:, 0]))  # (B, embed_dim)


class TextTransformer(nn.Module):
    """Text tower: a causal (GPT-style) transformer read out at the end-of-text token.

    The end-of-text token is located as the highest token id in each row (`tokens.argmax(-1)`, as in CLIP): our
    tokenizer gives end-of-text the highest id of its vocabulary, so the first occurrence of the maximum is the
    end-of-text token. Because attention is causal, nothing after that token can change the feature.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.text_width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.position_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.blocks = nn.ModuleList(
            Block(width, config.text_heads, config.mlp_ratio, causal=True, activation=config.activation)
            for _ in range(config.text_layers)
        )
        self.ln_final = nn.LayerNorm(width)
        self.projection = nn.Linear(width, config.embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        x = self.token_embedding(tokens) + self.position_embedding[:T]  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        end_of_text = x[torch.arange(B, device=x.device), tokens.argmax(dim=-1)]  # (B, C)
        return self.projection(end_of_text)  # (B, embed_dim)


class CLIP(nn.Module):
    """Two towers projecting into one space, and the learnable temperature (stored as log of the logit scale)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config)
        self.text = TextTransformer(config)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.reset_parameters()

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, embed_dim) features, unit length if `normalize`."""
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, context_length) token ids -> (B, embed_dim) features, unit length if `normalize`."""
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def logit_scale(self) -> torch.Tensor:
        """exp(log logit scale), never above `MAX_LOGIT_SCALE`; an fp32 scalar (autocast does not touch exp)."""
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (image_emb (B, D), text_emb (B, D), logit_scale ()): unit-length embeddings and exp'd scale."""
        image_features = self.encode_image(images)  # (B, D)
        text_features = self.encode_text(tokens)  # (B, D)
        image_emb = F.normalize(image_features, dim=-1)
        text_emb = F.normalize(text_features, dim=-1)
        return image_emb, text_emb, self.logit_scale()  # logits = logit_scale * image_emb @ text_emb.T

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Call after every optimiser step: keeps the scale in [1, MAX_LOGIT_SCALE] (as CLIP and open_clip do)."""
        self.log_logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CLIP's initialisation: small normal weights, residual projections scaled down by depth."""
        for tower, width, layers in ((self.visual, self.config.vision_width, self.config.vision_layers),
                                     (self.text, self.config.text_width, self.config.text_layers)):
            attention_std = width**-0.5
            projection_std = width**-0.5 * (2 * layers) ** -0.5
            for block in tower.blocks:
                nn.init.normal_(block.attn.qkv.weight, std=attention_std)
                nn.init.normal_(block.attn.proj.weight, std=projection_std)
                nn.init.normal_(block.mlp.fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(block.mlp.proj.weight, std=projection_std)
                for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
                    nn.init.zeros_(linear.bias)
            for norm in (m for m in tower.modules() if isinstance(m, nn.LayerNorm)):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
            nn.init.normal_(tower.projection.weight, std=width**-0.5)
        vision_scale = self.config.vision_width**-0.5
        nn.init.normal_(self.visual.patch_embed.weight, std=vision_scale)
        nn.init.normal_(self.visual.class_token, std=vision_scale)
        nn.init.normal_(self.visual.position_embedding, std=vision_scale)
        nn.init.normal_(self.text.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text.position_embedding, std=0.01)
        self.log_logit_scale.fill_(math.log(1 / 0.07))


def create_model(preset: str | ModelConfig, device: torch.device | str | None = None) -> CLIP:
    """Build a CLIP model from a preset name (see `MODEL_PRESETS`) or a `ModelConfig`, in fp32.

    `device="meta"` builds it without allocating memory (enough for counting parameters).
    """
    if isinstance(preset, str):
        if preset not in MODEL_PRESETS:
            raise KeyError(f"unknown model preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
        preset = MODEL_PRESETS[preset]
    with torch.device(device or "cpu"):
        return CLIP(preset)


def parameter_counts(model: CLIP) -> dict[str, int]:
    """Parameters per tower: {"image", "text", "total"}; each tower includes its projection, total adds the scale."""
    image = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for p in model.text.parameters())
    return {"image": image, "text": text, "total": sum(p.numel() for p in model.parameters())}


def _transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
    """Forward FLOPs (2 per multiply-add) of `layers` blocks over `tokens` tokens, matmuls only.

    Attention scores and their weighted sum are counted in full even when causal, as open_clip's profiler does.
    """
    hidden = int(width * mlp_ratio)
    projections = 2 * tokens * width * (3 * width + width + 2 * hidden)  # qkv, output, MLP in and out
    attention = 2 * 2 * tokens * tokens * width  # q @ k^T and weights @ v, summed over heads
    return layers * (projections + attention)


def flops_per_sample(config: ModelConfig) -> dict[str, int]:
    """Analytic forward FLOPs for one image-caption pair: {"image", "text", "total"} (x3 for a training step).

    The text tower is counted over the full `context_length`, the projections on one token each; norms, softmax,
    GELU and the loss are left out (they are a few percent at most).
    """
    patches = (config.image_size // config.patch_size) ** 2
    patch_embed = 2 * patches * (3 * config.patch_size**2) * config.vision_width
    image = (patch_embed + _transformer_flops(patches + 1, config.vision_width, config.vision_layers, config.mlp_ratio)
             + 2 * config.vision_width * config.embed_dim)
    text = (_transformer_flops(config.context_length, config.text_width, config.text_layers, config.mlp_ratio)
            + 2 * config.text_width * config.embed_dim)
    return {"image": image, "text": text, "total": image + text}
