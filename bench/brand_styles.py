"""Can a brand profile tell one emoji vendor's house style from another's? (issue 14, "Must show" 1)

The bundled catalogs draw the same emoji twice: OpenMoji and Microsoft's Fluent Emoji Flat. The emoji both vendors
draw are split by base (skin-tone families together) into halves A and B by a stable hash. For each direction
(brand = OpenMoji, off-brand = Fluent; and the reverse):

- today's method (`centroid`): the unit centroid of the brand's half-A embeddings; score = cosine to it;
- the discriminative profile (`clipforge brand build`, `evaluation.brand.build_profile`) from the brand's half A,
  with the other vendor's half A as off-brand references, for each feature set (embedding, style, both);
- the same profile with no references given (the generic set: the brand's images restyled, and drawn shapes).

Every method scores half B of both vendors (emoji no profile saw, in both styles); the table gives the ROC AUC
(brand B vs other B), and for the profiles the false-accept rate on other-B and false-reject rate on brand-B at the
threshold the build chose for a 5% false-accept rate. Each folder is embedded once (with style statistics) and the
profiles read those tables, so the numbers come from the product's build and score code.

    python bench/brand_styles.py --model .clipforge/runs/openmoji/model
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.catalog import EMOJI_CATALOGS, normalise_hexcode, read_catalog  # noqa: E402
from evaluation.brand import (BrandBuildConfig, BrandScoreConfig, build_profile, read_scores, roc_auc,  # noqa: E402
                            score_images)
from training.checkpoint import load_model  # noqa: E402
from evaluation.embed import embed_location, valid_rows, vectors, write_table  # noqa: E402

VENDORS = ("openmoji", "fluent")
STYLE_BLOCKS = (0, 1)


def half_of(base: str, seed: int) -> str:
    return "A" if hashlib.sha256(f"{seed}:{normalise_hexcode(base)}".encode()).digest()[0] < 128 else "B"


def image_folders(catalogs: dict[str, Path], root: Path, seed: int,
                  max_emoji: int | None = None) -> dict[tuple[str, str], Path]:
    """(vendor, half) -> folder of that vendor's drawings of the emoji both vendors draw, linked from the catalog."""
    rows = {vendor: {normalise_hexcode(r["hexcode"]): r for r in read_catalog(path).to_pylist()}
            for vendor, path in catalogs.items()}
    shared = sorted(set(rows["openmoji"]) & set(rows["fluent"]))[:max_emoji]
    folders = {}
    for vendor in VENDORS:
        for hexcode in shared:
            row = rows[vendor][hexcode]
            folder = folders.setdefault((vendor, half_of(row["base"], seed)), root / f"{vendor}-{half_of(row['base'], seed)}")
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{hexcode}.png"
            if not target.exists():
                os.link(catalogs[vendor] / row["image"], target)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint trained only on OpenMoji")
    parser.add_argument("--catalogs", default=".clipforge/catalog", help="folder holding (or to build) openmoji/ and fluent/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the A/B halves and of the profiles' splits")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--max-emoji", type=int, default=None, help="first N shared emoji only (a quick check)")
    parser.add_argument("--features", nargs="+", choices=("embedding", "style", "both"),
                        default=["embedding", "style", "both"], help="feature sets of the profiles with references")
    parser.add_argument("--no-generic", action="store_true", help="skip the profile with the generic references")
    args = parser.parse_args()

    catalogs = {vendor: EMOJI_CATALOGS[vendor](Path(args.catalogs) / vendor) for vendor in VENDORS}
    model, _ = load_model(args.model)
    with tempfile.TemporaryDirectory(prefix="clipforge-brand-bench-") as scratch:
        root = Path(scratch)
        folders = image_folders(catalogs, root, args.seed, args.max_emoji)
        start = time.perf_counter()
        tables = {}
        for (vendor, half), folder in sorted(folders.items()):
            table = embed_location(model, str(folder), args.model, precision=args.precision, thumbnail_size=48,
                                   style_blocks=STYLE_BLOCKS, progress=False)
            tables[vendor, half] = write_table(table, str(root / f"{vendor}-{half}.parquet"))
        counts = {f"{v}-{h}": len(list(f.glob('*.png'))) for (v, h), f in sorted(folders.items())}
        print(f"emoji drawn by both vendors, by half: {counts}; embedded in {time.perf_counter() - start:.0f} s")
        print(f"{'brand':<9} {'off-brand':<9} {'method':<34} {'AUC (B)':>8} {'FAR (B)':>8} {'FRR (B)':>8} "
              f"{'AUC held-out':>12}")
        for brand, other in (("openmoji", "fluent"), ("fluent", "openmoji")):
            from evaluation.embed import read_embeddings

            approved = vectors(valid_rows(read_embeddings(tables[brand, "A"])))
            centroid = approved.mean(axis=0) / np.linalg.norm(approved.mean(axis=0))
            cosine = {v: vectors(valid_rows(read_embeddings(tables[v, "B"]))) @ centroid for v in (brand, other)}
            print(f"{brand:<9} {other:<9} {'centroid (today)':<34} {roc_auc(cosine[brand], cosine[other]):>8.3f}")
            runs = [(f"profile, {features}, references", features, tables[other, "A"]) for features in args.features]
            if not args.no_generic:
                runs.append(("profile, both, generic references", "both", None))
            for label, features, references in runs:
                output = root / f"profile-{brand}-{features}-{references is None}"
                build = BrandBuildConfig(model=args.model, images=tables[brand, "A"], references=references,
                                         output=str(output), features=features, style_blocks=STYLE_BLOCKS,
                                         seed=args.seed, precision=args.precision)
                if references is None:  # the generic set restyles the brand's images: give it the folder
                    build = build.model_copy(update={"images": str(folders[brand, "A"])})
                profile = build_profile(build, progress=False)
                probability = {}
                for vendor in (brand, other):
                    scored = root / f"scores-{brand}-{features}-{references is None}-{vendor}"
                    score_images(BrandScoreConfig(profile=str(output), images=tables[vendor, "B"], output=str(scored),
                                                  precision=args.precision, report=False), progress=False)
                    probability[vendor] = np.array(read_scores(str(scored)).column("probability").to_pylist())
                threshold = profile.info["threshold"]
                print(f"{brand:<9} {other:<9} {label:<34} {roc_auc(probability[brand], probability[other]):>8.3f} "
                      f"{(probability[other] >= threshold).mean():>8.3f} {(probability[brand] < threshold).mean():>8.3f} "
                      f"{profile.info['auc']:>12.3f}")


if __name__ == "__main__":
    main()
