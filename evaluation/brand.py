"""Brand alignment: is an image drawn the brand's way, not just "does it show the same kind of thing"?

A content-trained embedding is built to ignore style: two vendors' drawings of the same emoji land close together,
so a centroid of approved embeddings cannot tell them apart (held-out ROC AUC 0.44 in issue 14). A profile here is
*discriminative*:

1. **Two sets.** Approved images (the brand) and off-brand references: the user's own (`references`), or, when none
   are given, a generic set made at build time (`generic_references`): the approved images themselves redrawn in
   other styles (hue, palette, line weight, blur, texture) plus procedurally drawn shapes. It ships no other
   vendor's artwork, and it only teaches "not these variations": real competitors' images are better references.
2. **Features** (`features`): the image embedding, and/or style statistics of the image tower's early blocks (mean
   and standard deviation of each channel over the patch tokens: line, palette and texture, not content), read
   through forward hooks (`evaluation.embed.capture_blocks`); plus, with text `guidelines`, each image's zero-shot
   cosine to them, as one more input whose weight is learned with the rest.
3. **Scorer**: L2-regularised logistic regression (standardised features, classes weighted equally, the penalty
   chosen on an inner split of the fit part), fitted on the fit part of both sets (a stable hash of each key holds
   `holdout_fraction` out).
4. **Calibration** on the held-out part: Platt scaling of the scorer's logit into a probability of "approved"
   (under the held-out mix of approved and references). The held-out ROC curve and AUC say whether the profile
   can tell the brand apart; under `min_auc` it is written with a loud warning.
5. **Threshold** at `target_false_accept_rate`: the lowest probability at which at most that share of held-out
   references is accepted; the expected false-reject rate (held-out approved images below it) is reported.

`score_images` gives each image its probability, verdict (`on-brand`, `off-brand`, or `error` when it could not be
read: untrusted files are checked before decoding and the batch goes on), its guideline cosine, and its nearest
approved and nearest off-brand examples (the explanation; thumbnails in the report). A profile is a directory:
`profile.json` (settings, AUC, ROC, threshold, rates), `scorer.npz` (standardisation, weights, Platt, held-out
probabilities, guideline embedding) and `examples.parquet` (embeddings and thumbnails of both sets).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from pydantic import Field

from pipeline import storage
from pipeline.catalog import COLOURS, SHAPES, TEXTURES, draw_synthetic_image
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.storage import StorageConfig
from pipeline.tables import read_table
from training.device import DeviceSetting, PrecisionSetting, announce, resolve_precision
from pipeline.sources import iter_samples
from evaluation.embed import (embed_location, encode_texts, error_counts, error_rows,
                            valid_rows, vectors, write_table)

PROFILE_FILE, SCORER_FILE, EXAMPLES_FILE = "profile.json", "scorer.npz", "examples.parquet"
ON_BRAND, OFF_BRAND, ERROR = "on-brand", "off-brand", "error"
APPROVED, REFERENCE = "approved", "reference"
Features = Literal["embedding", "style", "both"]
PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)  # L2 strengths tried on the inner split (on standardised features)


class _ImageOptions(Config):
    batch_size: int = Field(128, gt=0)
    """Images per forward pass."""
    device: DeviceSetting = "auto"
    """auto: a CUDA GPU when one is visible, else the CPU; cpu or cuda force it."""
    precision: PrecisionSetting = "auto"
    """auto: bf16 autocast where the hardware runs bf16 natively (CUDA with bf16, CPUs with AMX or AVX-512 BF16), else
    fp32; bf16 or fp32 force it."""
    image_column: str = "image"
    """Column of an image list that holds each image's location."""
    max_image_bytes: int = Field(20_000_000, gt=0)
    """Files larger than this many bytes become error rows (`too_large`) without being decoded."""
    max_image_pixels: int = Field(50_000_000, gt=0)
    """Images declaring more than width x height pixels become error rows before decoding (decompression bombs)."""
    storage: StorageConfig = StorageConfig()
    """How to reach object storage for s3:// locations."""


