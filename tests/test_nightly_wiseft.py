"""nightly-finetune with WiSE-FT, end to end on the Fluent Emoji Flat catalog (slow: Prefect server, img2dataset,
Ray): a base model promoted from OpenMoji, Fluent's train split arriving under `incoming`, the fine-tune, the grid
of mixing weights evaluated on Fluent's validation set (domain) and OpenMoji's (guardrail), the choice, the
promotion decision, and the mixing weight in the registry's lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from flows.nightly import NightlyParams
from flows.params import EvaluationSettings, FinetuneSettings, IngestSettings
from pipeline.registry import get_version, promote, promoted, register_model

pytestmark = pytest.mark.slow


def _val_list(catalog: Path) -> str:
    from pipeline.catalog import read_catalog

    table = read_catalog(catalog)
    path = catalog / "val.parquet"  # an image list beside the images: no ingest needed to evaluate
    pq.write_table(table.filter(pc.equal(table.column("split"), "val")), path)
    return str(path)


def test_nightly_wise_ft_on_the_fluent_catalog(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.nightly import nightly_finetune
    from infra.prefect_server import prefect_server
    from pipeline.catalog import build_fluent_catalog, build_openmoji_catalog, serve_directory, write_url_list
    from tests.test_flows import _artifacts
    from training.checkpoint import save_checkpoint
    from training.model import MODEL_PRESETS, create_model
    from training.tokenizer import train_tokenizer

    openmoji = build_openmoji_catalog(tmp_path / "openmoji", limit=200)
    fluent = build_fluent_catalog(tmp_path / "fluent", limit=300)
    guardrail, domain = _val_list(openmoji), _val_list(fluent)
    captions = pq.read_table(openmoji / "catalog.parquet").column("caption").to_pylist()
    tokenizer = train_tokenizer(captions, vocab_size=MODEL_PRESETS["tiny"].vocab_size,
                                context_length=MODEL_PRESETS["tiny"].context_length)
    base = save_checkpoint(tmp_path / "base-model", create_model("tiny"), tokenizer)
    registry = str(tmp_path / "registry")
    promote(registry, "clip", register_model(registry, "clip", str(base), config={}, metrics={}, dataset=[],
                                             parent=None).version, reason="base model (OpenMoji)")

    with prefect_server(tmp_path / "prefect") as server, serve_directory(fluent) as base_url, \
            temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        (tmp_path / "incoming").mkdir()
        write_url_list(fluent, base_url, "train", tmp_path / "incoming" / "fluent-train.parquet")
        state = nightly_finetune(
            nightly=NightlyParams(incoming=str(tmp_path / "incoming"), validation=guardrail, domain_validation=domain,
                                  data_root=str(tmp_path / "nightly-data"), metric="retrieval.text_to_image.R@5",
                                  tolerance=0.05, mixing_weights=[0.5, 1.0]),
            train=FinetuneSettings(output=str(tmp_path / "runs"), steps=6, warmup_steps=2, batch_size=32,
                                   checkpoint_every=6, loader_workers=1, log_every=3),
            ingest=IngestSettings(samples_per_shard=64, processes=1, threads=8),
            evaluation=EvaluationSettings(label_field="group", templates="emoji", batch_size=64, report=False),
            registry={"location": registry, "model_name": "clip"},
            return_state=True)
        assert state.is_completed(), state.message
        result = state.result()
        report = _artifacts(state.state_details.flow_run_id)["nightly-report"].data

    grid = result["wise_ft"]["grid"]
    assert [p["mixing_weight"] for p in grid] == [0.0, 0.5, 1.0]
    assert all(p["domain"] is not None and p["guardrail"] is not None for p in grid)
    version = get_version(registry, "clip", 2)
    assert version.parent == "clip@1" and version.mixing_weight == result["wise_ft"]["mixing_weight"]
    assert (promoted(registry, "clip").version == 2) == result["promoted"]
    start, chosen = grid[0], next(p for p in grid if p["mixing_weight"] == version.mixing_weight)
    assert result["promoted"] == (chosen["domain"] > start["domain"] and chosen["guardrail"] >= start["guardrail"] - 0.05)
    assert "WiSE-FT" in report and "data:image/png;base64," in report and "(chosen)" in report
    assert Path(result["wise_ft"]["plot"]).read_bytes().startswith(b"\x89PNG")
    print("WiSE-FT grid:", json.dumps(grid), "promoted:", result["promoted"], result["reason"])
