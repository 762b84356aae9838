"""A loopback web server that behaves like the web as it is, for ingest tests.

`FaultyWeb()` serves real, distinct images (JPEG and PNG, 64-320 px, aspect under 2:1, the same bytes for the same
index on every run) next to URLs that fail in each way an image crawl meets: error statuses, refused connections,
redirect loops, servers that never answer or drip one byte a second, truncated and corrupt files, HTML at a `.jpg`
URL, a decompression bomb, a 1x1 image and an `X-Robots-Tag: noai` opt-out. `url_list()` returns rows
`{"url", "caption", "expected"}` where `expected` is `"ok"` or the fault kind, so a test can check that exactly the
good rows arrive, byte for byte or at least at their original size:

    with FaultyWeb() as web:
        rows = web.url_list(n_good=20, n_per_fault=2)
        good = web.expected_ok(rows)            # {url: caption} of the rows that must arrive
        width, height = web.original_size(url)  # for a good url

Hanging and dripping handlers wait on one `threading.Event`, set when the context exits, so the server stops within
a second even with those requests in flight.
"""

from __future__ import annotations

import contextlib
import io
import random
import socket
import struct
import threading
import zlib
from collections import Counter
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from PIL import Image, ImageDraw

OK = "ok"
HTTP_404 = "http_404"
HTTP_500 = "http_500"
CONNECTION_REFUSED = "connection_refused"
REDIRECT_LOOP = "redirect_loop"
TIMEOUT = "timeout"
SLOW_DRIP = "slow_drip"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
NOT_AN_IMAGE = "not_an_image"
DECOMPRESSION_BOMB = "decompression_bomb"
TINY = "tiny"
ROBOTS_OPTOUT = "robots_optout"

FAULT_KINDS = (
    HTTP_404,
    HTTP_500,
    CONNECTION_REFUSED,
    REDIRECT_LOOP,
    TIMEOUT,
    SLOW_DRIP,
    TRUNCATED,
    CORRUPT,
    NOT_AN_IMAGE,
    DECOMPRESSION_BOMB,
    TINY,
    ROBOTS_OPTOUT,
)

HANG_SECONDS = 60.0
"""How long a `timeout` request hangs at most (it ends at once when the server stops)."""
DRIP_CONTENT_LENGTH = 20_000
"""Bytes a `slow_drip` response promises; it sends one per second, so a per-read timeout never fires."""
BOMB_SIZE = (30_000, 30_000)
"""Pixels the decompression bomb's PNG header declares (8-bit RGB: 2.7 GB once decoded)."""

_COLOURS = {
    "red": (200, 40, 40),
    "orange": (230, 140, 30),
    "yellow": (230, 210, 40),
    "green": (40, 160, 60),
    "teal": (30, 150, 150),
    "blue": (40, 80, 200),
    "purple": (130, 50, 170),
    "pink": (230, 120, 170),
    "brown": (120, 80, 40),
    "grey": (128, 128, 128),
}
_SHAPES = ("circles", "squares", "stripes", "dots", "rings", "blocks")


# --- the content ----------------------------------------------------------------------------------------------------


def good_image_format(index: int) -> str:
    """The format of good image `index`: "png" for every third one, else "jpeg"."""
    return "png" if index % 3 == 2 else "jpeg"


@lru_cache(maxsize=4096)
def _good_image(index: int) -> tuple[bytes, tuple[int, int], str]:
    """(bytes, (width, height), caption) of good image `index`; depends on the index only."""
    rng = random.Random(f"good-image-{index}")
    width = rng.randint(64, 320)
    height = max(64, round(width * rng.uniform(0.55, 1.8)))  # aspect ratio stays under 2:1
    colour_name = rng.choice(sorted(_COLOURS))
    shape = rng.choice(_SHAPES)
    image = _render(rng, (width, height), _COLOURS[colour_name], shape, label=str(index))
    caption = f"picture {index}: {colour_name} {shape} on a {width}x{height} canvas"
    return _encode(image, good_image_format(index)), (width, height), caption


def good_image_bytes(index: int) -> bytes:
    return _good_image(index)[0]


def good_image_size(index: int) -> tuple[int, int]:
    """(width, height) of good image `index` as served."""
    return _good_image(index)[1]


