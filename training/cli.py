"""Commands of the training layer: `clipforge model-info` and `clipforge train`."""

import click

from pipeline.cli_options import config_command
from training.train import TrainConfig

commands: list[click.Command] = []


@click.command("model-info")
@click.argument("preset", type=click.Choice(["tiny", "small", "vit-b-32", "vit-b-16", "vit-l-14", "openai-vit-b-32",
                                             "openai-vit-b-16", "openai-vit-l-14", "openai-vit-l-14-336"]))
def model_info(preset: str) -> None:
    """Print a model preset's shape, parameters per tower and forward FLOPs per image-caption pair."""
    from training.model import MODEL_PRESETS, create_model, flops_per_sample, parameter_counts

    config = MODEL_PRESETS[preset]
    params = parameter_counts(create_model(config, device="meta"))  # meta: counts without allocating weights
    flops = flops_per_sample(config)
    click.echo(f"{preset}: " + ", ".join(f"{k}={v}" for k, v in config.model_dump().items()))
    click.echo(f"{'':8}{'parameters':>14}{'GFLOPs/sample (forward)':>26}")
    for tower in ("image", "text", "total"):
        click.echo(f"{tower:8}{params[tower] / 1e6:>13.2f}M{flops[tower] / 1e9:>26.3f}")
    click.echo("FLOPs count matmuls only, 2 per multiply-add; a training step costs about 3x the forward.")


commands.append(model_info)


@config_command(
    TrainConfig,
    "train",
    help="""Train a CLIP model on shards written by `clipforge ingest`, on Ray Train (local on demand, or a cluster).

    \b
    Examples:
      clipforge train --data .clipforge/data/openmoji-train --preset small --epochs 10
      clipforge train --data s3://bucket/shards --output s3://bucket/runs/a --num-workers 4 --ray-address HEAD:6379
      clipforge train --data new-shards --init-from .clipforge/runs/clip/model --lr 1e-4 --steps 200   (fine-tune)

    Writes checkpoints (every --checkpoint-every steps, atomically) under OUTPUT/ray, the final model to OUTPUT/model,
    metrics to OUTPUT/metrics.jsonl and OUTPUT/tensorboard. A killed run resumes when the same command is re-run.""",
    required=("data",),
)
def train(config: TrainConfig) -> None:
    from training.ray_job import run_training

    result = run_training(config)
    metrics = result.metrics
    click.echo(f"model:   {result.model}")
    click.echo(f"steps:   {metrics['steps']} ({metrics['steps_per_epoch']} per epoch), run {result.run_name}")
    click.echo(f"loss:    {metrics.get('loss', float('nan')):.4f}   temperature: {metrics.get('temperature', float('nan')):.4f}")


commands.append(train)