class BrandBuildConfig(_ImageOptions):
    """Build a discriminative brand profile from approved images and off-brand references."""

    model: str
    """Checkpoint location (folder or s3://...) whose image tower embeds the images; recorded in the profile."""
    images: str
    """Approved images: a folder or s3:// prefix of image files, an image list, or an ingested dataset."""
    output: str
    """Profile directory to write (profile.json, scorer.npz, examples.parquet, report.html), local or s3://."""
    references: str | None = None
    """Off-brand images (competitors, other styles), in any form `images` takes. Empty: a generic set made from
    the approved images redrawn in other styles plus drawn shapes (weaker than real references)."""
    guidelines: list[str] = []
    """Optional brand guidelines as text ("flat pastel illustration with a thick dark outline"); each image's
    zero-shot cosine to them becomes one more input of the scorer."""
    features: Features = "both"
    """What the scorer reads: the image embedding, the style statistics of early blocks, or both."""
    style_blocks: tuple[int, ...] = (0, 1)
    """Image-tower blocks (0 = first) whose token statistics are the style features."""
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of each set held out of the scorer's fit, to calibrate it and measure its ROC."""
    seed: int = 0
    """Seed of the fit / held-out split (the split hashes each image key with it, so it is stable)."""
    min_images: int = Field(10, ge=2)
    """Fewer readable approved (or reference) images than this is an error: the calibration would be meaningless."""
    target_false_accept_rate: float = Field(0.05, ge=0, le=1)
    """The threshold accepts at most this share of held-out off-brand references."""
    min_auc: float = Field(0.8, ge=0, le=1)
    """A held-out ROC AUC under this means the profile cannot tell the brand apart: it is written with a warning."""


class BrandScoreConfig(_ImageOptions):
    """Score images against a brand profile."""

    profile: str
    """Profile directory written by `clipforge brand build`."""
    images: str
    """Images to score: a folder or s3:// prefix of image files, an image list, or an ingested dataset."""
    output: str
    """Folder (or s3:// prefix) for scores.parquet, summary.json and report.html."""
    threshold: float | None = Field(None, ge=0, le=1)
    """An image is on-brand when its calibrated probability is at least this. Empty: the profile's threshold (set
    at its target false-accept rate)."""
    model: str | None = None
    """Checkpoint to embed with. Empty: the one recorded in the profile (it must be the same model)."""
    report: bool = True
    """Write report.html (ROC, score histograms, operating point, explanations) beside the scores."""


# ---------------------------------------------------------------------------------------------------------------------
# 1. The maths: logistic regression, Platt scaling, ROC, the operating point


