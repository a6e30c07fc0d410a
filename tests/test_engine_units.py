"""Engine pieces on their own: fused losses, the phase machine, phase switches, schedule, config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import ConfigError, Method, MethodConfig, OptimConfig, RunConfig, Schedule, StudentInit, build_config
from engine.losses import bce_one_hot, bce_pseudo_labels, logit, softmax_cross_entropy
from engine.models import build_model, classifier_of
from engine.phases import STUDENT, TEACHER, TRAIN, PhaseAction, PhasePlan, PhaseSwitch, module_state
from engine.schedule import lr_at, peak_lr

SNAP, SAVE, RESTORE = PhaseAction.SNAPSHOT_TEACHER, PhaseAction.SAVE_STUDENT, PhaseAction.RESTORE_STUDENT


def two_step_pseudo_bce(student: torch.Tensor, teacher: torch.Tensor, rho: float) -> torch.Tensor:
    """The plain computation the fused loss must equal: threshold the sigmoid, then BCE."""
    targets = (torch.sigmoid(teacher.double()) > rho).double()
    per_class = F.binary_cross_entropy_with_logits(student.double(), targets, reduction="none")
    return per_class.sum(dim=1).mean()


@pytest.mark.parametrize("rho", [0.5, 0.25, 0.9, 1e-6, 1 - 1e-6])
def test_fused_pseudo_label_bce_equals_two_step(rho: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(64, 17, generator=generator) * 4
    teacher = torch.randn(64, 17, generator=generator) * 4
    fused = bce_pseudo_labels(student, teacher, logit(rho))
    assert torch.allclose(fused.double(), two_step_pseudo_bce(student, teacher, rho), rtol=1e-5, atol=1e-5)


def test_pseudo_label_threshold_edges() -> None:
    """Teacher logit exactly at logit(rho) is not a positive (strict '>'), just above it is."""
    rho = 0.5
    student = torch.zeros(1, 3)
    teacher = torch.tensor([[0.0, 1e-4, -1e-4]])  # sigmoid = 0.5, >0.5, <0.5
    expected = two_step_pseudo_bce(student, teacher, rho)
    assert torch.allclose(bce_pseudo_labels(student, teacher, logit(rho)).double(), expected)
    # with student logits 0 every class costs log 2; a positive target does not change that, so
    # check the positives through the gradient instead: d/dz = sigmoid(z) - y
    z = torch.zeros(1, 3, requires_grad=True)
    bce_pseudo_labels(z, teacher, logit(rho)).backward()
    assert z.grad is not None and torch.allclose(z.grad, torch.tensor([[0.5, -0.5, 0.5]]))


def test_pseudo_labels_saturated_teacher() -> None:
    """Huge teacher logits: the fused form is finite and matches float64."""
    student = torch.tensor([[30.0, -30.0, 0.0]])
    teacher = torch.tensor([[80.0, -80.0, 20.0]])
    for rho in (1e-6, 0.5, 1 - 1e-6):
        fused = bce_pseudo_labels(student, teacher, logit(rho))
        assert torch.isfinite(fused)
        assert torch.allclose(fused.double(), two_step_pseudo_bce(student, teacher, rho), atol=1e-5)


def test_bce_one_hot_and_softmax_match_torch() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 10, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    one_hot = F.one_hot(labels, 10).float()
    reference = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="sum") / 32
    assert torch.allclose(bce_one_hot(logits, labels), reference, atol=1e-5)
    assert torch.allclose(softmax_cross_entropy(logits, labels), F.cross_entropy(logits, labels))


def test_logit_rejects_out_of_range() -> None:
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            logit(bad)


def mile(k_t: int = 3, k_s: int = 2, warmup: int = 0, init: str = "teacher") -> PhasePlan:
    return PhasePlan(
        MethodConfig(
            name=Method.MILE,
            k_teacher_steps=k_t,
            k_student_steps=k_s,
            warmup_steps=warmup,
            student_init=StudentInit(init),
        )
    )


def test_phases_run_exactly_k_steps() -> None:
    plan = mile(k_t=3, k_s=2)
    phases = [plan.position(s).phase for s in range(13)]
    assert phases == [TEACHER] * 3 + [STUDENT] * 2 + [TEACHER] * 3 + [STUDENT] * 2 + [TEACHER] * 3
    assert [plan.position(s).step_in_phase for s in range(8)] == [0, 1, 2, 0, 1, 0, 1, 2]
    assert [plan.position(s).cycle for s in (0, 3, 5, 8, 10)] == [0, 0, 1, 1, 2]


def test_warmup_extends_first_teacher_phase_only() -> None:
    plan = mile(k_t=2, k_s=1, warmup=4)
    phases = [plan.position(s).phase for s in range(10)]
    assert phases == [TEACHER] * 6 + [STUDENT] + [TEACHER] * 2 + [STUDENT]


def test_baselines_have_one_phase() -> None:
    plan = PhasePlan(MethodConfig(name=Method.SIGMOID))
    assert {plan.position(s).phase for s in range(50)} == {TRAIN}
    assert all(plan.transitions_before(s) == () for s in range(50))


def test_transitions() -> None:
    teacher_init = mile(k_t=2, k_s=2)
    assert teacher_init.transitions_before(0) == ()
    assert teacher_init.transitions_before(2) == (SNAP,)
    assert teacher_init.transitions_before(4) == ()
    previous = mile(k_t=2, k_s=2, init="previous")
    assert previous.transitions_before(0) == (SAVE,)
    assert previous.transitions_before(2) == (SNAP, RESTORE)
    assert previous.transitions_before(4) == (SAVE,)
    assert previous.transitions_before(3) == ()


def _perturb(module: torch.nn.Module, amount: float) -> None:
    with torch.no_grad():
        for tensor in module_state(module):
            if tensor.is_floating_point():
                tensor.add_(amount)


def test_phase_switch_copies_parameters_and_buffers_in_place() -> None:
    learner, teacher = build_model("grid_cnn", 10, True), build_model("grid_cnn", 10, True)
    learner.train()(torch.randn(4, 3, 24, 24))  # moves BatchNorm running statistics
    teacher_ptrs = [t.data_ptr() for t in module_state(teacher)]
    switch = PhaseSwitch(learner, teacher, [])
    switch.apply((SNAP,))
    for mine, theirs in zip(module_state(learner), module_state(teacher)):
        assert torch.equal(mine, theirs)
    assert [t.data_ptr() for t in module_state(teacher)] == teacher_ptrs  # no re-allocation


def test_previous_student_restores_weights_and_momentum() -> None:
    learner, teacher = build_model("grid_cnn", 10, True), build_model("grid_cnn", 10, True)
    momentum = [torch.zeros_like(p) for p in learner.parameters()]
    switch = PhaseSwitch(learner, teacher, momentum)
    before = [t.clone() for t in module_state(learner)]
    switch.apply((SAVE,))
    _perturb(learner, 1.0)  # the teacher phase trains the learner on ground truth
    for buffer in momentum:
        buffer.add_(3.0)
    switch.apply((SNAP, RESTORE))
    for restored, original in zip(module_state(learner), before):
        assert torch.equal(restored, original)
    assert all(torch.count_nonzero(b) == 0 for b in momentum)
    for trained, original in zip(module_state(teacher), before):  # the teacher kept the trained weights
        if trained.is_floating_point():
            assert torch.allclose(trained, original + 1.0)


def test_sigmoid_head_bias() -> None:
    model = build_model("grid_cnn", 10, multi_label_head=True)
    bias = classifier_of(model).bias
    assert bias is not None and torch.allclose(bias, torch.full((10,), -math.log(10)))
    resnet = build_model("resnet18", 1000, multi_label_head=True)
    bias = classifier_of(resnet).bias
    assert bias is not None and torch.allclose(bias, torch.full((1000,), -math.log(1000)))


def test_schedule_warmup_cosine_and_scaling() -> None:
    optim = OptimConfig(lr_per_256=0.1, warmup_lr_steps=10, schedule=Schedule.COSINE)
    assert peak_lr(optim, 512) == pytest.approx(0.2)
    assert lr_at(0, 100, optim, 256) == pytest.approx(0.01)
    assert lr_at(9, 100, optim, 256) == pytest.approx(0.1)
    assert lr_at(10, 100, optim, 256) == pytest.approx(0.1)
    assert lr_at(55, 100, optim, 256) == pytest.approx(0.05)
    assert lr_at(99, 100, optim, 256) < 0.001
    step = OptimConfig(lr_per_256=0.1, schedule=Schedule.STEP, step_decay_every=30, step_decay_factor=0.1)
    assert lr_at(29, 100, step, 256) == pytest.approx(0.1)
    assert lr_at(30, 100, step, 256) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method.rho": 1.0}, "--rho"),
        ({"method.rho": 0.0}, "--rho"),
        ({"method.k_teacher_steps": 0}, "--k-teacher-steps"),
        ({"method.k_student_steps": 0}, "--k-student-steps"),
        ({"method.name": "softmaxx"}, "--method"),
        ({"eval_thetas": [0.5, 1.2]}, "--theta"),
        ({"method.student_init": "random"}, "--student-init"),
        ({"num_steps": 0}, "--steps"),
    ],
)
def test_bad_options_name_the_option(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({}, overrides)


def test_flags_override_file_values() -> None:
    config = build_config(
        {"num_steps": 10, "method": {"rho": 0.3, "k_teacher_steps": 7}}, {"method.rho": 0.4, "num_steps": None}
    )
    assert config.method.rho == 0.4 and config.method.k_teacher_steps == 7 and config.num_steps == 10
    assert isinstance(config, RunConfig)


def test_eval_crop_follows_training_augmentation() -> None:
    """Without train augmentation eval must see the whole image (a crop cuts grid digits off)."""
    from engine.config import DataConfig

    assert DataConfig(augment=False).resolved_eval_crop_fraction == 1.0
    assert DataConfig(augment=True).resolved_eval_crop_fraction == 0.875
    assert DataConfig(augment=True, eval_crop_fraction=0.9).resolved_eval_crop_fraction == 0.9


def test_engine_bench_rows_on_cpu(tmp_path) -> None:
    """tools/bench.py engine: every row measured (CPU smoke run of the GPU benchmark's code)."""
    import json

    from benchmarks.engine_steps import EngineBenchConfig, run_engine_bench, write_json

    config = EngineBenchConfig(
        arch="grid_cnn",
        image_size_px=24,
        batch_size=4,
        num_classes=10,
        steps_per_repeat=1,
        repeats=2,
        warmup_steps=1,
        device="cpu",
    )
    rows = run_engine_bench(config)
    names = [row.name for row in rows]
    assert names == [
        "engine teacher step (eager)",
        "engine student step (eager)",
        "phase switch: teacher snapshot (eager)",
        "eager baseline teacher step (NCHW fp32)",
        "eager baseline student step (NCHW fp32)",
        "phase switch: deepcopy teacher (baseline)",
    ]
    assert all(row.ms_per_step_median > 0 for row in rows)
    write_json(tmp_path / "bench.json", config, rows, {})
    assert len(json.loads((tmp_path / "bench.json").read_text())["rows"]) == 6


def test_gpus_relaunch_drops_only_the_gpus_flag(monkeypatch) -> None:
    import sys

    from engine import distributed
    from engine.commands.run import without_gpus_flag

    argv = ["--gpus", "8", "--method", "mile", "--gpus=4", "--out", "runs/x"]
    assert without_gpus_flag(argv) == ["--method", "mile", "--out", "runs/x"]
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 8)
    command = distributed.torchrun_command(8, ["--method", "mile"])
    assert command[:3] == [sys.executable, "-m", "engine.commands.launch"]  # torchrun, forwarding SIGUSR1 too
    assert "--nproc_per_node=8" in command and command[-4:] == ["-m", "engine.commands.run", "--method", "mile"]
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="--gpus 8: only 2"):
        distributed.torchrun_command(8, [])


