"""Cross-style check: train on one bundled emoji catalog, evaluate on a vendor whose drawings the model never saw.

    python bench/cross_style.py --train openmoji --steps 1200 --augment colour grey outline blur resolution rotate

Trains the `small` preset (`--image-size` and `--patch-size` change its input) in this process, by `train_loop` as
`clipforge train` runs it in each worker, on the training split of OpenMoji (or of both catalogs: `--train both`),
then evaluates zero-shot classification over the Unicode groups and text-to-image retrieval on:
- `openmoji-val`: OpenMoji's validation split (emoji kept out of training, in the style trained on);
- `fluent`: the whole Fluent Emoji Flat catalog (every emoji, a style never seen) when training on OpenMoji alone;
- `fluent-val`: Fluent's validation split (emoji kept out of training) when training on both.
It prints one JSON line (`--results FILE` appends it there too): training seconds, then per evaluation set text-to-image
R@1/5/10 with chance, zero-shot group acc@1 and balanced accuracy with their majority baselines. The shards are real:
each catalog is served over loopback HTTP and ingested by `clipforge ingest`, once, under `--workdir`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.recipe import print_result, train_and_evaluate  # noqa: E402
from pipeline.catalog import build_fluent_catalog, build_openmoji_catalog, read_catalog, serve_catalogs  # noqa: E402
from pipeline.ingest import IngestConfig, ingest  # noqa: E402
from pipeline.manifest import MANIFEST_NAME  # noqa: E402
from training.model import MODEL_PRESETS  # noqa: E402
from training.train import TrainConfig  # noqa: E402
from training.transforms import STYLE_AUGMENTATIONS  # noqa: E402

BUILDERS = {"openmoji": build_openmoji_catalog, "fluent": build_fluent_catalog}


def catalogs(workdir: Path) -> dict[str, Path]:
    return {name: build(workdir / "catalog" / name) for name, build in BUILDERS.items()}


def training_shards(workdir: Path, sources: list[str], built: dict[str, Path]) -> str:
    """The training splits of `sources` as one ingested dataset (built on first use), downloaded over loopback HTTP."""
    output = workdir / "data" / "+".join(sources)
    if not (output / MANIFEST_NAME).exists():
        with serve_catalogs({s: built[s] for s in sources}, workdir / "lists" / "+".join(sources)) as url_lists:
            ingest(IngestConfig(urls=str(url_lists["train"]), output=str(output), min_success_rate=0.95),
                   progress=False)
    return str(output)


def evaluation_list(workdir: Path, name: str, catalog: Path, split: str | None) -> str:
    """An image list (absolute paths) of the catalog's `split` (None: every image) for `clipforge evaluate`."""
    table = read_catalog(catalog)
    if split is not None:
        table = table.filter(pc.equal(table.column("split"), split))
    images = [str(catalog / image) for image in table.column("image").to_pylist()]
    table = table.set_column(table.column_names.index("image"), "image", pa.array(images))
    path = workdir / "lists" / f"eval-{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.drop_columns(["captions"]), path)
    return str(path)


def summary(metrics: dict) -> dict:
    zero_shot, retrieval = metrics["zero_shot"], metrics["retrieval"]
    return {"images": metrics["num_images"],
            "text_to_image": {k: round(v, 4) for k, v in retrieval["text_to_image"].items()},
            "text_to_image_chance": {k: round(v, 4) for k, v in retrieval["chance"]["text_to_image"].items()},
            "group_acc@1": round(zero_shot["acc@1"], 4),
            "group_balanced_accuracy": round(zero_shot["balanced_accuracy"], 4),
            "majority_acc@1": round(zero_shot["majority"]["acc@1"], 4),
            "majority_balanced_accuracy": round(zero_shot["majority"]["balanced_accuracy"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=".clipforge/cross-style")
    parser.add_argument("--train", choices=["openmoji", "both"], default="openmoji")
    parser.add_argument("--steps", type=int, default=174, help="optimiser steps (the demo: 6 epochs = 174)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.2)
    parser.add_argument("--patch-dropout", type=float, default=0.5)
    parser.add_argument("--crop-scale-min", type=float, default=0.8)
    parser.add_argument("--augment", nargs="*", default=[], choices=STYLE_AUGMENTATIONS)
    parser.add_argument("--captions", choices=["one", "list"], default="one",
                        help="one: every sample with its name; list: one of its caption list, drawn per epoch")
    parser.add_argument("--image-size", type=int, default=64, help="the model's input side (small: 64)")
    parser.add_argument("--patch-size", type=int, default=8, help="the image tower's patch side (small: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="a name for this run in the output")
    parser.add_argument("--results", default=None, help="append the JSON line to this file too")
    args = parser.parse_args()

    workdir = Path(args.workdir).resolve()
    built = catalogs(workdir)
    sources = ["openmoji", "fluent"] if args.train == "both" else ["openmoji"]
    data = training_shards(workdir, sources, built)
    evaluations = {"openmoji-val": evaluation_list(workdir, "openmoji-val", built["openmoji"], "val")}
    if args.train == "both":
        evaluations["fluent-val"] = evaluation_list(workdir, "fluent-val", built["fluent"], "val")
    else:
        evaluations["fluent"] = evaluation_list(workdir, "fluent", built["fluent"], None)
    MODEL_PRESETS["recipe"] = MODEL_PRESETS["small"].derive(image_size=args.image_size, patch_size=args.patch_size)
    config = TrainConfig(data=data, preset="recipe", steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, warmup_steps=20, patch_dropout=args.patch_dropout,
                         crop_scale_min=args.crop_scale_min, augment=args.augment,
                         caption_field="captions" if args.captions == "list" else None, seed=args.seed)
    seconds, metrics = train_and_evaluate(config, evaluations)
    results = {name: summary(m) for name, m in metrics.items()}
    recipe = {k: v for k, v in vars(args).items() if k not in ("workdir", "results", "label")}
    print_result({"label": args.label, "recipe": recipe, "threads": torch.get_num_threads(),
                  "train_seconds": round(seconds), **results}, args.results)


if __name__ == "__main__":
    main()
