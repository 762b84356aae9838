"""Real shards for the benchmarks: the bundled OpenMoji catalog rendered at a given size, served over loopback HTTP
and ingested by `clipforge ingest` (img2dataset), exactly as a web source would be. Cached: a second call with the same
settings returns the existing dataset at once.

    python bench/catalog_shards.py --image-size 224 --workdir .clipforge/bench   # prints the dataset location
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pipeline.catalog import build_openmoji_catalog, serve_directory, write_url_list  # noqa: E402
from pipeline.ingest import IngestConfig, ingest  # noqa: E402
from pipeline.manifest import MANIFEST_NAME  # noqa: E402


def catalog_shards(workdir: str | Path, image_size: int = 224, limit: int | None = None,
                   samples_per_shard: int = 256) -> str:
    """The location of a dataset of the catalog's training split at `image_size` px (built on first use)."""
    workdir = Path(workdir).resolve()
    name = f"openmoji-{image_size}px" + (f"-{limit}" if limit else "")
    output = workdir / "data" / name
    if (output / MANIFEST_NAME).exists():
        return str(output)
    catalog = build_openmoji_catalog(workdir / "catalog" / name, image_size=image_size, limit=limit)
    with serve_directory(catalog) as base_url:
        urls = write_url_list(catalog, base_url, "train", workdir / "lists" / f"{name}.parquet")
        ingest(IngestConfig(urls=str(urls), output=str(output), image_size=image_size,
                            samples_per_shard=samples_per_shard, min_success_rate=0.95), progress=False)
    return str(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=".clipforge/bench")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--limit", type=int, default=None, help="only the first N emoji (fast runs)")
    args = parser.parse_args()
    print(catalog_shards(args.workdir, args.image_size, args.limit))


if __name__ == "__main__":
    main()
