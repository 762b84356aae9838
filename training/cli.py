"""Commands of the training layer (`clipforge model-info`, later `clipforge train`)."""

import click

commands: list[click.Command] = []


@click.command("model-info")
@click.argument("preset", type=click.Choice(["tiny", "small", "vit-b-32", "vit-b-16", "vit-l-14"]))
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
