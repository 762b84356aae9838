"""Reports: one self-contained HTML file per run (plots and thumbnails inlined as base64 PNG data URIs), and the
plain-text summaries the CLI prints.

Plots are drawn with matplotlib's Agg backend (no display needed): the zero-shot confusion matrix, recall@k bars with
chance beside them, brand ROC curves and score histograms (approved vs references vs scored) and search hits as thumbnails. Every
metric is shown beside its chance level, so a number is never read without its floor. Brand reports
show the profile's held-out ROC curve and its operating point beside the score histograms.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 12px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img.plot { max-width: 100%; display: block; margin: 8px 0; }
.hits { display: flex; flex-wrap: wrap; gap: 10px; } .hit { width: 120px; font-size: 0.8em; text-align: center; }
.hit img { width: 112px; height: 112px; image-rendering: pixelated; border: 1px solid #ccc; }
.muted { color: #777; } .row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.row img.plot { max-width: 520px; } .error { color: #b00; }
"""


# ---------------------------------------------------------------------------------------------------------------------
# Images as data URIs


def figure_data_uri(figure: plt.Figure) -> str:
    """A matplotlib figure as a `data:image/png;base64,...` URI (the figure is closed)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_data_uri(data: bytes) -> str:
    """Any encoded image (the tables keep JPEG thumbnails) re-encoded as a PNG data URI."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(uri: str, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="{uri}">'


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def confusion_matrix_plot(matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> str:
    """Row-normalised confusion matrix (rows: true class) as a PNG data URI; counts written in small matrices."""
    counts = np.asarray(matrix, dtype=float)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = len(class_names)
    side = min(16, max(5, 0.45 * size + 2))
    figure, axes = plt.subplots(figsize=(side + 1.5, side))
    shown = axes.imshow(rows, cmap="viridis", vmin=0, vmax=1)
    figure.colorbar(shown, ax=axes, fraction=0.046, label="share of the true class")
    if size <= 40:
        axes.set_xticks(range(size), [str(n)[:24] for n in class_names], rotation=60, ha="right", fontsize=8)
        axes.set_yticks(range(size), [str(n)[:24] for n in class_names], fontsize=8)
    if size <= 15:
        for i in range(size):
            for j in range(size):
                if counts[i, j]:
                    axes.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                              color="black" if rows[i, j] > 0.5 else "white")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title("zero-shot confusion matrix")
    return figure_data_uri(figure)


def recall_plot(retrieval: dict[str, Any]) -> str:
    """Grouped bars: recall@k for both directions, chance as hatched bars beside them."""
    ks = list(retrieval["text_to_image"])
    figure, axes = plt.subplots(figsize=(5.5, 3.4))
    x = np.arange(len(ks))
    width = 0.2
    for offset, (direction, colour) in zip((-1.5, 0.5), (("image_to_text", "#1f77b4"), ("text_to_image", "#ff7f0e"))):
        values = [retrieval[direction][k] for k in ks]
        chance = [retrieval["chance"][direction][k] for k in ks]
        bars = axes.bar(x + offset * width, values, width, color=colour, label=direction.replace("_to_", " → "))
        axes.bar(x + (offset + 1) * width, chance, width, color="white", edgecolor=colour, hatch="//",
                 label=f"chance ({direction.split('_')[0]} query)")
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks(x, ks)
    axes.set_ylim(0, 1.35)  # headroom for the legend
    axes.set_ylabel("recall")
    axes.set_title(f"retrieval recall@k ({retrieval['num_images']} images, {retrieval['num_texts']} captions)", fontsize=10)
    axes.legend(fontsize=7, loc="upper left", ncols=2)
    return figure_data_uri(figure)


