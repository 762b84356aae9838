"""The `brand-score` flow: build a brand profile from approved images, then score images against it
(`training.brand`), as a Prefect run.

With `build` empty the flow scores against the profile already at `score.profile`. The UI shows the verdict counts
(table artifact); scores.parquet, summary.json and report.html lie under `score.output`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.params import retry_options
from training.brand import BrandBuildConfig, BrandScoreConfig, build_profile, score_images


@task(name="build-brand-profile", **retry_options())
def build_profile_task(config: BrandBuildConfig) -> dict[str, Any]:
    """Embed the approved images and save the profile; returns its profile.json content."""
    logger = get_run_logger()
    logger.info("building a brand profile from %s with %s -> %s", config.images, config.model, config.output)
    profile = build_profile(config, progress=False)
    logger.info("profile: %d fit and %d held-out images", profile.info["fit_images"], profile.info["heldout_images"])
    return profile.info


@task(name="score-brand-images", **retry_options())
def score_task(config: BrandScoreConfig) -> dict[str, Any]:
    """Score every image against the profile; returns the summary (verdict counts, thresholds, quantiles)."""
    logger = get_run_logger()
    logger.info("scoring %s against the profile %s -> %s", config.images, config.profile, config.output)
    summary = score_images(config, progress=False)
    logger.info("%d on-brand, %d off-brand, %d unreadable", summary["on-brand"], summary["off-brand"], summary["error"])
    return summary


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("scored", "on-brand", "off-brand", "error", "threshold_percentile", "threshold_cosine")
    return [{"item": key, "value": summary[key]} for key in keys if key in summary]


@flow(name="brand-score", log_prints=True)
def brand_score_flow(score: BrandScoreConfig, build: BrandBuildConfig | None = None) -> dict[str, Any]:
    """Build a brand profile from approved images (when `build` is given), then score images against it."""
    if build is not None:
        build_profile_task(build)
    summary = score_task(score)
    create_table_artifact(summary_rows(summary), key="brand-scores",
                          description=f"Brand scores of {score.images}; files under {score.output}")
    return summary
