"""Tests of brand profiles: calibration within a stated error, the threshold at the requested false-accept rate, style
separation of two emoji vendors (ROC AUC), the low-AUC warning, and hostile inputs that must become error rows."""

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

from pipeline.catalog import build_fluent_catalog, build_openmoji_catalog, read_catalog
from pipeline.errors import UserError
from evaluation.brand import (calibration_error, fit_scorer, load_profile, platt_scaling, roc_auc, roc_curve, sigmoid,
                            threshold_at_false_accept)
from training.checkpoint import save_checkpoint
from evaluation.cli import commands
from training.model import create_model
from training.tokenizer import train_tokenizer
from tests.test_evaluate import synthetic_catalog, tiny_checkpoint  # noqa: F401 - shared fixtures

BRAND = next(c for c in commands if c.name == "brand")


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, followed by a few bytes of data (a bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def test_roc_auc_and_curve() -> None:
    assert roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([1.0]), np.array([1.0])) == 0.5
    assert roc_auc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5
    fpr, tpr, _ = roc_curve(np.array([0.9, 0.8, 0.3]), np.array([0.7, 0.2]))
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(np.array([0.9, 0.8, 0.3]), np.array([0.7, 0.2])))


def two_classes(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """40% positives, 20-d Gaussians whose means differ by 0.35 per dimension: overlapping (AUC ~0.9)."""
    labels = (rng.random(count) < 0.4).astype(np.float64)
    return rng.normal(size=(count, 20)) + 0.35 * labels[:, None], labels


def test_held_out_probabilities_are_calibrated_within_three_points() -> None:
    # The build's own steps: scorer on the fit part, Platt on the held-out part; then new data from the same mix.
    rng = np.random.default_rng(0)
    x, y = two_classes(rng, 3000)
    fit = np.arange(3000) % 5 != 0
    mean, scale, weights, bias, _ = fit_scorer(x[fit], y[fit], [str(i) for i in np.flatnonzero(fit)], seed=0)

    def logits(features: np.ndarray) -> np.ndarray:
        return ((features - mean) / scale) @ weights + bias

    a, b = platt_scaling(logits(x[~fit]), y[~fit])
    new_x, new_y = two_classes(rng, 20000)
    calibrated = sigmoid(a * logits(new_x) + b)
    raw = sigmoid(logits(new_x))  # the class-balanced scorer before calibration: it assumes a 50/50 mix
    error, raw_error = calibration_error(calibrated, new_y), calibration_error(raw, new_y)
    print(f"\nexpected calibration error on new data: {error:.4f} calibrated, {raw_error:.4f} raw")
    assert error < 0.03 < raw_error
    assert roc_auc(calibrated[new_y == 1], calibrated[new_y == 0]) > 0.85


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2])
def test_threshold_accepts_at_most_the_requested_share_of_references(rate: float) -> None:
    rng = np.random.default_rng(1)
    approved, references = rng.normal(1.0, 1.0, 500), rng.normal(-1.0, 1.0, 2000)
    threshold, false_accept, false_reject = threshold_at_false_accept(approved, references, rate)
    assert false_accept == (references >= threshold).mean() <= rate
    assert (references >= references[references < threshold].max()).mean() > rate  # the lowest such threshold
    assert false_reject == (approved < threshold).mean()
    fresh = rng.normal(-1.0, 1.0, 50000)  # new references from the same distribution: near the requested rate
    assert abs((fresh >= threshold).mean() - rate) < 3 * np.sqrt(rate * (1 - rate) / len(references)) + 1 / 2000
    assert threshold_at_false_accept(approved, references, 0.0)[1] == 0.0


@pytest.fixture(scope="module")
def vendors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """The first 300 emoji of both bundled vendors as image folders, by vendor and split."""
    root = tmp_path_factory.mktemp("vendors")
    folders: dict[str, dict[str, Path]] = {}
    for vendor, build in (("openmoji", build_openmoji_catalog), ("fluent", build_fluent_catalog)):
        catalog = build(root / f"{vendor}-catalog", limit=300)
        for row in read_catalog(catalog).to_pylist():
            folder = folders.setdefault(vendor, {}).setdefault(row["split"], root / vendor / row["split"])
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(catalog / row["image"], folder / f"{vendor}-{Path(row['image']).name}")
    return folders