def test_loader_workers_default_to_auto_and_the_resolved_count_is_logged(tmp_path, monkeypatch, caplog) -> None:
    """--workers defaults to -1 (auto); the loaders get it and the run logs the resolved count."""
    import logging
    import os

    from engine.data import build_loaders
    from engine.distributed import DistInfo
    from engine.plan import plan_run
    from pipelines.torch_backend import TorchLoader
    from shards.format import LabelKind
    from shards.writer import SourceItem, SplitSpec, WriterSettings, write_split

    assert build_config({}, {}).data.num_workers == -1
    assert build_config({}, {"data.num_workers": 0}).data.num_workers == 0
    pixels = torch.full((8, 8, 3), 100, dtype=torch.uint8).numpy()
    for split in ("train", "val"):
        items = [SourceItem(key=f"k{i}", label=i % 2, source=f"mem/{i}", pixels=pixels) for i in range(4)]
        write_split(tmp_path, SplitSpec(split, LabelKind.SINGLE, ["a", "b"]), items, WriterSettings(progress=False))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    config = build_config(
        {},
        {
            "data.root": str(tmp_path),
            "data.backend": "torch",
            "global_batch_size": 2,
            "data.image_size_px": 8,
            "out_dir": str(tmp_path / "run"),
        },
    )
    with caplog.at_level(logging.INFO, logger="engine.data"):
        loaders = build_loaders(plan_run(config, DistInfo(0, 1, 0, torch.device("cpu"))))
    assert "loader workers per process: 3 (auto: CPU affinity / local ranks)" in caplog.text
    assert [
        loader.num_workers for loader in (loaders.train, *loaders.evaluation) if isinstance(loader, TorchLoader)
    ] == [3, 3]
    loaders.close()


