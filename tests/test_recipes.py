"""Every recipe in engine/configs/paper/ runs: its documented data command converts a miniature
dataset of the real layout, and the recipe then trains a few steps on it, unchanged except for size.

The recipe's own header is what a user follows, so the test executes its ``# Data:`` command (paths
as written, run from a folder that holds the miniature ``data/...`` layouts) and then the recipe with
only the budget and size shrunk: arch, method, data root and splits, schedule, init checkpoint and
MILe's rho and student init are the recipe's.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from dataset_layouts import listed_one_percent, make_celeba, make_imagenet_train, make_imagenet_val, make_webvision
from typer.testing import CliRunner

from engine.commands.sweep import load_sweep
from engine.config import Method, build_config, load_toml
from engine.distributed import DistInfo
from engine.models import build_model
from engine.phases import Phase, PhasePlan
from engine.trainer import Trainer
from shards.cli import app as make_shards

RECIPES = Path(__file__).resolve().parent.parent / "engine" / "configs" / "paper"
SWEEPS = RECIPES.parent / "sweeps"
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
DATA_LINE = re.compile(r"^# Data:\s+(make-shards .+)$", re.MULTILINE)

# What only the smoke test changes: size and budget (a few steps of a tiny batch at 32 px).
SMOKE = {
    "num_steps": 4, "num_epochs": 0, "global_batch_size": 4, "eval_every": 4, "log_every": 1, "checkpoint_every": 4,
    "data.image_size_px": 32, "data.num_workers": 0, "data.backend": "torch", "device": "cpu",
    "method.k_teacher_steps": 1, "method.k_student_steps": 1, "method.warmup_steps": 1,
}  # fmt: skip


def recipe_files() -> list[Path]:
    return sorted(RECIPES.glob("*.toml"))


def data_commands(recipe: Path) -> list[list[str]]:
    """The ``# Data: make-shards ...`` lines of a recipe's header, as argument lists."""
    return [shlex.split(line)[1:] for line in DATA_LINE.findall(recipe.read_text())]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder laid out as the recipes expect: data/imagenet, data/celeba, data/webvision, the SimCLR
    subset lists, a MoCo v2-style ResNet-50 checkpoint and fine-tuned ResNet-50s under weights/."""
    root = tmp_path_factory.mktemp("workspace")
    make_imagenet_train(root / "data" / "imagenet", with_broken=False)
    make_imagenet_val(root / "data" / "imagenet", "folders")
    listed = [name for names in listed_one_percent().values() for name in names]
    (root / "1percent.txt").write_text("\n".join(listed[::2]) + "\n")
    (root / "10percent.txt").write_text("\n".join(listed) + "\n")
    make_celeba(root / "data" / "celeba", partitions=[0] * 12 + [1] * 6 + [2] * 4, with_broken=False)
    make_webvision(root / "data" / "webvision", labels=[0, 1, 2, 3] * 3, val_labels=[0, 1, 2, 3, 0, 1])
    backbone = build_model("resnet50", 1000, multi_label_head=False).state_dict()
    moco = {f"module.encoder_q.{k}": v for k, v in backbone.items() if not k.startswith("fc.")}
    moco.update(
        {"module.encoder_q.fc.0.weight": torch.zeros(8, 2048), "module.encoder_q.fc.2.weight": torch.zeros(4, 8)}
    )
    (root / "weights").mkdir()
    torch.save({"state_dict": moco, "epoch": 800}, root / "weights" / "moco_v2_800ep_pretrain.pth.tar")
    for fraction in (1, 10):  # fine-tuned classifiers in torchvision's layout, the semi-supervised starts
        torch.save(backbone, root / "weights" / f"simclr_v2_r50_1x_sk0_ft{fraction}pct.pth")
    return root


def test_every_recipe_names_its_source_data_command_and_run_command() -> None:
    assert len(recipe_files()) >= 7
    for recipe in recipe_files():
        text = recipe.read_text()
        assert data_commands(recipe), f"{recipe.name}: no '# Data: make-shards ...' line"
        assert f"engine-run --config engine/configs/paper/{recipe.name}" in text, recipe.name
        assert "Sources" in text, f"{recipe.name}: no 'Sources' paragraph"


@pytest.mark.parametrize("recipe", recipe_files(), ids=lambda p: p.stem)
def test_mile_recipes_end_on_an_imitation_phase(recipe: Path) -> None:
    """MILe reports the student: a recipe's last step is in an imitation phase."""
    config = build_config(load_toml(recipe), {}, source=str(recipe))
    assert config.method.name is Method.MILE
    assert PhasePlan(config.method).position(config.num_steps - 1).phase is Phase.STUDENT


@pytest.mark.slow
@pytest.mark.parametrize("recipe", recipe_files(), ids=lambda p: p.stem)
def test_recipe_trains_on_data_prepared_by_its_own_command(
    recipe: Path, workspace: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(workspace)  # the recipe's relative paths (data/, shards/, weights/) as a user has them
    for args in data_commands(recipe):
        out = Path(args[args.index("--out") + 1])
        if not (out / "manifest.json").is_file():  # recipes share conversions, as users' would
            result = CliRunner().invoke(make_shards, [*args, "--workers", "1"])
            assert result.exit_code == 0, f"{recipe.name}: make-shards {' '.join(args)}\n{result.output}"
    file_values = load_toml(recipe)
    config = build_config(file_values, {**SMOKE, "out_dir": str(tmp_path / "run")}, source=str(recipe))
    summary = Trainer(config, CPU).run()
    assert summary["step"] == 4 and summary["method"] == "mile"
    assert "top1" in summary or "f1@0.25" in summary
    for spec in config.data.extra_eval:  # every extra eval set is scored under its own keys
        folder, _, split = spec.rpartition(":")
        assert f"{Path(folder).name}/{split}/top1" in summary, sorted(summary)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    unlabelled = sum(r.get("unlabelled_images", 0) for r in records if r["kind"] == "train")
    # steps 1-2 interaction, 3 imitation, 4 interaction: semi-supervised recipes feed step 3 (4 images) unlabelled
    assert unlabelled == (4 if config.data.unlabelled_split else 0)


def test_ablation_sweeps_build_every_run_from_the_recipe(tmp_path: Path) -> None:
    runs, select_by = load_sweep(SWEEPS / "imagenet_kt_ks.toml", tmp_path)
    assert len(runs) == 25 and select_by == "f1@0.25"
    assert {(r.config.method.k_teacher_steps, r.config.method.k_student_steps) for r in runs} >= {
        (8000, 2000),
        (500, 200),
    }
    assert all(r.config.data.root == "shards/imagenet-10pct" for r in runs)
    rho_runs, _ = load_sweep(SWEEPS / "imagenet_rho.toml", tmp_path)
    assert sorted(r.config.method.rho for r in rho_runs) == [0.1, 0.25, 0.5, 0.75, 0.9]
