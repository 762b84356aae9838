"""The bundled catalogs: split without leaks, captions that read like names, labels filled, determinism, URL lists
in every format fetched over the loopback server, idempotent builds, and the CLI."""

from __future__ import annotations

import csv
import io
import json
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import catalog
from pipeline.catalog_cli import catalog_group
from pipeline.errors import UserError


@pytest.fixture(scope="module")
def openmoji_300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return catalog.build_openmoji_catalog(tmp_path_factory.mktemp("openmoji"), limit=300)


@pytest.fixture(scope="module")
def fluent_300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return catalog.build_fluent_catalog(tmp_path_factory.mktemp("fluent"), limit=300)


@pytest.fixture(scope="module")
def synthetic_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return catalog.build_synthetic_catalog(tmp_path_factory.mktemp("synthetic"), count=64, image_size=32)


def _sides_per_base(rows: list[dict]) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        sides[row["base"]].add(row["split"])
    return sides


def test_base_drops_skin_tones_and_variation_selectors() -> None:
    assert catalog.base_hexcode("1F9DB-1F3FE") == "1F9DB"
    assert catalog.base_hexcode("1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FC") == "1F9D1-200D-1F91D-200D-1F9D1"
    assert catalog.base_hexcode("2764-FE0F-200D-1F525") == "2764-200D-1F525"
    assert catalog.base_hexcode("1F3FB") == "1F3FB"  # the swatch on its own


def test_captions_from_unicode_names() -> None:
    assert catalog.caption_from_name(":grinning_face_with_big_eyes:") == "grinning face with big eyes"
    assert catalog.caption_from_name(":vampire_medium-dark_skin_tone:") == "vampire: medium-dark skin tone"
    assert catalog.caption_from_name(":man_dark_skin_tone_red_hair:") == "man: dark skin tone, red hair"
    assert catalog.caption_from_name(":United_States:", "country-flag") == "flag: United States"


def test_caption_variants_put_the_caption_first_without_repeats() -> None:
    assert catalog.caption_variants("grinning face", "Smileys & Emotion", "face-smiling", [":grinning:"]) == [
        "grinning face", "grinning face, face smiling", "grinning face, Smileys & Emotion", "grinning",
        "an emoji of grinning face", "grinning face icon"]
    assert catalog.caption_variants("dog", "", "", [":dog:"]) == ["dog", "an emoji of dog", "dog icon"]


def test_limited_openmoji_split_keeps_skin_tone_families_together(openmoji_300: Path) -> None:
    rows = catalog.read_catalog(openmoji_300).to_pylist()
    assert len(rows) == 300
    sides = _sides_per_base(rows)
    assert all(len(s) == 1 for s in sides.values()), [b for b, s in sides.items() if len(s) > 1]
    family_sizes = defaultdict(int)
    for row in rows:
        family_sizes[row["base"]] += 1
    families = [base for base, size in family_sizes.items() if size >= 5]  # base + five tones, or tone pairs
    assert families, "the sample should hold at least one skin-tone family"
    assert {"train", "val"} == {row["split"] for row in rows}


def test_limited_openmoji_rows_are_labelled_and_rendered(openmoji_300: Path) -> None:
    table = catalog.read_catalog(openmoji_300)
    for column in ("image", "caption", "group", "subgroup", "split", "emoji", "hexcode", "base"):
        assert column in table.column_names
    rows = table.to_pylist()
    for row in rows:
        caption = row["caption"]
        assert caption and caption == caption.strip()
        assert "_" not in caption and not caption.startswith(":") and not caption.endswith(":")
        assert caption.count(":") <= 1  # only Unicode's "name: attributes" separator
        assert row["group"] and row["subgroup"]
        assert row["emoji"] and row["image"] == f"images/{row['hexcode']}.png"
        assert row["captions"][0] == caption and len(row["captions"]) >= 5  # name, with subgroup, with group, templates
    assert any(len(row["captions"]) > 5 for row in rows)  # shortcode aliases where the emoji package has them
    assert len({row["group"] for row in rows}) >= 8  # a limited sample still spans the groups
    with Image.open(openmoji_300 / rows[0]["image"]) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    assert "CC BY-SA" in (openmoji_300 / "ATTRIBUTION.md").read_text()
    assert catalog.read_catalog_metadata(openmoji_300)["skipped_unnamed"] > 0


