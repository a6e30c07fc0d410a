#!/usr/bin/env python
"""``tools/bench.py``: performance measurements, one subcommand per area; see ``--help``."""

from __future__ import annotations

from pathlib import Path

import typer

OUT_OPTION = typer.Option(None, "--out", help="Write the results as JSON to FILE.")  # every subcommand

app = typer.Typer(
    help="Measure the trainer's parts side by side; prints a table and writes JSON.", no_args_is_help=True
)


@app.callback()
def main() -> None:
    """Subcommands: loaders (input pipelines), dali-gap (DALI CPU backend vs a plain DALI pipeline),
    convert (shard conversion), engine (training steps), e2e (all together)."""


@app.command("loaders")
def loaders(
    out: Path | None = OUT_OPTION,
    num_images: int = typer.Option(512, "--num-images", min=8, help="Synthetic ~500x375 photo JPEGs to stream."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per batch (every loader)."),
    image_size: int = typer.Option(224, "--image-size", min=8, help="Output side in pixels."),
    workers: int = typer.Option(2, "--workers", min=0, help="DataLoader processes / DALI threads (every loader)."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed epochs per loader."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed epochs first."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic photos and the loaders."),
) -> None:
    """Train-mode decode+augment images/s: DALI CPU, torch backend, PIL DataLoader (and GPU decode with CUDA)."""
    from benchmarks import loaders as bench_loaders

    config = bench_loaders.LoaderBenchConfig(num_images, batch_size, image_size, workers, repeats, warmup, seed)
    env = bench_loaders.environment()
    results = bench_loaders.run_loader_bench(config)
    typer.echo(bench_loaders.format_table(results))
    if out is not None:
        bench_loaders.write_json(out, config, results, env)
        typer.echo(f"wrote {out}")


@app.command("dali-gap")
def dali_gap(
    out: Path | None = OUT_OPTION,
    num_images: int = typer.Option(512, "--num-images", min=8, help="Synthetic ~500x375 photo JPEGs to stream."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per batch (every row)."),
    image_size: int = typer.Option(224, "--image-size", min=8, help="Output side in pixels."),
    workers: int = typer.Option(2, "--workers", min=1, help="DALI threads (every row)."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed rounds (one epoch of every row each)."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed rounds first."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic photos and the pipelines."),
    rows: str = typer.Option(
        "", "--rows", help="Comma-separated parts of row names to run (default: all; the plain pipeline always)."
    ),
) -> None:
    """DALI CPU: the project's loader vs a plain DALI pipeline, and variants removing one difference each."""
    from benchmarks import dali_gap as bench_gap
    from benchmarks import loaders as bench_loaders

    if (reason := _dali_missing()) is not None:
        raise typer.BadParameter(f"dali-gap needs NVIDIA DALI, which does not import here ({reason})")
    config = bench_loaders.LoaderBenchConfig(num_images, batch_size, image_size, workers, repeats, warmup, seed)
    env = bench_loaders.environment()
    results = bench_gap.run_dali_gap(config, tuple(part.strip() for part in rows.split(",") if part.strip()))
    typer.echo(bench_gap.format_table(results))
    if out is not None:
        bench_gap.write_json(out, config, results, env)
        typer.echo(f"wrote {out}")


def _dali_missing() -> str | None:
    from pipelines import dali_import_error

    return dali_import_error()


@app.command("convert")
def convert(
    out: Path | None = OUT_OPTION,
    num_images: int = typer.Option(1000, "--num-images", min=1, help="Synthetic photo JPEGs (~500x375) to convert."),
    large_fraction: float = typer.Option(0.3, "--large-fraction", min=0.0, max=1.0, help="Share enlarged to 800x600."),
    max_side: int = typer.Option(500, "--max-side", min=8, help="--max-side of the resizing conversion."),
    workers: str = typer.Option("1,2", "--workers", help="Comma-separated worker counts to measure."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per configuration."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic photos."),
) -> None:
    """make_shards conversion images/s (pass-through and --max-side) and verify seconds per 1,000 images."""
    from benchmarks import convert as bench_convert

    worker_counts = tuple(int(w) for w in workers.split(","))
    config = bench_convert.ConvertBenchConfig(num_images, large_fraction, max_side, worker_counts, repeats, seed)
    results, num_large = bench_convert.run_convert_bench(config)
    typer.echo(f"{num_images} images, {num_large} of them 800x600")
    typer.echo(bench_convert.format_table(results))
    if out is not None:
        bench_convert.write_json(out, config, results, num_large)
        typer.echo(f"wrote {out}")


@app.command("engine")
def engine(
    out: Path | None = OUT_OPTION,
    arch: str = typer.Option("resnet50", "--arch", help="Model (grid_cnn for a quick CPU check)."),
    image_size: int = typer.Option(224, "--image-size", min=8, help="Image side in pixels."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per step."),
    num_classes: int = typer.Option(1000, "--num-classes", min=2, help="Classifier outputs."),
    steps: int = typer.Option(20, "--steps", min=1, help="Timed steps per repeat."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed repeats (median and spread reported)."),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed steps first."),
    device: str = typer.Option("cuda", "--device", help="cuda or cpu."),
) -> None:
    """Engine-only images/s per phase (graphs on/off) vs a plain eager deepcopy-teacher loop."""
    from benchmarks import engine_steps as bench_engine
    from benchmarks.loaders import environment

    config = bench_engine.EngineBenchConfig(arch, image_size, batch_size, num_classes, steps, repeats, warmup, device)
    _use_device(device)
    env = environment()
    rows = bench_engine.run_engine_bench(config)
    typer.echo(bench_engine.format_table(rows))
    if out is not None:
        bench_engine.write_json(out, config, rows, env)
        typer.echo(f"wrote {out}")


def _use_device(device: str) -> None:
    """``cuda:N``: make N the current device, where streams, events and graph captures are made."""
    if device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(device)


@app.command("e2e")
def e2e(
    out: Path | None = OUT_OPTION,
    arch: str = typer.Option("resnet50", "--arch", help="Model (grid_cnn for a quick CPU check)."),
    image_size: int = typer.Option(224, "--image-size", min=8, help="Image side in pixels."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per step."),
    num_classes: int = typer.Option(1000, "--num-classes", min=2, help="Classes (labels cycle through them)."),
    num_images: int = typer.Option(
        1024, "--num-images", min=1, help="Distinct synthetic ~500x375 photos (repeated to fill the rows)."
    ),
    steps: int = typer.Option(20, "--steps", min=1, help="Timed steps per row."),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed steps first, per row."),
    workers: int = typer.Option(8, "--workers", min=0, help="DataLoader processes / DALI threads (every loader)."),
    k_teacher: int = typer.Option(10, "--k-teacher-steps", min=1, help="End-to-end rows: steps per teacher phase."),
    k_student: int = typer.Option(5, "--k-student-steps", min=1, help="End-to-end rows: steps per student phase."),
    device: str = typer.Option("cuda", "--device", help="cuda, cuda:N or cpu."),
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
    typer.echo(bench_e2e.format_table(rows))
    if out is not None:
        bench_e2e.write_json(out, config, rows, env)
        typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()
