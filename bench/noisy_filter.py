"""Filtering a catalog made noisy on purpose: what the filter removes, what it keeps, and what that buys in training.

    python bench/noisy_filter.py --score-steps 250 --steps 300

1. The bundled OpenMoji catalog's training split is cut by emoji family (skin-tone variants stay together): a clean
   `--seed-fraction` (default 30 %) trains the CLIP-score model, as a user would start from a small curated set;
   the rest becomes a noisy "crawl": 30 % of its captions swapped between images (a random cycle), 20 % of its pairs
   copied again with a small crop (85-95 % of the side) or a colour change (hue turned, saturation and brightness
   changed), and every validation image copied in with its caption. Each row carries its `truth` (clean, swapped,
   near_duplicate, validation_copy) in the URL list, so ingest keeps it in the sample's json.
2. The seed part and the noisy crawl are served over loopback HTTP and ingested by `clipforge ingest`; the scoring
   model is trained on the seed part (`--score-with-fluent`: plus Fluent Emoji Flat's drawings of every emoji
   outside the validation split) by `train_loop` (as `clipforge train` runs it), with the demo's recipe or
   (`--score-recipe transfer`) the cross-style one.
3. `clipforge filter` (with that model) removes pairs by CLIP score (`--clip-score-top-fraction`), near-duplicates
   by embedding and perceptual hash (same caption), and copies of validation images; the script counts, per truth,
   the share removed, and the CLIP-score AUC of clean against swapped pairs.
   `--self-train-steps N`: a second round. The crawl is cut in two halves by emoji (an image and its perturbed copies
   on the same side); for each half, the scoring model is fine-tuned for N steps on the seed plus that half's pairs
   it scored best (`--self-train-top` of those the other rules kept), and each half is filtered again with the model
   fine-tuned on the other half, so no pair is judged by a model that trained on it (cross-fitting). The two
   filtered halves together are the filtered crawl. `--self-train-rounds R`: R such rounds, each half's model
   fine-tuned further on that half's pairs as the previous round ranked them (still never scoring its own half).
4. Three models train for the same `--steps` on the unfiltered crawl, on the crawl with only the validation copies
   removed (decontamination alone) and on the filtered crawl; each is evaluated on the validation split
   (text-to-image R@10 and zero-shot group accuracy).

Prints one JSON line (`--results FILE` appends it). Shards, the scoring model and runs are kept under `--workdir`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageEnhance

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.cross_style import evaluation_list, summary  # noqa: E402
from bench.recipe import print_result, train_and_evaluate  # noqa: E402
from evaluation.brand import roc_auc  # noqa: E402
from evaluation.filtering import model_embedder  # noqa: E402
from pipeline.catalog import (CATALOG_FILE, build_fluent_catalog, build_openmoji_catalog, read_catalog,  # noqa: E402
                              serve_catalogs)
from pipeline.filter import FilterConfig, filter_dataset  # noqa: E402
from pipeline.ingest import IngestConfig, ingest  # noqa: E402
from pipeline.manifest import MANIFEST_NAME, IngestSummary, ShardInfo, write_manifest  # noqa: E402
from pipeline.shards import iter_dataset  # noqa: E402
from training.device import cpu_name  # noqa: E402
from training.model import MODEL_PRESETS  # noqa: E402
from training.train import TrainConfig  # noqa: E402

TRUTHS = ("clean", "swapped", "near_duplicate", "validation_copy")


def _fraction_of(text: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for `text` (the family's split draw)."""
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:8], 16) / 16**8


def perturbed(image: Image.Image, rng: random.Random) -> Image.Image:
    """A near-copy: a small crop resized back, or the colours changed (hue turned, saturation and brightness)."""
    width, height = image.size
    if rng.random() < 0.5:
        scale = rng.uniform(0.85, 0.95)
        w, h = round(width * scale), round(height * scale)
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        return image.crop((left, top, left + w, top + h)).resize((width, height), Image.BICUBIC)
    hue, saturation, value = image.convert("HSV").split()
    hue = hue.point(lambda v, turn=rng.randint(20, 60): (v + turn) % 256)
    recoloured = Image.merge("HSV", (hue, saturation, value)).convert("RGB")
    recoloured = ImageEnhance.Color(recoloured).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Brightness(recoloured).enhance(rng.uniform(0.9, 1.1))