def zero_shot_bars(zero_shot: dict[str, Any]) -> str:
    """Model, chance and majority baseline side by side for acc@1, acc@5 and balanced accuracy."""
    names = [n for n in ("acc@1", "acc@5", "balanced_accuracy") if n in zero_shot]
    figure, axes = plt.subplots(figsize=(4.5, 3.4))
    x = np.arange(len(names))
    bars = axes.bar(x - 0.27, [zero_shot[n] for n in names], 0.27, color="#2ca02c", label="model")
    axes.bar(x, [zero_shot["chance"][n] for n in names], 0.27, color="white", edgecolor="#2ca02c", hatch="//",
             label="chance")
    axes.bar(x + 0.27, [zero_shot.get("majority", {}).get(n, 0) for n in names], 0.27, color="white",
             edgecolor="#d62728", hatch="..", label="majority class")
    axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks(x, [n.replace("_", " ") for n in names], fontsize=8)
    axes.set_ylim(0, 1.08)
    axes.set_title(f"zero-shot classification ({zero_shot['num_classes']} classes)", fontsize=10)
    axes.legend(fontsize=8)
    return figure_data_uri(figure)


def brand_histogram(approved: np.ndarray, references: np.ndarray, scored: np.ndarray | None = None,
                    threshold: float | None = None) -> str:
    """Histograms of the calibrated probability: held-out approved vs held-out references (and the scored images),
    with the operating threshold."""
    figure, axes = plt.subplots(figsize=(8, 3.6))
    bins = np.linspace(0, 1, 31)
    axes.hist(approved, bins=bins, alpha=0.6, density=True, color="#2ca02c",
              label=f"approved, held out ({len(approved)})")
    axes.hist(references, bins=bins, alpha=0.6, density=True, color="#d62728",
              label=f"off-brand references, held out ({len(references)})")
    if scored is not None and len(scored):
        axes.hist(scored, bins=bins, density=True, histtype="step", linewidth=2, color="#1f77b4",
                  label=f"scored ({len(scored)})")
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    axes.set_xlabel("calibrated probability of on-brand")
    axes.set_ylabel("density")
    axes.set_title("brand scores")
    axes.legend(fontsize=8)
    return figure_data_uri(figure)


def roc_plot(false_accept: Sequence[float], true_accept: Sequence[float], auc: float,
             operating_point: tuple[float, float] | None = None, min_auc: float | None = None) -> str:
    """The held-out ROC curve (false-accept rate of references vs accept rate of approved), chance diagonal,
    AUC in the title, and the operating point."""
    figure, axes = plt.subplots(figsize=(4.4, 4.2))
    axes.plot(false_accept, true_accept, color="#1f77b4", linewidth=2, label=f"profile (AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], color="#999", linestyle=":", label="chance (AUC 0.5)")
    if operating_point is not None:
        axes.plot(*operating_point, "o", color="#d62728", markersize=8,
                  label=f"operating point: FAR {operating_point[0]:.3f}, FRR {1 - operating_point[1]:.3f}")
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_xlabel("false-accept rate (off-brand references accepted)")
    axes.set_ylabel("true-accept rate (approved accepted)")
    low = min_auc is not None and not auc >= min_auc
    axes.set_title(f"held-out ROC, AUC {auc:.3f}" + (f" (under the floor {min_auc:g})" if low else ""),
                   fontsize=10, color="#b00" if low else "black")
    axes.legend(fontsize=7, loc="lower right")
    return figure_data_uri(figure)


# ---------------------------------------------------------------------------------------------------------------------
# Pages


def _page(title: str, sections: list[tuple[str, str]]) -> str:
    body = "\n".join(f"<section><h2>{html.escape(heading)}</h2>\n{content}</section>" for heading, content in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header) if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, float, float, float | None]]:
    """(name, value, chance, majority baseline or None) for every headline metric of an evaluation."""
    rows = []
    zero_shot = metrics.get("zero_shot")
    if zero_shot:
        for name in ("acc@1", "acc@5", "balanced_accuracy"):
            rows.append((f"zero-shot {name.replace('_', ' ')}", zero_shot[name], zero_shot["chance"][name],
                         zero_shot.get("majority", {}).get(name)))
    retrieval = metrics.get("retrieval")
    if retrieval:
        for direction in ("image_to_text", "text_to_image"):
            for k, value in retrieval[direction].items():
                rows.append((f"{direction.replace('_', ' ')} {k}", value, retrieval["chance"][direction][k], None))
    return rows