def test_limited_fluent_catalog_is_named_labelled_split_and_rendered_like_openmoji(fluent_300: Path,
                                                                                   openmoji_300: Path) -> None:
    table = catalog.read_catalog(fluent_300)
    assert table.column_names == catalog.read_catalog(openmoji_300).column_names
    rows = table.to_pylist()
    assert len(rows) == 300 and len({row["group"] for row in rows}) >= 8
    for row in rows:
        assert row["caption"] and "_" not in row["caption"] and row["caption"].count(":") <= 1
        assert row["group"] and row["subgroup"] and row["image"] == f"images/{row['hexcode']}.png"
    sides = _sides_per_base(rows)
    assert all(len(s) == 1 for s in sides.values()) and {"train", "val"} == {row["split"] for row in rows}
    assert any(sum(row["base"] == base for row in rows) >= 5 for base in sides)  # a whole skin-tone family
    # Same emoji, same caption and labels as OpenMoji: one naming path, matched by code point.
    openmoji = {catalog.normalise_hexcode(r["hexcode"]): r for r in catalog.read_catalog(openmoji_300).to_pylist()}
    shared = [r for r in rows if catalog.normalise_hexcode(r["hexcode"]) in openmoji]
    assert len(shared) > 100  # the same `limit` order picks mostly the same emoji
    for row in shared:
        twin = openmoji[catalog.normalise_hexcode(row["hexcode"])]
        assert (row["caption"], row["group"], row["subgroup"], row["base"]) == \
            (twin["caption"], twin["group"], twin["subgroup"], twin["base"])
    with Image.open(fluent_300 / rows[0]["image"]) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels = np.asarray(image)
        assert (pixels < 250).any() and (pixels == 255).any()  # a drawing on white, not a blank or black square
    assert "MIT" in (fluent_300 / "ATTRIBUTION.md").read_text()
    assert "Microsoft" in (fluent_300 / "LICENSE-fluent-emoji.txt").read_text()
    metadata = catalog.read_catalog_metadata(fluent_300)
    assert metadata["failed_to_render"] == [] and metadata["skipped_without_code_point"] > 0


def test_render_svg_accepts_markup_and_reports_broken_svg_as_an_error(tmp_path: Path) -> None:
    drawings = dict(catalog._fluent_drawings()[0])
    png = tmp_path / "1F600.png"
    assert catalog._render_svg((drawings["1F600"], str(png), 32)) == (str(png), None)
    with Image.open(png) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    broken = catalog._render_svg(("<svg><path d=", str(tmp_path / "X.png"), 32))
    assert broken[1] and broken[1].startswith("X:") and not (tmp_path / "X.png").exists()


def test_fluent_build_is_deterministic(fluent_300: Path, tmp_path: Path) -> None:
    again = catalog.build_fluent_catalog(tmp_path / "again", limit=300)
    first = catalog.read_catalog(fluent_300)
    assert first.equals(catalog.read_catalog(again))
    for image in first.column("image").to_pylist()[:50]:
        assert (fluent_300 / image).read_bytes() == (again / image).read_bytes()
    other_seed = catalog.build_fluent_catalog(tmp_path / "other", limit=300, seed=1)
    assert catalog.read_catalog(other_seed).column("split") != first.column("split")


def test_combined_catalog_keeps_each_emoji_on_one_side_for_both_vendors(openmoji_300: Path, fluent_300: Path,
                                                                         tmp_path: Path) -> None:
    combined = catalog.build_combined_catalog(tmp_path / "both", {"openmoji": openmoji_300, "fluent": fluent_300})
    rows = catalog.read_catalog(combined).to_pylist()
    assert len(rows) == 600 and {row["catalog"] for row in rows} == {"openmoji", "fluent"}
    assert all(len(s) == 1 for s in _sides_per_base(rows).values())  # base is shared across vendors
    assert {"train", "val"} == {row["split"] for row in rows}
    row = next(r for r in rows if r["catalog"] == "fluent")
    assert row["image"].startswith("images/fluent/")
    assert (combined / row["image"]).read_bytes() == (fluent_300 / "images" / Path(row["image"]).name).read_bytes()
    urls = catalog.write_url_list(combined, "http://h:1", "train", tmp_path / "train.jsonl")
    assert len(_read_url_list(urls)) == sum(r["split"] == "train" for r in rows)