def noisy_catalogs(catalog: Path, workdir: Path, seed_fraction: float, swap: float, copies: float,
                   seed: int) -> tuple[Path, Path]:
    """Two catalog folders (built once): the clean seed part and the noisy crawl (with the validation split)."""
    # the folders name what built them, so that another draw never reuses an old one
    tag = f"seed{seed}-f{seed_fraction}-swap{swap}-copies{copies}"
    seed_dir, crawl_dir = workdir / f"seed-catalog-{tag}", workdir / f"crawl-catalog-{tag}"
    if (seed_dir / CATALOG_FILE).exists() and (crawl_dir / CATALOG_FILE).exists():
        return seed_dir, crawl_dir
    table = read_catalog(catalog)
    rows = table.to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    seed_rows = [r for r in train if _fraction_of(r["base"], seed) < seed_fraction]
    crawl = [dict(r, truth="clean") for r in train if _fraction_of(r["base"], seed) >= seed_fraction]
    rng = random.Random(seed)

    # a random cycle: in a random order each swapped row takes the previous one's captions (none keeps its own); in
    # catalog order the neighbour would often be a skin-tone variant of the same emoji
    swapped = rng.sample(range(len(crawl)), round(swap * len(crawl)))
    if len(swapped) < 2:
        swapped = []
    rotated = swapped[1:] + swapped[:1]
    originals = [(crawl[i]["caption"], crawl[i]["captions"]) for i in swapped]
    for target, (caption, captions) in zip(rotated, originals):
        crawl[target].update(caption=caption, captions=captions, truth="swapped")

    for folder in (seed_dir, crawl_dir):
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "images").is_symlink():
            (folder / "images").symlink_to((catalog / "images").resolve())
    (crawl_dir / "copies").mkdir(exist_ok=True)
    extra = []
    for number, i in enumerate(sorted(rng.sample(range(len(crawl)), round(copies * len(crawl))))):
        row = crawl[i]
        with Image.open(catalog / row["image"]) as image:
            path = f"copies/{number:05d}.png"
            perturbed(image.convert("RGB"), rng).save(crawl_dir / path)
        extra.append(dict(row, image=path, truth="near_duplicate" if row["truth"] == "clean" else row["truth"]))
    extra += [dict(r, split="train", truth="validation_copy") for r in val]
    crawl_rows = crawl + extra + [dict(r, truth="held_out") for r in val]

    def write(folder: Path, table_rows: list[dict]) -> None:
        columns = {name: [r.get(name) for r in table_rows] for name in table_rows[0]}
        pq.write_table(pa.table(columns).replace_schema_metadata(table.schema.metadata), folder / CATALOG_FILE)

    write(seed_dir, [dict(r, truth="clean") for r in seed_rows] + [dict(r, truth="held_out") for r in val])
    write(crawl_dir, crawl_rows)
    return seed_dir, crawl_dir


def with_fluent(seed_dir: Path, fluent: Path) -> Path:
    """The seed part plus Fluent Emoji Flat's drawings of every emoji outside OpenMoji's validation split (another
    vendor's drawings of the crawl's names, none of them a crawl image), as one catalog folder (built once)."""
    folder = seed_dir.with_name(seed_dir.name.replace("seed-", "seed+fluent-"))
    if (folder / CATALOG_FILE).exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in (("images", seed_dir / "images"), ("fluent-images", fluent / "images")):
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(target.resolve())
    seed = read_catalog(seed_dir)
    # Fluent's own split is drawn over its own emoji: filter by OpenMoji's validation families instead
    held_out = {r["base"] for r in seed.to_pylist() if r["split"] == "val"}
    extra = [dict(r, image="fluent-" + r["image"], split="train", truth="clean")
             for r in read_catalog(fluent).to_pylist() if r["base"] not in held_out]
    rows = seed.to_pylist() + [{name: r.get(name) for name in seed.column_names} for r in extra]
    columns = {name: [r[name] for r in rows] for name in seed.column_names}
    pq.write_table(pa.table(columns, schema=seed.schema), folder / CATALOG_FILE)
    return folder


