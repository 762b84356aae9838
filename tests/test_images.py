"""The untrusted-image validator: each reason on crafted bytes, good images pass with their header, the checked decode."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import training.transforms
from pipeline.failures import Fault
from pipeline.images import ImageHeader, check_image_bytes, decode, decode_checked


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, pixel_data: bytes | None = None) -> bytes:
    """A PNG whose header declares width x height RGB pixels; its IDAT holds `pixel_data` (a few zero rows if None)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * 1000) if pixel_data is None else pixel_data
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def reason(body: bytes, **limits: int) -> str:
    with pytest.raises(Fault) as caught:
        check_image_bytes(body, **limits)
    return caught.value.kind


GOOD = Image.new("RGB", (40, 30), (200, 30, 30))


@pytest.mark.parametrize("image_format, kind", [("PNG", "png"), ("JPEG", "jpeg"), ("GIF", "gif"), ("WEBP", "webp"),
                                                ("BMP", "bmp"), ("TIFF", "tiff")])
def test_a_good_image_returns_its_header(image_format: str, kind: str) -> None:
    assert check_image_bytes(encoded(GOOD, image_format)) == ImageHeader(kind, 40, 30)


def test_html_is_not_an_image() -> None:
    html = b"<!doctype html><html><body>This image has moved</body></html>"
    with pytest.raises(Fault) as caught:
        check_image_bytes(html, content_type="text/html")
    assert caught.value.kind == "not_an_image" and "text/html" in caught.value.detail
    assert reason(b"") == "not_an_image"


def test_truncated_jpeg_and_png() -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8))
    jpeg, png = encoded(noise, "JPEG"), encoded(noise, "PNG")  # halves that still hold whole headers
    assert reason(jpeg[: len(jpeg) // 2]) == "truncated"
    assert reason(png[:-12]) == "truncated"  # the IEND chunk is the last 12 bytes


def test_unreadable_header_is_corrupt() -> None:
    assert reason(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4) == "corrupt"
    assert reason(b"\x89PNG\r\n\x1a\n" + b"\0" * 64) == "corrupt"


def test_decompression_bombs() -> None:
    assert reason(png_declaring(30000, 30000)) == "decompression_bomb"  # past PIL's own guard
    assert reason(png_declaring(10000, 6000)) == "decompression_bomb"  # 60 M pixels: past the 50 M default only
    assert reason(encoded(GOOD, "PNG"), max_pixels=40 * 30 - 1) == "decompression_bomb"
    assert check_image_bytes(encoded(GOOD, "PNG"), max_pixels=40 * 30).width == 40


def test_oversize_body_is_too_large() -> None:
    body = encoded(GOOD, "PNG")
    assert reason(body, max_bytes=len(body) - 1) == "too_large"
    assert reason(b"<html>" * 100, max_bytes=10) == "too_large"  # size is checked before anything is read


def test_decode_checked_composites_transparency_onto_white() -> None:
    rgba = Image.new("RGBA", (8, 4), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent
    body = encoded(rgba, "PNG")
    image = decode_checked(body)
    assert image.mode == "RGB" and image.size == (8, 4)
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 0)) == (0, 0, 255)
    assert np.array_equal(np.array(image), np.array(training.transforms.decode(body)))
    assert training.transforms.decode is decode  # one decode for training and for outside images


def test_decode_checked_rejects_before_decoding_and_names_broken_pixels_corrupt() -> None:
    with pytest.raises(Fault) as caught:
        decode_checked(png_declaring(10000, 6000))
    assert caught.value.kind == "decompression_bomb"
    with pytest.raises(Fault) as caught:  # a readable header and an IEND, but pixel data that is not zlib
        decode_checked(png_declaring(16, 16, pixel_data=b"not zlib at all" * 8))
    assert caught.value.kind == "corrupt"
    assert str(caught.value).startswith("[corrupt] ")  # the tag ingest's classify_error reads