def is_held_out(key: str, fraction: float, seed: int) -> bool:
    """Deterministic split: the key's hash, read as a number in [0, 1), falls below `fraction`."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def fit_logistic(x: np.ndarray, y: np.ndarray, penalty: float, balanced: bool = True) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by L-BFGS: (N, F) features, (N,) 0/1 labels -> (weights (F,), bias).

    Minimises mean weighted log loss + penalty / 2 x |w|^2 (the bias is not penalised); `balanced` weights each
    class to half the total, so a large reference set does not drown a small brand.
    """
    features, labels = torch.from_numpy(x).double(), torch.from_numpy(y).double()
    weights = torch.ones_like(labels)
    if balanced:
        positives = labels.sum().clamp(min=1)
        weights = torch.where(labels > 0, 0.5 / positives, 0.5 / (len(labels) - positives).clamp(min=1)) * len(labels)
    w = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    # 200 iterations reach the optimum to ~1e-6 here; near-separable sets with a weak penalty would creep on for long
    optimiser = torch.optim.LBFGS([w, b], max_iter=200, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = features @ w + b  # (N,)
        loss = (weights * torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")).mean()
        loss = loss + 0.5 * penalty * (w @ w)
        loss.backward()
        return loss

    optimiser.step(closure)
    return w.detach().numpy(), float(b.detach())


def platt_scaling(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Platt (1999): p = sigmoid(a x logit + b) fitted on held-out logits, with his smoothed targets."""
    positives, negatives = labels.sum(), len(labels) - labels.sum()
    targets = np.where(labels > 0, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    a, b = fit_logistic(logits[:, None], targets, penalty=0.0, balanced=False)
    return float(a[0]), b


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(x, -60, 60)))


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting one half (the Mann-Whitney form of the ROC AUC)."""
    if not len(positive) or not len(negative):
        return float("nan")
    negative = np.sort(negative)
    below = np.searchsorted(negative, positive, side="left")  # (P,) negatives strictly below each positive
    at_or_below = np.searchsorted(negative, positive, side="right")
    return float((below + 0.5 * (at_or_below - below)).sum() / (len(positive) * len(negative)))


def roc_curve(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-accept rate, true-accept rate, threshold) at every distinct score, accepting score >= threshold."""
    thresholds = np.r_[np.inf, np.unique(np.concatenate([positive, negative]))[::-1]]
    fpr = np.array([(negative >= t).mean() for t in thresholds])
    tpr = np.array([(positive >= t).mean() for t in thresholds])
    return fpr, tpr, thresholds


def threshold_at_false_accept(approved: np.ndarray, references: np.ndarray, rate: float) -> tuple[float, float, float]:
    """The lowest threshold accepting at most `rate` of `references` -> (threshold, its false-accept rate on them,
    the false-reject rate on `approved`). Scores at or above the threshold are accepted."""
    candidates = np.unique(np.concatenate([approved, references, [1.0 + 1e-9]]))
    for threshold in candidates:  # ascending: the first that satisfies the rate rejects the fewest approved
        false_accept = float((references >= threshold).mean()) if len(references) else 0.0
        if false_accept <= rate:
            return float(threshold), false_accept, float((approved < threshold).mean())
    raise AssertionError("unreachable: the last candidate accepts nothing")


def calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the mean |predicted - observed| over equal-width probability bins, by count."""
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            error += inside.mean() * abs(probabilities[inside].mean() - labels[inside].mean())
    return float(error)


# ---------------------------------------------------------------------------------------------------------------------
# 2. The profile


@dataclass(frozen=True)
class BrandProfile:
    mean: np.ndarray
    """(F,) feature means of the fit images (standardisation)."""
    scale: np.ndarray
    """(F,) feature standard deviations of the fit images."""
    weights: np.ndarray
    """(F,) logistic-regression weights on standardised features."""
    bias: float
    platt: tuple[float, float]
    """(a, b): probability = sigmoid(a x logit + b)."""
    guideline_embedding: np.ndarray | None
    """(D,) unit mean of the guideline texts' embeddings, or None without guidelines."""
    heldout_approved: np.ndarray
    """(H1,) calibrated probabilities of the held-out approved images (histograms, ROC)."""
    heldout_references: np.ndarray
    """(H0,) calibrated probabilities of the held-out references."""
    examples: pa.Table
    """Both sets: key, kind (approved / reference), embedding, thumbnail: the explanations' nearest examples."""
    info: dict[str, Any]
    """Settings, counts, AUC, ROC, threshold and rates (profile.json)."""

    @property
    def model(self) -> str:
        return self.info["model"]

    @property
    def threshold(self) -> float:
        return self.info["threshold"]

    def probability(self, features: np.ndarray) -> np.ndarray:
        """(N, F) raw features -> (N,) calibrated probability that the image is on-brand."""
        logits = ((features - self.mean) / self.scale) @ self.weights + self.bias
        return sigmoid(self.platt[0] * logits + self.platt[1])


def image_features(table: pa.Table, features: Features, guideline_embedding: np.ndarray | None) -> np.ndarray:
    """(N, F) scorer inputs of an embedding table's valid rows: embedding and/or style, then the guideline cosine."""
    embedding = vectors(table)
    parts = []
    if features in ("embedding", "both"):
        parts.append(embedding)
    if features in ("style", "both"):
        parts.append(vectors(table, "style"))
    if guideline_embedding is not None:
        parts.append(embedding @ guideline_embedding[:, None])  # (N, 1) zero-shot cosine to the guidelines
    return np.concatenate(parts, axis=1).astype(np.float64)


def fit_scorer(x: np.ndarray, y: np.ndarray, keys: list[str], seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                                  np.ndarray, float, float]:
    """Standardise, choose the L2 penalty on an inner 75/25 split by balanced log loss, refit on everything.

    Returns (mean, scale, weights, bias, penalty).
    """
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / scale
    inner = np.array([is_held_out(k, 0.25, seed + 1) for k in keys])
    best, penalty = np.inf, PENALTIES[-1]
    if inner.any() and (~inner).any() and len(set(y[inner])) == 2 and len(set(y[~inner])) == 2:
        for candidate in PENALTIES:
            w, b = fit_logistic(z[~inner], y[~inner], candidate)
            p = np.clip(sigmoid(z[inner] @ w + b), 1e-9, 1 - 1e-9)
            loss = -0.5 * (np.log(p[y[inner] == 1]).mean() + np.log(1 - p[y[inner] == 0]).mean())
            if loss < best:
                best, penalty = loss, candidate
    w, b = fit_logistic(z, y, penalty)
    return mean, scale, w, b, penalty


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _save_bytes(location: str, name: str, data: bytes, config: StorageConfig | None) -> None:
    target = storage.join(location, name)
    fs, path = storage.filesystem(target, config)
    with storage.storage_errors(target, config), fs.open(path, "wb") as file:
        file.write(data)


def save_profile(profile: BrandProfile, location: str, config: StorageConfig | None = None) -> str:
    guideline = profile.guideline_embedding if profile.guideline_embedding is not None else np.zeros(0, np.float32)
    _save_bytes(location, SCORER_FILE, _npz(
        mean=profile.mean, scale=profile.scale, weights=profile.weights, bias=np.array(profile.bias),
        platt=np.array(profile.platt), guideline_embedding=guideline, heldout_approved=profile.heldout_approved,
        heldout_references=profile.heldout_references), config)
    write_table(profile.examples, storage.join(location, EXAMPLES_FILE), config)
    _save_bytes(location, PROFILE_FILE, json.dumps(profile.info, indent=2).encode(), config)  # last: present = complete
    return location


def load_profile(location: str, config: StorageConfig | None = None) -> BrandProfile:
    fs, path = storage.filesystem(location, config)

    def read(name: str) -> bytes:
        with storage.storage_errors(location, config):
            try:
                return fs.cat_file(f"{path.rstrip('/')}/{name}")
            except FileNotFoundError:
                raise UserError(f"{location} is not a brand profile of this version (missing {name}); "
                                "build one with `clipforge brand build`") from None

    info = json.loads(read(PROFILE_FILE))
    arrays = np.load(io.BytesIO(read(SCORER_FILE)))
    guideline = arrays["guideline_embedding"]
    return BrandProfile(arrays["mean"], arrays["scale"], arrays["weights"], float(arrays["bias"]),
                        tuple(float(v) for v in arrays["platt"]), guideline if len(guideline) else None,
                        arrays["heldout_approved"], arrays["heldout_references"],
                        read_table(storage.join(location, EXAMPLES_FILE), config, "brand profile examples"), info)


# ---------------------------------------------------------------------------------------------------------------------
# 3. The generic references: the approved images redrawn in other styles, and drawn shapes


def _restyle(image: Image.Image, style: int, rng: random.Random) -> Image.Image:
    """One of six redrawings that keep the content and change the style."""
    image = image.convert("RGB")
    if style == 0:  # another palette: rotate the hue
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(int) + rng.randint(40, 215)) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")
    if style == 1:  # poster colours: few levels, oversaturated
        return ImageEnhance.Color(ImageOps.posterize(image, rng.choice((2, 3)))).enhance(1.8)
    if style == 2:  # heavier dark lines
        return image.filter(ImageFilter.MinFilter(3))
    if style == 3:  # soft, painterly edges
        return image.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.0)))
    if style == 4:  # muted, pastel
        return ImageEnhance.Contrast(ImageEnhance.Color(image).enhance(0.35)).enhance(0.7)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 18, (image.height, image.width, 1))  # texture
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def generic_references(images: str, folder: Path, seed: int, config: StorageConfig | None = None,
                       image_column: str = "image", max_image_bytes: int | None = None, shapes: int = 200) -> Path:
    """Write the generic off-brand set into `folder`: each readable approved image redrawn in one other style
    (hue, palette, line weight, blur, muted colours, texture; chosen by a hash of its key), and `shapes` drawn
    shapes on textured backgrounds. Same inputs and seed, same set."""
    folder.mkdir(parents=True, exist_ok=True)
    size = 64
    for index, sample in enumerate(iter_samples(images, config, image_column, max_image_bytes)):
        if sample.error or sample.data is None:
            continue
        try:
            with Image.open(io.BytesIO(sample.data)) as image:
                image.load()
                kind = image.format
                size = max(image.size)
        except Exception:  # noqa: BLE001 - unreadable approved images are counted by the build, not here
            continue
        rng = random.Random(f"{seed}:{sample.key}")
        restyled = _restyle(image, rng.randrange(6), rng)
        # the approved images' own format, so compression artefacts are no cue
        if kind == "JPEG":
            restyled.save(folder / f"restyled-{index:06d}.jpg", quality=95)
        else:
            restyled.save(folder / f"restyled-{index:06d}.png")
    rng = random.Random(seed)
    for index in range(shapes):
        colour, background = rng.sample(list(COLOURS), 2)
        drawn = draw_synthetic_image(rng.choice(SHAPES), colour, rng.choice(TEXTURES), background, min(size, 256), rng)
        drawn.save(folder / f"shape-{index:06d}.png")
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# 4. Build and score


