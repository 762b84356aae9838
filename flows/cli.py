"""`clipforge`: the command line. Each layer contributes its commands; this module only assembles them.

Errors the user can fix (`UserError`) and invalid configs print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import sys
import threading
from typing import NoReturn

import click

from pipeline.errors import UserError


# command name -> the module whose `commands` list holds it; a command's module is imported only when it runs, so
# `clipforge ingest` does not pay for importing torch, Prefect and matplotlib
_COMMANDS = {
    "catalog": "pipeline.cli", "ingest": "pipeline.cli",
    "model-info": "training.cli", "train": "training.cli", "import": "training.cli", "export": "training.cli",
    "embed": "evaluation.cli", "evaluate": "evaluation.cli", "brand": "evaluation.cli",
    "search": "evaluation.cli", "filter": "evaluation.cli",
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
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs (default: the flow's demo setting).")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]),
              help="Autocast of training and evaluation (default auto: bf16 only where the hardware runs it natively).")
@click.option("--catalog", type=click.Choice(["openmoji", "fluent", "both"]),
              help="Bundled catalog(s) to train on (default: the flow's, openmoji); both: OpenMoji and Fluent Emoji "
                   "Flat as one dataset, with shards, run and model name of its own.")
def demo(workdir: str, epochs: int | None, precision: str | None, catalog: str | None) -> None:
    """The main job on embedded defaults: the clip-train flow with no parameters but its locations (the bundled
    OpenMoji catalog served over loopback HTTP, ingest, train the small preset on a local Ray, evaluate, brand
    scoring, register), with a local Prefect server that the demo starts and stops. Re-running it reuses finished
    work; it ends with the time each phase took."""
    from flows.demo import run_demo

    result = run_demo(workdir, epochs, precision, catalog)
    click.echo(f"model:        {result.version} at {result.model}")
    click.echo(f"report:       {result.report}")
    click.echo(f"brand report: {result.brand_report}")
    click.echo(f"training run: {result.run} (tensorboard --logdir {result.run}/tensorboard)")
    click.echo("phases:       " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.phases.items()))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: every `finally` runs, so what we started is stopped


def _exit(code: int) -> NoReturn:
    """End the process without tearing down native libraries in interpreter finalization: a thread pool still
    joinable there (Arrow's, apache/arrow#34314) aborts the process (SIGABRT, "terminate called without an active
    exception") after the command's work and its last line are done. What a normal exit does before that runs
    here, in its order and through its own functions: threading's shutdown (thread pools told to stop, then the
    threads that are not daemons joined), the atexit hooks (logging, multiprocessing, Ray), then the flush of stdout
    and stderr."""
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`clipforge ... | head`) or stream: nothing left to deliver
            pass
    os._exit(code)


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    code = 0
    try:
        cli(prog_name="clipforge", standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort):  # click turns Ctrl-C into Abort
        click.echo("interrupted: everything this command started is stopped; re-run the same command to resume",
                   err=True)
        code = 130
    except click.exceptions.Exit as done:
        code = done.exit_code
    except click.ClickException as err:
        err.show()
        code = err.exit_code
    except SystemExit as done:  # sys.exit(n) in a command; a message (not an int) is printed, as Python does
        if done.code is not None and not isinstance(done.code, int):
            print(done.code, file=sys.stderr)
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    _exit(code)


if __name__ == "__main__":
    main()