def test_build_is_idempotent_and_resumes(openmoji_300: Path, tmp_path: Path) -> None:
    before = (openmoji_300 / catalog.CATALOG_FILE).stat().st_mtime_ns
    catalog.build_openmoji_catalog(openmoji_300, limit=300)
    assert (openmoji_300 / catalog.CATALOG_FILE).stat().st_mtime_ns == before  # complete: nothing rebuilt

    # A killed build: some images, no catalog.parquet. The next call finishes it.
    partial = catalog.build_synthetic_catalog(tmp_path / "s", count=20, image_size=16)
    (partial / catalog.CATALOG_FILE).unlink()
    (partial / "images" / "000003.png").unlink()
    catalog.build_synthetic_catalog(partial, count=20, image_size=16)
    assert catalog.read_catalog(partial).num_rows == 20
    assert (partial / "images" / "000003.png").is_file()


def test_synthetic_catalog_is_deterministic(synthetic_64: Path, tmp_path: Path) -> None:
    again = catalog.build_synthetic_catalog(tmp_path / "again", count=64, image_size=32)
    first, second = catalog.read_catalog(synthetic_64), catalog.read_catalog(again)
    assert first.equals(second)
    for image in first.column("image").to_pylist():
        assert (synthetic_64 / image).read_bytes() == (again / image).read_bytes()
    other_seed = catalog.build_synthetic_catalog(tmp_path / "other", count=64, image_size=32, seed=1)
    assert not catalog.read_catalog(other_seed).equals(first)


def test_synthetic_catalog_has_labels_and_compositional_captions(synthetic_64: Path) -> None:
    rows = catalog.read_catalog(synthetic_64).to_pylist()
    assert len(rows) == 64
    for row in rows:
        assert row["group"] == row["shape"] and row["subgroup"] == row["colour"]
        assert row["caption"].startswith(f"a {row['colour']} {row['shape']} on a ")
        assert row["caption"].endswith(f"{row['background']} background")
        assert row["texture"] == "solid" or row["texture"] in row["caption"]
    assert all(len(s) == 1 for s in _sides_per_base(rows).values())
    assert {row["split"] for row in rows} == {"train", "val"}
    with Image.open(synthetic_64 / rows[0]["image"]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"


def _read_url_list(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    delimiter = "\t" if path.suffix == ".tsv" else ","
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")), delimiter=delimiter))


@pytest.mark.parametrize("extension", [".parquet", ".csv", ".tsv", ".jsonl"])
def test_url_list_served_over_loopback_returns_the_pngs(openmoji_300: Path, tmp_path: Path, extension: str) -> None:
    table = catalog.read_catalog(openmoji_300)
    with catalog.serve_directory(openmoji_300) as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        path = catalog.write_url_list(openmoji_300, base_url, "val", tmp_path / f"urls{extension}")
        rows = _read_url_list(path)
        expected = [row for row in table.to_pylist() if row["split"] == "val"]
        assert len(rows) == len(expected) > 0
        assert {"url", "caption", "group", "subgroup", "hexcode"} <= set(rows[0])
        for row, source in zip(rows, expected):
            assert row["url"] == f"{base_url}/{source['image']}"
            assert row["caption"] == source["caption"] and row["group"] == source["group"]
            captions = row["captions"]  # a list in parquet and jsonl; its JSON text in csv and tsv, as ingest keeps it
            assert (captions if isinstance(captions, list) else json.loads(captions)) == source["captions"]
            with urllib.request.urlopen(row["url"], timeout=10) as response:
                body = response.read()
                assert response.headers["Content-Type"] == "image/png"
                assert int(response.headers["Content-Length"]) == len(body)
            assert body == (openmoji_300 / source["image"]).read_bytes()


def test_catalogs_served_together_give_one_url_list_per_split(openmoji_300: Path, fluent_300: Path,
                                                               tmp_path: Path) -> None:
    with catalog.serve_catalogs({"openmoji": openmoji_300, "fluent": fluent_300}, tmp_path / "lists") as lists:
        for split in ("train", "val"):
            rows = pq.read_table(lists[split]).to_pylist()
            expected = [r for folder in (openmoji_300, fluent_300) for r in catalog.read_catalog(folder).to_pylist()
                        if r["split"] == split]
            assert [r["caption"] for r in rows] == [r["caption"] for r in expected]
            with urllib.request.urlopen(rows[-1]["url"], timeout=10) as response:  # a Fluent image, served
                assert response.read() == (fluent_300 / expected[-1]["image"]).read_bytes()


def test_a_taken_fixed_port_says_why_the_port_is_fixed(synthetic_64: Path, tmp_path: Path) -> None:
    with catalog.serve_directory(synthetic_64) as base_url:  # holds a port, as another run would
        port = int(base_url.rsplit(":", 1)[1])
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}: .*fixed ports.*another clipforge"):
            with catalog.serve_catalogs({"synthetic": synthetic_64}, tmp_path / "lists", first_port=port):
                pass


def test_url_list_splits_and_errors(synthetic_64: Path, tmp_path: Path) -> None:
    sizes = {split: len(_read_url_list(catalog.write_url_list(synthetic_64, "http://h:1/", split,
                                                                 tmp_path / f"{split}.jsonl")))
             for split in ("train", "val", "all")}
    assert sizes["train"] + sizes["val"] == sizes["all"] == 64
    assert _read_url_list(tmp_path / "all.jsonl")[0]["url"] == "http://h:1/images/000000.png"
    with pytest.raises(UserError, match="unknown split"):
        catalog.write_url_list(synthetic_64, "http://h:1", "test", tmp_path / "x.parquet")
    with pytest.raises(UserError, match="format"):
        catalog.write_url_list(synthetic_64, "http://h:1", "all", tmp_path / "x.txt")
    with pytest.raises(UserError, match="not a built catalog"):
        catalog.read_catalog(tmp_path)


def test_server_stops_cleanly_and_answers_404(synthetic_64: Path) -> None:
    with catalog.serve_directory(synthetic_64) as base_url:
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base_url}/images/nope.png", timeout=10)
        assert missing.value.code == 404
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base_url}/catalog.parquet", timeout=5)


