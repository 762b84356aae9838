"""The nightly story on the bundled catalogs: a base model trained on OpenMoji is promoted; Fluent Emoji Flat's
train split arrives under `incoming`; nightly-finetune fine-tunes, mixes (WiSE-FT), evaluates every mix on Fluent's
validation split (domain) and OpenMoji's (guardrail), chooses, and promotes or refuses. Prints the grid and the
decision (the numbers in the README).

    python bench/nightly_wiseft.py --base .clipforge/runs/openmoji/model --workdir /tmp/nightly-story

`--base` is any clipforge checkpoint trained on OpenMoji (e.g. `clipforge demo`'s model, or `clipforge train
--data .clipforge/data/openmoji-train --preset small`). Starts and stops its own Prefect server and local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def val_list(catalog: Path) -> str:
    from pipeline.catalog import read_catalog

    table = read_catalog(catalog)
    path = catalog / "val.parquet"
    pq.write_table(table.filter(pc.equal(table.column("split"), "val")), path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="clipforge checkpoint trained on OpenMoji")
    parser.add_argument("--workdir", default="/tmp/clipforge-nightly-story")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--metric", default="zero_shot.acc@1")
    args = parser.parse_args()

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.nightly import NightlyParams, nightly_finetune
    from flows.params import EvaluationSettings, FinetuneSettings, IngestSettings
    from infra.prefect_server import prefect_server
    from pipeline.catalog import build_fluent_catalog, build_openmoji_catalog, serve_directory, write_url_list
    from pipeline.registry import promote, register_model

    work = Path(args.workdir)
    openmoji = build_openmoji_catalog(work / "catalog" / "openmoji")
    fluent = build_fluent_catalog(work / "catalog" / "fluent")
    guardrail, domain = val_list(openmoji), val_list(fluent)
    registry = str(work / "registry")
    version = register_model(registry, "clip", args.base, config={}, metrics={}, dataset=[], parent=None)
    promote(registry, "clip", version.version, reason="base model trained on OpenMoji")

    started = time.monotonic()
    with prefect_server(work / "prefect") as server, serve_directory(fluent) as base_url, \
            temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        (work / "incoming").mkdir(parents=True, exist_ok=True)
        write_url_list(fluent, base_url, "train", work / "incoming" / "fluent-train.parquet")
        result = nightly_finetune(
            nightly=NightlyParams(incoming=str(work / "incoming"), validation=guardrail, domain_validation=domain,
                                  data_root=str(work / "nightly-data"), metric=args.metric, tolerance=args.tolerance),
            train=FinetuneSettings(output=str(work / "runs"), steps=args.steps, warmup_steps=5,
                                   batch_size=args.batch_size, lr=args.lr, checkpoint_every=args.steps,
                                   loader_workers=1, log_every=5),
            ingest=IngestSettings(samples_per_shard=512, processes=1, threads=8),
            evaluation=EvaluationSettings(label_field="group", templates="emoji", batch_size=128, report=False),
            registry={"location": registry, "model_name": "clip"})
    print(json.dumps({"seconds": round(time.monotonic() - started), "promoted": result["promoted"],
                      "reason": result["reason"], "mixing_weight": result["wise_ft"]["mixing_weight"],
                      "grid": [{k: p[k] for k in ("mixing_weight", "domain", "guardrail")}
                               for p in result["wise_ft"]["grid"]], "plot": result["wise_ft"]["plot"]}, indent=2))


if __name__ == "__main__":
    main()
