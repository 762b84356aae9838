"""The img2dataset child process: one bounded, classified download per URL.

`pipeline.ingest` runs `main()` in a subprocess (img2dataset installs signal handlers, which only work in a main
thread, and a subprocess can be killed as a whole). Two things img2dataset does not do are added here, by subclasses
that img2dataset pickles into its worker processes (importing them there applies the patch):

- every download has a wall-clock deadline (img2dataset's `timeout` is per socket read, so a server that drips one
  byte a second never times out) and a size cap, and the bytes are checked before they reach the resizer
  (`pipeline.images.check_image_bytes`): HTML instead of an image, truncated files and decompression bombs (a small
  file declaring an enormous image) fail with a reason tag, `[kind] message`, that `classify_error` maps to a counted
  reason;
- every process exits when its parent is gone, so `kill -9` of the ingest leaves no orphan still writing a shard that
  the resumed run rewrites.

The patched function follows img2dataset 1.47's `download_image` contract: `(key, BytesIO | None, error | None)`.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (imported by img2dataset) phones home

import img2dataset.downloader
import img2dataset.logger

from pipeline import storage
from pipeline.cluster import ray_init_kwargs
from pipeline.failures import Fault
from pipeline.images import check_image_bytes

# ---------------------------------------------------------------------------------------------------------------------
# the bounded download


@dataclass(frozen=True)
class DownloadLimits:
    deadline_seconds: float = 30.0
    """Wall-clock limit for one download, however slowly the bytes arrive."""
    max_bytes: int = 20_000_000
    """Largest body accepted."""
    max_pixels: int = 50_000_000
    """Largest width x height an image may declare (decompression-bomb guard)."""


_limits = DownloadLimits()


def _read_bounded(response: Any, deadline: float, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise Fault("deadline_exceeded", f"download took longer than {_limits.deadline_seconds:g} s")
        chunk = response.read1(65536)  # returns as soon as any bytes arrive, so the deadline is checked often
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise Fault("too_large", f"body larger than {max_bytes} bytes")
        chunks.append(chunk)


def download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """img2dataset's `download_image`, plus a wall-clock deadline, a size cap and a content check."""
    key, url = row
    deadline = time.monotonic() + _limits.deadline_seconds
    user_agent = "Mozilla/5.0 (compatible; clipforge; +img2dataset)"
    if user_agent_token:
        user_agent += f" ({user_agent_token})"
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": user_agent})
        with urllib.request.urlopen(request, timeout=min(timeout, _limits.deadline_seconds)) as response:
            if disallowed_header_directives and img2dataset.downloader.is_disallowed(
                response.headers, user_agent_token, disallowed_header_directives
            ):
                return key, None, "[robots_optout] use of image disallowed by X-Robots-Tag directive"
            body = _read_bounded(response, deadline, _limits.max_bytes)
            content_type = response.headers.get("Content-Type", "")
        check_image_bytes(body, _limits.max_bytes, _limits.max_pixels, content_type)
        return key, io.BytesIO(body), None
    except Exception as err:  # noqa: BLE001 - every failure is one counted sample, never a crash
        return key, None, str(err)


img2dataset.downloader.download_image = download_image  # used by download_image_with_retry in every worker


# ---------------------------------------------------------------------------------------------------------------------
# processes that die with their parent


_watching_parent = False


def die_with_parent() -> None:
    """Exit this process, within half a second, once the process that started it is gone.

    A polling thread rather than Linux's PR_SET_PDEATHSIG: that signal fires when the parent *thread* ends, and
    multiprocessing's pool replaces workers from a helper thread that ends at shutdown; a worker killed then, while
    it holds the task queue's lock, deadlocks `Pool.terminate()`.
    """
    global _watching_parent
    if _watching_parent:
        return
    _watching_parent = True
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)  # orphaned: the ingest that wanted this work is gone, and its re-run redoes the shard

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


class BoundedDownloader(img2dataset.downloader.Downloader):
    """img2dataset's Downloader; carries the limits into each worker process and ties it to its parent."""

    limits: DownloadLimits = DownloadLimits()  # set on the class by main(), copied into each pickled instance
    tie_to_parent: bool = True
    # explicit storage keys for Ray tasks on other nodes: the pickled instance is a task argument (an object in
    # Ray's object store), which Ray neither logs nor shows in its APIs, unlike a runtime_env
    credentials: dict[str, str] = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = type(self).limits
        self.tie_to_parent = type(self).tie_to_parent
        self.credentials = type(self).credentials

    def __call__(self, row):
        global _limits
        _limits = self.limits
        if self.tie_to_parent:
            die_with_parent()
        else:  # a Ray task: take the driver's explicit keys; say where it ran (the driver's log collects these lines)
            storage.adopt_credentials(self.credentials)
            print(f"clipforge: shard {row[0]} downloaded by ray task pid {os.getpid()} on {os.uname().nodename}")
        return super().__call__(row)


class TiedLoggerProcess(img2dataset.logger.LoggerProcess):
    def run(self):
        die_with_parent()
        super().run()


# ---------------------------------------------------------------------------------------------------------------------
# entry point


def main() -> None:
    """`python -c 'from pipeline.download_worker import main; main()' SPEC.json`: run img2dataset.download(**spec)."""
    die_with_parent()
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    limits = DownloadLimits(**spec.pop("limits"))
    ray_address = spec.pop("ray_address", None)
    runtime_env = spec.pop("runtime_env", None)
    ship_credentials = spec.pop("ship_credentials", False)
    BoundedDownloader.limits = limits
    if ray_address:
        import ray

        ray.init(log_to_driver=True, runtime_env=runtime_env, **ray_init_kwargs(ray_address))
        if ship_credentials:  # ingest put the config's keys in this process's environment
            BoundedDownloader.credentials = {k: os.environ[k] for k in storage.CREDENTIAL_VARIABLES if k in os.environ}
        spec["distributor"] = "ray"
        BoundedDownloader.tie_to_parent = False  # Ray workers belong to the raylet, not to us
    i2d_main = sys.modules["img2dataset.main"]  # the package re-exports a function named `main` over the module
    i2d_main.Downloader = BoundedDownloader
    i2d_main.LoggerProcess = TiedLoggerProcess
    i2d_main.download(**spec)
