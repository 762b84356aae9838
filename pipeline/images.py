"""The one validator for untrusted image bytes, and the one decode of image bytes to an RGB picture.

Every image from outside (an ingest download, an upload to embed or score) passes `check_image_bytes` before any
pixel is decoded; `decode_checked` checks and then decodes. A rejected image raises `pipeline.failures.Fault`, whose
`kind` is the reason counted in ingest's failures.parquet and written in the `error` column of embedding tables:

- `too_large`: the body is longer than `max_bytes`;
- `not_an_image`: the bytes start with no known image signature (an HTML error page, text);
- `decompression_bomb`: the header declares more than `max_pixels` pixels (or more than PIL's own guard allows), so
  a small file would decode into gigabytes;
- `corrupt`: a known signature, but the header (or, in `decode_checked`, the pixel data) cannot be read;
- `truncated`: a JPEG without its end-of-image marker or a PNG without its IEND chunk.

`decode` is the unchecked decode for trusted bytes (the shards `clipforge ingest` wrote); training uses it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from pipeline.failures import Fault

# (signature, kind); WebP is told apart separately (RIFF container)
_MAGIC = [(b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff")]


@dataclass(frozen=True)
class ImageHeader:
    kind: str
    """jpeg, png, gif, webp, bmp or tiff (from the file's signature, not its name or content type)."""
    width: int
    height: int


def image_kind(body: bytes) -> str | None:
    """The image format its first bytes announce, or None when they announce none."""
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "webp"
    return next((kind for magic, kind in _MAGIC if body.startswith(magic)), None)


def check_image_bytes(body: bytes, max_bytes: int = 20_000_000, max_pixels: int = 50_000_000,
                      content_type: str = "") -> ImageHeader:
    """Reject what is not a whole image of acceptable size, reading the header only. Raises `Fault` (see above)."""
    if len(body) > max_bytes:
        raise Fault("too_large", f"{len(body):,} bytes, above the limit of {max_bytes:,}")
    kind = image_kind(body)
    if kind is None:
        start = body[:20].decode("latin-1", "replace").strip()
        raise Fault("not_an_image", f"content is not an image ({content_type or 'no content type'}, starts {start!r})")
    # PIL warns (and counts nothing) between its two bomb limits; our own limit below decides. catch_warnings is not
    # thread-safe, but download threads racing here can at worst leave this one warning category ignored.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(body)) as image:  # parses the header only, decodes nothing
                width, height = image.size
        except Image.DecompressionBombError as err:
            raise Fault("decompression_bomb", str(err).split(".")[0]) from None
        except Exception as err:  # noqa: BLE001 - PIL raises many types for broken headers
            raise Fault("corrupt", f"unreadable {kind} header: {type(err).__name__}: {err}") from None
    if kind == "jpeg" and b"\xff\xd9" not in body[-1024:]:
        raise Fault("truncated", "JPEG has no end-of-image marker")
    if kind == "png" and b"IEND" not in body[-32:]:
        raise Fault("truncated", "PNG has no IEND chunk")
    if width * height > max_pixels:
        raise Fault("decompression_bomb", f"declares {width}x{height} = {width * height:,} pixels, "
                                          f"above the limit of {max_pixels:,}")
    return ImageHeader(kind, width, height)


def decode(data: bytes) -> Image.Image:
    """Encoded image bytes -> RGB PIL image, unchecked (raises on corrupt data): for trusted bytes only."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "P"):  # transparent pixels become white, as the catalog's are
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("RGB")
    return image


def decode_checked(body: bytes, max_bytes: int = 20_000_000, max_pixels: int = 50_000_000) -> Image.Image:
    """Untrusted bytes -> RGB PIL image: `check_image_bytes`, then a full decode; a decode failure is `corrupt`."""
    header = check_image_bytes(body, max_bytes, max_pixels)
    with warnings.catch_warnings():  # the pixel count was checked above against our own limit
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return decode(body)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt pixel data
            raise Fault("corrupt", f"undecodable {header.kind}: {type(err).__name__}: {err}") from None
