"""Commands of the evaluation layer: `clipforge embed`, `evaluate`, `brand build|score`, `search` and `filter`.

Each command is a thin wrapper over one library function, whose typed config is the command's options. The CLI
root registers the list `commands`.
"""

from __future__ import annotations

import click

from pipeline.cli_options import config_command
from pipeline.filter import FilterConfig
from evaluation.brand import BrandBuildConfig, BrandScoreConfig, build_profile, score_images
from evaluation.embed import EmbedConfig, embed
from evaluation.evaluate import EvaluateConfig, evaluate, output_files
from evaluation.filtering import run_filter
from evaluation.report import format_brand_profile, format_brand_summary, format_evaluation
from evaluation.search import SearchConfig, search


@config_command(EmbedConfig, "embed", required=("model", "data", "output"), help="""Embed images into a parquet
    table (key, unit-length embedding, caption, source, metadata) that evaluate, brand and search reuse.

    \b
    Example:
      clipforge embed --model checkpoints/final --data .clipforge/data/openmoji-val --output lib.parquet

    Unreadable, corrupt or oversized images become rows with an `error` and no embedding.""")
def embed_command(config: EmbedConfig) -> None:
    summary = embed(config)
    click.echo(f"embedded {summary['embedded']} of {summary['rows']} images ({summary['errors']} errors) "
               f"into {summary['output']}")


@config_command(EvaluateConfig, "evaluate", required=("model", "data", "output"), help="""Zero-shot classification
    and image-text retrieval of a checkpoint on an evaluation set; writes metrics.json and report.html.

    \b
    Example:
      clipforge evaluate --model checkpoints/final --data .clipforge/data/openmoji-val \\
          --label-field group --templates emoji --output eval/openmoji-val

    Every metric is printed with its chance level beside it (acc@k: k / classes; recall@k: k / N).""")
def evaluate_command(config: EvaluateConfig) -> None:
    metrics = evaluate(config)
    click.echo(format_evaluation(metrics))
    click.echo("wrote " + ", ".join(output_files(config)))


@click.group("brand", context_settings={"max_content_width": 120})
def brand_group() -> None:
    """Brand alignment: build a profile from approved and off-brand images, then score new images against it."""


@config_command(BrandBuildConfig, "build", required=("model", "images", "output"), help="""Build a brand profile
    that tells the brand's images from off-brand ones: a calibrated linear scorer on embeddings and early-block style
    statistics, fitted on approved images and off-brand references, with its threshold at a target false-accept rate.

    \b
    Example:
      clipforge brand build --model checkpoints/final --images brand/approved --references brand/competitors \\
          --output brand/profile --guidelines "flat pastel illustration with a thick dark outline"

    Prints the held-out ROC AUC and the operating point, and writes report.html (ROC curve, histograms) beside the
    profile. Without --references a generic set is used (the approved images redrawn in other styles, and shapes).
    A profile whose held-out AUC is under --min-auc is written with a loud warning.""")
def brand_build_command(config: BrandBuildConfig) -> None:
    profile = build_profile(config)
    click.echo(format_brand_profile(profile.info))
    click.echo(f"wrote {config.output} (profile.json, scorer.npz, examples.parquet, report.html)")
    if profile.info["warning"]:
        banner = "!" * 100
        click.secho(f"{banner}\nWARNING: {profile.info['warning']}\n{banner}", fg="red", bold=True, err=True)


@config_command(BrandScoreConfig, "score", required=("profile", "images", "output"), help="""Score images against a
    brand profile: calibrated probability of on-brand, verdict at the profile's threshold, guideline cosine, and
    the nearest approved and nearest off-brand example of each image.

    \b
    Example:
      clipforge brand score --profile brand/profile --images uploads/ --output brand/scores

    Writes scores.parquet (one row per image; unreadable ones as error rows), summary.json and report.html.""")
def brand_score_command(config: BrandScoreConfig) -> None:
    summary = score_images(config)
    click.echo(format_brand_summary(summary))
    click.echo(f"wrote {config.output}/scores.parquet, summary.json" + (", report.html" if config.report else ""))


brand_group.add_command(brand_build_command)
brand_group.add_command(brand_score_command)


@config_command(SearchConfig, "search", required=("index",), arguments=("queries",), help="""Search an embedded
    image library with text queries; prints the top-k images with their cosine scores.

    \b
    Example:
      clipforge search --index lib.parquet "a red circle" "a smiling face" --top-k 5""")
def search_command(config: SearchConfig) -> None:
    for result in search(config):
        click.echo(f"query: {result['query']}")
        for hit in result["hits"]:
            caption = f"  {hit['caption']}" if hit["caption"] else ""
            click.echo(f"  {hit['rank']:>3}  {hit['score']:.4f}  {hit['key']}{caption}")
    if config.output:
        click.echo(f"wrote {config.output}/results.json, report.html")


@config_command(FilterConfig, "filter", required=("data", "output"), help="""Filter an ingested dataset into a new
    one, like DataComp: caption and image rules, language, CLIP score, near-duplicates, decontamination against
    evaluation sets. Every removed sample is counted under one reason (kept + removed = input) and listed in
    removed.parquet; report.html shows counts, score histograms and removed examples. Re-running resumes.

    \b
    Examples:
      clipforge filter --data .clipforge/data/openmoji/train --output .clipforge/data/openmoji/train-clean \\
          --min-words 2 --duplicate-hash-distance 8 --decontaminate .clipforge/data/openmoji/val
      clipforge filter --data shards/ --output shards-clean/ --model checkpoints/final \\
          --clip-score-top-fraction 0.3 --duplicate-similarity 0.95

    Rules that need a model (CLIP score, embedding near-duplicates) run only with --model.""")
def filter_command(config: FilterConfig) -> None:
    manifest = run_filter(config)
    summary = manifest.summary
    removed = ", ".join(f"{reason} {count}" for reason, count in summary.failures.items()) or "none"
    click.echo(f"kept {summary.successes} of {summary.input_rows} samples; removed: {removed}")
    click.echo(f"wrote {manifest.location} (manifest.parquet, removed.parquet, decontaminated.parquet, report.html)")


commands: list[click.Command] = [embed_command, evaluate_command, brand_group, search_command, filter_command]
