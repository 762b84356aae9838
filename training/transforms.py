"""Image preprocessing shared by training and evaluation: decode, crop, resize, normalise (PIL + torch, no torchvision).

Training uses a random resized crop (and no flip: captions say "left" and "right"); evaluation resizes the shorter
side and takes the centre. Both normalise with CLIP's channel statistics. The training loader stops before that:
its processes decode to uint8 (a quarter of the bytes of fp32) and draw each sample's crop box (`train_crop`); the
training process cuts, resizes and normalises whole batches on its device (`device_crops`), where that is nearly free.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:  # libjpeg-turbo straight to a numpy array: 2-4x PIL's JPEG decode here (bench/loader.py); optional
    import simplejpeg
except ImportError:  # pragma: no cover - the PIL path below does the same, slower
    simplejpeg = None

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


def decode_array(data: bytes) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB array; JPEG through simplejpeg when installed (raises on corrupt data)."""
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass  # e.g. CMYK, which libjpeg-turbo does not convert: PIL does; a corrupt file fails there too
    return np.array(decode(data), dtype=np.uint8)


def to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W), a view: stacking copies


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


def crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.8, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int] | None:
    """(left, top, width, height) of a crop covering a random `scale` share of the area with a random aspect `ratio`;
    None when ten draws do not fit (then take the centre)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_w, crop_h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, width - crop_w), rng.randint(0, height - crop_h), crop_w, crop_h
    return None


def random_resized_crop(image: Image.Image, size: int, rng: random.Random,
                        scale: tuple[float, float] = (0.8, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """A crop covering a random `scale` share of the area with a random aspect `ratio`, resized to `size`."""
    box = crop_box(*image.size, rng, scale, ratio)
    if box is None:
        return center_crop(image, size)
    left, top, crop_w, crop_h = box
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))


def eval_transform(data: bytes, size: int) -> torch.Tensor:
    """Encoded bytes -> (3, size, size) tensor, deterministic (evaluation, embedding, scoring)."""
    return to_tensor(center_crop(decode(data), size))


def train_crop(data: bytes, size: int, rng: random.Random,
               scale: tuple[float, float] = (0.8, 1.0)) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Encoded bytes -> ((3, size, size) uint8 image, (left, top, width, height) crop box for `device_crops`).

    An image already `size` x `size` (what `clipforge ingest` writes for this size) is handed over whole with its
    random box, to be cut and resized on the device; any other size is cropped and resized here (box: all of it).
    """
    array = decode_array(data)  # (H, W, 3)
    if array.shape[:2] == (size, size):
        box = crop_box(size, size, rng, scale) or (0, 0, size, size)
        return torch.from_numpy(array).permute(2, 0, 1), box
    return to_uint8(random_resized_crop(Image.fromarray(array), size, rng, scale)), (0, 0, size, size)


def device_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Cut each (left, top, width, height) box out of uint8 (B, 3, H, W) images, resize it to `size` (bilinear) and
    normalise: (B, 3, size, size) float32, in one batched op on the images' device."""
    B, _, H, W = images.shape
    boxes = boxes.to(torch.float32)
    left, top, width, height = boxes.unbind(1)  # (B,) each, in pixels
    theta = torch.zeros(B, 2, 3, device=images.device)  # output [-1, 1] -> source [-1, 1] (align_corners=False)
    theta[:, 0, 0], theta[:, 0, 2] = width / W, (2 * left + width) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = height / H, (2 * top + height) / H - 1
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    crops = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return normalize(crops.clamp_(0, 255))


def train_transform(data: bytes, size: int, rng: random.Random, scale: tuple[float, float] = (0.8, 1.0)) -> torch.Tensor:
    """Encoded bytes -> (3, size, size) tensor with a random resized crop drawn from `rng`."""
    return to_tensor(random_resized_crop(decode(data), size, rng, scale))
