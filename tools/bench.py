#!/usr/bin/env python
"""``tools/bench.py``: performance measurements, one subcommand per area; see ``--help``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from engine.options import ARCH, BATCH_SIZE, DEVICE, IMAGE_SIZE, OUT, WORKERS, knob_option
from shards.cli import MAX_SIDE
from shards.command_options import Opt, OptionGroup, command_app, with_options

if TYPE_CHECKING:
    from benchmarks.loaders import LoaderBenchConfig

app = command_app(
    "Measure the trainer's parts side by side; prints a table and writes JSON.", no_args_is_help=True, completion=True
)

# Options of several subcommands; each one changes only what differs there (a default, or what the value is for).
RESULTS = OUT.but(type=Path | None, default=None, help="Write the results as JSON to FILE.")  # every subcommand
NUM_IMAGES = Opt(("--num-images",), int, "Synthetic ~500x375 photo JPEGs to stream.", 512, min=8)
REPEATS = Opt(("--repeats",), int, "Timed repeats (median and spread reported).", 5, min=1)
WARMUP = Opt(("--warmup",), int, "Untimed steps first.", 5, min=0)
SEED = Opt(("--seed",), int, "Seed of the synthetic photos and the loaders.", 0)
STEPS = Opt(("--steps",), int, "Timed steps per repeat.", 20, min=1)
NUM_CLASSES = Opt(("--num-classes",), int, "Classifier outputs.", 1000, min=2)
MODEL_ARCH = ARCH.but(default="resnet50", help="Model (grid_cnn for a quick CPU check).")
MODEL_IMAGE_SIZE = IMAGE_SIZE.but(default=224)
STEP_BATCH_SIZE = BATCH_SIZE.but(default=256, help="Images per step.")
GPU = DEVICE.but(default="cuda", help="cuda, cuda:N or cpu.")


def _loader_bench_config(**values: Any) -> LoaderBenchConfig:
    from benchmarks.loaders import LoaderBenchConfig

    return LoaderBenchConfig(**values)


# What loaders and dali-gap stream: one LoaderBenchConfig from these options.
LOADER_BENCH = OptionGroup(
    {
        "num_images": NUM_IMAGES,
        "batch_size": BATCH_SIZE.but(default=64, help="Images per batch (every loader)."),
        "image_size_px": IMAGE_SIZE.but(default=224, help="Output side in pixels."),
        "workers": WORKERS.but(default=2, min=0, help="DataLoader processes / DALI threads (every loader)."),
        "repeats": REPEATS.but(help="Timed epochs per loader."),
        "warmup_epochs": WARMUP.but(default=1, help="Untimed epochs first."),
        "seed": SEED,
    },
    _loader_bench_config,
)
DALI_GAP_BENCH = LOADER_BENCH.but(
    batch_size=LOADER_BENCH.options["batch_size"].but(help="Images per batch (every row)."),
    workers=WORKERS.but(default=2, min=1, help="DALI threads (every row)."),
    repeats=REPEATS.but(help="Timed rounds (one epoch of every row each)."),
    warmup_epochs=WARMUP.but(default=1, help="Untimed rounds first."),
    seed=SEED.but(help="Seed of the synthetic photos and the pipelines."),
)

TORCH_GAP_BENCH = DALI_GAP_BENCH.but(workers=WORKERS.but(default=2, min=0, help="DataLoader processes (every row)."))


@app.callback()
def main() -> None:
    """Subcommands: loaders (input pipelines), dali-gap (DALI CPU backend vs a plain DALI pipeline),
    torch-gap (torch backend vs a plain torchvision DataLoader), convert (shard conversion), engine
    (training steps), e2e (all together)."""


@app.command("loaders")
@with_options(config=LOADER_BENCH)
def loaders(*, out: Path | None = RESULTS.option(), config: LoaderBenchConfig) -> None:
    """Train-mode decode+augment images/s: DALI CPU and torch backends beside their libraries' plain
    pipelines, the PIL DataLoader (and GPU decode with CUDA)."""
    from benchmarks import loaders as bench_loaders

    env = bench_loaders.environment()
    results = bench_loaders.run_loader_bench(config)
    _show(bench_loaders.format_table(results), out, lambda path: bench_loaders.write_json(path, config, results, env))


@app.command("dali-gap")
@with_options(config=DALI_GAP_BENCH)
def dali_gap(
    *,
    out: Path | None = RESULTS.option(),
    config: LoaderBenchConfig,
    rows: str = typer.Option(
        "", "--rows", help="Comma-separated parts of row names to run (default: all; the plain pipeline always)."
    ),
) -> None:
    """DALI CPU: the project's loader vs a plain DALI pipeline, and variants removing one difference each."""
    from benchmarks import dali_gap as bench_gap
    from benchmarks import loaders as bench_loaders

    if (reason := _dali_missing()) is not None:
        raise typer.BadParameter(f"dali-gap needs NVIDIA DALI, which does not import here ({reason})")
    env = bench_loaders.environment()
    try:
        results = bench_gap.run_dali_gap(config, _row_parts(rows))
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--rows") from None
    _show(bench_gap.format_table(results), out, lambda path: bench_gap.write_json(path, config, results, env))


