"""Image preprocessing shared by training and evaluation: decode, crop, resize, normalise (PIL + torch, no torchvision).

Training uses a random resized crop (and no flip: captions say "left" and "right"); evaluation resizes the shorter
side and takes the centre. Both normalise with CLIP's channel statistics. The training loader stops before that:
its processes decode to uint8 (a quarter of the bytes of fp32) and draw each sample's crop box (`train_crop`); the
training process cuts, resizes and normalises whole batches on its device (`device_crops`), where that is nearly free.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.images import decode  # the one bytes -> RGB decode, shared with the checked path of outside images

try:  # libjpeg-turbo straight to a numpy array: 2-4x PIL's JPEG decode here (bench/loader.py); optional
    import simplejpeg
except ImportError:  # pragma: no cover - the PIL path below does the same, slower
    simplejpeg = None

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
_MEAN = torch.tensor(MEAN).view(3, 1, 1)
_STD = torch.tensor(STD).view(3, 1, 1)


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


# ---------------------------------------------------------------------------------------------------------------------
# Style augmentations: change how a picture is drawn, keep what it shows (training only; evaluation never sees them)

STYLE_AUGMENTATIONS = ("colour", "grey", "outline", "blur", "resolution", "lowres", "rotate")
"""colour: any hue turn and saturation (1 in 5 kept); grey: greyscale (1 in 5); outline: dark lines one pixel thicker
or thinner, a 3x3 min or max filter (1 in 4 each); blur: a 3x3 blur (1 in 5); resolution: drawn at 3/8 to 5/8 of the
size and scaled back up (1 in 3); lowres: drawn at 1/8 to 1/4 of the size, so that only the layout of colours is
left (1 in 2; it takes precedence over resolution); rotate: up to 15 degrees either way. No flips: captions say
"left" and "right"."""
_RESOLUTIONS = (0.375, 0.5, 0.625)
_LOW_RESOLUTIONS = (0.125, 0.1875, 0.25)
# (B, 7) per-sample draws: angle (radians), hue (radians), saturation, grey, outline (-1 thinner, +1 thicker), blur,
# resolution (share of the size); all neutral (0, 0, 1, 0, 0, 0, 1) when an augmentation is off or not drawn.
NEUTRAL_STYLE = (0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def check_augmentations(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(names) - set(STYLE_AUGMENTATIONS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {', '.join(unknown)}; choose from {', '.join(STYLE_AUGMENTATIONS)}")
    return tuple(names)


def style_draw(rng: random.Random, augment: tuple[str, ...]) -> tuple[float, ...]:
    """One sample's style draw (see NEUTRAL_STYLE): each augmentation named in `augment` is applied with its own chance.

    Each augmentation draws from `rng` whether or not it is on: turning one off leaves the others' draws as they were.
    """
    u = [rng.random() for _ in range(8)]
    angle = (u[0] * 2 - 1) * math.radians(15) if "rotate" in augment else 0.0
    hue, saturation = ((u[1] * 2 - 1) * math.pi, 0.5 + u[2]) if "colour" in augment and u[2] < 0.8 else (0.0, 1.0)
    grey = float("grey" in augment and u[3] < 0.2)
    outline = (-1.0 if u[4] < 0.25 else 1.0 if u[4] > 0.75 else 0.0) if "outline" in augment else 0.0
    blur = float("blur" in augment and u[5] < 0.2)
    resolution = _RESOLUTIONS[int(u[6] * 9) % 3] if "resolution" in augment and u[6] < 1 / 3 else 1.0
    if "lowres" in augment and u[7] < 0.5:
        resolution = _LOW_RESOLUTIONS[int(u[7] * 6) % 3]
    return angle, hue, saturation, grey, outline, blur, resolution


def _hue_matrices(hue: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3): rotate colours by `hue` about the grey axis, then scale their distance from grey by `saturation`."""
    eye, grey = torch.eye(3, device=hue.device), torch.full((3, 3), 1 / 3, device=hue.device)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=hue.device) / math.sqrt(3)
    cos, sin = hue.cos()[:, None, None], hue.sin()[:, None, None]
    rotation = cos * eye + (1 - cos) * grey + sin * cross
    return grey + saturation[:, None, None] * (rotation - grey)


def style_augment(images: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Apply the (B, 7) draws of `style_draw` (all but the angle, which `device_crops` applies) to float (B, 3, S, S)
    images in [0, 255]; samples with neutral draws come back unchanged."""
    hue, saturation, grey, outline, blur, resolution = style.unbind(1)[1:]
    chosen = lambda mask, changed, x: torch.where(mask[:, None, None, None], changed, x)  # noqa: E731
    coloured = (hue != 0) | (saturation != 1)
    if coloured.any():
        images = chosen(coloured, torch.einsum("bij,bjhw->bihw", _hue_matrices(hue, saturation), images), images)
    if grey.any():
        luma = (images * torch.tensor([0.299, 0.587, 0.114], device=images.device)[None, :, None, None]).sum(1, True)
        images = chosen(grey > 0, luma.expand_as(images), images)
    if outline.any():  # dark lines on a light ground: a min filter thickens them, a max filter thins them
        thinner = chosen(outline < 0, F.max_pool2d(images, 3, 1, 1), images)
        images = chosen(outline > 0, -F.max_pool2d(-images, 3, 1, 1), thinner)
    if blur.any():
        images = chosen(blur > 0, F.avg_pool2d(images, 3, 1, 1, count_include_pad=False), images)
    size = images.shape[-1]
    for share in (*_RESOLUTIONS, *_LOW_RESOLUTIONS):
        mask = resolution == share
        if mask.any():
            small = F.interpolate(images, size=max(1, round(size * share)), mode="bilinear", antialias=True)
            images = chosen(mask, F.interpolate(small, size=size, mode="bilinear"), images)
    return images.clamp(0, 255)


def device_crops(images: torch.Tensor, boxes: torch.Tensor, size: int,
                 style: torch.Tensor | None = None) -> torch.Tensor:
    """Cut each (left, top, width, height) box out of uint8 (B, 3, H, W) images, resize it to `size` (bilinear) and
    normalise: (B, 3, size, size) float32, in one batched op on the images' device. With `style` (B, 7 draws of
    `style_draw`), each crop is also turned by its angle and restyled by `style_augment`."""
    B, _, H, W = images.shape
    boxes = boxes.to(torch.float32)
    left, top, width, height = boxes.unbind(1)  # (B,) each, in pixels
    angle = style[:, 0].to(images.device) if style is not None else torch.zeros(B, device=images.device)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(B, 2, 3, device=images.device)  # output [-1, 1] -> source [-1, 1] (align_corners=False)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos * width / W, -sin * height / W, (2 * left + width) / W - 1
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * width / H, cos * height / H, (2 * top + height) / H - 1
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    crops = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if style is not None:
        crops = style_augment(crops, style.to(images.device))
    return normalize(crops.clamp_(0, 255))


def train_transform(data: bytes, size: int, rng: random.Random, scale: tuple[float, float] = (0.8, 1.0)) -> torch.Tensor:
    """Encoded bytes -> (3, size, size) tensor with a random resized crop drawn from `rng`."""
    return to_tensor(random_resized_crop(decode(data), size, rng, scale))
