"""The ingest manifest: the exact sample count of every shard, plus the run's summary.

`manifest.parquet` lies beside the shards, one row per shard (`shard`, `path`, `samples`, `attempted`, `failed`,
`bytes`, `offsets`), with the summary (input rows, successes, failures by reason, bytes) in the file's metadata under
`clipforge.summary`. Training reads epoch sizes from here and never guesses. `offsets` is the shard's index: the
byte offset where each sample's first tar member starts, plus the end of the last one, so a reader can start at any
sample with one ranged read (empty in manifests written before it existed; readers then scan or read from the start).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UserError
from pipeline.storage import StorageConfig

MANIFEST_NAME = "manifest.parquet"
_SUMMARY_KEY = b"clipforge.summary"


@dataclass(frozen=True)
class ShardInfo:
    shard: int
    """Shard number, as in the file name `00012.tar`."""
    path: str
    """Tar file name relative to the dataset location."""
    samples: int
    """Samples in the tar (the successes of this shard)."""
    attempted: int
    """Input rows this shard tried to download."""
    failed: int
    """Rows of this shard that failed (attempted - samples)."""
    bytes: int
    """Size of the tar file."""
    offsets: list[int] | None = None
    """Byte offset of each sample's first member, then the end of the last sample (samples + 1 values). Empty: unknown."""


@dataclass(frozen=True)
class IngestSummary:
    input_rows: int
    """Rows in the URL list as given."""
    successes: int
    """Samples written to shards."""
    failures: dict[str, int] = field(default_factory=dict)
    """Failed rows by reason (`http_404`, `timeout`, `duplicate_url`, ...)."""
    bytes: int = 0
    """Total size of the shards."""
    shards: int = 0
    """Number of shards."""
    seconds: float = 0.0
    """Wall-clock time of the run that completed the ingest."""

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def success_rate(self) -> float:
        return self.successes / self.input_rows if self.input_rows else 0.0


@dataclass(frozen=True)
class Manifest:
    location: str
    shards: list[ShardInfo]
    summary: IngestSummary

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def shard_urls(self) -> list[str]:
        """Locations of the non-empty shards, in shard order."""
        return [storage.join(self.location, s.path) for s in self.shards if s.samples > 0]


_SCHEMA = pa.schema(
    [("shard", pa.int64()), ("path", pa.string()), ("samples", pa.int64()), ("attempted", pa.int64()),
     ("failed", pa.int64()), ("bytes", pa.int64()), ("offsets", pa.list_(pa.int64()))]
)


def tar_sample_offsets(stream) -> list[int]:
    """Sample index of a WebDataset tar: where each sample's first member header starts, then the end of the last.

    Samples are grouped as webdataset groups them: consecutive regular files whose names share the part before the
    first dot of the base name. A seekable stream is read header by header (data is skipped, not read).
    """
    offsets, previous, end = [], None, 0
    with tarfile.open(fileobj=stream, mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            directory, _, base = member.name.rpartition("/")
            key = f"{directory}/{base.split('.', 1)[0]}"
            if key != previous:
                offsets.append(member.offset)
                previous = key
            end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return [*offsets, end] if offsets else [0]


def write_manifest(location: str, shards: list[ShardInfo], summary: IngestSummary,
                   config: StorageConfig | None = None) -> str:
    """Write `manifest.parquet` at `location`, whole or not at all (`storage.open_atomic`)."""
    columns = {name: [getattr(s, name) for s in shards] for name in _SCHEMA.names}
    table = pa.table(columns, schema=_SCHEMA)
    table = table.replace_schema_metadata({_SUMMARY_KEY: json.dumps(asdict(summary)).encode()})
    fs, path = storage.filesystem(location, config)
    with storage.open_atomic(fs, f"{path}/{MANIFEST_NAME}") as file:
        pq.write_table(table, file)
    return storage.join(location, MANIFEST_NAME)


def read_manifest(location: str, config: StorageConfig | None = None) -> Manifest:
    """Read the manifest of a dataset written by `clipforge ingest`."""
    fs, path = storage.pyarrow_filesystem(location, config)
    with storage.storage_errors(location, config):
        try:
            table = pq.read_table(f"{path}/{MANIFEST_NAME}", filesystem=fs)
        except FileNotFoundError:
            raise UserError(f"{location} has no {MANIFEST_NAME}: is it a dataset written by `clipforge ingest`?") from None
    meta = json.loads((table.schema.metadata or {}).get(_SUMMARY_KEY, b"{}"))
    shards = [ShardInfo(**row) for row in table.to_pylist()]  # manifests older than `offsets` lack that column
    return Manifest(location=location, shards=shards, summary=IngestSummary(**meta))