def good_image_caption(index: int) -> str:
    return _good_image(index)[2]


def _render(
    rng: random.Random, size: tuple[int, int], colour: tuple[int, int, int], shape: str, label: str
) -> Image.Image:
    width, height = size
    background = tuple(rng.randint(0, 255) for _ in range(3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(4, 12)):
        x0, y0 = rng.randint(0, width - 8), rng.randint(0, height - 8)
        x1, y1 = rng.randint(x0 + 4, width), rng.randint(y0 + 4, height)
        fill = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in colour)
        if shape in ("circles", "dots", "rings"):
            draw.ellipse((x0, y0, x1, y1), fill=None if shape == "rings" else fill, outline=fill, width=3)
        elif shape == "stripes":
            draw.rectangle((0, y0, width, min(height, y0 + rng.randint(3, 12))), fill=fill)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
    draw.text((4, 4), label, fill=(255 - background[0], 255 - background[1], 255 - background[2]))
    return image


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


@lru_cache(maxsize=4)
def decompression_bomb_png(width: int = BOMB_SIZE[0], height: int = BOMB_SIZE[1], rows: int = 32) -> bytes:
    """A PNG whose header declares `width` x `height` 8-bit RGB pixels, a few KB on the wire.

    Its chunks and checksums are valid and its IDAT is a complete zlib stream of zero rows, but only the first `rows`
    of them: deflate compresses at most ~1000:1, so a complete 30000x30000 image could not be smaller than ~110 KB
    even at 1 bit per pixel. The header alone is what makes a naive decoder allocate the full image.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB)
    compressor = zlib.compressobj(9)
    zero_row = b"\x00" * (1 + 3 * width)  # filter byte 0, then black pixels
    data = b"".join(compressor.compress(zero_row) for _ in range(rows)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


@lru_cache(maxsize=256)
def _fault_body(kind: str, index: int) -> bytes:
    """The bytes served for fault `kind` number `index` (deterministic)."""
    rng = random.Random(f"{kind}-{index}")
    if kind in (TRUNCATED, SLOW_DRIP):
        full = _encode(_render(rng, (256, 192), _COLOURS["blue"], "blocks", label=f"{kind} {index}"), "jpeg")
        return full[: len(full) // 2] if kind == TRUNCATED else (full * 40)[:DRIP_CONTENT_LENGTH]
    if kind == CORRUPT:
        jfif = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        return jfif + rng.randbytes(4096)
    if kind == NOT_AN_IMAGE:
        return (
            b"<!doctype html><html><head><title>Moved</title></head><body><h1>This image has moved</h1>"
            + f"<p>Page {index}. Please visit our homepage.</p></body></html>".encode()
        )
    if kind == DECOMPRESSION_BOMB:
        return decompression_bomb_png()
    if kind == TINY:
        return _encode(Image.new("RGB", (1, 1), tuple(rng.randint(0, 255) for _ in range(3))), "png")
    if kind == ROBOTS_OPTOUT:
        return good_image_bytes(1_000_000 + index)  # a good image, but its owner opted out of AI training
    raise ValueError(f"fault {kind!r} has no body")


# --- the server -----------------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler still in flight never keeps the test process alive
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, web: FaultyWeb) -> None:
        self.web = web
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers in keep-alive
    timeout = 30  # a client that connects and sends nothing is dropped

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # clients of a faulty web give up
            self.server.web._serve(self)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output clean
        pass


class FaultyWeb:
    """A loopback HTTP server with good images and every fault kind; use as a context manager."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.hits: Counter[str] = Counter()  # path -> requests received
        self._hits_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.refused_port = 0

    # -- lifecycle --

    def start(self) -> FaultyWeb:
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="faulty-web", daemon=True
        )
        self._thread.start()
        self.refused_port = _closed_port()
        return self

    def stop(self) -> None:
        """Release hanging and dripping handlers, stop accepting, close the socket."""
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FaultyWeb:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("FaultyWeb is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- URLs --

    def good_url(self, index: int) -> str:
        extension = "png" if good_image_format(index) == "png" else "jpg"
        return f"{self.base_url}/ok/{index}.{extension}"

    def fault_url(self, kind: str, index: int = 0) -> str:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(FAULT_KINDS)}")
        extension = "png" if kind in (DECOMPRESSION_BOMB, TINY) else "jpg"
        if kind == CONNECTION_REFUSED:
            return f"http://127.0.0.1:{self.refused_port}/fault/{kind}/{index}.{extension}"
        return f"{self.base_url}/fault/{kind}/{index}.{extension}"

    def url_list(
        self, n_good: int, n_per_fault: int, seed: int = 0, kinds: tuple[str, ...] = FAULT_KINDS
    ) -> list[dict[str, str]]:
        """`n_good` good rows and `n_per_fault` rows of each fault kind, shuffled by `seed`.

        Good row `i` is image `i` (see `good_image_bytes`); every caption is unique.
        """
        rows = [{"url": self.good_url(i), "caption": good_image_caption(i), "expected": OK} for i in range(n_good)]
        for kind in kinds:
            for j in range(n_per_fault):
                caption = f"{kind.replace('_', ' ')} sample {j}"
                rows.append({"url": self.fault_url(kind, j), "caption": caption, "expected": kind})
        random.Random(seed).shuffle(rows)
        return rows

    # -- what a correct ingest must produce --

    @staticmethod
    def expected_ok(rows: list[dict[str, str]]) -> dict[str, str]:
        """{url: caption} of the rows that must arrive (expected == "ok")."""
        return {row["url"]: row["caption"] for row in rows if row["expected"] == OK}

    def _good_index(self, url: str) -> int:
        path = urlsplit(url).path
        if not path.startswith("/ok/"):
            raise ValueError(f"{url} is not a good image URL of this server")
        return int(path[len("/ok/") :].split(".")[0])

    def image_bytes(self, url: str) -> bytes:
        """The exact bytes served at a good URL."""
        return good_image_bytes(self._good_index(url))

    def original_size(self, url: str) -> tuple[int, int]:
        """(width, height) of the image at a good URL."""
        return good_image_size(self._good_index(url))

    # -- serving --

    def _serve(self, handler: _Handler) -> None:
        path = urlsplit(handler.path).path
        with self._hits_lock:
            self.hits[path] += 1
        parts = path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "ok":
            index = int(parts[1].split(".")[0])
            content_type = "image/png" if good_image_format(index) == "png" else "image/jpeg"
            return _send(handler, 200, good_image_bytes(index), content_type)
        if len(parts) != 3 or parts[0] != "fault" or parts[1] not in FAULT_KINDS:
            return _send(handler, 404, b"not found", "text/plain")
        kind, name = parts[1], parts[2]
        index = int(name.split(".")[0].split("-")[0])
        if kind == HTTP_404:
            return _send(handler, 404, b"<html><body>Not Found</body></html>", "text/html")
        if kind == HTTP_500:
            return _send(handler, 500, b"<html><body>Internal Server Error</body></html>", "text/html")
        if kind == REDIRECT_LOOP:  # A -> B -> A -> ...
            target = f"/fault/{kind}/{index}.jpg" if "-b" in name else f"/fault/{kind}/{index}-b.jpg"
            handler.send_response(302)
            handler.send_header("Location", target)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return None
        if kind == TIMEOUT:
            self.stopping.wait(HANG_SECONDS)  # accept, read the request, never answer
            return None
        if kind == SLOW_DRIP:
            return self._drip(handler, _fault_body(kind, index))
        content_type = {NOT_AN_IMAGE: "text/html; charset=utf-8", DECOMPRESSION_BOMB: "image/png", TINY: "image/png"}
        headers = {"X-Robots-Tag": "noai"} if kind == ROBOTS_OPTOUT else {}
        return _send(handler, 200, _fault_body(kind, index), content_type.get(kind, "image/jpeg"), headers)

    def _drip(self, handler: _Handler, body: bytes) -> None:
        """Promise the whole body, then send one byte a second until done, the client leaves or the server stops."""
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for position in range(len(body)):
            handler.wfile.write(body[position : position + 1])
            handler.wfile.flush()
            if self.stopping.wait(1.0):
                return


def _send(
    handler: _Handler, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def _closed_port() -> int:
    """A loopback port where nothing listens: bind one, note it, close it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
