"""`clipforge catalog build | serve`: build a bundled catalog, and serve it over loopback HTTP as the web would.

Thin click wrappers over `pipeline.catalog`; `catalog_group` is added to the `clipforge` command list by the CLI root.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import click

from pipeline import catalog
from pipeline.errors import UserError

DEFAULT_OUTPUT = {"openmoji": ".clipforge/catalog/openmoji", "fluent": ".clipforge/catalog/fluent",
                  "synthetic": ".clipforge/catalog/synthetic"}


class _CatalogGroup(click.Group):
    # The root CLI does the same; repeated here so the group also prints one line when run on its own.
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group("catalog", cls=_CatalogGroup, context_settings={"max_content_width": 120})
def catalog_group() -> None:
    """The bundled image-caption catalogs: OpenMoji (CC BY-SA 4.0), Fluent Emoji Flat (MIT) and synthetic shapes.

    `build` renders one into a folder (images/*.png + catalog.parquet with captions, labels and a train/val split);
    `serve` publishes it over HTTP and writes URL lists that `clipforge ingest` reads like any web dataset.
    """


@catalog_group.command("build")
@click.option("--source", "--catalog", type=click.Choice(["openmoji", "fluent", "synthetic"]), default="openmoji",
              show_default=True,
              help="openmoji: ~3,950 emoji rendered from the OpenMoji SVGs, captioned with their Unicode names. "
                   "fluent: Microsoft's Fluent Emoji Flat drawings of the same emoji, captioned the same way. "
                   "synthetic: coloured shapes on textured backgrounds, for fast tests.")
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Folder to build into. [default: .clipforge/catalog/<source>]")
@click.option("--image-size", type=click.IntRange(min=8), default=64, show_default=True,
              help="Width and height of each square PNG, in pixels.")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.1, show_default=True,
              help="About this fraction of each group goes to the validation split; skin-tone variants of one emoji "
                   "(and repeats of one synthetic combination) always land on the same side.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the split (and of the drawings, for synthetic). Same seed, same catalog.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="openmoji and fluent only: keep the first N emoji of a fixed order that spans every group. [default: all]")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="synthetic only: number of images to draw. [default: 512]")
def build_command(source: str, output: str | None, image_size: int, val_fraction: float, seed: int,
                  limit: int | None, count: int | None) -> None:
    """Build a catalog; does nothing when the folder already holds the same, complete catalog, resumes a broken one."""
    output = output or DEFAULT_OUTPUT[source]
    if source in catalog.EMOJI_CATALOGS:
        if count is not None:
            raise click.UsageError("--count is for --source synthetic; use --limit to take fewer emoji")
        path = catalog.EMOJI_CATALOGS[source](output, image_size=image_size, val_fraction=val_fraction, seed=seed,
                                              limit=limit)
    else:
        if limit is not None:
            raise click.UsageError("--limit is for --source openmoji or fluent; use --count to draw fewer images")
        path = catalog.build_synthetic_catalog(output, count=512 if count is None else count, image_size=image_size,
                                               val_fraction=val_fraction, seed=seed)
    table = catalog.read_catalog(path)
    splits = Counter(table.column("split").to_pylist())
    groups = len(set(table.column("group").to_pylist()))
    skipped = catalog.read_catalog_metadata(path).get("skipped_unnamed", 0)
    click.echo(f"catalog: {path}")
    click.echo(f"  {table.num_rows} images: {splits.get('train', 0)} train, {splits.get('val', 0)} val; "
               f"{groups} groups")
    if source == "openmoji":
        click.echo(f"  skipped {skipped} OpenMoji SVGs without a Unicode name (extras outside Unicode)")
        click.echo("  artwork: OpenMoji, CC BY-SA 4.0 (see ATTRIBUTION.md in the folder)")
    elif source == "fluent":
        click.echo(f"  skipped {skipped} Fluent drawings without a Unicode name")
        click.echo("  artwork: Fluent Emoji Flat, Microsoft, MIT (see ATTRIBUTION.md in the folder)")


@catalog_group.command("serve")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port to listen on; 0 takes any free port (the URL lists name the one chosen).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default is reachable from this machine only; 0.0.0.0 opens it to "
                   "the network.")
def serve_command(directory: str, port: int, host: str) -> None:
    """Serve a built catalog over HTTP until Ctrl-C, after writing urls-train.parquet and urls-val.parquet into it.

    The URL lists point at the address actually bound, so they are valid for as long as this command runs.
    """
    catalog.read_catalog(directory)  # fail early, with a hint, on a folder that is not a catalog
    with catalog.serve_directory(directory, host=host, port=port) as base_url:
        for split in catalog.SPLITS:
            path = catalog.write_url_list(directory, base_url, split, Path(directory) / f"urls-{split}.parquet")
            click.echo(f"{split} URL list: {path}")
        click.echo(f"serving {directory} at {base_url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            click.echo("stopped")
