"""The main job on the embedded defaults: `clipforge demo` (README's first command).

1. start a local Prefect server (SQLite under `.clipforge/prefect`), so the run shows up in its UI;
2. run the `clip-train` flow with no parameters but the locations under the workdir, i.e. on its embedded defaults
   (exactly what `prefect deployment run clip-train/clip-train` with no parameters runs): render the bundled OpenMoji
   catalog and serve it over loopback HTTP, ingest its train and val lists, train the `small` preset on a local Ray
   started on demand, evaluate zero-shot and retrieval on val, score brand alignment, register (and promote);
3. stop the server and print where the report and the model are, and how long each phase took.

Everything lands in a local folder (the embedded storage default). Re-running it reuses finished work: the catalog,
the shards and the Ray Train run are picked up where they are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline import storage
from pipeline.errors import UserError

@dataclass(frozen=True)
class DemoResult:
    model: str
    """The registered model version's folder."""
    version: str
    """name@version in the registry."""
    report: str
    """The evaluation's HTML report."""
    brand_report: str
    run: str
    """The training run's folder (checkpoints, metrics.jsonl, tensorboard)."""
    phases: dict[str, float]
    """Wall-clock seconds of each phase of the flow run."""


def demo_parameters(workdir: Path, epochs: int | None = None, precision: str | None = None,
                    catalog: str | None = None) -> dict[str, dict]:
    """The clip-train parameters of the demo: only locations under `workdir` (and the overrides given), so the flow
    runs on its embedded defaults, exactly as a parameter-less deployment run does."""
    from flows.params import DEMO_WORKDIR, demo_settings

    train: dict[str, object] = {"epochs": epochs} if epochs else {}
    evaluation: dict[str, object] = {}
    if precision:
        train["precision"] = evaluation["precision"] = precision
    defaults = demo_settings(catalog or "openmoji")
    under_workdir = lambda location: str(workdir / Path(location).relative_to(DEMO_WORKDIR))  # noqa: E731
    ingest = {"output": under_workdir(defaults["ingest"]["output"]), "catalog_dir": str(workdir / "catalog")}
    return {"ingest": {**ingest, **({"catalog": catalog} if catalog else {})},
            "train": {"output": under_workdir(defaults["train"]["output"]), **train}, "evaluation": evaluation,
            "registry": {"location": str(workdir / "registry")}}


def run_demo(workdir: str | Path = ".clipforge", epochs: int | None = None, precision: str | None = None,
             catalog: str | None = None) -> DemoResult:
    from infra.prefect_server import prefect_server

    workdir = Path(workdir).resolve()
    with prefect_server(workdir / "prefect") as server:
        print(f"Prefect UI: {server.ui_url} (while the demo runs; afterwards `python -m infra.prefect_server "
              f"--home {workdir / 'prefect'}` shows the finished run)", flush=True)
        with tempfile.TemporaryDirectory(prefix="clipforge-demo-") as scratch:
            spec_file, result_file = Path(scratch, "spec.json"), Path(scratch, "result.json")
            spec_file.write_text(json.dumps(demo_parameters(workdir, epochs, precision, catalog)))
            # the flow runs in its own process, against the server: it exits (flushing its logs and events to the
            # server) before the server stops
            child = subprocess.run([sys.executable, "-c", "from flows.demo import run_flow; run_flow()",
                                    str(spec_file), str(result_file)], env={**os.environ, **server.env()})
            result = json.loads(result_file.read_text()) if result_file.exists() else {}
            if "error" in result:  # a UserError the flow raised: what to fix, in one line
                raise UserError(f"the clip-train flow run failed: {result['error']}")
            if child.returncode != 0:
                raise UserError(f"the clip-train flow run failed (exit status {child.returncode}); its logs are above "
                                f"and in the Prefect UI; re-running `clipforge demo` resumes it")
            return DemoResult(**result)


def run_flow() -> None:
    """Child process: `run_flow SPEC.json RESULT.json` runs clip-train with the parameters in SPEC.json."""
    from flows.clip_train import clip_train
    from flows.params import ClipTrainRegistry, EvaluationSettings, IngestParams, TrainSettings

    parameters = json.loads(Path(sys.argv[1]).read_text())
    run = parameters["train"]["output"]
    try:
        version = clip_train(ingest=IngestParams(**parameters["ingest"]), train=TrainSettings(**parameters["train"]),
                             evaluation=EvaluationSettings(**parameters["evaluation"]),
                             registry=ClipTrainRegistry(**parameters["registry"]))
    except UserError as err:  # the flow run's log (above, and in the UI) says it too; the parent says it last
        Path(sys.argv[2]).write_text(json.dumps({"error": str(err)}))
        sys.exit(2)
    result = DemoResult(model=version.location, version=version.ref,
                        report=storage.join(run, "eval", "report.html"),
                        brand_report=storage.join(run, "brand", "scores", "report.html"), run=run,
                        phases=json.loads(Path(run, "phases.json").read_text()))
    Path(sys.argv[2]).write_text(json.dumps(result.__dict__))
