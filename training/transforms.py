"""Image preprocessing shared by training and evaluation: decode, crop, resize, normalise (PIL + torch, no torchvision).

Training uses a random resized crop (and no flip: captions say "left" and "right"); evaluation resizes the shorter
side and takes the centre. Both normalise with CLIP's channel statistics. The training loader stops before that:
its processes hand over uint8 crops (`train_crop`, a quarter of the bytes of fp32) and the training process
normalises whole batches on its device (`normalize`).
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
_MEAN = torch.tensor(MEAN).view(3, 1, 1)
_STD = torch.tensor(STD).view(3, 1, 1)


def decode(data: bytes) -> Image.Image:
    """Encoded image bytes -> RGB PIL image (raises on corrupt data)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "P"):  # transparent pixels become white, as the catalog's are
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("RGB")
    return image


def to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 normalised with CLIP's mean and std, on the images' device."""
    mean, std = _MEAN.to(images.device, non_blocking=True), _STD.to(images.device, non_blocking=True)
    return (images.float() / 255.0 - mean) / std


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float tensor normalised with CLIP's mean and std."""
    return normalize(to_uint8(image))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size`, then cut the central `size` x `size` square."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def random_resized_crop(image: Image.Image, size: int, rng: random.Random,
                        scale: tuple[float, float] = (0.8, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """A crop covering a random `scale` share of the area with a random aspect `ratio`, resized to `size`."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_w, crop_h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
            return image.resize((size, size), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    return center_crop(image, size)


def eval_transform(data: bytes, size: int) -> torch.Tensor:
    """Encoded bytes -> (3, size, size) tensor, deterministic (evaluation, embedding, scoring)."""
    return to_tensor(center_crop(decode(data), size))


def train_crop(data: bytes, size: int, rng: random.Random, scale: tuple[float, float] = (0.8, 1.0)) -> torch.Tensor:
    """Encoded bytes -> (3, size, size) uint8 tensor with a random resized crop drawn from `rng` (not normalised)."""
    return to_uint8(random_resized_crop(decode(data), size, rng, scale))


def train_transform(data: bytes, size: int, rng: random.Random, scale: tuple[float, float] = (0.8, 1.0)) -> torch.Tensor:
    """Encoded bytes -> (3, size, size) tensor with a random resized crop drawn from `rng`."""
    return normalize(train_crop(data, size, rng, scale))
