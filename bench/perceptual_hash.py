"""Which perceptual hash finds copies on icon-like images: distances on the bundled OpenMoji catalog.

    python bench/perceptual_hash.py

For three hashes (the common 64-bit greyscale dHash, a 768-bit colour dHash, and the 768-bit colour dHash with a
16-level margin that `pipeline.filter.perceptual_hash` uses), prints:
- how many of the training drawings have a validation drawing (a different emoji) within 0, 8 and 16 bits: false
  copies the decontamination rule would see;
- the median and 90th-percentile distance between a drawing and its JPEG re-encoding (quality 95 and 75), its 2x
  upscale, and a 5-15 % crop resized back: what a copy on the web looks like.
Also the number of training drawings pixel-identical to a validation drawing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pipeline.catalog import build_openmoji_catalog, read_catalog  # noqa: E402
from pipeline.filter import perceptual_hash  # noqa: E402
from pipeline.images import decode  # noqa: E402


def grey_dhash(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    return pixels[:, 1:] > pixels[:, :-1]


def colour_dhash(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image.resize((17, 16), Image.BOX), dtype=np.int16)
    return pixels[:, 1:] > pixels[:, :-1]


def margin_dhash(image: Image.Image) -> np.ndarray:
    return np.unpackbits(np.frombuffer(perceptual_hash(image), np.uint8))


HASHES = {"grey dHash 64 bits": grey_dhash, "colour dHash 768 bits": colour_dhash,
          "colour dHash 768 bits, margin 16 (clipforge)": margin_dhash}


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def crop(image: Image.Image, rng: random.Random) -> Image.Image:
    scale = rng.uniform(0.85, 0.95)
    w, h = round(image.width * scale), round(image.height * scale)
    left, top = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
    return image.crop((left, top, left + w, top + h)).resize(image.size, Image.BICUBIC)


def main() -> None:
    catalog = build_openmoji_catalog(".clipforge/catalog/openmoji")
    rows = read_catalog(catalog).to_pylist()
    images = {split: [decode((catalog / r["image"]).read_bytes()) for r in rows if r["split"] == split]
              for split in ("train", "val")}
    val_pixels = {hashlib.sha256(i.tobytes()).digest() for i in images["val"]}
    identical = sum(hashlib.sha256(i.tobytes()).digest() in val_pixels for i in images["train"])
    rng = random.Random(0)
    sample = images["train"][:500]
    copies = {"jpeg 95": [jpeg(i, 95) for i in sample], "jpeg 75": [jpeg(i, 75) for i in sample],
              "upscale 2x": [i.resize((2 * i.width, 2 * i.height), Image.BICUBIC) for i in sample],
              "crop 85-95 %": [crop(i, rng) for i in sample]}
    result = {"train": len(images["train"]), "val": len(images["val"]), "pixel_identical_train_val": identical}
    for name, hash_of in HASHES.items():
        train = np.array([hash_of(i).reshape(-1) for i in images["train"]])
        val = np.array([hash_of(i).reshape(-1) for i in images["val"]])
        nearest = np.array([(val != row).sum(1).min() for row in train])  # (train,) bits to the closest val drawing
        entry = {"bits": int(train.shape[1]),
                 "train_with_a_val_drawing_within": {k: int((nearest <= k).sum()) for k in (0, 8, 16)}}
        for copy_name, copied in copies.items():
            distance = np.array([(hash_of(c).reshape(-1) != t).sum() for c, t in zip(copied, train)])
            entry[copy_name] = {"median": int(np.median(distance)), "p90": int(np.percentile(distance, 90))}
        result[name] = entry
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
