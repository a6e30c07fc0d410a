"""The run plan: a run resolved and checked before anything is built or written (docs/DESIGN.md,
"The path of a run")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CPU, tiny_config

import shards.manifest
from engine.config import ConfigError, Method, MethodKind
from engine.distributed import DistInfo
from engine.plan import PlanError, plan_run
from engine.trainer import Trainer
from shards.manifest import ShardError


def test_the_plan_resolves_epochs_loaders_spec_and_kind_without_writing(grid_root: Path, tmp_path: Path) -> None:
    config = tiny_config(grid_root, tmp_path / "run", num_epochs=2, global_batch_size=64, **{"method.name": "softmax"})
    plan = plan_run(config, CPU)
    assert plan.config.num_steps == 2 * 640 // 64  # two epochs of the 640-image train split
    assert plan.engine_spec.num_classes == plan.train.manifest.num_classes and plan.engine_spec.batches_per_epoch == 10
    assert plan.train_loader.batch_size == plan.eval_loader.batch_size == 64 and plan.train_loader.train
    assert plan.method_kind is MethodKind.SOFTMAX and [s.name for s in plan.eval_sets] == [""]
    assert not (tmp_path / "run").exists()  # the plan writes nothing


def test_each_manifest_is_read_once_per_run(grid_root: Path, tmp_path: Path, monkeypatch) -> None:
    reads: list[Path] = []
    original = shards.manifest.load_splits

    def counted(root: Path):
        reads.append(Path(root))
        return original(root)

    monkeypatch.setattr(shards.manifest, "load_splits", counted)
    Trainer(tiny_config(grid_root, tmp_path / "run", num_steps=4, eval_every=2), CPU).run()
    assert len(reads) == 2  # the train split's and the eval split's, by the plan; the loaders are given them


def test_batch_size_problems_are_plan_errors(grid_root: Path, tmp_path: Path) -> None:
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(PlanError, match="--batch-size 33 is not divisible by 2 processes"):
        plan_run(tiny_config(grid_root, tmp_path / "a", global_batch_size=33), two)
    with pytest.raises(PlanError, match="larger than the training split 'train', which holds 640 samples"):
        plan_run(tiny_config(grid_root, tmp_path / "b", global_batch_size=1024), CPU)
    assert issubclass(PlanError, ConfigError) and issubclass(PlanError, ShardError)  # printed as before


def test_the_method_kind_has_one_definition() -> None:
    assert [m.kind for m in Method] == [MethodKind.SOFTMAX, MethodKind.SIGMOID, MethodKind.SIGMOID]
