"""`clipforge`: the command line. Each layer contributes its commands; this module only assembles them.

Errors the user can fix (`UserError`) and invalid configs print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys

import click

from pipeline.errors import UserError


# command name -> the module whose `commands` list holds it; a command's module is imported only when it runs, so
# `clipforge ingest` does not pay for importing torch, Prefect and matplotlib
_COMMANDS = {
    "catalog": "pipeline.cli", "ingest": "pipeline.cli",
    "model-info": "training.cli", "train": "training.cli", "import": "training.cli", "export": "training.cli",
    "embed": "training.eval_cli", "evaluate": "training.eval_cli", "brand": "training.eval_cli",
    "search": "training.eval_cli",
    "serve": "flows.serve_cli",
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in _COMMANDS:
            module = importlib.import_module(_COMMANDS[name])
            return next(c for c in module.commands if c.name == name)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):  # one line and exit 2 for errors the user can fix, never a traceback
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
def cli() -> None:
    """clipforge: from URL lists of image-caption pairs to a trained, evaluated CLIP model.

    Start with `clipforge catalog build` for the bundled OpenMoji catalog, `clipforge ingest` to turn any URL list
    into WebDataset shards, and `clipforge demo` for the whole job on the embedded defaults.
    """


@cli.command()
@click.option("--workdir", default=".clipforge", show_default=True, type=click.Path(file_okay=False),
              help="Folder for everything the demo writes: catalog, shards, runs, registry, Prefect's database.")
@click.option("--port", default=18765, show_default=True, type=int,
              help="Loopback port the catalog is served on while it is ingested.")
@click.option("--epochs", default=4, show_default=True, type=click.IntRange(min=1),
              help="Training epochs over the catalog's train split (about a minute each on 2 CPU cores).")
def demo(workdir: str, port: int, epochs: int) -> None:
    """The main job on embedded defaults: the bundled OpenMoji catalog, served over loopback HTTP, through the
    clip-train flow (ingest, train the small preset on a local Ray, evaluate, brand scoring, register) with a local
    Prefect server that the demo starts and stops. Re-running it reuses finished work."""
    from flows.demo import run_demo

    result = run_demo(workdir, port=port, epochs=epochs)
    click.echo(f"model:        {result.version} at {result.model}")
    click.echo(f"report:       {result.report}")
    click.echo(f"brand report: {result.brand_report}")
    click.echo(f"training run: {result.run} (tensorboard --logdir {result.run}/tensorboard)")


def main() -> None:
    cli(prog_name="clipforge")


if __name__ == "__main__":
    main()