def ingested(name: str, folder: Path, workdir: Path) -> tuple[str, str]:
    """(train dataset, val dataset) of a catalog folder, ingested over loopback HTTP once."""
    train, val = workdir / "data" / f"{name}-train", workdir / "data" / f"{name}-val"
    if not (train / MANIFEST_NAME).exists() or not (val / MANIFEST_NAME).exists():
        with serve_catalogs({name: folder}, workdir / "lists" / name) as url_lists:
            for split, output in (("train", train), ("val", val)):
                ingest(IngestConfig(urls=str(url_lists[split]), output=str(output), min_success_rate=0.95),
                       progress=False)
    return str(train), str(val)


def sample_rows(dataset: str) -> dict[str, dict]:
    """{sample key: its json (caption, group, truth, ...)} of an ingested crawl."""
    return {s["__key__"]: json.loads(s["json"]) for s in iter_dataset(dataset)}


def write_dataset(folder: Path, samples, per_shard: int = 500) -> str:
    """A dataset (tar shards and a manifest, as ingest writes them) of `samples` (dicts as `iter_dataset` yields),
    written again from scratch."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shards: list[ShardInfo] = []
    tar, count = None, 0
    for sample in samples:
        if count % per_shard == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(folder / f"{len(shards):05d}.tar", "w", format=tarfile.USTAR_FORMAT)
            shards.append(ShardInfo(len(shards), f"{len(shards):05d}.tar", 0, 0, 0, 0))
        for extension, data in sample.items():
            if not extension.startswith("__"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{extension}")
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        count += 1
    if tar is not None:
        tar.close()
    sizes = [min(per_shard, count - i * per_shard) for i in range(len(shards))]
    shards = [ShardInfo(s.shard, s.path, n, n, 0, (folder / s.path).stat().st_size) for s, n in zip(shards, sizes)]
    write_manifest(str(folder), shards, IngestSummary(input_rows=count, successes=count, shards=len(shards),
                                                       bytes=sum(s.bytes for s in shards)))
    return str(folder)


def judged(output: str) -> tuple[dict[str, str | None], dict[str, str | None], dict[str, float | None]]:
    """(reason, detail, CLIP score) of every sample of a filter run, by key: its decision (None: kept), the decision's
    detail, and its score: the cosine (also for pairs an earlier rule removed), or with CSLS the score the rule
    judged by (None for pairs an earlier rule removed)."""
    work = Path(output) / "_filter"
    decisions = pq.read_table(work / "decisions.parquet")
    scores = pa.concat_tables([pq.read_table(p) for p in sorted((work / "scan").glob("*.parquet"))])
    if json.loads((work / "rules.json").read_text()).get("clip_score_csls"):
        scores = decisions
    keys = decisions["key"].to_pylist()
    return (dict(zip(keys, decisions["reason"].to_pylist())), dict(zip(keys, decisions["detail"].to_pylist())),
            dict(zip(scores["key"].to_pylist(), scores["clip_score"].to_pylist())))


def score_quality(truth: dict[str, str], score: dict[str, float | None], rows: dict[str, dict],
                  caption_group: dict[str, str]) -> dict:
    """How well the CLIP score tells clean pairs from swapped ones: ROC AUC (overall, and by whether the swapped
    caption names an emoji of the image's Unicode group), and the share of clean pairs kept by the threshold that
    removes 90 % of swapped pairs."""
    clean = np.array([score[k] for k, t in truth.items() if t == "clean" and score[k] is not None])
    swapped_keys = [k for k, t in truth.items() if t == "swapped" and score[k] is not None]
    swapped = np.array([score[k] for k in swapped_keys])
    # a swapped caption that names an emoji of another Unicode group than the image's is the easier case
    across = np.array([rows[k]["group"] != caption_group[rows[k]["caption"]] for k in swapped_keys])
    swapped_90 = np.quantile(swapped, 0.9) if len(swapped) else np.nan
    return {"clip_score_auc_clean_vs_swapped": round(roc_auc(clean, swapped), 4),
            "clip_score_auc_by_swapped_caption_group": {
                name: round(roc_auc(clean, swapped[across == value]), 4)
                for name, value in (("other_group", True), ("same_group", False))},
            "clean_kept_at_90_swapped_removed": round(float(np.mean(clean >= swapped_90)), 4)}


def self_trained_filter(args, rules: dict, scorers: tuple[Path, Path], seed_train: str, crawl_train: str,
                        workdir: Path, previous: tuple[dict, dict, dict], rows: dict[str, dict]
                        ) -> tuple[str, tuple[dict, dict, dict], tuple[Path, Path]]:
    """One more round (module docstring, step 3), each half's model fine-tuned from `scorers[half]` on the pairs the
    `previous` round's decisions ranked best: (the filtered crawl, its reason, detail and score by key, the models)."""
    reason, _, score = previous
    half = {key: int(hashlib.sha256(row["hexcode"].encode()).hexdigest()[:8], 16) % 2 for key, row in rows.items()}
    samples = {s["__key__"]: s for s in iter_dataset(crawl_train)}
    models = []
    for side in (0, 1):
        # the pairs of this half the other rules kept, best CLIP score first
        ranked = sorted((k for k in samples if half[k] == side and reason[k] in (None, "clip_score")),
                        key=lambda k: -score[k])
        confident = ranked[:round(args.self_train_top * len(ranked))]
        data = write_dataset(workdir / "data" / f"self-train-{side}",
                             [*(dict(s, __key__=f"seed{s['__key__']}") for s in iter_dataset(seed_train)),
                              *(samples[k] for k in confident)])
        start = scorers[side]
        ranked_by = f"-csls{args.clip_score_csls}" if args.clip_score_csls else ""  # how `confident` was picked
        model = start.with_name(f"{start.name}-self{args.self_train_steps}-top{args.self_train_top}{ranked_by}"
                                f"-half{side}")
        if not (model / "model.safetensors").exists():
            config = recipe(data, args.self_train_steps, args.seed, args.score_recipe == "transfer", args.score_preset)
            # from the scorer, at a fine-tune's rate
            config = config.model_copy(update={"init_from": str(start), "lr": 2e-4, "seed": args.seed + 1 + side})
            train_and_evaluate(config, {}, keep_model=model)
        models.append(model)
    outputs, decided = [], ({}, {}, {})
    for side in (0, 1):
        data = write_dataset(workdir / "data" / f"crawl-half{side}",
                             (s for k, s in samples.items() if half[k] == side))
        output = str(workdir / "data" / f"crawl-filtered-half{side}")
        run_filter_bench(FilterConfig(data=data, output=output, model=str(models[1 - side]), **rules))
        outputs.append(output)
        for whole, part in zip(decided, judged(output)):
            whole.update(part)
    filtered = write_dataset(workdir / "data" / "crawl-filtered-self-trained",
                             (s for output in outputs for s in iter_dataset(output)))
    return filtered, decided, tuple(models)


def run_filter_bench(config: FilterConfig) -> float:
    """`clipforge filter` as the command runs it (with the model's embedder), from scratch; its seconds."""
    shutil.rmtree(config.output, ignore_errors=True)  # the rules may have changed since the last run
    started = time.perf_counter()
    filter_dataset(config, functools.partial(model_embedder, config) if config.model else None, progress=False)
    return time.perf_counter() - started


# a scorer between `small` and ViT-B/32 (2.7 times the parameters of `small`), for --score-preset
MODEL_PRESETS["medium"] = MODEL_PRESETS["small"].derive(vision_width=384, vision_layers=8, vision_heads=6,
                                                        text_width=384, text_layers=8, text_heads=6, embed_dim=384)


def recipe(data: str, steps: int, seed: int, transfer: bool = False, preset: str = "small") -> TrainConfig:
    """The demo's recipe (the `preset`, patch dropout 0.5, caption lists) for `steps` steps; `transfer`: the
    cross-style recipe of README "Transfer to a drawing style never seen", ablation row G (blur, resolution and rotate
    augmentations, crops down to half the area, a 32 px input with 4 px patches)."""
    if not transfer:
        return TrainConfig(data=data, preset=preset, steps=steps, batch_size=128, lr=5e-4, warmup_steps=20,
                           patch_dropout=0.5, seed=seed)
    MODEL_PRESETS[f"{preset}-32px"] = MODEL_PRESETS[preset].derive(image_size=32, patch_size=4)
    return TrainConfig(data=data, preset=f"{preset}-32px", steps=steps, batch_size=128, lr=5e-4, warmup_steps=20,
                       patch_dropout=0.5, crop_scale_min=0.5, augment=["blur", "resolution", "rotate"], seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=".clipforge/noisy-filter")
    parser.add_argument("--seed-fraction", type=float, default=0.3, help="clean share that trains the scoring model")
    parser.add_argument("--swap", type=float, default=0.3, help="share of the crawl's captions swapped")
    parser.add_argument("--copies", type=float, default=0.2, help="share of the crawl copied again, perturbed")
    parser.add_argument("--score-steps", type=int, default=250, help="training steps of the scoring model")
    parser.add_argument("--score-recipe", choices=["demo", "transfer"], default="demo",
                        help="the scoring model's recipe: the demo's, or the cross-style one (see `recipe`)")
    parser.add_argument("--score-preset", choices=["small", "medium"], default="small",
                        help="the scoring model's size (the compared models are always `small`)")
    parser.add_argument("--score-with-fluent", action="store_true",
                        help="the scoring model also trains on Fluent Emoji Flat's drawings (bundled) of every emoji "
                             "outside OpenMoji's validation split")
    parser.add_argument("--self-train-steps", type=int, default=0,
                        help="self-training: each round fine-tunes the scoring model this many steps on the seed plus "
                             "the crawl pairs it scored best, cross-fitted over two halves of the crawl (0: none)")
    parser.add_argument("--self-train-rounds", type=int, default=1,
                        help="rounds of self-training (with --self-train-steps): each fine-tunes every half's model "
                             "further on the pairs the previous round ranked best")
    parser.add_argument("--self-train-top", type=float, default=0.6,
                        help="share of each half's pairs (those the other rules kept) a round trains on")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each compared model")
    parser.add_argument("--clip-score-top-fraction", type=float, default=0.8)
    parser.add_argument("--clip-score-csls", type=int, default=None,
                        help="judge pairs by CSLS over this many neighbours instead of the raw cosine")
    parser.add_argument("--duplicate-similarity", type=float, default=0.8)
    parser.add_argument("--duplicate-hash-distance", type=int, default=8)
    parser.add_argument("--contamination-similarity", type=float, default=None,
                        help="also decontaminate by embedding cosine (default: by perceptual hash alone)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-training", action="store_true", help="stop after filtering (no comparison runs)")
    parser.add_argument("--results", default=None, help="append the JSON line to this file too")
    args = parser.parse_args()

    workdir = Path(args.workdir).resolve()
    catalog = build_openmoji_catalog(workdir / "catalog" / "openmoji")
    seed_dir, crawl_dir = noisy_catalogs(catalog, workdir, args.seed_fraction, args.swap, args.copies, args.seed)
    if args.score_with_fluent:
        seed_dir = with_fluent(seed_dir, build_fluent_catalog(workdir / "catalog" / "fluent"))
    seed_name, crawl_name = seed_dir.name.replace("-catalog", ""), crawl_dir.name.replace("-catalog", "")
    seed_train, _ = ingested(seed_name, seed_dir, workdir)
    crawl_train, crawl_val = ingested(crawl_name, crawl_dir, workdir)
    val_list = evaluation_list(workdir, "openmoji-val", catalog, "val")

    preset = "" if args.score_preset == "small" else f"-{args.score_preset}"
    scorer = workdir / f"scoring-model-{seed_name}-{args.score_recipe}{preset}-{args.score_steps}"
    if not (scorer / "model.safetensors").exists():
        config = recipe(seed_train, args.score_steps, args.seed, args.score_recipe == "transfer", args.score_preset)
        seconds, metrics = train_and_evaluate(config, {"val": val_list}, keep_model=scorer)
        (scorer / "bench.json").write_text(json.dumps({"train_seconds": round(seconds), **summary(metrics["val"])}))
    scorer_info = json.loads((scorer / "bench.json").read_text())

    rules = dict(clip_score_top_fraction=args.clip_score_top_fraction, clip_score_csls=args.clip_score_csls,
                 duplicate_similarity=args.duplicate_similarity,
                 duplicate_hash_distance=args.duplicate_hash_distance, decontaminate=(crawl_val,),
                 contamination_similarity=args.contamination_similarity)
    config = FilterConfig(data=crawl_train, output=str(workdir / "data" / "crawl-filtered"), model=str(scorer), **rules)
    filter_seconds = run_filter_bench(config)
    filtered = config.output
    rows = sample_rows(crawl_train)
    truth = {key: row["truth"] for key, row in rows.items()}
    caption_group = {r["caption"]: r["group"] for r in read_catalog(catalog).to_pylist()}
    decided = judged(config.output)
    rounds = []
    if args.self_train_steps:
        started, scorers = time.perf_counter(), (scorer, scorer)
        for _ in range(args.self_train_rounds):
            rounds.append(score_quality(truth, decided[2], rows, caption_group))
            filtered, decided, scorers = self_trained_filter(args, rules, scorers, seed_train, crawl_train, workdir,
                                                             decided, rows)
        self_train_seconds = time.perf_counter() - started
    reason, detail, score = decided

    outcome: dict[str, dict[str, int]] = {t: {} for t in TRUTHS}
    for key, kind in truth.items():
        outcome[kind][reason[key] or "kept"] = outcome[kind].get(reason[key] or "kept", 0) + 1
    removed_share = {kind: round(1 - counts.get("kept", 0) / max(1, sum(counts.values())), 4)
                     for kind, counts in outcome.items()}
    # a clean pair removed as the duplicate of its own kept copy is still in the data (the copy stands in for it)
    clean = [k for k, kind in truth.items() if kind == "clean"]
    represented = sum(reason[k] is None or (reason[k] == "duplicate" and reason.get(detail[k][3:], "x") is None)
                      for k in clean)
    # OpenMoji ships some training drawings that copy a validation drawing under another name: contamination that
    # decontamination must remove, so the goal "keep 90 % of clean pairs" is also given over the other clean pairs
    uncontaminated = [k for k in clean if reason[k] != "contaminated"]
    kept = sum(r is None for r in reason.values())
    result = {"recipe": {k: v for k, v in vars(args).items() if k not in ("workdir", "results")},
              "cpu": cpu_name(), "threads": torch.get_num_threads(), "scoring_model": scorer_info,
              "crawl": {kind: sum(counts.values()) for kind, counts in outcome.items()},
              "outcome": outcome, "removed_share": removed_share,
              "kept_clean_share": round(1 - removed_share["clean"], 4),
              "clean_represented_share": round(represented / len(clean), 4),
              "uncontaminated_clean_represented_share": round(represented / len(uncontaminated), 4),
              **score_quality(truth, score, rows, caption_group),
              "filter_seconds": round(filter_seconds, 1), "kept": kept, "input": len(truth)}
    if args.self_train_steps:
        result["earlier_rounds"] = rounds
        result["self_train_seconds"] = round(self_train_seconds)
    if not args.skip_training:
        # the crawl without the validation copies (decontamination alone): what the other rules buy, free of the
        # inflation that training on the evaluation images gives the unfiltered run
        decontaminated = FilterConfig(data=crawl_train, output=str(workdir / "data" / "crawl-decontaminated"),
                                      decontaminate=(crawl_val,),
                                      model=config.model if config.contamination_similarity else None,
                                      contamination_similarity=config.contamination_similarity)
        run_filter_bench(decontaminated)
        for name, data in (("unfiltered", crawl_train), ("decontaminated_only", decontaminated.output),
                           ("filtered", filtered)):
            seconds, metrics = train_and_evaluate(recipe(data, args.steps, args.seed), {"val": val_list})
            result[name] = {"train_seconds": round(seconds), **summary(metrics["val"])}
    print_result(result, args.results)


if __name__ == "__main__":
    main()
