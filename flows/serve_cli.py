"""`clipforge serve`: run the deployments (`flows.deployments`) against a Prefect server until interrupted.

The server is the one `PREFECT_API_URL` names (environment or Prefect profile); when none is set, a local one is
started under `.clipforge/prefect` (SQLite, 127.0.0.1) and stopped on exit, and its UI address is printed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import click

from pipeline.config import read_yaml

commands: list[click.Command] = []


def _configured_api_url() -> str | None:
    from prefect.settings import get_current_settings

    return os.environ.get("PREFECT_API_URL") or get_current_settings().api.url


@click.command("serve")
@click.option("--timezone", default="UTC", show_default=True,
              help="Timezone of the nightly schedule (IANA name, e.g. Europe/Paris).")
@click.option("--cron", default="0 2 * * *", show_default=True, help="Schedule of nightly-finetune/nightly.")
@click.option("--nightly-config", type=click.Path(dir_okay=False, exists=True),
              help="YAML file with the nightly run's parameters (nightly, train, ingest, filtering, evaluation, "
              "registry, storage).")
@click.option("--prefect-home", default=".clipforge/prefect", show_default=True, type=click.Path(file_okay=False),
              help="Where the local Prefect server keeps its database, when PREFECT_API_URL is not set.")
@click.option("--limit", type=int, default=None, help="Flow runs executed at the same time (default: no limit).")
def serve(timezone: str, cron: str, nightly_config: str | None, prefect_home: str, limit: int | None) -> None:
    """Serve the deployments clip-train/clip-train (on demand) and nightly-finetune/nightly (cron).

    \b
    Then, from another shell with the same PREFECT_API_URL:
      prefect deployment run clip-train/clip-train      (no parameters: the main job on the embedded defaults)
      prefect deployment run clip-train/clip-train --params '{"ingest": {"train_urls": "...", "val_urls": "..."}}'
      prefect deployment run clip-train/clip-train --param train='{"preset": "tiny", "steps": 50}' ...
    Stop with Ctrl-C: runs in progress are cancelled and the schedules pause.
    """
    nightly_parameters = read_yaml(nightly_config) if nightly_config else None
    # until Prefect's runner installs its own (graceful) handler, SIGTERM unwinds the stack below, so the local
    # server started here is stopped too rather than left running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with contextlib.ExitStack() as stack:
        if not _configured_api_url():
            from infra.prefect_server import prefect_server
            from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

            click.echo(f"PREFECT_API_URL is not set: starting a local Prefect server under {prefect_home} ...")
            server = stack.enter_context(prefect_server(Path(prefect_home)))
            os.environ.update(server.env())  # flow runs are child processes: they inherit it
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url,
                                                            PREFECT_UI_URL: server.ui_url}))
            click.echo(f"Prefect UI: {server.ui_url}")
            click.echo(f"in another shell: export PREFECT_API_URL={server.api_url}")
        from flows.deployments import serve as serve_deployments

        serve_deployments(timezone=timezone, cron=cron, nightly_parameters=nightly_parameters, limit=limit)


commands.append(serve)


if __name__ == "__main__":
    serve(prog_name="clipforge serve")
