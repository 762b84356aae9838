"""Commands of the training layer (`clipforge model-info`, later `clipforge train`)."""

import click

commands: list[click.Command] = []
