"""Tests of brand profiles: calibration, style separation (ROC AUC), and hostile inputs that must become error rows."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.catalog import build_openmoji_catalog, read_catalog
from pipeline.errors import UserError
from training.brand import BrandProfile, fit_profile, load_profile, save_profile, score_embeddings
from training.checkpoint import save_checkpoint
from training.eval_cli import commands
from training.model import create_model
from training.tokenizer import train_tokenizer
from tests.test_evaluate import synthetic_catalog, tiny_checkpoint  # noqa: F401 - shared fixtures

BRAND = next(c for c in commands if c.name == "brand")


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting one half (the Mann-Whitney form of the ROC AUC)."""
    greater = (positive[:, None] > negative[None, :]).sum()
    equal = (positive[:, None] == negative[None, :]).sum()
    return float((greater + 0.5 * equal) / (len(positive) * len(negative)))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, followed by a few bytes of data (a bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def test_roc_auc_helper() -> None:
    assert roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([1.0]), np.array([1.0])) == 0.5


def test_percentile_is_the_share_of_heldout_images_at_or_below() -> None:
    profile = BrandProfile(np.array([1.0, 0.0], np.float32), np.array([0.5, 0.6, 0.7, 0.8], np.float32), {"model": "m"})
    np.testing.assert_allclose(profile.percentile(np.array([0.4, 0.5, 0.65, 0.8, 0.9], np.float32)), [0, 25, 50, 100, 100])
    assert profile.threshold_cosine(25) == pytest.approx(0.5)
    assert profile.threshold_cosine(30) == pytest.approx(0.6)
    assert profile.threshold_cosine(0) == -1.0
    cosine, percentile, on_brand = score_embeddings(profile, np.array([[0.65, 0.76], [0.4, 0.9]], np.float32), 30,
                                                    chunk_size=1)
    np.testing.assert_allclose(cosine, [0.65, 0.4])
    assert on_brand.tolist() == [True, False]


def test_profile_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    held_out = np.arange(20) % 4 == 0
    profile = fit_profile(emb, held_out, {"model": "somewhere"})
    assert np.linalg.norm(profile.centroid) == pytest.approx(1, abs=1e-6)
    assert len(profile.heldout_similarities) == 5 and np.all(np.diff(profile.heldout_similarities) >= 0)
    save_profile(profile, str(tmp_path / "profile"))
    loaded = load_profile(str(tmp_path / "profile"))
    np.testing.assert_array_equal(loaded.centroid, profile.centroid)
    assert loaded.info["model"] == "somewhere" and loaded.info["heldout_images"] == 5
    with pytest.raises(UserError, match="not a brand profile"):
        load_profile(str(tmp_path))


