"""``engine-run``: train softmax, sigmoid or MILe; with no arguments, MILe on the embedded digit grid."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import typer

from engine.config import ConfigError, RunConfig, build_config, load_toml

DEFAULT_CONFIG = "digits_grid.toml"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def default_config_path() -> Path:
    return Path(str(resources.files("engine") / "configs" / DEFAULT_CONFIG))


def _overrides(options: dict[str, Any]) -> dict[str, Any]:
    """Flag name -> config key; options left at None were not given and override nothing."""
    keys = {
        "data": "data.root", "train_split": "data.train_split", "eval_split": "data.eval_split",
        "image_size": "data.image_size_px", "augment": "data.augment", "eval_crop": "data.eval_crop_fraction", "loader": "data.backend",
        "workers": "data.num_workers", "method": "method.name", "k_teacher_steps": "method.k_teacher_steps",
        "k_student_steps": "method.k_student_steps", "rho": "method.rho", "student_init": "method.student_init",
        "warmup_steps": "method.warmup_steps", "lr": "optim.lr_per_256", "schedule": "optim.schedule",
        "warmup_lr_steps": "optim.warmup_lr_steps", "momentum": "optim.momentum", "nesterov": "optim.nesterov",
        "weight_decay": "optim.weight_decay", "arch": "arch", "steps": "num_steps", "batch_size": "global_batch_size",
        "theta": "eval_thetas", "multilabel_metrics": "multilabel_metrics", "eval_every": "eval_every",
        "log_every": "log_every", "checkpoint_every": "checkpoint_every", "seed": "seed", "out": "out_dir",
        "device": "device", "cuda_graphs": "cuda_graphs",
    }
    out = {keys[name]: value for name, value in options.items() if name in keys}
    if out.get("eval_thetas") == []:
        out["eval_thetas"] = None
    if out.get("data.root") is not None:
        out["data.root"] = str(out["data.root"])
    if out.get("out_dir") is not None:
        out["out_dir"] = str(out["out_dir"])
    return out


def resolve_config(config_file: Optional[Path], resume: bool, options: dict[str, Any]) -> RunConfig:
    """Saved config on --resume, else --config FILE (default: the digit-grid MILe config); flags win."""
    overrides = _overrides(options)
    if resume:
        out = Path(overrides.get("out_dir") or RunConfig().out_dir)
        saved = out / "config.json"
        if not saved.is_file():
            raise ConfigError(f"--resume: {saved} does not exist (is --out the folder of an earlier run?)")
        return build_config(json.loads(saved.read_text()), overrides)
    return build_config(load_toml(config_file or default_config_path()), overrides)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def run(
    config: Optional[Path] = typer.Option(None, "--config", help="TOML config; flags override its values. Default: MILe on the digit grid."),
    data: Optional[Path] = typer.Option(None, "--data", help="Shard folder (manifest.json). Default: the embedded digit grid, built on first use."),
    train_split: Optional[str] = typer.Option(None, "--train-split", help="Split to train on (default: train)."),
    eval_split: Optional[str] = typer.Option(None, "--eval-split", help="Split to evaluate on (default: val)."),
    method: Optional[str] = typer.Option(None, "--method", help="softmax | sigmoid | mile."),
    arch: Optional[str] = typer.Option(None, "--arch", help="grid_cnn | resnet18 | resnet50 | resnet50d."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps in total."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size (all processes)."),
    k_teacher_steps: Optional[int] = typer.Option(None, "--k-teacher-steps", help="MILe: steps per interaction (teacher) phase."),
    k_student_steps: Optional[int] = typer.Option(None, "--k-student-steps", help="MILe: steps per imitation (student) phase."),
    rho: Optional[float] = typer.Option(None, "--rho", help="MILe: pseudo-label threshold on the teacher's sigmoid, in (0, 1)."),
    student_init: Optional[str] = typer.Option(None, "--student-init", help="MILe: teacher (continue from the teacher) | previous (Algorithm 1)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="MILe: teacher-only steps before the first imitation phase."),
    theta: Optional[list[float]] = typer.Option(None, "--theta", help="Eval threshold(s) for F1 and coverage; repeat for several."),
    multilabel_metrics: Optional[str] = typer.Option(None, "--multilabel-metrics", help="auto | on (require multi-labels) | off."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate per 256 images (scaled by batch size)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine | step | constant."),
    warmup_lr_steps: Optional[int] = typer.Option(None, "--warmup-lr-steps", help="Linear learning-rate warmup steps."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum."),
    nesterov: Optional[bool] = typer.Option(None, "--nesterov/--no-nesterov", help="Nesterov momentum."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="SGD weight decay."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Image side in pixels."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random-resized-crop + flip in training."),
    eval_crop: Optional[float] = typer.Option(None, "--eval-crop", help="Eval centre-crop fraction; 0 = auto (0.875 with --augment, else 1)."),
    loader: Optional[str] = typer.Option(None, "--loader", help="auto | dali | torch."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Loader worker processes/threads."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of weights, data order and augmentation."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/latest)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N."),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="Capture steps as CUDA graphs."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N steps."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Log every N steps."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Checkpoint every N steps."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs on this node; N > 1 re-launches under torchrun."),
) -> None:
    """Train softmax, sigmoid or MILe (Multi-label Iterated Learning) from WebDataset shards."""
    options = dict(locals())
    run_config = resolve_config(options.pop("config"), options.pop("resume"), options)
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch(gpus)
        return
    _train(run_config, resume)


def _relaunch(gpus: int) -> None:
    from engine.distributed import torchrun_command

    raise SystemExit(subprocess.call(torchrun_command(gpus, without_gpus_flag(sys.argv[1:]))))


def without_gpus_flag(argv: list[str]) -> list[str]:
    """The arguments minus ``--gpus N`` / ``--gpus=N`` (the children must not re-launch)."""
    out, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == "--gpus":
            skip_next = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def _train(run_config: RunConfig, resume: bool) -> None:
    from engine.distributed import init_distributed, shutdown_distributed
    from engine.report import print_metrics_table
    from engine.trainer import Trainer

    dist = init_distributed(run_config.device)
    completed = False
    try:
        summary = Trainer(run_config, dist, resume).run()
        completed = True
        if dist.is_main:
            print_metrics_table(summary, title=f"{run_config.method.name} on {run_config.data.root or 'digit grid'}")
    finally:
        shutdown_distributed(completed)


def main() -> None:
    from engine.run_folder import RunFolderError
    from engine.trainer import NonFiniteLoss, RunInterrupted
    from shards.manifest import ShardError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        app()
    except RunInterrupted as stopped:
        typer.secho(str(stopped), fg=typer.colors.YELLOW, err=True)
        raise SystemExit(stopped.exit_code) from None
    except NonFiniteLoss as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise SystemExit(3) from None
    except (ConfigError, ShardError, RunFolderError, FileNotFoundError, ValueError) as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
