"""One run of a config that may already have a folder: train it, resume it, or reuse its result.

The demo and sweeps train many configs, each in its own folder; running them again must neither
repeat finished work nor delete a run, so each config goes through ``train_or_reuse``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from engine.config import RunConfig, check_loader_workers
from engine.run_folder import RunFolder, RunFolderError, saved_config


def train_or_reuse(config: RunConfig) -> dict[str, Any]:
    """Train one config, or reuse a finished run of the same config, or resume an interrupted one;
    a folder holding a run of another config is an error (nothing is ever deleted). The summary
    carries ``wall_s``, the seconds the training took (None for a run of an older release)."""
    from engine.distributed import init_distributed
    from engine.trainer import Trainer

    check_loader_workers(config.data.num_workers, "data.num_workers (--workers)")
    folder = RunFolder(config.out_dir)
    with folder.lock():  # one process per run folder (engine/run_folder.py)
        resume = _check_existing(folder, config)
        summary = folder.read_summary()
        if summary is not None:
            print(f"reusing the finished run in {folder.root}")
            return {**summary, "wall_s": folder.read_wall_s()}
        started = time.perf_counter()
        summary = Trainer(config, init_distributed(config.device), resume=resume).run()
        summary["wall_s"] = time.perf_counter() - started
        folder.wall_path.write_text(json.dumps(summary["wall_s"]) + "\n")
        return summary


def _check_existing(folder: RunFolder, config: RunConfig) -> bool:
    """True when ``folder`` holds an unfinished run of this very config (so it is resumed)."""
    if not folder.config_path.is_file():
        return False
    if saved_config(folder.root) != config:
        raise RunFolderError(f"{folder.root} holds a run with another config; move it away, or pass --out to the demo")
    return folder.checkpoint_path.is_file()
