"""The one reader of user-supplied tables: URL lists for ingest, image lists for embedding and scoring.

A table is a .csv, .tsv, .parquet, .jsonl or .json (JSON lines) file, local or on object storage; text formats may
be gzipped (`.csv.gz`). Every way it can fail (unknown suffix, missing file, a folder, an empty or unparsable file)
is one `UserError` line that starts with what the caller calls the table ("URL list x.csv does not exist").
"""

from __future__ import annotations

import io
import posixpath

import pyarrow as pa
import pyarrow.csv
import pyarrow.fs
import pyarrow.json
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UserError
from pipeline.storage import StorageConfig

_READERS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
TABLE_EXTENSIONS = tuple(_READERS)
"""Suffixes `read_table` reads (each may be followed by .gz, parquet excepted)."""


def read_table(location: str, config: StorageConfig | None = None, what: str = "table") -> pa.Table:
    """Read a table file (see the module docstring). Raises `UserError` for unknown formats, unreadable or empty files."""
    suffix = posixpath.splitext(location.lower().removesuffix(".gz"))[1]
    kind = _READERS.get(suffix)
    if kind is None:
        raise UserError(f"{what} {location} must end in .csv, .tsv, .parquet or .jsonl")
    fs, path = storage.pyarrow_filesystem(location, config)
    with storage.storage_errors(location, config):
        found = fs.get_file_info(path).type  # asked first: opening a local folder fails with a bare OSError
        if found == pyarrow.fs.FileType.NotFound:
            raise UserError(f"{what} {location} does not exist")
        if found == pyarrow.fs.FileType.Directory:
            raise UserError(f"{what} {location} is a folder, not a file")
        try:
            if kind == "parquet":
                return pq.read_table(path, filesystem=fs)
            with fs.open_input_stream(path, compression="detect") as stream:
                data = stream.read()
        except FileNotFoundError:  # removed between the two calls
            raise UserError(f"{what} {location} does not exist") from None
        except pa.ArrowInvalid as err:
            raise UserError(f"cannot read {what} {location} as {kind}: {str(err).splitlines()[0]}") from None
    if not data.strip():
        raise UserError(f"{what} {location} is empty")
    try:
        if kind == "jsonl":
            return pyarrow.json.read_json(io.BytesIO(data))
        delimiter = "\t" if kind == "tsv" else ","
        return pyarrow.csv.read_csv(
            io.BytesIO(data),
            parse_options=pyarrow.csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pyarrow.csv.ConvertOptions(strings_can_be_null=True),
        )
    except pa.ArrowInvalid as err:
        raise UserError(f"cannot parse {what} {location} as {kind}: {str(err).splitlines()[0]}") from None