@app.command("torch-gap")
@with_options(config=TORCH_GAP_BENCH)
def torch_gap(
    *,
    out: Path | None = RESULTS.option(),
    config: LoaderBenchConfig,
    rows: str = typer.Option(
        "", "--rows", help="Comma-separated parts of row names to run (default: all; the plain row always)."
    ),
) -> None:
    """torch backend (CPU): the project's loader vs a plain torchvision.io + v2 DataLoader, variants
    changing one difference each, and the host side of the GPU-decode path."""
    from benchmarks import loaders as bench_loaders
    from benchmarks import torch_gap as bench_gap

    env = bench_loaders.environment()
    try:
        results = bench_gap.run_torch_gap(config, _row_parts(rows))
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--rows") from None
    _show(bench_gap.format_table(results), out, lambda path: bench_gap.write_json(path, config, results, env))


def _show(table: str, out: Path | None, write: Callable[[Path], None]) -> None:
    """Every subcommand's ending: the table on stdout, the JSON in ``out`` when given."""
    typer.echo(table)
    if out is not None:
        write(out)
        typer.echo(f"wrote {out}")


def _row_parts(rows: str) -> tuple[str, ...]:
    """``--rows "a, b"`` -> ("a", "b")."""
    return tuple(part.strip() for part in rows.split(",") if part.strip())


def _dali_missing() -> str | None:
    from pipelines import dali_import_error

    return dali_import_error()


@app.command("convert")
def convert(
    out: Path | None = RESULTS.option(),
    num_images: int = NUM_IMAGES.option(default=1000, min=1, help="Synthetic photo JPEGs (~500x375) to convert."),
    large_fraction: float = typer.Option(0.3, "--large-fraction", min=0.0, max=1.0, help="Share enlarged to 800x600."),
    max_side: int = MAX_SIDE.option(default=500, help="--max-side of the resizing conversion."),
    workers: str = typer.Option("1,2", "--workers", help="Comma-separated worker counts to measure."),
    repeats: int = REPEATS.option(default=3, help="Timed runs per configuration."),
    seed: int = SEED.option(help="Seed of the synthetic photos."),
) -> None:
    """make_shards conversion images/s (pass-through and --max-side) and verify seconds per 1,000 images."""
    from benchmarks import convert as bench_convert

    worker_counts = tuple(int(w) for w in workers.split(","))
    config = bench_convert.ConvertBenchConfig(num_images, large_fraction, max_side, worker_counts, repeats, seed)
    results, num_large = bench_convert.run_convert_bench(config)
    typer.echo(f"{num_images} images, {num_large} of them 800x600")
    _show(
        bench_convert.format_table(results),
        out,
        lambda path: bench_convert.write_json(path, config, results, num_large),
    )


@app.command("engine")
def engine(
    out: Path | None = RESULTS.option(),
    arch: str = MODEL_ARCH.option(),
    image_size: int = MODEL_IMAGE_SIZE.option(),
    batch_size: int = STEP_BATCH_SIZE.option(),
    num_classes: int = NUM_CLASSES.option(),
    steps: int = STEPS.option(),
    repeats: int = REPEATS.option(),
    warmup: int = WARMUP.option(),
    device: str = GPU.option(help="cuda or cpu."),
) -> None:
    """Engine-only images/s per phase (graphs on/off) vs a plain eager deepcopy-teacher loop."""
    from benchmarks import engine_steps as bench_engine
    from benchmarks.loaders import environment

    config = bench_engine.EngineBenchConfig(arch, image_size, batch_size, num_classes, steps, repeats, warmup, device)
    _use_device(device)
    env = environment()
    rows = bench_engine.run_engine_bench(config)
    _show(bench_engine.format_table(rows), out, lambda path: bench_engine.write_json(path, config, rows, env))


def _use_device(device: str) -> None:
    """``cuda:N``: make N the current device, where streams, events and graph captures are made."""
    if device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(device)


@app.command("e2e")
def e2e(
    out: Path | None = RESULTS.option(),
    arch: str = MODEL_ARCH.option(),
    image_size: int = MODEL_IMAGE_SIZE.option(),
    batch_size: int = STEP_BATCH_SIZE.option(),
    num_classes: int = NUM_CLASSES.option(help="Classes (labels cycle through them)."),
    num_images: int = NUM_IMAGES.option(
        default=1024, min=1, help="Distinct synthetic ~500x375 photos (repeated to fill the rows)."
    ),
    steps: int = STEPS.option(help="Timed steps per row."),
    warmup: int = WARMUP.option(help="Untimed steps first, per row."),
    workers: int = WORKERS.option(default=8, min=0, help="DataLoader processes / DALI threads (every loader)."),
    k_teacher: int = knob_option("method.k_teacher_steps").option(
        default=10, help="End-to-end rows: steps per teacher phase."
    ),
    k_student: int = knob_option("method.k_student_steps").option(
        default=5, help="End-to-end rows: steps per student phase."
    ),
    device: str = GPU.option(),
) -> None:
    """Loader alone, engine alone (graphs on/off), loader + engine as trained, and the released code's way,
    with GPU telemetry."""
    from benchmarks import e2e as bench_e2e
    from benchmarks.loaders import environment

    config = bench_e2e.E2EConfig(
        arch, image_size, batch_size, num_classes, num_images, steps, warmup, workers, k_teacher, k_student, device
    )
    _use_device(device)
    env = environment()
    rows = bench_e2e.run_e2e_bench(config)
    _show(bench_e2e.format_table(rows), out, lambda path: bench_e2e.write_json(path, config, rows, env))


if __name__ == "__main__":
    app()
