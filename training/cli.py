"""Commands of the training layer: `clipforge model-info`, `train`, `import` and `export`."""

import click

from pipeline.cli_options import config_command
from training.convert import ExportConfig, ImportConfig
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


@config_command(ImportConfig, "import", required=("source", "output"), help="""Import a released CLIP (OpenAI,
    open_clip or Hugging Face weights, a local file or folder) as a clipforge checkpoint with CLIP's tokenizer.

    \b
    Examples:
      clipforge import ViT-B-32.pt --output models/openai-b32                (OpenAI's file: QuickGELU)
      clipforge import open_clip_pytorch_model.bin --output models/laion-b32 --activation gelu
      clipforge import ./clip-vit-base-patch32 --output models/hf-b32        (a transformers CLIPModel folder)

    The result works with train --init-from, evaluate, embed, brand and search.""")
def import_command(config: ImportConfig) -> None:
    from training.convert import import_checkpoint

    info = import_checkpoint(config)
    shape = info["config"]
    click.echo(f"imported {info['format']} weights from {info['weights']} ({info['activation']}, "
               f"{shape['image_size']} px / patch {shape['patch_size']}, vision {shape['vision_width']}x"
               f"{shape['vision_layers']}, text {shape['text_width']}x{shape['text_layers']}, embed {shape['embed_dim']})")
    click.echo(f"wrote {info['output']}")


import_command.params = [click.Argument(["source"], required=False),  # positional SOURCE instead of --source
                         *(p for p in import_command.params if p.name != "source")]
commands.append(import_command)


@config_command(ExportConfig, "export", required=("checkpoint", "output"), help="""Export a clipforge checkpoint
    for open_clip or Hugging Face transformers, tokenizer files included.

    \b
    Examples:
      clipforge export models/final --format hf --output export/hf           (CLIPModel.from_pretrained(DIR))
      clipforge export models/final --format open_clip --output export/oc    (create_model("local-dir:DIR"))""")
def export_command(config: ExportConfig) -> None:
    from training.convert import export_checkpoint

    click.echo(f"wrote {export_checkpoint(config)}")


export_command.params = [click.Argument(["checkpoint"], required=False),  # positional instead of --checkpoint
                         *(p for p in export_command.params if p.name != "checkpoint")]
commands.append(export_command)
