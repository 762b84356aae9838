"""Deployments and schedules: every way a flow is started by Prefect rather than called, in one place.

    clip-train/clip-train       on demand: `prefect deployment run clip-train/clip-train --params '{...}'` or the UI
    nightly-finetune/nightly    cron `0 2 * * *` (timezone configurable, UTC by default)

`serve()` runs both with `prefect.serve` in this process: flow runs start as child processes of it, and its schedules
pause when it stops. Parameters are the flows' pydantic models, so the server validates a run's parameters against
their JSON schema (an unknown key or an out-of-range value is refused with the field named) and the UI shows every
field with its description.

    python -m flows.deployments            # against PREFECT_API_URL (see `clipforge serve` for a local server)
"""

from __future__ import annotations

from typing import Any

from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.clip_train import clip_train
from flows.nightly import nightly_finetune

NIGHTLY_CRON = "0 2 * * *"


def build_deployments(timezone: str = "UTC", cron: str = NIGHTLY_CRON,
                      nightly_parameters: dict[str, Any] | None = None) -> list[RunnerDeployment]:
    """The project's deployments; `nightly_parameters` are the nightly run's defaults (its flow's defaults if None)."""
    return [
        clip_train.to_deployment(
            name="clip-train",
            description="Ingest train/val URL lists, train on Ray, evaluate, score brand alignment, register.",
            tags=["clipforge"],
        ),
        nightly_finetune.to_deployment(
            name="nightly",
            schedule=Cron(cron, timezone=timezone),
            parameters=nightly_parameters or {},
            description="Fine-tune the promoted model on newly arrived URL lists; promote unless the metric falls.",
            tags=["clipforge"],
        ),
    ]


def serve(timezone: str = "UTC", cron: str = NIGHTLY_CRON, nightly_parameters: dict[str, Any] | None = None,
          limit: int | None = None) -> None:
    """Register the deployments with the Prefect API and run their flow runs until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(timezone, cron, nightly_parameters), limit=limit)


if __name__ == "__main__":
    serve()
