"""``tools/make_shards.py`` / ``make-shards``: convert a data source into WebDataset shards."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from shards.images import ImagePolicy
from shards.manifest import ShardError
from shards.sources import digits_grid, folder
from shards.writer import WriterSettings, write_split

app = typer.Typer(
    help="Convert datasets into WebDataset tar shards (+ DALI index files and a manifest).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# Options every source shares. Typer has no option groups, so each command lists them and
# passes them through ``writer_settings``.
OutOption = typer.Option(..., "--out", help="Output folder (manifest.json and one sub-folder per split).")
WorkersOption = typer.Option(os.cpu_count() or 1, "--workers", min=1, help="Processes encoding images in parallel.")
SeedOption = typer.Option(0, "--seed", help="Seed of the write-time shuffle (and of any random selection).")
ShardSamplesOption = typer.Option(1000, "--shard-samples", min=1, help="Maximum samples per tar shard.")
ShardMbOption = typer.Option(512, "--shard-mb", min=1, help="Maximum size of a tar shard in MiB.")
MaxSideOption = typer.Option(None, "--max-side", min=8, help="Shrink images whose longer side exceeds PX (re-encodes).")
QualityOption = typer.Option(90, "--quality", min=1, max=100, help="JPEG quality when an image is re-encoded.")


def writer_settings(workers: int, seed: int, shard_samples: int, shard_mb: int, max_side: int | None, quality: int) -> WriterSettings:
    return WriterSettings(
        max_samples_per_shard=shard_samples,
        max_bytes_per_shard=shard_mb * 1024 * 1024,
        seed=seed,
        workers=workers,
        image=ImagePolicy(max_side_px=max_side, quality=quality),
    )


@app.command("digits-grid")
def digits_grid_command(
    out: Path = OutOption,
    train_size: int = typer.Option(20000, "--train-size", min=1, help="Number of training grids."),
    val_size: int = typer.Option(2000, "--val-size", min=1, help="Number of validation grids."),
    cell_px: int = typer.Option(16, "--cell-px", min=4, max=64, help="Side of one digit cell in pixels."),
    seed: int = SeedOption,
    workers: int = WorkersOption,
    shard_samples: int = ShardSamplesOption,
    quality: int = typer.Option(95, "--quality", min=1, max=100, help="JPEG quality of the grids."),
) -> None:
    """The paper's multi-label digit grid (3×3 digits; label = centre digit w.p. 0.6), no download needed."""
    config = digits_grid.GridConfig(train_size=train_size, val_size=val_size, seed=seed, cell_px=cell_px)
    settings = writer_settings(workers, seed, shard_samples, 512, None, quality)
    for split, items in digits_grid.grid_items(config).items():
        write_split(out, digits_grid.grid_spec(split, config), items, settings)


@app.command("folder")
def folder_command(
    images: Path = typer.Option(..., "--images", help="Image folder; label-file paths are relative to it."),
    labels: Path = typer.Option(..., "--labels", help="CSV (header path,label[,labels]) or JSONL label file."),
    split: str = typer.Option(..., "--split", help="Split name to write (e.g. train, val)."),
    out: Path = OutOption,
    seed: int = SeedOption,
    workers: int = WorkersOption,
    shard_samples: int = ShardSamplesOption,
    shard_mb: int = ShardMbOption,
    max_side: int | None = MaxSideOption,
    quality: int = QualityOption,
) -> None:
    """Any image folder plus a label file; run again with another --split to add splits."""
    items, class_names, kind = folder.folder_items(images, labels, out)
    spec = folder.folder_spec(split, class_names, kind, labels)
    write_split(out, spec, items, writer_settings(workers, seed, shard_samples, shard_mb, max_side, quality))


def main() -> None:
    try:
        app()
    except (ShardError, ValueError) as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