def test_imitation_variant_targets() -> None:
    from engine.losses import imitation_targets

    teacher = torch.tensor([[2.0, -2.0, 0.0, -3.0], [-1.2, -1.5, -4.0, 0.5]])
    labels = torch.tensor([3, -1])  # the second image has no given label (unlabelled data)
    hard = imitation_targets(teacher, logit(0.25), labels, soft=False, add_label=False)
    assert hard.tolist() == [[1, 0, 1, 0], [0, 0, 0, 1]]  # sigmoid > 0.25 <=> logit > -1.0986
    with_label = imitation_targets(teacher, logit(0.25), labels, soft=False, add_label=True)
    assert with_label.tolist() == [[1, 0, 1, 1], [0, 0, 0, 1]]  # the label joins; -1 adds nothing
    soft = imitation_targets(teacher, logit(0.25), labels, soft=True, add_label=False)
    assert torch.allclose(soft, torch.sigmoid(teacher))
    soft_with_label = imitation_targets(teacher, logit(0.25), labels, soft=True, add_label=True)
    assert soft_with_label[0, 3] == 1.0 and torch.allclose(soft_with_label[1], torch.sigmoid(teacher[1]))


def test_the_faithful_imitation_loss_is_the_fused_one_and_variants_are_bce_on_their_targets() -> None:
    from engine.steps import StepSettings, pseudo_label_loss

    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(16, 10, generator=generator) * 3, torch.randn(16, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (16,), generator=generator)

    def loss(**variant: bool) -> torch.Tensor:
        settings = StepSettings("mile", 0.25, False, None, "cpu", **variant)
        return pseudo_label_loss(settings)(student, teacher, labels).double()

    assert torch.equal(loss(), bce_pseudo_labels(student, teacher, logit(0.25)).double())
    soft = F.binary_cross_entropy_with_logits(student.double(), torch.sigmoid(teacher.double()), reduction="none")
    assert torch.allclose(loss(soft_imitation=True), soft.sum(dim=1).mean(), atol=1e-5)
    hard = (torch.sigmoid(teacher.double()) > 0.25).double()
    hard[torch.arange(16), labels] = 1.0
    added = F.binary_cross_entropy_with_logits(student.double(), hard, reduction="none").sum(dim=1).mean()
    assert torch.allclose(loss(imitation_add_label=True), added, atol=1e-5)