def test_unwritable_output_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write the catalog"):
        catalog.build_synthetic_catalog(blocker / "catalog", count=4)


def test_cli_build_prints_a_summary(tmp_path: Path) -> None:
    output = tmp_path / "cli"
    result = CliRunner().invoke(catalog_group, ["build", "--source", "synthetic", "--output", str(output),
                                                "--count", "40", "--image-size", "16", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "40 images" in result.output and "train" in result.output and "groups" in result.output
    assert catalog.read_catalog(output).num_rows == 40

    result = CliRunner().invoke(catalog_group, ["build", "--source", "synthetic", "--limit", "3",
                                                "--output", str(output)])
    assert result.exit_code == 2 and "--count" in result.output

    result = CliRunner().invoke(catalog_group, ["build", "--catalog", "fluent", "--limit", "12",
                                                "--output", str(tmp_path / "fluent")])
    assert result.exit_code == 0, result.output
    assert "12 images" in result.output and "Fluent Emoji Flat" in result.output

    result = CliRunner().invoke(catalog_group, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and "not a built catalog" in result.output


@pytest.mark.slow
@pytest.mark.parametrize(("source", "at_least"), [("openmoji", 3500), ("fluent", 3000)])
def test_full_emoji_catalog(tmp_path: Path, source: str, at_least: int) -> None:
    built = catalog.EMOJI_CATALOGS[source](tmp_path / source)
    rows = catalog.read_catalog(built).to_pylist()
    assert len(rows) > at_least
    train = [row for row in rows if row["split"] == "train"]
    val = [row for row in rows if row["split"] == "val"]
    assert train and val
    assert {row["group"] for row in train} == {row["group"] for row in rows}
    assert all(len(s) == 1 for s in _sides_per_base(rows).values())
    assert 0.05 < len(val) / len(rows) < 0.15
    assert all((built / row["image"]).is_file() for row in rows)
    assert catalog.read_catalog_metadata(built)["failed_to_render"] == []