@pytest.fixture(scope="module")
def random_tiny_checkpoint(vendors: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained `tiny` CLIP: its random early-block features already carry line and palette."""
    import torch

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("random") / "tiny", create_model("tiny").eval(),
                           train_tokenizer(["a flat emoji", "a drawing"], vocab_size=1024, context_length=32))


def test_profile_tells_one_vendor_from_another_and_explains_its_scores(vendors: dict[str, dict[str, Path]],
                                                                       random_tiny_checkpoint: Path,
                                                                       tmp_path: Path) -> None:
    runner = CliRunner()
    built = runner.invoke(BRAND, ["build", "--model", str(random_tiny_checkpoint),
                                  "--images", str(vendors["openmoji"]["train"]),
                                  "--references", str(vendors["fluent"]["train"]), "--output", str(tmp_path / "profile"),
                                  "--guidelines", "a flat emoji with a thin black outline",
                                  "--target-false-accept-rate", "0.1"])
    assert built.exit_code == 0, built.output
    assert "ROC AUC" in built.output and "WARNING" not in built.output
    info = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert info["auc"] > 0.9 and info["heldout_references"] >= 20 and info["heldout_approved"] >= 20
    assert info["heldout_false_accept_rate"] <= 0.1 and 0 <= info["expected_false_reject_rate"] < 0.5
    assert info["feature_count"] == 64 + 2 * 2 * 64 + 1  # embedding, two blocks' mean and std, guideline cosine
    assert (tmp_path / "profile" / "report.html").is_file()

    candidates = tmp_path / "candidates"
    for vendor in ("openmoji", "fluent"):  # emoji the profile never saw, in both styles
        shutil.copytree(vendors[vendor]["val"], candidates, dirs_exist_ok=True)
    scored = runner.invoke(BRAND, ["score", "--profile", str(tmp_path / "profile"), "--images", str(candidates),
                                   "--output", str(tmp_path / "scores")])
    assert scored.exit_code == 0, scored.output
    rows = pq.read_table(tmp_path / "scores" / "scores.parquet").to_pylist()
    probability = {v: np.array([r["probability"] for r in rows if r["key"].startswith(v)]) for v in ("openmoji", "fluent")}
    auc = roc_auc(probability["openmoji"], probability["fluent"])
    print(f"\nOpenMoji vs Fluent on unseen emoji, random-init tiny: held-out AUC {info['auc']:.3f}, new AUC {auc:.3f}")
    assert auc > 0.9
    assert all(0 <= r["probability"] <= 1 and -1 <= r["guideline_cosine"] <= 1 for r in rows)
    for row in rows:  # each score names its nearest approved (OpenMoji) and nearest off-brand (Fluent) example
        assert row["nearest_approved"].startswith("openmoji-") and row["nearest_reference"].startswith("fluent-")
        assert row["nearest_approved_thumbnail"] and row["nearest_reference_thumbnail"]
    report = (tmp_path / "scores" / "report.html").read_text()
    assert 'alt="held-out ROC curve"' in report and 'alt="score histograms"' in report
    assert "nearest off-brand" in report and "expected false-reject rate" in report


def test_low_auc_profile_is_written_with_a_loud_warning(vendors: dict[str, dict[str, Path]],
                                                        random_tiny_checkpoint: Path, tmp_path: Path) -> None:
    # References in the brand's own style: nothing to tell apart, the held-out AUC is near a coin toss.
    approved, references = tmp_path / "approved", tmp_path / "references"
    for index, path in enumerate(sorted(vendors["openmoji"]["train"].glob("*.png"))):
        target = approved if index % 2 else references
        target.mkdir(exist_ok=True)
        shutil.copy(path, target / path.name)
    built = CliRunner().invoke(BRAND, ["build", "--model", str(random_tiny_checkpoint), "--images", str(approved),
                                       "--references", str(references), "--output", str(tmp_path / "profile"),
                                       "--min-auc", "0.8"])
    assert built.exit_code == 0, built.output  # written anyway: the user decides
    info = load_profile(str(tmp_path / "profile")).info
    assert info["auc"] < 0.8 and "under the floor 0.8" in info["warning"]
    assert "WARNING: held-out ROC AUC" in built.output
    assert "under the floor" in (tmp_path / "profile" / "report.html").read_text()


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
    expected = {"bomb.png": "decompression_bomb", "wide.png": "decompression_bomb", "huge.png": "too_large",
                "notes.png": "not_an_image", "cut.png": "truncated"}
    for key, reason in expected.items():
        assert rows[key]["verdict"] == "error" and rows[key]["error"].startswith(reason), rows[key]
        assert rows[key]["probability"] is None and rows[key]["nearest_approved"] is None
    good = [r for k, r in rows.items() if k not in expected]
    assert len(good) == 6 and all(r["verdict"] in ("on-brand", "off-brand") and r["error"] is None for r in good)
    assert all(0 <= r["probability"] <= 1 and r["nearest_approved"] for r in good)
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert summary["error"] == 5 and summary["scored"] == 6
    assert summary["errors_by_reason"] == {"decompression_bomb": 2, "too_large": 1, "not_an_image": 1, "truncated": 1}
    assert "error" in scored.output


def test_build_needs_enough_readable_images(tiny_checkpoint: Path, synthetic_catalog: Path,  # noqa: F811
                                            tmp_path: Path) -> None:
    for path in sorted((synthetic_catalog / "images").glob("*.png"))[:3]:
        shutil.copy(path, tmp_path / path.name)
    result = CliRunner().invoke(BRAND, ["build", "--model", str(tiny_checkpoint), "--images", str(tmp_path),
                                        "--output", str(tmp_path / "profile")])
    assert isinstance(result.exception, UserError) and "at least 10" in str(result.exception)


@pytest.mark.slow
def test_build_and_score_on_object_storage_as_on_a_local_folder(synthetic_catalog: Path,  # noqa: F811
                                                                 tiny_checkpoint: Path, tmp_path: Path,  # noqa: F811
                                                                 s3_env: str) -> None:
    """Approved images, profile, uploads and scores all under an S3 prefix (SeaweedFS, keys from the AWS variables)
    give the scores the same images give in local folders."""
    from evaluation.brand import read_scores
    from pipeline import storage

    fs, prefix = storage.filesystem(s3_env)
    images = sorted((synthetic_catalog / "images").glob("*.png"))
    for folder, chosen in (("approved", images[:40]), ("uploads", images[40:46])):
        (tmp_path / folder).mkdir()
        for path in chosen:
            shutil.copy(path, tmp_path / folder / path.name)
            fs.put_file(str(path), f"{prefix}/{folder}/{path.name}")
    (tmp_path / "uploads" / "notes.png").write_text("a text file with an image's name\n")
    fs.put_file(str(tmp_path / "uploads" / "notes.png"), f"{prefix}/uploads/notes.png")

    runner, scores = CliRunner(), {}
    for root in (str(tmp_path), s3_env):
        profile = storage.join(root, "profile")
        built = runner.invoke(BRAND, ["build", "--model", str(tiny_checkpoint), "--images",
                                      storage.join(root, "approved"), "--output", profile])
        assert built.exit_code == 0, built.output
        scored = runner.invoke(BRAND, ["score", "--profile", profile, "--images", storage.join(root, "uploads"),
                                       "--output", storage.join(root, "scores")])
        assert scored.exit_code == 0, scored.output
        scores[root] = {r["key"]: r for r in read_scores(storage.join(root, "scores")).to_pylist()}
    local, remote = scores[str(tmp_path)], scores[s3_env]
    assert sorted(remote) == sorted(local) and len(local) == 7
    assert remote["notes.png"]["error"].startswith("not_an_image")
    for key, row in local.items():
        assert remote[key]["verdict"] == row["verdict"]
        assert remote[key]["probability"] == pytest.approx(row["probability"], abs=1e-6)
    assert fs.exists(f"{prefix}/profile/report.html") and fs.exists(f"{prefix}/scores/report.html")
