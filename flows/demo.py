"""The main job on the embedded defaults: `clipforge demo` (README's first command).

Builds the bundled OpenMoji catalog, serves it over loopback HTTP exactly as the web would serve it, and ingests the
train and validation splits into WebDataset shards under `.clipforge/` (a local folder: the embedded storage
default). Re-running it resumes or reuses what is already there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.catalog import build_openmoji_catalog, serve_directory, write_url_list
from pipeline.ingest import IngestConfig, ingest
from pipeline.manifest import Manifest

DEMO_PORT = 18_765  # fixed, so the URL lists (and so the ingest fingerprints) are the same on every re-run


@dataclass(frozen=True)
class DemoResult:
    catalog: Path
    datasets: dict[str, Manifest]


def run_demo(workdir: str | Path = ".clipforge", image_size: int = 64, port: int = DEMO_PORT,
             progress: bool = True) -> DemoResult:
    workdir = Path(workdir)
    catalog = build_openmoji_catalog(workdir / "catalog" / "openmoji", image_size=image_size)
    datasets = {}
    with serve_directory(catalog, port=port) as base_url:
        for split in ("train", "val"):
            url_list = write_url_list(catalog, base_url, split, workdir / "lists" / f"openmoji-{split}.parquet")
            config = IngestConfig(urls=str(url_list), output=str(workdir / "data" / f"openmoji-{split}"),
                                  image_size=image_size, samples_per_shard=256, min_success_rate=0.95)
            datasets[split] = ingest(config, progress=progress)
    return DemoResult(catalog=catalog, datasets=datasets)
