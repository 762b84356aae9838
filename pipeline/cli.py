"""Commands of the pipeline layer: `clipforge catalog ...` and `clipforge ingest`."""

from __future__ import annotations

import click

from pipeline import storage
from pipeline.catalog_cli import catalog_group
from pipeline.cli_options import config_command
from pipeline.ingest import IngestConfig, ingest
from pipeline.manifest import IngestSummary


def format_summary(summary: IngestSummary, location: str) -> str:
    lines = [
        f"shards:     {summary.shards} at {location}",
        f"input rows: {summary.input_rows}",
        f"successes:  {summary.successes} ({summary.success_rate:.1%})",
        f"failed:     {summary.failed}",
    ]
    lines += [f"  {reason:<20} {count}" for reason, count in summary.failures.items()]
    lines += [f"bytes:      {summary.bytes:,}", f"time:       {summary.seconds:.1f} s"]
    return "\n".join(lines)


@config_command(
    IngestConfig,
    "ingest",
    help="""Download a URL list of image-caption pairs into WebDataset shards (jpg + txt + json per sample).

    \b
    Example:
      clipforge ingest --urls pairs.parquet --output s3://bucket/datasets/pairs --image-size 224

    Faulty web data (404s, timeouts, corrupt files, HTML, decompression bombs, ...) is counted per reason, never fatal.
    Beside the shards: manifest.parquet (exact samples per shard, summary) and failures.parquet (every failed row with
    its reason). Killed runs resume: re-run the same command. Exit status 2 with a one-line error for bad input,
    refused credentials, or a success rate below --min-success-rate.""",
    required=("urls",),
)
def ingest_command(config: IngestConfig) -> None:
    manifest = ingest(config)
    click.echo(format_summary(manifest.summary, manifest.location))
    click.echo(f"manifest:   {storage.join(manifest.location, 'manifest.parquet')}")


commands: list[click.Command] = [catalog_group, ingest_command]