def format_evaluation(metrics: dict[str, Any]) -> str:
    """The console summary: every metric with its chance level beside it."""
    lines = [f"model:  {metrics['model']}", f"data:   {metrics['data']} ({metrics['num_images']} images"
             + (f", {metrics['num_errors']} unreadable)" if metrics.get("num_errors") else ")")]
    zero_shot = metrics.get("zero_shot")
    if zero_shot:
        lines.append(f"zero-shot on {zero_shot['label_field']!r}: {zero_shot['num_classes']} classes, "
                     f"{len(zero_shot['templates'])} templates")
    lines.append(f"{'metric':<32}{'value':>8}{'chance':>10}{'majority':>10}")
    lines += [f"{name:<32}{value:>8.4f}{chance:>10.4f}" + (f"{majority:>10.4f}" if majority is not None else "")
              for name, value, chance, majority in metric_rows(metrics)]
    return "\n".join(lines)


def evaluation_report(metrics: dict[str, Any]) -> str:
    """The HTML report of `clipforge evaluate`: metrics beside chance, recall@k and accuracy bars, confusion matrix."""
    errors = ", ".join(f"{k}: {v}" for k, v in metrics.get("errors", {}).items()) or "none"
    run = (f'<p class="muted">model {html.escape(str(metrics["model"]))} &middot; data {html.escape(str(metrics["data"]))}'
           f' &middot; {metrics["num_images"]} images &middot; unreadable: {html.escape(errors)}</p>')
    plots = []
    if metrics.get("retrieval"):
        plots.append(_img(recall_plot(metrics["retrieval"]), "recall at k"))
    zero_shot = metrics.get("zero_shot")
    if zero_shot:
        plots.append(_img(zero_shot_bars(zero_shot), "zero-shot accuracy"))
    rows = [(name, value, chance, "" if majority is None else majority)
            for name, value, chance, majority in metric_rows(metrics)]
    sections = [("Metrics (chance and, for classes, the majority baseline beside each)", run + '<div class="row">'
                 + _table(["metric", "value", "chance", "majority class"], rows) + "".join(plots) + "</div>")]
    if zero_shot:
        templates = '<p class="muted">templates: ' + html.escape(" | ".join(zero_shot["templates"])) + "</p>"
        recalls = _table(["class", "recall"], sorted(zero_shot["per_class_recall"].items()))
        sections.append((f"Zero-shot classification on {zero_shot['label_field']!r}",
                         templates + _img(confusion_matrix_plot(zero_shot["confusion_matrix"], zero_shot["class_names"]),
                                          "confusion matrix")
                         + f"<details><summary>recall per class</summary>{recalls}</details>"))
    return _page("clipforge evaluation", sections)


def _thumbnail_grid(items: list[tuple[bytes | None, str]]) -> str:
    cells = []
    for data, caption in items:
        image = f'<img alt="hit" src="{image_data_uri(data)}">' if data else '<div class="muted">(no thumbnail)</div>'
        cells.append(f'<div class="hit">{image}<br>{caption}</div>')
    return f'<div class="hits">{"".join(cells)}</div>'


