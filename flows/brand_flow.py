"""The `brand-score` flow: build a brand profile from approved images, then score images against it
(`evaluation.brand`), as a Prefect run.

With `build` empty the flow scores against the profile already at `score.profile`. The UI shows the profile's
held-out ROC curve with its operating point (markdown artifact; a profile under its AUC floor logs a warning) and
the verdict counts (table artifact); scores.parquet, summary.json and report.html (ROC, histograms, explanations)
lie under `score.output`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.params import retry_options
from evaluation.brand import BrandBuildConfig, BrandScoreConfig, build_profile, score_images
from evaluation.report import roc_plot


@task(name="build-brand-profile", **retry_options())
def build_profile_task(config: BrandBuildConfig) -> dict[str, Any]:
    """Embed the approved images and save the profile; returns its profile.json content."""
    logger = get_run_logger()
    logger.info("building a brand profile from %s with %s -> %s", config.images, config.model, config.output)
    profile = build_profile(config, progress=False)
    info = profile.info
    logger.info("profile: %d approved, %d references; held-out ROC AUC %.3f; threshold %.4f at false-accept rate "
                "%.3f, expected false-reject rate %.3f", info["approved_images"], info["reference_images"],
                info["auc"], info["threshold"], info["heldout_false_accept_rate"], info["expected_false_reject_rate"])
    if info["warning"]:
        logger.warning("WARNING: %s", info["warning"])
    fpr, tpr = info["roc"]["false_accept_rate"], info["roc"]["true_accept_rate"]
    operating = (info["heldout_false_accept_rate"], 1 - info["expected_false_reject_rate"])
    create_markdown_artifact(
        (f"**WARNING: {info['warning']}**\n\n" if info["warning"] else "")
        + f"held-out ROC AUC **{info['auc']:.3f}**; on-brand at probability >= {info['threshold']:.4f} "
        f"(false-accept rate {operating[0]:.3f}, expected false-reject rate {1 - operating[1]:.3f})\n\n"
        f"![held-out ROC]({roc_plot(fpr, tpr, info['auc'], operating, info['min_auc'])})",
        key="brand-profile-roc", description=f"Brand profile {config.output}")
    return info


@task(name="score-brand-images", **retry_options())
def score_task(config: BrandScoreConfig) -> dict[str, Any]:
    """Score every image against the profile; returns the summary (verdict counts, thresholds, quantiles)."""
    logger = get_run_logger()
    logger.info("scoring %s against the profile %s -> %s", config.images, config.profile, config.output)
    summary = score_images(config, progress=False)
    logger.info("%d on-brand, %d off-brand, %d unreadable", summary["on-brand"], summary["off-brand"], summary["error"])
    return summary


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("scored", "on-brand", "off-brand", "error", "threshold", "profile_auc", "target_false_accept_rate",
            "expected_false_reject_rate")
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
