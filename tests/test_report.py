"""Tests of the HTML reports: self-contained (plots as PNG data URIs) and rendered by headless Chromium.

The Chromium tests need the Debian package: `apt-get update && apt-get install -y chromium` (binary /usr/bin/chromium).
Without it they are skipped with that reason.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from evaluation.evaluate import retrieval_metrics, zero_shot_metrics
from evaluation.brand import BrandProfile, roc_auc, roc_curve
from evaluation.report import brand_report, evaluation_report, format_evaluation, search_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: "
                                    "apt-get update && apt-get install -y chromium")
DATA_URI = re.compile(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
# colours the plots are drawn in (matplotlib's tab10 and viridis' ends)
RETRIEVAL_BLUE, RETRIEVAL_ORANGE, ZERO_SHOT_GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)
VIRIDIS_DARK = (68, 1, 84)


def evaluation_metrics() -> dict:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(120, 16)).astype(np.float32)
    texts = images + rng.normal(scale=1.0, size=images.shape).astype(np.float32)
    classes = rng.normal(size=(6, 16)).astype(np.float32)
    labels = (images @ classes.T + rng.normal(scale=2.0, size=(120, 6))).argmax(axis=1)
    names = ["animals", "food", "flags", "objects", "people", "symbols"]
    return {"model": "checkpoints/tiny", "data": "shards/val", "num_images": 120, "num_errors": 1,
            "errors": {"corrupt": 1},
            "zero_shot": {"label_field": "group", "templates": ["a photo of a {}."],
                          **zero_shot_metrics(images, labels, classes, names)},
            "retrieval": retrieval_metrics(images, texts)}


def thumbnail(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def screenshot(html_path: Path, tmp_path: Path) -> np.ndarray:
    """Render `html_path` in headless Chromium at 1200x2000 and return the screenshot as an (H, W, 3) array."""
    png = tmp_path / f"{html_path.stem}.png"
    profile = tmp_path / f"chromium-profile-{html_path.stem}"  # a fresh profile: no state shared between runs
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,2000",
                    f"file://{html_path}"], check=True, capture_output=True, timeout=120)
    assert png.exists(), "chromium wrote no screenshot"
    return np.asarray(Image.open(png).convert("RGB"))


def pixels_near(image: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12) -> int:
    return int((np.abs(image.astype(int) - np.array(colour)).max(axis=-1) <= tolerance).sum())


def test_evaluation_report_is_self_contained_with_every_plot(tmp_path: Path) -> None:
    html = evaluation_report(evaluation_metrics())
    uris = DATA_URI.findall(html)
    assert len(uris) == 3  # recall@k bars, zero-shot bars, confusion matrix
    for uri in uris:
        with Image.open(io.BytesIO(base64.b64decode(uri))) as plot:
            assert plot.format == "PNG" and plot.width > 300
    assert 'alt="confusion matrix"' in html and 'alt="recall at k"' in html
    assert "src=\"http" not in html and "<script" not in html  # nothing fetched when opened offline


def test_console_summary_puts_chance_and_the_majority_baseline_beside_every_metric() -> None:
    metrics = evaluation_metrics()
    text = format_evaluation(metrics)
    assert text.splitlines()[3].split()[-2:] == ["chance", "majority"]
    acc = next(line for line in text.splitlines() if line.startswith("zero-shot acc@1"))
    assert acc.split()[-2:] == [f"{1 / 6:.4f}", f"{metrics['zero_shot']['majority']['acc@1']:.4f}"]
    balanced = next(line for line in text.splitlines() if line.startswith("zero-shot balanced accuracy"))
    assert balanced.split()[-2:] == [f"{1 / 6:.4f}", f"{1 / 6:.4f}"]
    recall = next(line for line in text.splitlines() if line.startswith("text to image R@10"))
    assert recall.split()[-1] == f"{10 / 120:.4f}"


@needs_chromium
def test_evaluation_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    path.write_text(evaluation_report(evaluation_metrics()), encoding="utf-8")
    image = screenshot(path, tmp_path)
    assert image.shape[:2] == (2000, 1200)
    non_white = (image < 240).any(axis=-1)
    assert non_white.mean() > 0.05, "the page rendered (almost) blank"
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    assert colours > 500, f"only {colours} distinct colours: plots missing?"
    # each plot's own colours are on screen: recall bars (blue, orange), accuracy bars (green), confusion matrix
    for name, colour in (("recall@k bars", RETRIEVAL_BLUE), ("recall@k bars", RETRIEVAL_ORANGE),
                         ("zero-shot bars", ZERO_SHOT_GREEN), ("confusion matrix", VIRIDIS_DARK)):
        assert pixels_near(image, colour) > 300, f"{name} not visible in the screenshot"
    # the confusion matrix is the lower half's big coloured block: many colours there
    lower = image[1000:]
    assert len(np.unique(lower.reshape(-1, 3), axis=0)) > 200


def brand_profile() -> BrandProfile:
    rng = np.random.default_rng(0)
    approved, references = np.clip(rng.normal(0.8, 0.1, 60), 0, 1), np.clip(rng.normal(0.2, 0.15, 90), 0, 1)
    fpr, tpr, _ = roc_curve(approved, references)
    info = {"approved_images": 300, "reference_images": 450, "references": "competitors/", "features": "both",
            "style_blocks": [0, 1], "guidelines": ["flat pastel"], "auc": roc_auc(approved, references), "min_auc": 0.8,
            "warning": None, "roc": {"false_accept_rate": fpr.tolist(), "true_accept_rate": tpr.tolist()},
            "calibration_error_heldout": 0.03, "threshold": 0.5, "target_false_accept_rate": 0.05,
            "heldout_false_accept_rate": 0.04, "expected_false_reject_rate": 0.1, "heldout_approved": 60,
            "heldout_references": 90}
    return BrandProfile(np.zeros(4), np.ones(4), np.zeros(4), 0.0, (1.0, 0.0), None, approved, references,
                        pa.table({"key": ["a"]}), info)


@needs_chromium
def test_brand_and_search_reports_render_thumbnails_roc_and_histograms(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scored = np.clip(np.concatenate([rng.normal(0.8, 0.1, 20), rng.normal(0.2, 0.1, 20)]), 0, 1)
    rows = [{"key": f"img-{i}.png", "probability": float(p), "verdict": "on-brand" if p >= 0.5 else "off-brand",
             "error": None, "thumbnail": thumbnail((200, 30 + 5 * i, 60)), "nearest_approved": f"ok-{i}.png",
             "nearest_approved_cosine": 0.9, "nearest_approved_thumbnail": thumbnail((40, 160, 40)),
             "nearest_reference": f"other-{i}.png", "nearest_reference_cosine": 0.8,
             "nearest_reference_thumbnail": thumbnail((160, 40, 160))} for i, p in enumerate(scored)]
    rows.append({"key": "bomb.png", "probability": None, "verdict": "error",
                 "error": "decompression_bomb: declares 30000x30000", "thumbnail": None})
    summary = {"profile": "brand/profile", "model": "checkpoints/tiny", "images": "uploads", "on-brand": 20,
               "off-brand": 20, "error": 1, "threshold": 0.5}
    path = tmp_path / "brand.html"
    path.write_text(brand_report(summary, brand_profile(), scored, rows), encoding="utf-8")
    html = path.read_text()
    assert 'alt="held-out ROC curve"' in html and 'alt="score histograms"' in html and "decompression_bomb" in html
    assert len(DATA_URI.findall(html)) == 2 + 3 * 12  # ROC + histograms; 6 least and 6 most on-brand, each explained
    image = screenshot(path, tmp_path)
    assert pixels_near(image, (214, 39, 40), tolerance=20) > 20, "reference histogram or operating point missing"
    assert pixels_near(image, (200, 80, 60), tolerance=60) > 2000, "thumbnails missing"

    hits = [{"rank": r + 1, "key": f"k{r}", "score": 0.9 - r / 10, "thumbnail": thumbnail((20, 40 * r, 200))}
            for r in range(5)]
    path = tmp_path / "search.html"
    path.write_text(search_report("lib.parquet", [{"query": "a blue star", "hits": hits}]), encoding="utf-8")
    image = screenshot(path, tmp_path)
    assert pixels_near(image, (20, 80, 200), tolerance=50) > 5 * 100 * 100 * 0.5, "search thumbnails missing"
