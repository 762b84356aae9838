"""The faulty web server fails in exactly the way each fault kind promises (plain urllib as the client)."""

from __future__ import annotations

import io
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from tests import webfaults
from tests.webfaults import FAULT_KINDS, OK, FaultyWeb


def fetch(url: str, timeout: float = 10) -> tuple[bytes, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read(), dict(response.headers)


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_url_list_has_every_kind_unique_captions_and_is_deterministic(faulty_web: FaultyWeb) -> None:
    rows = faulty_web.url_list(n_good=12, n_per_fault=2, seed=3)
    assert len(rows) == 12 + 2 * len(FAULT_KINDS)
    assert {row["expected"] for row in rows} == {OK, *FAULT_KINDS}
    assert len({row["url"] for row in rows}) == len(rows)
    assert len({row["caption"] for row in rows}) == len(rows)
    assert faulty_web.url_list(12, 2, seed=3) == rows
    assert faulty_web.url_list(12, 2, seed=4) != rows  # the seed shuffles
    assert sorted(faulty_web.url_list(12, 2, seed=4), key=str) == sorted(rows, key=str)
    good = faulty_web.expected_ok(rows)
    assert len(good) == 12 and all("/ok/" in url for url in good)


def test_good_images_are_real_distinct_varied_and_match_the_helpers(faulty_web: FaultyWeb) -> None:
    rows = [row for row in faulty_web.url_list(n_good=12, n_per_fault=0) if row["expected"] == OK]
    bodies, sizes, formats = set(), set(), set()
    for row in rows:
        data, headers = fetch(row["url"])
        image = open_image(data)
        assert data == faulty_web.image_bytes(row["url"])
        assert image.size == faulty_web.original_size(row["url"])
        width, height = image.size
        assert min(width, height) >= 64 and max(width, height) / min(width, height) < 2
        assert headers["Content-Type"] == f"image/{image.format.lower()}"
        bodies.add(data)
        sizes.add(image.size)
        formats.add(image.format)
    assert len(bodies) == len(rows) and len(sizes) > len(rows) // 2
    assert formats == {"JPEG", "PNG"}
    # the same index gives the same bytes in another server (and another run)
    with FaultyWeb() as other:
        assert fetch(other.good_url(5))[0] == faulty_web.image_bytes(faulty_web.good_url(5))


@pytest.mark.parametrize("kind, status", [(webfaults.HTTP_404, 404), (webfaults.HTTP_500, 500)])
def test_error_statuses(faulty_web: FaultyWeb, kind: str, status: int) -> None:
    with pytest.raises(urllib.error.HTTPError) as raised:
        fetch(faulty_web.fault_url(kind))
    assert raised.value.code == status


def test_connection_refused(faulty_web: FaultyWeb) -> None:
    with pytest.raises(urllib.error.URLError) as raised:
        fetch(faulty_web.fault_url(webfaults.CONNECTION_REFUSED))
    assert isinstance(raised.value.reason, ConnectionRefusedError)


def test_redirect_loop(faulty_web: FaultyWeb) -> None:
    with pytest.raises(urllib.error.HTTPError) as raised:
        fetch(faulty_web.fault_url(webfaults.REDIRECT_LOOP))
    assert raised.value.code == 302 and "infinite loop" in str(raised.value)


def test_timeout_never_answers(faulty_web: FaultyWeb) -> None:
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)) as raised:
        fetch(faulty_web.fault_url(webfaults.TIMEOUT), timeout=1)
    if isinstance(raised.value, urllib.error.URLError):
        assert isinstance(raised.value.reason, TimeoutError)


def test_slow_drip_defeats_a_per_read_timeout(faulty_web: FaultyWeb) -> None:
    with urllib.request.urlopen(faulty_web.fault_url(webfaults.SLOW_DRIP), timeout=5) as response:
        assert int(response.headers["Content-Length"]) == webfaults.DRIP_CONTENT_LENGTH
        assert len(response.read(2)) == 2  # each read is answered well within the 5 s timeout...
        received, started = 2, time.monotonic()
        while time.monotonic() - started < 3:
            received += len(response.read(1))
        assert received < 10  # ...but the 20 KB body is nowhere near complete after 3 s


def test_truncated_is_half_a_jpeg_with_a_matching_length(faulty_web: FaultyWeb) -> None:
    data, headers = fetch(faulty_web.fault_url(webfaults.TRUNCATED))
    assert int(headers["Content-Length"]) == len(data) and data[:2] == b"\xff\xd8"
    with pytest.raises(OSError):
        open_image(data)


def test_corrupt_has_a_jpeg_header_and_garbage(faulty_web: FaultyWeb) -> None:
    data, headers = fetch(faulty_web.fault_url(webfaults.CORRUPT))
    assert data[:3] == b"\xff\xd8\xff" and headers["Content-Type"] == "image/jpeg"
    with pytest.raises(OSError):
        open_image(data)


def test_not_an_image_is_html_at_a_jpg_url(faulty_web: FaultyWeb) -> None:
    url = faulty_web.fault_url(webfaults.NOT_AN_IMAGE)
    data, headers = fetch(url)
    assert url.endswith(".jpg") and headers["Content-Type"].startswith("text/html") and b"<html>" in data
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError
        open_image(data)


def test_decompression_bomb_is_small_but_declares_30000_squared(
    faulty_web: FaultyWeb, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = fetch(faulty_web.fault_url(webfaults.DECOMPRESSION_BOMB))
    assert len(data) < 50_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    header_only = Image.open(io.BytesIO(data))  # reads the header, decodes nothing
    assert header_only.size == webfaults.BOMB_SIZE and header_only.format == "PNG"


def test_tiny_is_a_valid_one_pixel_image(faulty_web: FaultyWeb) -> None:
    assert open_image(fetch(faulty_web.fault_url(webfaults.TINY))[0]).size == (1, 1)


def test_robots_optout_is_a_good_image_with_noai(faulty_web: FaultyWeb) -> None:
    data, headers = fetch(faulty_web.fault_url(webfaults.ROBOTS_OPTOUT))
    assert headers["X-Robots-Tag"] == "noai"
    assert min(open_image(data).size) >= 64


def test_stops_promptly_with_hanging_and_dripping_requests_in_flight() -> None:
    errors: list[BaseException] = []

    def client(url: str) -> None:
        try:
            fetch(url, timeout=30)
        except Exception as err:  # noqa: BLE001 - each client must end with an error once the server stops
            errors.append(err)

    web = FaultyWeb().start()
    urls = [web.fault_url(webfaults.TIMEOUT, i) for i in range(3)]
    urls += [web.fault_url(webfaults.SLOW_DRIP, i) for i in range(2)]
    threads = [threading.Thread(target=client, args=(url,), daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while sum(web.hits.values()) < len(urls) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(web.hits.values()) == len(urls)
    started = time.monotonic()
    web.stop()
    assert time.monotonic() - started < 10
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads) and len(errors) == len(urls)
