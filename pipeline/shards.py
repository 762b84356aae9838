"""The one reader of WebDataset shards: the tar files `clipforge ingest` writes, local or on object storage.

A sample is a dict of raw bytes per member extension plus its key and shard, `{"__key__": "00012/000120345",
"__url__": <shard>, "jpg": b"...", "txt": b"...", "json": b"..."}`, grouped by webdataset's own tar readers (the key
is the member name up to the first dot of its base name). Nothing is decoded here: the training loader
(`training.data`), embedding (`evaluation.embed`) and caption reading all start from these dicts.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator

from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline import storage
from pipeline.errors import UserError
from pipeline.manifest import read_manifest
from pipeline.storage import StorageConfig

IMAGE_EXTENSIONS_IN_SHARDS = ("jpg", "jpeg", "png", "webp")
"""Member extensions that hold a sample's image (ingest writes one of them per sample)."""

# what reading a broken or missing shard raises: tarfile's errors, truncated streams, webdataset's duplicate-member
# ValueError, storage failures (`storage.storage_errors` turns recognised ones into a UserError)
_SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, UserError)


def tar_samples(stream, url: str, handler) -> Iterator[dict]:
    """Samples ({"__key__", "jpg", "txt", "json"} bytes) of one open tar stream, via webdataset's tar readers."""
    files = ({**f, "__url__": url} for f in tar_file_iterator(stream, handler=handler))
    return group_by_keys(files, handler=handler)


def iter_shard(url: str, config: StorageConfig | None = None, handler=None) -> Iterator[dict]:
    """Samples of one tar shard (a path or s3:// URL), in tar order. `handler(err) -> bool` sees each broken member
    (True: skip it and go on); by default the error is raised."""
    fs, path = storage.filesystem(url, config)
    with storage.storage_errors(url, config), fs.open(path, "rb") as stream:
        yield from tar_samples(stream, url, handler or reraise_exception)


def iter_dataset(location: str, config: StorageConfig | None = None,
                 on_error: Callable[[str, Exception], None] | None = None) -> Iterator[dict]:
    """Every sample of every non-empty shard in the dataset's manifest, in shard order.

    A corrupt or unreadable shard calls `on_error(url, err)` and reading goes on with the next shard (the samples
    read before the fault have been yielded); without `on_error` the error is raised.
    """
    for url in read_manifest(location, config).shard_urls():
        try:
            yield from iter_shard(url, config)
        except _SHARD_ERRORS as err:
            if on_error is None:
                raise
            on_error(url, err)


def sample_image(sample: dict) -> bytes | None:
    """The bytes of a sample's first image member (see IMAGE_EXTENSIONS_IN_SHARDS), or None when it has none."""
    return next((value for name, value in sample.items() if name in IMAGE_EXTENSIONS_IN_SHARDS), None)