@pytest.fixture(scope="module")
def openmoji(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_openmoji_catalog(tmp_path_factory.mktemp("openmoji"), limit=300)


@pytest.fixture(scope="module")
def random_tiny_checkpoint(openmoji: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained `tiny` CLIP: its random image features already tell the two styles apart (checked below)."""
    import torch

    captions = read_catalog(openmoji).column("caption").to_pylist()
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("random") / "tiny", create_model("tiny").eval(),
                           train_tokenizer(captions, vocab_size=1024, context_length=32))


def test_profile_scores_its_own_style_above_another(openmoji: Path, synthetic_catalog: Path,  # noqa: F811
                                                    random_tiny_checkpoint: Path, tmp_path: Path) -> None:
    approved, candidates = tmp_path / "approved", tmp_path / "candidates"
    approved.mkdir()
    candidates.mkdir()
    for row in read_catalog(openmoji).to_pylist():  # OpenMoji train split: the brand; its val split: new on-brand work
        target = approved if row["split"] == "train" else candidates
        shutil.copy(openmoji / row["image"], target / f"emoji-{Path(row['image']).name}")
    for row in read_catalog(synthetic_catalog).to_pylist()[:60]:  # another style: shapes on textured backgrounds
        shutil.copy(synthetic_catalog / row["image"], candidates / f"shape-{Path(row['image']).name}")

    runner = CliRunner()
    built = runner.invoke(BRAND, ["build", "--model", str(random_tiny_checkpoint), "--images", str(approved),
                                  "--output", str(tmp_path / "profile")])
    assert built.exit_code == 0, built.output
    info = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert info["model"] == str(random_tiny_checkpoint) and info["heldout_images"] >= 20
    scored = runner.invoke(BRAND, ["score", "--profile", str(tmp_path / "profile"), "--images", str(candidates),
                                   "--output", str(tmp_path / "scores")])
    assert scored.exit_code == 0, scored.output
    rows = pq.read_table(tmp_path / "scores" / "scores.parquet").to_pylist()
    emoji = np.array([r["cosine"] for r in rows if r["key"].startswith("emoji")])
    shapes = np.array([r["cosine"] for r in rows if r["key"].startswith("shape")])
    auc = roc_auc(emoji, shapes)
    on_brand = {kind: np.mean([r["verdict"] == "on-brand" for r in rows if r["key"].startswith(kind)])
                for kind in ("emoji", "shape")}
    print(f"\nbrand ROC AUC (OpenMoji val vs synthetic shapes, random-init tiny): {auc:.3f}; "
          f"on-brand at the 5th percentile: emoji {on_brand['emoji']:.2f}, shapes {on_brand['shape']:.2f}")
    assert len(emoji) >= 20 and len(shapes) == 60
    assert auc > 0.8
    assert on_brand["emoji"] > 0.7 > on_brand["shape"]
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert summary["scored"] == len(rows) and summary["error"] == 0


def test_hostile_files_become_error_rows_and_the_rest_is_scored(synthetic_catalog: Path,  # noqa: F811
                                                                tiny_checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    approved, uploads = tmp_path / "approved", tmp_path / "uploads"
    approved.mkdir()
    uploads.mkdir()
    images = sorted((synthetic_catalog / "images").glob("*.png"))
    for path in images[:40]:
        shutil.copy(path, approved / path.name)
    for path in images[40:46]:
        shutil.copy(path, uploads / path.name)
    (uploads / "bomb.png").write_bytes(png_declaring(30000, 30000))  # 900 M pixels, refused by PIL's own guard too
    (uploads / "wide.png").write_bytes(png_declaring(10000, 6000))  # 60 M pixels: above our 50 M limit only
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    (uploads / "huge.png").write_bytes(buffer.getvalue())  # ~1 MB: above --max-image-bytes below
    (uploads / "notes.png").write_text("this is a text file with an image's name\n")
    (uploads / "cut.png").write_bytes(images[0].read_bytes()[:200])  # truncated PNG
    runner = CliRunner()
    built = runner.invoke(BRAND, ["build", "--model", str(tiny_checkpoint), "--images", str(approved),
                                  "--output", str(tmp_path / "profile")])
    assert built.exit_code == 0, built.output
    scored = runner.invoke(BRAND, ["score", "--profile", str(tmp_path / "profile"), "--images", str(uploads),
                                   "--output", str(tmp_path / "scores"), "--max-image-bytes", "500000"])
    assert scored.exit_code == 0, scored.output
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "scores" / "scores.parquet").to_pylist()}
    assert len(rows) == 11
    expected = {"bomb.png": "too_many_pixels", "wide.png": "too_many_pixels", "huge.png": "too_large",
                "notes.png": "not_an_image", "cut.png": "corrupt_image"}
    for key, reason in expected.items():
        assert rows[key]["verdict"] == "error" and rows[key]["error"].startswith(reason), rows[key]
        assert rows[key]["cosine"] is None
    good = [r for k, r in rows.items() if k not in expected]
    assert len(good) == 6 and all(r["verdict"] in ("on-brand", "off-brand") and r["error"] is None for r in good)
    assert all(-1 <= r["cosine"] <= 1 and 0 <= r["percentile"] <= 100 for r in good)
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert summary["error"] == 5 and summary["scored"] == 6
    assert summary["errors_by_reason"] == {"too_many_pixels": 2, "too_large": 1, "not_an_image": 1, "corrupt_image": 1}
    assert "error" in scored.output


def test_build_needs_enough_readable_images(tiny_checkpoint: Path, synthetic_catalog: Path,  # noqa: F811
                                            tmp_path: Path) -> None:
    for path in sorted((synthetic_catalog / "images").glob("*.png"))[:3]:
        shutil.copy(path, tmp_path / path.name)
    result = CliRunner().invoke(BRAND, ["build", "--model", str(tiny_checkpoint), "--images", str(tmp_path),
                                        "--output", str(tmp_path / "profile")])
    assert isinstance(result.exception, UserError) and "at least 10" in str(result.exception)