def _guideline_embedding(model: Any, tokenizer: Any, guidelines: list[str], precision: PrecisionSetting) -> np.ndarray | None:
    if not guidelines:
        return None
    mean = encode_texts(model, tokenizer, list(guidelines), precision=precision).mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


def _embed(model: Any, location: str, config: _ImageOptions, model_location: str, style_blocks: tuple[int, ...],
           progress: bool, thumbnail_size: int = 48) -> pa.Table:
    return embed_location(model, location, model_location, config.storage, config.image_column, config.batch_size,
                          config.precision, thumbnail_size=thumbnail_size, max_image_bytes=config.max_image_bytes,
                          max_image_pixels=config.max_image_pixels, progress=progress, style_blocks=style_blocks)


def build_profile(config: BrandBuildConfig, progress: bool = True) -> BrandProfile:
    """`clipforge brand build`: embed both sets, fit the scorer, calibrate and measure it on held-out images, save."""
    from training.checkpoint import load_model

    model, tokenizer = load_model(config.model, config.storage,
                                  announce("brand build", config.device, config.precision)[0])
    if any(not 0 <= b < model.config.vision_layers for b in config.style_blocks):
        raise UserError(f"style blocks {list(config.style_blocks)} outside the image tower's "
                        f"{model.config.vision_layers} blocks (0 to {model.config.vision_layers - 1})")
    blocks = config.style_blocks if config.features != "embedding" else ()
    approved = _embed(model, config.images, config, config.model, blocks, progress)
    with tempfile.TemporaryDirectory(prefix="clipforge-references-") as scratch:
        references_location = config.references or str(generic_references(
            config.images, Path(scratch), config.seed, config.storage, config.image_column, config.max_image_bytes))
        references = _embed(model, references_location, config, config.model, blocks, progress)
    unreadable = {APPROVED: error_rows(approved).num_rows, REFERENCE: error_rows(references).num_rows}
    approved, references = valid_rows(approved), valid_rows(references)
    for kind, table, location in ((APPROVED, approved, config.images), (REFERENCE, references, references_location)):
        if table.num_rows < config.min_images:
            raise UserError(f"only {table.num_rows} readable {kind} images in {location} "
                            f"({unreadable[kind]} errors); a profile needs at least {config.min_images} of each")

    guideline = _guideline_embedding(model, tokenizer, config.guidelines, config.precision)
    x = np.concatenate([image_features(approved, config.features, guideline),
                        image_features(references, config.features, guideline)])
    y = np.r_[np.ones(approved.num_rows), np.zeros(references.num_rows)]
    keys = [f"{APPROVED}:{k}" for k in approved.column("key").to_pylist()] + \
           [f"{REFERENCE}:{k}" for k in references.column("key").to_pylist()]
    held_out = np.array([is_held_out(k, config.holdout_fraction, config.seed) for k in keys])
    for label in (0, 1):  # tiny sets: keep at least one image of each set on each side
        members = np.flatnonzero(y == label)
        if held_out[members].all() or not held_out[members].any():
            held_out[members] = False
            held_out[members[:: max(2, round(1 / config.holdout_fraction))]] = True

    fit = ~held_out
    mean, scale, weights, bias, penalty = fit_scorer(x[fit], y[fit], [k for k, f in zip(keys, fit) if f], config.seed)
    logits = ((x[held_out] - mean) / scale) @ weights + bias
    platt = platt_scaling(logits, y[held_out])
    probability = sigmoid(platt[0] * logits + platt[1])
    heldout_approved, heldout_references = probability[y[held_out] == 1], probability[y[held_out] == 0]
    auc = roc_auc(heldout_approved, heldout_references)
    threshold, false_accept, false_reject = threshold_at_false_accept(heldout_approved, heldout_references,
                                                                      config.target_false_accept_rate)
    fpr, tpr, _ = roc_curve(heldout_approved, heldout_references)
    warning = None
    if not auc >= config.min_auc:
        warning = (f"held-out ROC AUC {auc:.3f} is under the floor {config.min_auc:g}: this profile cannot reliably "
                   "tell the brand from the references; add real off-brand references, more approved images, "
                   "or another feature set before relying on its verdicts")

    examples = pa.table({
        "key": pa.array(approved.column("key").to_pylist() + references.column("key").to_pylist(), pa.string()),
        "kind": pa.array([APPROVED] * approved.num_rows + [REFERENCE] * references.num_rows, pa.string()),
        "embedding": pa.concat_arrays([approved.column("embedding").combine_chunks(),
                                       references.column("embedding").combine_chunks()]),
        "thumbnail": pa.concat_arrays([approved.column("thumbnail").combine_chunks(),
                                       references.column("thumbnail").combine_chunks()]),
    })
    info = {
        "model": config.model, "images": config.images, "references": config.references or "generic",
        "guidelines": list(config.guidelines), "features": config.features, "style_blocks": list(blocks),
        "feature_count": int(x.shape[1]), "penalty": penalty, "holdout_fraction": config.holdout_fraction,
        "seed": config.seed,
        "precision": resolve_precision(config.precision, next(model.parameters()).device),
        "approved_images": approved.num_rows, "reference_images": references.num_rows,
        "unreadable_images": unreadable[APPROVED], "unreadable_references": unreadable[REFERENCE],
        "fit_images": int(fit.sum()), "heldout_approved": len(heldout_approved),
        "heldout_references": len(heldout_references),
        "auc": auc, "min_auc": config.min_auc, "warning": warning,
        "roc": {"false_accept_rate": fpr.round(5).tolist(), "true_accept_rate": tpr.round(5).tolist()},
        "target_false_accept_rate": config.target_false_accept_rate, "threshold": threshold,
        "heldout_false_accept_rate": false_accept, "expected_false_reject_rate": false_reject,
        "calibration_error_heldout": calibration_error(probability, y[held_out]),
    }
    profile = BrandProfile(mean, scale, weights, bias, platt, guideline, heldout_approved, heldout_references,
                           examples, info)
    save_profile(profile, config.output, config.storage)
    from evaluation.report import brand_profile_report

    _save_bytes(config.output, "report.html", brand_profile_report(profile).encode(), config.storage)
    return profile


