"""The main job on the embedded defaults: `clipforge demo` (README's first command).

1. render the bundled OpenMoji catalog and serve it over loopback HTTP, exactly as the web would serve it;
2. start a local Prefect server (SQLite under `.clipforge/prefect`), so the run shows up in its UI;
3. run the `clip-train` flow: ingest train and val lists -> train the `small` preset on a local Ray started on
   demand -> zero-shot evaluation and retrieval on val -> brand scoring -> register (and promote) the model;
4. stop the server and print where the report and the model are.

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
from pipeline.catalog import build_openmoji_catalog, serve_directory, write_url_list
from pipeline.errors import UserError

DEMO_PORT = 18_765  # fixed, so the URL lists (and so the ingest fingerprints) are the same on every re-run


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


def run_demo(workdir: str | Path = ".clipforge", port: int = DEMO_PORT, epochs: int = 4,
             preset: str = "small") -> DemoResult:
    from infra.prefect_server import prefect_server

    workdir = Path(workdir).resolve()
    catalog = build_openmoji_catalog(workdir / "catalog" / "openmoji", image_size=64)
    with prefect_server(workdir / "prefect") as server, serve_directory(catalog, port=port) as base_url:
        print(f"Prefect UI: {server.ui_url} (while the demo runs; afterwards `python -m infra.prefect_server "
              f"--home {workdir / 'prefect'}` shows the finished run)")
        lists = {split: str(write_url_list(catalog, base_url, split, workdir / "lists" / f"openmoji-{split}.parquet"))
                 for split in ("train", "val")}
        spec = {"workdir": str(workdir), "lists": lists, "epochs": epochs, "preset": preset}
        with tempfile.TemporaryDirectory(prefix="clipforge-demo-") as scratch:
            spec_file, result_file = Path(scratch, "spec.json"), Path(scratch, "result.json")
            spec_file.write_text(json.dumps(spec))
            # the flow runs in its own process, against the server: it exits (flushing its logs and events to the
            # server) before the server stops
            child = subprocess.run([sys.executable, "-c", "from flows.demo import run_flow; run_flow()",
                                    str(spec_file), str(result_file)], env={**os.environ, **server.env()})
            if child.returncode != 0:
                raise UserError(f"the clip-train flow run failed (exit status {child.returncode}); its logs are above "
                                f"and in the Prefect UI; re-running `clipforge demo` resumes it")
            return DemoResult(**json.loads(result_file.read_text()))


def run_flow() -> None:
    """Child process: `run_flow SPEC.json RESULT.json` runs clip-train on the demo's settings."""
    from flows.clip_train import clip_train
    from flows.params import ClipTrainRegistry, EvaluationSettings, IngestParams, TrainSettings

    spec = json.loads(Path(sys.argv[1]).read_text())
    workdir, run = Path(spec["workdir"]), Path(spec["workdir"]) / "runs" / "demo"
    version = clip_train(
        ingest=IngestParams(train_urls=spec["lists"]["train"], val_urls=spec["lists"]["val"],
                            output=str(workdir / "data" / "openmoji"), image_size=64, samples_per_shard=256,
                            min_success_rate=0.95),
        train=TrainSettings(output=str(run), preset=spec["preset"], epochs=spec["epochs"], batch_size=128, lr=5e-4,
                            warmup_steps=20, checkpoint_every=50),
        evaluation=EvaluationSettings(label_field="group", templates="emoji"),
        registry=ClipTrainRegistry(location=str(workdir / "registry"), model_name="openmoji-clip"),
    )
    result = DemoResult(model=version.location, version=version.ref,
                        report=storage.join(str(run), "eval", "report.html"),
                        brand_report=storage.join(str(run), "brand", "scores", "report.html"), run=str(run))
    Path(sys.argv[2]).write_text(json.dumps(result.__dict__))
