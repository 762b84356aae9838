"""Commands of the pipeline layer: `clipforge catalog ...` and `clipforge ingest`."""

import click

commands: list[click.Command] = []