def nearest_examples(profile: BrandProfile, embeddings: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) unit embeddings -> (index into `profile.examples` (N,), cosine (N,)) of the nearest example of `kind`."""
    members = np.flatnonzero(pc.equal(profile.examples.column("kind"), kind).to_numpy(zero_copy_only=False))
    bank = vectors(profile.examples.take(members))  # (M, D)
    nearest = np.empty(len(embeddings), dtype=np.int64)
    cosine = np.empty(len(embeddings), dtype=np.float32)
    for start in range(0, len(embeddings), 4096):
        similarity = embeddings[start:start + 4096] @ bank.T  # (chunk, M)
        best = similarity.argmax(axis=1)
        nearest[start:start + 4096], cosine[start:start + 4096] = members[best], similarity[np.arange(len(best)), best]
    return nearest, cosine


def score_images(config: BrandScoreConfig, progress: bool = True) -> dict[str, Any]:
    """`clipforge brand score`: scores.parquet (one row per image, errors included), summary.json, report.html."""
    from training.checkpoint import load_model

    profile = load_profile(config.profile, config.storage)
    model_location = config.model or profile.model
    model, _ = load_model(model_location, config.storage,
                          announce("brand score", config.device, config.precision)[0])
    dim = profile.examples.column("embedding").type.list_size
    if model.config.embed_dim != dim:
        raise UserError(f"model {model_location} embeds into {model.config.embed_dim} dimensions but the profile "
                        f"was built in {dim}: use the model it was built with ({profile.model})")
    table = _embed(model, config.images, config, model_location, tuple(profile.info["style_blocks"]), progress)
    ok = pc.is_null(table.column("error")).to_numpy(zero_copy_only=False)
    threshold = profile.threshold if config.threshold is None else config.threshold
    n = table.num_rows
    probability, guideline = np.full(n, np.nan), np.full(n, np.nan)
    near = {kind: (np.zeros(n, np.int64), np.full(n, np.nan, np.float32)) for kind in (APPROVED, REFERENCE)}
    if ok.any():
        valid = valid_rows(table)
        probability[ok] = profile.probability(image_features(valid, profile.info["features"],
                                                             profile.guideline_embedding))
        embedding = vectors(valid)
        if profile.guideline_embedding is not None:
            guideline[ok] = embedding @ profile.guideline_embedding
        for kind in near:
            near[kind][0][ok], near[kind][1][ok] = nearest_examples(profile, embedding, kind)
    verdict = np.where(~ok, ERROR, np.where(probability >= threshold, ON_BRAND, OFF_BRAND))
    example_keys = profile.examples.column("key").to_numpy(zero_copy_only=False)
    example_thumbnails = profile.examples.column("thumbnail")

    def nearest_columns(kind: str) -> dict[str, pa.Array]:
        index, cosine = near[kind]
        return {f"nearest_{kind}": pa.array(example_keys[index].tolist(), pa.string(), mask=~ok),
                f"nearest_{kind}_cosine": pa.array(cosine, mask=~ok),
                f"nearest_{kind}_thumbnail": pc.if_else(pa.array(ok), example_thumbnails.take(pa.array(index)),
                                                        pa.scalar(None, pa.binary()))}

    scores = pa.table({
        "key": table.column("key"), "source": table.column("source"),
        "probability": pa.array(probability, mask=~ok), "verdict": pa.array(verdict.tolist(), type=pa.string()),
        "guideline_cosine": pa.array(guideline, mask=~ok | np.isnan(guideline)),
        **nearest_columns(APPROVED), **nearest_columns(REFERENCE),
        "error": table.column("error"), "thumbnail": table.column("thumbnail"),
    })
    write_table(scores, storage.join(config.output, "scores.parquet"), config.storage)
    counts = {v: int((verdict == v).sum()) for v in (ON_BRAND, OFF_BRAND, ERROR)}
    summary = {
        "profile": config.profile, "model": model_location, "images": config.images, "scored": int(ok.sum()),
        **counts, "threshold": threshold, "profile_auc": profile.info["auc"],
        "profile_warning": profile.info.get("warning"),
        "target_false_accept_rate": profile.info["target_false_accept_rate"],
        "expected_false_reject_rate": profile.info["expected_false_reject_rate"],
        "probability_quantiles": ({f"p{q}": float(np.quantile(probability[ok], q / 100)) for q in (5, 25, 50, 75, 95)}
                                  if ok.any() else {}),
        "errors_by_reason": error_counts(table),
    }
    _save_bytes(config.output, "summary.json", json.dumps(summary, indent=2).encode(), config.storage)
    if config.report:
        from evaluation.report import brand_report

        html = brand_report(summary, profile, probability[ok], scores.to_pylist())
        _save_bytes(config.output, "report.html", html.encode(), config.storage)
    return summary


def read_scores(location: str, config: StorageConfig | None = None) -> pa.Table:
    """The scores.parquet of a `score_images` output folder."""
    return read_table(storage.join(location, "scores.parquet"), config, "scores table")
