"""Brand alignment: how close is a new image to a brand's approved visual style?

`build_profile` embeds a folder (or list, or prefix) of approved images and splits them, by a hash of each key, into
a *fit* part and a *held-out* part. The profile is the unit-length centroid of the fit embeddings plus the sorted
cosine similarities of the held-out approved images to that centroid: the brand's own distribution of "how close an
approved image is". Holding images out matters: the fit images are closer to their own centroid than new approved
images will be.

`score_images` gives each candidate image
- `cosine`: its cosine similarity to the centroid;
- `percentile`: 100 x the share of held-out approved images whose cosine is at most the image's (its calibrated
  score: 50 means "as close as a typical approved image", 2 means "less close than 98% of them");
- `verdict`: `on-brand` when percentile >= the threshold (default 5: an image is accepted if it is at least as close
  as the least-close 5% of approved images), `off-brand` otherwise, `error` when it could not be read.

Candidate images come from outside (uploads, generators), so each is checked before it is decoded (file size,
declared pixel count); a corrupt, oversized or non-image file becomes an `error` row with its reason while the
rest of the batch is scored. A profile is a small directory: `profile.json` (model location, counts, quantiles),
`centroid.npy` (D,) and `heldout_similarities.npy` (sorted).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline import storage
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.storage import StorageConfig
from training.device import DeviceSetting, PrecisionSetting, announce, resolve_precision
from training.embed import embed_location, error_counts, error_rows, valid_rows, vectors, write_table

PROFILE_FILE, CENTROID_FILE, HELDOUT_FILE = "profile.json", "centroid.npy", "heldout_similarities.npy"
ON_BRAND, OFF_BRAND, ERROR = "on-brand", "off-brand", "error"


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
    """Build a brand profile from approved images."""

    model: str
    """Checkpoint location (folder or s3://...) whose image tower embeds the images; recorded in the profile."""
    images: str
    """Approved images: a folder or s3:// prefix of image files, an image list, or an ingested dataset."""
    output: str
    """Profile directory to write (profile.json, centroid.npy, heldout_similarities.npy), local or s3://."""
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the approved images held out of the centroid to calibrate scores."""
    seed: int = 0
    """Seed of the fit / held-out split (the split hashes each image key with it, so it is stable)."""
    min_images: int = Field(10, ge=2)
    """Fewer readable approved images than this is an error: the calibration would be meaningless."""


class BrandScoreConfig(_ImageOptions):
    """Score images against a brand profile."""

    profile: str
    """Profile directory written by `clipforge brand build`."""
    images: str
    """Images to score: a folder or s3:// prefix of image files, an image list, or an ingested dataset."""
    output: str
    """Folder (or s3:// prefix) for scores.parquet, summary.json and report.html."""
    threshold_percentile: float = Field(5.0, ge=0, le=100)
    """An image is on-brand when its percentile among held-out approved images is at least this."""
    model: str | None = None
    """Checkpoint to embed with. Empty: the one recorded in the profile (it must be the same model)."""
    report: bool = True
    """Write report.html (score histograms) beside the scores."""


@dataclass(frozen=True)
class BrandProfile:
    centroid: np.ndarray
    """(D,) unit-length mean of the fit images' embeddings."""
    heldout_similarities: np.ndarray
    """(H,) sorted cosines of the held-out approved images to the centroid."""
    info: dict[str, Any]
    """model location, image counts, split settings, quantiles (profile.json)."""

    @property
    def model(self) -> str:
        return self.info["model"]

    def percentile(self, cosine: np.ndarray) -> np.ndarray:
        """100 x share of held-out approved images with a cosine at most `cosine` (the empirical CDF)."""
        below_or_equal = np.searchsorted(self.heldout_similarities, cosine, side="right")
        return 100.0 * below_or_equal / len(self.heldout_similarities)

    def threshold_cosine(self, threshold_percentile: float) -> float:
        """The smallest cosine that reaches `threshold_percentile` (an image is on-brand iff cosine >= it)."""
        needed = math.ceil(threshold_percentile / 100 * len(self.heldout_similarities) - 1e-9)
        return -1.0 if needed <= 0 else float(self.heldout_similarities[needed - 1])


def is_held_out(key: str, fraction: float, seed: int) -> bool:
    """Deterministic split: the key's hash, read as a number in [0, 1), falls below `fraction`."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def fit_profile(embeddings: np.ndarray, held_out: np.ndarray, info: dict[str, Any]) -> BrandProfile:
    """A profile from (N, D) unit embeddings and an (N,) held-out mask."""
    fit = embeddings[~held_out]
    centroid = fit.mean(axis=0)
    centroid = (centroid / np.linalg.norm(centroid)).astype(np.float32)
    heldout = np.sort(embeddings[held_out] @ centroid).astype(np.float32)
    quantiles = {f"p{q}": float(np.quantile(heldout, q / 100)) for q in (1, 5, 10, 25, 50, 75, 90)}
    info = {**info, "fit_images": int(len(fit)), "heldout_images": int(len(heldout)), "embed_dim": int(len(centroid)),
            "heldout_quantiles": quantiles,
            "fit_similarity_mean": float((fit @ centroid).mean())}
    return BrandProfile(centroid, heldout, info)


def _save_bytes(location: str, name: str, data: bytes, config: StorageConfig | None) -> None:
    target = storage.join(location, name)
    fs, path = storage.filesystem(target, config)
    with storage.storage_errors(target, config), fs.open(path, "wb") as file:
        file.write(data)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def save_profile(profile: BrandProfile, location: str, config: StorageConfig | None = None) -> str:
    _save_bytes(location, CENTROID_FILE, _npy(profile.centroid), config)
    _save_bytes(location, HELDOUT_FILE, _npy(profile.heldout_similarities), config)
    _save_bytes(location, PROFILE_FILE, json.dumps(profile.info, indent=2).encode(), config)  # last: present = complete
    return location


def load_profile(location: str, config: StorageConfig | None = None) -> BrandProfile:
    fs, path = storage.filesystem(location, config)

    def read(name: str) -> bytes:
        with storage.storage_errors(location, config):
            try:
                return fs.cat_file(f"{path.rstrip('/')}/{name}")
            except FileNotFoundError:
                raise UserError(f"{location} is not a brand profile (missing {name}); "
                                "build one with `clipforge brand build`") from None

    info = json.loads(read(PROFILE_FILE))
    centroid = np.load(io.BytesIO(read(CENTROID_FILE)))
    heldout = np.load(io.BytesIO(read(HELDOUT_FILE)))
    return BrandProfile(centroid.astype(np.float32), np.sort(heldout).astype(np.float32), info)


def build_profile(config: BrandBuildConfig, progress: bool = True) -> BrandProfile:
    """`clipforge brand build`: embed the approved images, fit the centroid, calibrate on the held-out ones, save."""
    from training.checkpoint import load_model

    model, _ = load_model(config.model, config.storage, announce("brand build", config.device, config.precision)[0])
    table = embed_location(model, config.images, config.model, config.storage, config.image_column,
                           config.batch_size, config.precision, thumbnail_size=0,
                           max_image_bytes=config.max_image_bytes, max_image_pixels=config.max_image_pixels,
                           progress=progress)
    errors = error_rows(table)
    table = valid_rows(table)
    if table.num_rows < config.min_images:
        raise UserError(f"only {table.num_rows} readable approved images in {config.images} "
                        f"({errors.num_rows} errors); a profile needs at least {config.min_images}")
    keys = table.column("key").to_pylist()
    held_out = np.array([is_held_out(k, config.holdout_fraction, config.seed) for k in keys])
    if held_out.all() or not held_out.any():  # tiny sets: keep at least one image on each side
        held_out[:] = False
        held_out[:: max(2, round(1 / config.holdout_fraction))] = True
    info = {"model": config.model, "images": config.images, "holdout_fraction": config.holdout_fraction,
            "seed": config.seed, "precision": resolve_precision(config.precision, next(model.parameters()).device), "unreadable_images": errors.num_rows}
    profile = fit_profile(vectors(table), held_out, info)
    save_profile(profile, config.output, config.storage)
    return profile


def score_embeddings(profile: BrandProfile, embeddings: np.ndarray, threshold_percentile: float = 5.0,
                     chunk_size: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D) unit embeddings -> (cosine (N,), percentile (N,), on_brand (N,) bool), `chunk_size` rows at a time."""
    cosine = np.empty(len(embeddings), dtype=np.float32)
    for start in range(0, len(embeddings), chunk_size):
        cosine[start:start + chunk_size] = embeddings[start:start + chunk_size] @ profile.centroid
    percentile = profile.percentile(cosine)
    return cosine, percentile, percentile >= threshold_percentile


def score_images(config: BrandScoreConfig, progress: bool = True) -> dict[str, Any]:
    """`clipforge brand score`: scores.parquet (one row per image, errors included), summary.json, report.html."""
    from training.checkpoint import load_model

    profile = load_profile(config.profile, config.storage)
    model_location = config.model or profile.model
    model, _ = load_model(model_location, config.storage,
                          announce("brand score", config.device, config.precision)[0])
    if model.config.embed_dim != len(profile.centroid):
        raise UserError(f"model {model_location} embeds into {model.config.embed_dim} dimensions but the profile "
                        f"was built in {len(profile.centroid)}: use the model it was built with ({profile.model})")
    table = embed_location(model, config.images, model_location, config.storage, config.image_column,
                           config.batch_size, config.precision, thumbnail_size=48,
                           max_image_bytes=config.max_image_bytes, max_image_pixels=config.max_image_pixels,
                           progress=progress)
    ok = pc.is_null(table.column("error")).to_numpy(zero_copy_only=False)
    cosine = np.full(table.num_rows, np.nan, dtype=np.float32)
    percentile = np.full(table.num_rows, np.nan)
    if ok.any():
        cosine[ok], percentile[ok], _ = score_embeddings(profile, vectors(valid_rows(table)), config.threshold_percentile)
    verdict = np.where(~ok, ERROR, np.where(percentile >= config.threshold_percentile, ON_BRAND, OFF_BRAND))
    scores = pa.table({
        "key": table.column("key"), "source": table.column("source"),
        "cosine": pa.array(cosine, mask=~ok), "percentile": pa.array(percentile, mask=~ok),
        "verdict": pa.array(verdict.tolist(), type=pa.string()), "error": table.column("error"),
        "thumbnail": table.column("thumbnail"),
    })
    write_table(scores, storage.join(config.output, "scores.parquet"), config.storage)
    counts = {v: int((verdict == v).sum()) for v in (ON_BRAND, OFF_BRAND, ERROR)}
    summary = {
        "profile": config.profile, "model": model_location, "images": config.images, "scored": int(ok.sum()),
        **counts, "threshold_percentile": config.threshold_percentile,
        "threshold_cosine": profile.threshold_cosine(config.threshold_percentile),
        "cosine_quantiles": ({f"p{q}": float(np.quantile(cosine[ok], q / 100)) for q in (5, 25, 50, 75, 95)}
                             if ok.any() else {}),
        "profile_heldout_quantiles": profile.info.get("heldout_quantiles", {}),
        "errors_by_reason": error_counts(table),
    }
    _save_bytes(config.output, "summary.json", json.dumps(summary, indent=2).encode(), config.storage)
    if config.report:
        from training.report import brand_report

        html = brand_report(summary, profile.heldout_similarities, cosine[ok], scores.to_pylist())
        _save_bytes(config.output, "report.html", html.encode(), config.storage)
    return summary


def read_scores(location: str, config: StorageConfig | None = None) -> pa.Table:
    """The scores.parquet of a `score_images` output folder."""
    from training.embed import read_table

    return read_table(storage.join(location, "scores.parquet"), config)