def format_brand_profile(info: dict[str, Any]) -> str:
    """The console summary of `clipforge brand build`: counts, held-out AUC, a few ROC points, the operating point."""
    lines = [f"profile: {info['approved_images']} approved and {info['reference_images']} off-brand reference images "
             f"({info['references']}); features: {info['features']}"
             + (f" (style of blocks {info['style_blocks']})" if info["style_blocks"] else "")
             + (f" + {len(info['guidelines'])} text guidelines" if info["guidelines"] else ""),
             f"held out: {info['heldout_approved']} approved, {info['heldout_references']} references; "
             f"ROC AUC {info['auc']:.3f} (floor {info['min_auc']:g}); "
             f"calibration error {info['calibration_error_heldout']:.3f}"]
    fpr, tpr = np.array(info["roc"]["false_accept_rate"]), np.array(info["roc"]["true_accept_rate"])
    points = []
    for rate in (0.01, 0.05, 0.1, 0.2):
        inside = fpr <= rate
        points.append(f"FAR {rate:g}: accepts {tpr[inside].max() if inside.any() else 0:.3f} of approved")
    lines.append("held-out ROC: " + "; ".join(points))
    lines.append(f"operating point: probability >= {info['threshold']:.4f}, false-accept rate "
                 f"{info['heldout_false_accept_rate']:.3f} (target {info['target_false_accept_rate']:g}), "
                 f"expected false-reject rate {info['expected_false_reject_rate']:.3f}")
    return "\n".join(lines)


def format_brand_summary(summary: dict[str, Any]) -> str:
    lines = [f"scored {summary['scored']} images against {summary['profile']} "
             f"(on-brand: probability >= {summary['threshold']:.4f}; profile AUC {summary['profile_auc']:.3f}, "
             f"false-accept rate {summary['target_false_accept_rate']:g}, expected false-reject rate "
             f"{summary['expected_false_reject_rate']:.3f})",
             f"on-brand: {summary['on-brand']}   off-brand: {summary['off-brand']}   errors: {summary['error']}"]
    lines += [f"  error {reason}: {count}" for reason, count in summary["errors_by_reason"].items()]
    if summary.get("profile_warning"):
        lines.append(f"WARNING: {summary['profile_warning']}")
    return "\n".join(lines)


def _profile_sections(profile: Any, scored: np.ndarray | None = None, threshold: float | None = None) -> list[tuple[str, str]]:
    info = profile.info
    threshold = info["threshold"] if threshold is None else threshold
    operating = (float((profile.heldout_references >= threshold).mean()),
                 float((profile.heldout_approved >= threshold).mean()))
    warning = (f'<p class="error"><b>WARNING:</b> {html.escape(info["warning"])}</p>' if info.get("warning") else "")
    rows = [("approved images", info["approved_images"]), ("off-brand references", info["reference_images"]),
            ("references from", info["references"]), ("features", info["features"]),
            ("guidelines", " | ".join(info["guidelines"]) or "none"),
            ("held-out ROC AUC", info["auc"]), ("AUC floor", info["min_auc"]),
            ("held-out calibration error", info["calibration_error_heldout"]),
            ("threshold (probability)", threshold), ("target false-accept rate", info["target_false_accept_rate"]),
            ("held-out false-accept rate", operating[0]), ("expected false-reject rate", 1 - operating[1])]
    plots = (_img(roc_plot(info["roc"]["false_accept_rate"], info["roc"]["true_accept_rate"], info["auc"],
                           operating, info["min_auc"]), "held-out ROC curve")
             + _img(brand_histogram(profile.heldout_approved, profile.heldout_references, scored, threshold),
                    "score histograms"))
    return [("Profile: can it tell the brand apart?", warning + '<div class="row">' + _table(["", ""], rows)
             + plots + "</div>")]


def brand_profile_report(profile: Any) -> str:
    """The HTML report `clipforge brand build` writes beside the profile: held-out ROC, histograms, operating point."""
    return _page("clipforge brand profile", _profile_sections(profile))


