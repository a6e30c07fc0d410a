"""``tools/make_shards.py`` / ``make-shards``: convert a data source into WebDataset shards.

Every conversion holds the ``--out`` folder's lock from listing to manifest (a second conversion
into the same folder stops at once, naming the first one's pid). ``main`` turns every expected
failure (bad input, busy or unwritable folder, full disk, SIGTERM) into one line on stderr and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from pathlib import Path

import typer

from shards.command_options import Opt, OptionGroup, command_app, with_options
from shards.folder_lock import output_lock
from shards.format import check_split_name
from shards.images import ImagePolicy
from shards.manifest import ShardError
from shards.sources import celeba, digits_grid, folder, imagenet, webvision
from shards.sources.common import PlannedSplit, parse_splits, write_planned
from shards.verify import format_report, verify_root
from shards.writer import WriterSettings

app = command_app(
    "Convert datasets into WebDataset tar shards (+ DALI index files and a manifest).",
    no_args_is_help=True,
    completion=True,
)

OUT = Opt(("--out",), Path, "Output folder (manifest.json and one sub-folder per split).")
ROOT = Opt(("--root",), Path, "The dataset's top folder, as downloaded.")
SPLITS = Opt(("--splits",), str | None, "Comma-separated splits to write (default: every split found).", None)
FOLLOW_SYMLINKS = Opt(
    ("--follow-symlinks",),
    bool,
    "Read listed files through symlinks that point outside the dataset folder (refused by default).",
    False,
)
OVERWRITE = Opt(
    ("--overwrite",),
    bool,
    "--out holds splits of another dataset (other classes): remove them instead of refusing.",
    False,
)
SEED = Opt(("--seed",), int, "Seed of the write-time shuffle (and of any random selection).", 0)
WORKERS = Opt(("--workers",), int, "Processes encoding images in parallel.", os.cpu_count() or 1, min=1)
MAX_SIDE = Opt(("--max-side",), int | None, "Shrink images whose longer side exceeds PX (re-encodes).", None, min=8)
QUALITY = Opt(("--quality",), int, "JPEG quality when an image is re-encoded.", 90, min=1, max=100)


def writer_settings(
    workers: int, seed: int, shard_samples: int, shard_mb: int, max_side: int | None, quality: int
) -> WriterSettings:
    return WriterSettings(
        max_samples_per_shard=shard_samples,
        max_bytes_per_shard=shard_mb * 1024 * 1024,
        seed=seed,
        workers=workers,
        image=ImagePolicy(max_side_px=max_side, quality=quality),
    )


# How every converter writes its shards: one value, WriterSettings, from these options.
WRITER = OptionGroup(
    {
        "seed": SEED,
        "workers": WORKERS,
        "shard_samples": Opt(("--shard-samples",), int, "Maximum samples per tar shard.", 1000, min=1),
        "shard_mb": Opt(("--shard-mb",), int, "Maximum size of a tar shard in MiB.", 512, min=1),
        "max_side": MAX_SIDE,
        "quality": QUALITY,
    },
    writer_settings,
)


# The digit grid's writer: its own JPEG quality; grids are small (no --shard-mb) and never resized.
GRID_WRITER = OptionGroup(
    {name: WRITER.options[name] for name in ("seed", "workers", "shard_samples")}
    | {"quality": QUALITY.but(default=digits_grid.GRID_JPEG_QUALITY, help="JPEG quality of the grids.")},
    functools.partial(writer_settings, shard_mb=WRITER.options["shard_mb"].default, max_side=None),
)


@app.command("digits-grid")
@with_options(writer=GRID_WRITER)
def digits_grid_command(
    *,
    out: Path = OUT.option(),
    train_size: int = typer.Option(20000, "--train-size", min=1, help="Number of training grids."),
    val_size: int = typer.Option(2000, "--val-size", min=1, help="Number of validation grids."),
    tune_size: int | None = typer.Option(
        None, "--tune-size", min=1, help="Number of tune grids (for choosing hyperparameters); default: --val-size."
    ),
    cell_px: int = typer.Option(8, "--cell-px", min=4, max=64, help="Side of one digit cell in pixels."),
    jitter_px: int = typer.Option(
        0, "--jitter-px", min=0, help="Shift each digit by up to this many pixels inside its cell (< cell-px / 2)."
    ),
    noise_std: float = typer.Option(
        0.0, "--noise-std", min=0.0, max=128.0, help="Gaussian pixel noise (standard deviation, 0..255 units)."
    ),
    pool_seed: int = typer.Option(
        digits_grid.POOL_SEED, "--pool-seed", help="Seed of the digit images' split into train/tune/val pools."
    ),
    writer: WriterSettings,
    overwrite: bool = OVERWRITE.option(),
) -> None:
    """The paper's multi-label digit grid (3×3 digits; label = centre digit w.p. 0.6), no download needed.

    Writes splits train, tune and val, drawn from three disjoint digit-image pools that --seed never
    changes: tune on the tune split, report on val."""
    try:
        config = digits_grid.GridConfig(
            train_size=train_size,
            val_size=val_size,
            tune_size=tune_size,
            seed=writer.seed,
            cell_px=cell_px,
            jitter_px=jitter_px,
            noise_std=noise_std,
            pool_seed=pool_seed,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--jitter-px") from None
    with output_lock(out):
        grids = digits_grid.grid_items(config)
        planned = [PlannedSplit(digits_grid.grid_spec(split, config), items) for split, items in grids.items()]
        write_planned(out, planned, writer, overwrite)


@app.command("folder")
@with_options(writer=WRITER)
def folder_command(
    *,
    images: Path = typer.Option(..., "--images", help="Image folder; label-file paths are relative to it."),
    labels: Path = typer.Option(
        ...,
        "--labels",
        help="CSV (header path,label[,labels] or path,labels: the first listed is the label) or JSONL label file.",
    ),
    split: str = typer.Option(..., "--split", help="Split name to write (e.g. train, val)."),
    unlabelled: bool = typer.Option(
        False,
        "--unlabelled",
        help="Write an unlabelled split (semi-supervised training): only the label file's path column is read; "
        "convert a labelled split into --out first (its class names are kept).",
    ),
    out: Path = OUT.option(),
    writer: WriterSettings,
    overwrite: bool = OVERWRITE.option(),
    follow_symlinks: bool = FOLLOW_SYMLINKS.option(),
) -> None:
    """Any image folder plus a label file; run again with another --split to add splits."""
    check_split_name(split, "--split")
    with output_lock(out):  # the classes are read from the manifest: hold the lock from here
        items, class_names, kind = folder.folder_items(images, labels, out, split, follow_symlinks, unlabelled)
        spec = folder.folder_spec(split, class_names, kind, labels)
        write_planned(out, [PlannedSplit(spec, items)], writer, overwrite)


@app.command("imagenet")
@with_options(writer=WRITER)
def imagenet_command(
    *,
    root: Path = ROOT.option(),
    out: Path = OUT.option(),
    splits: str | None = SPLITS.option(),
    val_layout: str = typer.Option(
        "auto",
        "--val-layout",
        help="Val layout: auto, folders, kaggle (LOC_val_solution.csv) or devkit.",
    ),
    val_labels: Path | None = typer.Option(
        None,
        "--val-labels",
        help="Val label file (Kaggle CSV or devkit ground truth) if not found by itself.",
    ),
    devkit_synsets: Path | None = typer.Option(
        None,
        "--devkit-synsets",
        help="Devkit meta.mat, or WNIDs in ILSVRC2012_ID order (default: meta.mat beside the ground truth).",
    ),
    real_labels: Path | None = typer.Option(
        None,
        "--real-labels",
        help="ReaL labels JSON for val (default: the copy timm bundles).",
    ),
    no_real: bool = typer.Option(False, "--no-real", help="Write val with single labels only, no ReaL sets."),
    subset: Path | None = typer.Option(
        None,
        "--subset",
        help="Keep only the train files listed (SimCLR 1%/10% list: one file name per line).",
    ),
    fraction: float | None = typer.Option(
        None,
        "--fraction",
        help="Keep this fraction of each train class, chosen with --seed (e.g. 0.05).",
    ),
    unlabelled_complement: str | None = typer.Option(
        None,
        "--unlabelled-complement",
        help="With --fraction or --subset: also write the train images not kept, without labels, as this split "
        "(e.g. train_unlabelled), for semi-supervised training (--unlabelled-split).",
    ),
    classes: int | None = typer.Option(
        None,
        "--classes",
        help="Only the first N sorted WNIDs present; class index = position among them.",
    ),
    class_list: Path | None = typer.Option(
        None,
        "--class-list",
        help="Only these WNIDs (one per line); class index = position in the file.",
    ),
    writer: WriterSettings,
    overwrite: bool = OVERWRITE.option(),
    follow_symlinks: bool = FOLLOW_SYMLINKS.option(),
) -> None:
    """ImageNet-1k: train class folders; val in folders, Kaggle-CSV or devkit layout, with ReaL sets."""
    options = imagenet.ImageNetOptions(
        root=root,
        splits=parse_splits(splits, imagenet.SPLITS),
        val_layout=val_layout,
        val_labels=val_labels,
        devkit_synsets=devkit_synsets,
        real_labels=real_labels,
        use_real=not no_real,
        subset=subset,
        fraction=fraction,
        seed=writer.seed,
        num_classes=classes,
        class_list=class_list,
        follow_symlinks=follow_symlinks,
        unlabelled_complement=unlabelled_complement,
    )
    with output_lock(out):
        write_planned(out, imagenet.imagenet_plan(options), writer, overwrite)


@app.command("webvision")
@with_options(writer=WRITER)
def webvision_command(
    *,
    root: Path = ROOT.option(),
    out: Path = OUT.option(),
    mini: bool = typer.Option(False, "--mini", help="mini-WebVision: Google images of the first 50 classes."),
    sources: str | None = typer.Option(
        None,
        "--sources",
        help="Comma-separated train sources: google,flickr (default: both; google with --mini).",
    ),
    splits: str | None = SPLITS.option(),
    write_class_list: Path | None = typer.Option(
        None,
        "--write-class-list",
        help="Also write the classes' WNIDs here, for `imagenet --class-list`.",
    ),
    writer: WriterSettings,
    overwrite: bool = OVERWRITE.option(),
    follow_symlinks: bool = FOLLOW_SYMLINKS.option(),
) -> None:
    """WebVision 1.0 (or --mini): info/ file lists, Google/Flickr train images, val_images_256/."""
    source_names = tuple(s.strip() for s in sources.split(",") if s.strip()) if sources is not None else None
    options = webvision.WebVisionOptions(
        root, mini, source_names, parse_splits(splits, webvision.SPLITS), follow_symlinks
    )
    with output_lock(out):
        planned = webvision.webvision_plan(options)
        if write_class_list is not None:
            webvision.write_class_list(write_class_list, planned[0].spec.class_names)
        write_planned(out, planned, writer, overwrite)


@app.command("celeba")
@with_options(writer=WRITER)
def celeba_command(
    *,
    root: Path = ROOT.option(),
    out: Path = OUT.option(),
    splits: str | None = SPLITS.option(),
    writer: WriterSettings,
    overwrite: bool = OVERWRITE.option(),
    follow_symlinks: bool = FOLLOW_SYMLINKS.option(),
) -> None:
    """CelebA: the 40 attributes as a multi-label target, official train/val/test partition."""
    options = celeba.CelebAOptions(root, parse_splits(splits, celeba.SPLITS), follow_symlinks)
    with output_lock(out):
        write_planned(out, celeba.celeba_plan(options), writer, overwrite)


@app.command("verify")
def verify_command(
    root: Path = typer.Argument(..., help="Shard folder (holding manifest.json)."),
    sample: float = typer.Option(
        1.0,
        "--sample",
        min=0.0,
        max=1.0,
        help="Fraction of images to decode (checksums and counts are always checked in full).",
    ),
    seed: int = SEED.option(help="Seed choosing which images --sample decodes."),
    workers: int = WORKERS.option(help="Processes checking shards in parallel."),
) -> None:
    """Re-hash every shard, check counts against the manifest and index files, decode the images."""
    report = verify_root(root, sample_fraction=sample, seed=seed, workers=workers)
    typer.echo(format_report(report))
    if not report.ok:
        raise typer.Exit(1)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks run: worker processes are
    killed, the folder lock is released, finished shards stay for a resume. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


# What to do about an OSError, by errno: the path comes from the error itself.
_OS_ERROR_ADVICE = {
    errno.ENOSPC: (
        "free space on that disk or choose another --out, then run the same command again (finished shards are kept)"
    ),
    errno.EDQUOT: "free space within your quota or choose another --out, then run the same command again",
    errno.EACCES: "check the folder's permissions or choose a writable --out",
    errno.EPERM: "check the folder's permissions or choose a writable --out",
    errno.EROFS: "that file system is read-only: choose another --out",
    errno.ENOTDIR: "a path component is a file, not a folder: choose another --out",
    errno.EEXIST: "a file is in the way: choose another --out",
}
_READ_ONLY_ADVICE = _OS_ERROR_ADVICE[errno.EROFS]
_FREE_SPACE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT})  # only writes raise them: the path is an output


def describe_os_error(error: OSError) -> str:
    """One line naming the path at fault, what went wrong and what to do. A write that fails on a
    read-only file system is called that even when the kernel or a FUSE layer answered ENOSPC:
    "free space" would send the user the wrong way."""
    what = error.strerror or str(error)
    where = error.filename if error.filename is not None else "(no file named)"
    advice = _OS_ERROR_ADVICE.get(error.errno or 0, "")
    if error.errno in _FREE_SPACE_ERRORS and error.filename is not None and _on_read_only_file_system(error.filename):
        advice = _READ_ONLY_ADVICE
    return f"cannot access {where}: {what}" + (f"; {advice}" if advice else "")


def _on_read_only_file_system(path: str | bytes | os.PathLike) -> bool:
    """Whether the nearest existing folder of ``path`` lies on a file system mounted read-only."""
    folder = Path(os.fsdecode(path))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def main() -> None:
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        app()
    except (ShardError, ValueError) as error:
        _fail(f"error: {error}", 2)
    except OSError as error:
        _fail(f"error: {describe_os_error(error)}", 2)
    except Terminated:
        message = "make-shards: terminated (SIGTERM); finished shards are kept: run the same command again to resume"
        _fail(message, 128 + signal.SIGTERM)


def _fail(message: str, status: int) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    sys.stderr.flush()
    raise SystemExit(status)


if __name__ == "__main__":
    main()
