"""Choosing and starting a model: any timm architecture, --init-checkpoint with the prefixes of
self-supervised releases, the classifier's own learning rate, milestones, epochs, eval precision."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import CPU, CPU_FLAGS, checkpoint_state, tiny_config
from typer.testing import CliRunner

from engine.build import EngineSpec, OptimizerInPlace, build_engine
from engine.checkpoint import CheckpointError
from engine.commands.run import app
from engine.config import MilestoneUnit, OptimConfig, Schedule, build_config
from engine.data import compute_dtype, loader_config
from engine.init_weights import load_backbone, read_weights
from engine.models import build_model, classifier_of, classifier_prefix
from engine.plan import steps_from_epochs
from engine.schedule import lr_at
from engine.trainer import Trainer
from pipelines.contract import Batch

runner = CliRunner()


def config_from_flags(*args: str):
    """The config ``engine-run ARGS`` would train with (parsed by the CLI, printed, read back)."""
    import tomllib

    result = runner.invoke(app, [*args, "--print-config"])
    assert result.exit_code == 0, result.output
    return build_config(tomllib.loads(result.stdout), {})


# -- any timm architecture ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_resnet"])
def test_any_timm_model_trains_with_a_sigmoid_head(arch: str) -> None:
    config = build_config({}, {"arch": arch, "device": "cpu", "method.name": "sigmoid", "data.image_size_px": 32})
    engine = build_engine(config, EngineSpec(num_classes=7), torch.device("cpu"))
    bias = classifier_of(engine.learner).bias
    assert bias is not None and torch.allclose(bias, torch.full((7,), -math.log(7)))
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    result = engine.train_step(0, Batch(images, torch.tensor([0, 1, 2, 3])))
    assert result.logits.shape == (4, 7) and torch.isfinite(result.loss)


def test_builtin_names_keep_torchvision_and_nothing_downloads(monkeypatch) -> None:
    import timm
    import torchvision

    assert isinstance(build_model("resnet18", 5, False), torchvision.models.ResNet)  # timm has the name too
    calls = []
    real = timm.create_model

    def recorded_create_model(name: str, **kw: Any) -> Any:
        calls.append(kw)
        return real(name, **kw)

    monkeypatch.setattr(timm, "create_model", recorded_create_model)
    build_model("test_vit", 5, True)
    assert calls == [{"pretrained": False, "num_classes": 5}]


# -- --init-checkpoint -------------------------------------------------------------------------


def moco_file(backbone: dict[str, torch.Tensor], path: Path) -> Path:
    """A MoCo v2 release layout: query and key encoders, the queue and an fc MLP projection head."""
    state: dict[str, torch.Tensor] = {}
    for key, value in backbone.items():
        state[f"module.encoder_q.{key}"] = value.clone()
        state[f"module.encoder_k.{key}"] = torch.zeros_like(value)
    mlp = {
        "fc.0.weight": torch.randn(64, 512),
        "fc.0.bias": torch.randn(64),
        "fc.2.weight": torch.randn(16, 64),
        "fc.2.bias": torch.randn(16),
    }
    for key, value in mlp.items():
        state[f"module.encoder_q.{key}"] = value
        state[f"module.encoder_k.{key}"] = value.clone()
    state["module.queue"] = torch.randn(16, 32)
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {"lr": 0.03}}, path)
    return path


@pytest.mark.slow
def test_moco_checkpoint_of_a_trained_resnet18_loads_every_backbone_key(
    grid_root: Path, tmp_path: Path, caplog
) -> None:
    small = {
        "arch": "resnet18",
        "method.name": "sigmoid",
        "num_steps": 2,
        "eval_every": 2,
        "checkpoint_every": 2,
        "global_batch_size": 16,
    }
    Trainer(tiny_config(grid_root, tmp_path / "pre", **small), CPU).run()
    learner = checkpoint_state(tmp_path / "pre")["learner"]
    backbone = {k: v for k, v in learner.items() if not k.startswith("fc.")}
    path = moco_file(backbone, tmp_path / "moco_v2_800ep.pth.tar")

    config = config_from_flags(
        "--data",
        str(grid_root),
        *CPU_FLAGS,
        "--out",
        str(tmp_path / "fine"),
        "--arch",
        "resnet18",
        "--method",
        "mile",
        "--batch-size",
        "16",
        "--init-checkpoint",
        str(path),
    )
    with caplog.at_level(logging.INFO, logger="engine.init_weights"):
        trainer = Trainer(config, CPU)
    teacher = trainer.engine.teacher
    assert teacher is not None
    for key, value in backbone.items():  # every backbone tensor, BatchNorm statistics included
        assert torch.equal(trainer.engine.learner.state_dict()[key], value), key
        assert torch.equal(teacher.state_dict()[key], value), key
    bias = classifier_of(trainer.engine.learner).bias
    assert bias is not None and torch.allclose(bias, torch.full((10,), -math.log(10)))  # re-initialised
    assert f"loaded {len(backbone)} backbone tensors (key prefix 'module.encoder_q.'), skipped 4 head" in caplog.text
    assert f"and {len(backbone) + 4 + 1} unexpected, 0 of another shape, 0 missing" in caplog.text


def test_a_file_of_another_architecture_is_an_error_naming_missing_keys(tmp_path: Path) -> None:
    # resnet50's keys overlap resnet18's: most load by name, 23 have another shape
    torch.save(build_model("resnet50", 10, False).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(CheckpointError) as error:
        load_backbone(build_model("resnet18", 10, False), tmp_path / "r50.pth")
    message = str(error.value)
    assert "init_checkpoint (--init-checkpoint)" in message and "r50.pth" in message
    assert (
        "leaves 23 of the 120 backbone tensors of ResNet unloaded (missing: layer1.0.conv1.weight, "
        "layer1.1.conv1.weight" in message
    )
    assert "of another shape: layer1.0.conv1.weight: file (64, 64, 1, 1) vs model (64, 64, 3, 3)" in message
    # no key in common: everything missing
    torch.save({"state_dict": build_model("grid_cnn", 10, False).state_dict()}, tmp_path / "grid.pth")
    with pytest.raises(
        CheckpointError,
        match=r"leaves 120 of the 120 backbone tensors of ResNet unloaded \(missing: conv1.weight, bn1.weight",
    ):
        load_backbone(build_model("resnet18", 10, False), tmp_path / "grid.pth")


GRID_PREFIXES = ["", "module.", "module.encoder.", "encoder.", "backbone.", "module.backbone.", "model."]


@pytest.mark.parametrize("prefix", GRID_PREFIXES)
@pytest.mark.parametrize("wrapper", ["plain", "state_dict", "model", "safetensors"])
def test_release_layouts_load_into_the_backbone(tmp_path: Path, prefix: str, wrapper: str) -> None:
    """SimCLR (module./encoder.), BYOL and SwAV (module./backbone.) layouts, wrapped or not, and safetensors."""
    source = build_model("grid_cnn", 10, False)
    state = {f"{prefix}{k}": v for k, v in source.state_dict().items()}
    if wrapper == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "weights.pth"
        torch.save(state if wrapper == "plain" else {wrapper: state, "epoch": 3}, path)
    torch.manual_seed(1)
    target = build_model("grid_cnn", 4, True)  # another class count: the head never loads
    report = load_backbone(target, path)
    assert report.prefix == prefix and not report.missing and len(report.head) == 2
    for key, value in target.state_dict().items():
        if not key.startswith(classifier_prefix(target)):
            assert torch.equal(value, source.state_dict()[key]), key
    bias = classifier_of(target).bias
    assert bias is not None and torch.allclose(bias, torch.full((4,), -math.log(4)))


def test_the_trainers_own_checkpoint_is_a_weights_file(grid_root: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(grid_root, tmp_path / "run", num_steps=4, eval_every=4, checkpoint_every=4), CPU).run()
    weights = read_weights(tmp_path / "run" / "checkpoints" / "last.pt")
    assert weights.keys() == checkpoint_state(tmp_path / "run")["learner"].keys()


def test_a_few_missing_tensors_warn_and_bad_files_fail_clearly(tmp_path: Path, caplog) -> None:
    state = build_model("grid_cnn", 10, False).state_dict()
    del state["features.0.0.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with caplog.at_level(logging.WARNING, logger="engine.init_weights"):
        report = load_backbone(build_model("grid_cnn", 10, False), tmp_path / "partial.pt")
    assert (
        report.missing == ["features.0.0.weight"] and "left at their initialisation: features.0.0.weight" in caplog.text
    )
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    torch.save({"epoch": 3, "arch": "resnet18"}, tmp_path / "empty.pt")
    for name, message in [
        ("junk.pt", "cannot be read with torch.load"),
        ("empty.pt", "holds no state dict"),
        ("absent.pt", "no such file"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            load_backbone(build_model("grid_cnn", 10, False), tmp_path / name)


# -- the classifier's learning rate -------------------------------------------------------------


def test_head_lr_scale_gives_the_classifier_its_own_device_lr(tmp_path: Path) -> None:
    config = build_config(
        {},
        {
            "arch": "grid_cnn",
            "device": "cpu",
            "method.name": "sigmoid",
            "optim.head_lr_scale": 0.0,
            "optim.warmup_lr_steps": 0,
        },
    )
    engine = build_engine(config, EngineSpec(num_classes=10), torch.device("cpu"))
    backbone, head = engine.optimizer.param_groups
    assert backbone["lr"] is engine.lr and head["lr"] is engine.head_lr
    assert [id(p) for p in head["params"]] == [id(p) for p in classifier_of(engine.learner).parameters()]
    before = {k: v.clone() for k, v in engine.learner.state_dict().items()}
    engine.train_step(0, Batch(torch.randn(8, 3, 24, 24), torch.arange(8)))
    after = engine.learner.state_dict()
    assert torch.equal(after["fc.weight"], before["fc.weight"]) and torch.equal(after["fc.bias"], before["fc.bias"])
    assert not torch.equal(after["features.0.0.weight"], before["features.0.0.weight"])

    scaled = build_engine(
        build_config({}, {"arch": "grid_cnn", "device": "cpu", "optim.head_lr_scale": 10.0}),
        EngineSpec(num_classes=10),
        torch.device("cpu"),
    )
    scaled.train_step(5, Batch(torch.randn(8, 3, 24, 24), torch.arange(8)))
    assert scaled.head_lr.item() == pytest.approx(10 * scaled.lr.item()) and scaled.lr.item() == pytest.approx(
        scaled.lr_at(5)
    )
    # a resumed optimizer keeps each group reading its own device tensor
    state = OptimizerInPlace(scaled.optimizer, [scaled.lr, scaled.head_lr]).state_dict()
    OptimizerInPlace(scaled.optimizer, [scaled.lr, scaled.head_lr]).load_state_dict(state)
    assert [g["lr"] for g in scaled.optimizer.param_groups] == [scaled.lr, scaled.head_lr]
    assert scaled.optimizer.param_groups[1]["lr"] is scaled.head_lr


# -- schedules and precision ----------------------------------------------------------------------


def test_step_schedule_at_milestones() -> None:
    optim = OptimConfig(lr_per_256=0.1, schedule=Schedule.STEP, lr_milestones=(5, 8), step_decay_factor=0.5)
    assert [lr_at(step, 100, optim, 256) for step in (0, 4, 5, 7, 8, 50)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    )
    assert config_from_flags(
        "--schedule", "step", "--lr-milestones", "30", "--lr-milestones", "60"
    ).optim.lr_milestones == (30, 60)


def test_milestones_in_epochs_decay_at_each_epochs_first_step() -> None:
    optim = OptimConfig(
        lr_per_256=0.1,
        schedule=Schedule.STEP,
        lr_milestones=(2, 3),
        lr_milestones_unit=MilestoneUnit.EPOCHS,
        step_decay_factor=0.5,
    )
    # 4 batches per epoch: epoch 2 starts at step 8, epoch 3 at step 12
    assert [lr_at(step, 100, optim, 256, batches_per_epoch=4) for step in (7, 8, 11, 12)] == pytest.approx(
        [0.1, 0.05, 0.05, 0.025]
    )
    with pytest.raises(ValueError, match="batches per epoch"):
        lr_at(8, 100, optim, 256)


def test_trainer_places_epoch_milestones_by_the_train_split(grid_root: Path, tmp_path: Path) -> None:
    """640 training grids at batch 64 = 10 batches per epoch: the rate drops after step 10 (1-based)."""
    out = tmp_path / "run"
    config = tiny_config(
        grid_root,
        out,
        global_batch_size=64,
        num_steps=12,
        log_every=1,
        eval_every=100,
        checkpoint_every=100,
        **{
            "method.name": "softmax",
            "optim.schedule": "step",
            "optim.lr_milestones": (1,),
            "optim.lr_milestones_unit": "epochs",
            "optim.lr_per_256": 0.4,
        },
    )
    Trainer(config, CPU).run()
    rates = {
        r["step"]: r["lr"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    }
    assert rates[10] == pytest.approx(0.1) and rates[11] == pytest.approx(0.01)


def test_epochs_set_the_number_of_steps(grid_root: Path, tmp_path: Path) -> None:
    config = tiny_config(
        grid_root, tmp_path / "run", num_epochs=1, global_batch_size=64, eval_every=100, checkpoint_every=100
    )
    assert steps_from_epochs(config, 7).num_steps == 7 and steps_from_epochs(config.__class__(), 7).num_steps == 3000
    summary = Trainer(config, CPU).run()
    assert summary["step"] == 640 // 64  # one epoch of the 640-image train split
    assert "num_epochs = 1" in (tmp_path / "run" / "config.toml").read_text()


def test_fp32_evaluation_turns_autocast_off(grid_root: Path, tmp_path: Path, monkeypatch) -> None:
    cuda = torch.device("cuda")
    bf16, fp32 = build_config({}, {}), build_config({}, {"eval_precision": "fp32"})
    assert compute_dtype(bf16, cuda, train=False) is torch.bfloat16 and compute_dtype(fp32, cuda, train=False) is None
    assert compute_dtype(fp32, cuda, train=True) is torch.bfloat16  # training keeps bf16
    assert compute_dtype(bf16, torch.device("cpu"), train=True) is None
    assert (
        loader_config(fp32, False, 0, 1, cuda).dtype is torch.float32
        and loader_config(fp32, True, 0, 1, cuda).dtype is torch.bfloat16
    )
    seen = []
    import engine.trainer

    monkeypatch.setattr(
        engine.trainer, "compute_dtype", lambda config, device, train: seen.append((config.eval_precision.value, train))
    )
    trainer = Trainer(tiny_config(grid_root, tmp_path / "run", eval_precision="fp32"), CPU)
    trainer.evaluate()
    assert seen and set(seen) == {("fp32", False)}