def brand_report(summary: dict[str, Any], profile: Any, scored: np.ndarray, rows: list[dict[str, Any]],
                 max_thumbnails: int = 12) -> str:
    """The HTML report of `clipforge brand score`: the profile's ROC and histograms with the operating point, the
    counts, the least and most on-brand images each beside its nearest approved and off-brand examples, errors."""
    counts = [("on-brand", summary["on-brand"]), ("off-brand", summary["off-brand"]), ("error", summary["error"])]
    sections = [("Summary", _table(["", ""], [("profile", summary["profile"]), ("model", summary["model"]),
                                             ("images", summary["images"]), *counts])),
                *_profile_sections(profile, scored, summary["threshold"])]
    scored_rows = sorted((r for r in rows if r["verdict"] != "error"), key=lambda r: r["probability"])

    def explained(chosen: list[dict[str, Any]]) -> str:
        items = []
        for r in chosen:
            items.append((r.get("thumbnail"), f"<b>{html.escape(str(r['key']))}</b><br>p={r['probability']:.3f}, "
                                              f"{r['verdict']}"))
            items.append((r.get("nearest_approved_thumbnail"), f"nearest approved<br>{html.escape(str(r['nearest_approved']))}"
                                                               f" ({r['nearest_approved_cosine']:.2f})"))
            items.append((r.get("nearest_reference_thumbnail"), f"nearest off-brand<br>{html.escape(str(r['nearest_reference']))}"
                                                                f" ({r['nearest_reference_cosine']:.2f})"))
        return ('<p class="muted">each image, then its nearest approved and nearest off-brand example '
                '(cosine of the image embeddings)</p>' + _thumbnail_grid(items))

    half = max_thumbnails // 2
    if scored_rows:
        sections.append(("Least on-brand, explained", explained(scored_rows[:half])))
        sections.append(("Most on-brand, explained", explained(scored_rows[::-1][:half])))
    errors = [(r["key"], r["error"]) for r in rows if r["verdict"] == "error"]
    if errors:
        sections.append(("Errors", _table(["image", "reason"], errors)))
    return _page("clipforge brand score", sections)


def search_report(index: str, results: list[dict[str, Any]]) -> str:
    """The HTML page of `clipforge search --output`: each query's hits as thumbnails with scores."""
    sections = []
    for result in results:
        items = [(hit.get("thumbnail"), f"#{hit['rank']} {hit['score']:.3f}<br>{html.escape(str(hit['key']))}")
                 for hit in result["hits"]]
        sections.append((f"“{result['query']}”", _thumbnail_grid(items)))
    return _page(f"clipforge search: {index}", sections)


def clip_score_histogram(kept: np.ndarray, removed: np.ndarray) -> str:
    """Histograms of the pairs' CLIP score (image-caption cosine), kept against removed."""
    figure, axes = plt.subplots(figsize=(8, 3.4))
    values = np.concatenate([kept, removed])
    bins = np.linspace(values.min(), values.max(), 41) if len(values) else 40
    axes.hist(kept, bins=bins, alpha=0.6, color="#2ca02c", label=f"kept ({len(kept)})")
    axes.hist(removed, bins=bins, alpha=0.6, color="#d62728", label=f"removed by any rule ({len(removed)})")
    axes.set_xlabel("CLIP score (cosine of the image and its caption)")
    axes.set_ylabel("pairs")
    axes.legend(fontsize=8)
    return figure_data_uri(figure)


def filter_report(summary: Any, rules: dict[str, Any], scores: dict[str, np.ndarray],
                  examples: dict[str, list[tuple[bytes | None, str]]]) -> str:
    """The HTML page of `clipforge filter`: counts per reason, the settings, score histograms, removed examples."""
    total = summary.input_rows or 1
    rows = [("kept", summary.successes, f"{summary.successes / total:.1%}")]
    rows += [(reason, count, f"{count / total:.1%}") for reason, count in summary.failures.items()]
    rows.append(("input", summary.input_rows, "100%"))
    sections = [("Samples by outcome", _table(("outcome", "samples", "share"), rows)),
                ("Rules", _table(("setting", "value"), [(k, v) for k, v in rules.items() if v not in (None, [], ())]))]
    if scores and len(scores["kept"]) + len(scores["removed"]):
        sections.append(("CLIP score", _img(clip_score_histogram(scores["kept"], scores["removed"]), "CLIP score")))
    for reason, items in examples.items():
        sections.append((f"Removed: {reason}", _thumbnail_grid([(data, html.escape(text)) for data, text in items])))
    return _page("clipforge filter", sections)
