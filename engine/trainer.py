"""The training loop: one loop for every method, the phase machine deciding which step runs.

Hot-loop rule (DESIGN §2): nothing between two log points waits for the device. Losses, train
accuracy and a non-finite flag accumulate in device tensors; the host reads them only at log,
eval and checkpoint points, each marked ``# SYNC``.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from tqdm import tqdm

from engine.checkpoint import DataPosition, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from engine.config import ConfigError, RunConfig
from engine.data import build_loaders, resolve_data_root
from engine.distributed import DistInfo
from engine.metrics import EvalAccumulator
from engine.models import build_model
from engine.phases import PhasePlan, PhaseSwitch, TensorMirror
from engine.run_folder import RunFolder
from engine.schedule import lr_at
from engine.steps import StepResult, StepSettings, autocast_context, build_stepper, init_momentum
from pipelines.contract import Batch, Loader
from shards.format import LabelKind
from shards.manifest import load_split

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the message names the step and phase."""


class TrainStats:
    """Device-side accumulators between two log points."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.num_images = 0  # host-side: batch sizes are known without asking the device
        self.num_steps = 0

    def update(self, result: StepResult, labels: torch.Tensor, step: int) -> None:
        self.loss_sum += result.loss
        self.correct += (result.logits.argmax(dim=1) == labels).sum()
        bad = ~torch.isfinite(result.loss) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)
        self.num_images += labels.shape[0]
        self.num_steps += 1

    def first_bad(self) -> int:
        return int(self.first_bad_step)  # SYNC: read at log/checkpoint points only

    def read_and_reset(self) -> dict[str, float]:
        loss, correct = (self.loss_sum / max(1, self.num_steps)).item(), self.correct.item()  # SYNC: log point
        out = {"loss": loss, "train_top1": correct / max(1, self.num_images)}
        self.loss_sum.zero_()
        self.correct.zero_()
        self.num_images = self.num_steps = 0
        return out


class RunInterrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved. ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class StopRequest:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint and exits at the next step boundary."""

    signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum = signum


class Trainer:
    def __init__(self, config: RunConfig, dist: DistInfo, resume: bool = False) -> None:
        self.config, self.dist, self.device = config, dist, dist.device
        self.folder = RunFolder(config.out_dir, is_main=dist.is_main)
        root = resolve_data_root(config.data)
        self.train_split = load_split(root, config.data.train_split)
        self.eval_split = load_split(root, config.data.eval_split)
        self.metric_flags = _check_metric_request(config, self.eval_split.label_kind)
        if self.train_split.label_kind is LabelKind.ATTRIBUTES and config.method.name == "softmax":
            raise ConfigError(
                f"--method softmax: split {config.data.train_split!r} holds independent binary attributes "
                f"(no single label per image); use --method sigmoid or mile"
            )
        self.folder.prepare(config.to_json(), resume)
        self.train_loader, self.eval_loader = build_loaders(config, root, dist.rank, dist.world_size, self.device)
        self.plan = PhasePlan(config.method)
        self._build_models()
        self.step, self.position = 0, DataPosition()
        self._saved_student: list[torch.Tensor] | None = None
        self._captured = False
        if resume:
            self._load(self.folder.checkpoint_path)
        self._build_steps()

    # -- construction -------------------------------------------------------------------------

    def _build_models(self) -> None:
        config = self.config
        torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # training shapes never change: pick the fastest kernels once
        multi = config.method.multi_label_head
        num_classes = self.train_split.num_classes
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.learner = build_model(config.arch, num_classes, multi).to(self.device, memory_format=memory_format)
        self.teacher = None
        if config.method.name == "mile":
            # allocated once; later refreshed by device-side copies, never re-created
            self.teacher = build_model(config.arch, num_classes, multi).to(self.device, memory_format=memory_format)
            self.teacher.load_state_dict(self.learner.state_dict())
            self.teacher.eval().requires_grad_(False)
        self.lr = torch.zeros((), device=self.device)  # read by fused SGD inside the captured steps
        self.optimizer = torch.optim.SGD(
            self.learner.parameters(),
            lr=self.lr,
            momentum=config.optim.momentum,
            nesterov=config.optim.nesterov,
            weight_decay=config.optim.weight_decay,
            fused=True,
        )
        init_momentum(self.optimizer)

    def _build_steps(self) -> None:
        config = self.config
        self.switch = PhaseSwitch(self.learner, self.teacher, init_momentum(self.optimizer))
        if self._saved_student is not None:
            self.switch.saved_student = TensorMirror(self.switch.student_state)
            self.switch.saved_student.copy_from(self._saved_student)
        model = self.learner
        if self.dist.enabled:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        settings = StepSettings(
            method=config.method.name,
            rho=config.method.rho,
            attributes=self.train_split.label_kind is LabelKind.ATTRIBUTES,
            autocast_dtype=torch.bfloat16 if (self.device.type == "cuda" and config.bf16) else None,
            device_type=self.device.type,
        )
        self.step_settings = settings
        self.stepper = build_stepper(self.plan.phases, model, self.teacher, self.optimizer, settings)

    def _maybe_capture(self, batch: Batch) -> None:
        """Capture CUDA graphs on the first batch's shapes, or log why the steps stay eager."""
        reason = None
        if not self.config.cuda_graphs:
            reason = "CUDA graphs turned off (--no-cuda-graphs)"
        elif self.device.type != "cuda":
            reason = f"device is {self.device.type}: steps run eagerly"
        elif self.dist.enabled:
            reason = "multi-process runs keep DDP steps eager for now"
        if reason is None:
            try:
                self.stepper.capture((batch.images, batch.labels, batch.targets), self.learner, self.optimizer)
            except RuntimeError as error:  # capture can fail on exotic ops; eager still trains
                reason = f"CUDA graph capture failed ({error}); running eagerly"
        if reason and self.dist.is_main:
            log.info(reason)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        stop = StopRequest()
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._loop(stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.train_loader.close()
            self.eval_loader.close()
            self.folder.close()

    def _loop(self, stop: StopRequest) -> dict[str, Any]:
        config = self.config
        stats = TrainStats(self.device)
        batches = self._batches()
        bar = tqdm(total=config.num_steps, initial=self.step, unit="step", disable=not self.dist.is_main, dynamic_ncols=True)
        tick, eval_metrics = time.perf_counter(), {}
        self.learner.train()
        while self.step < config.num_steps:
            self._train_step(next(batches), stats)
            bar.update(1)
            done = self.step == config.num_steps
            log_point = self.step % config.log_every == 0 or done
            if log_point:
                tick = self._log_point(stats, tick, bar)
            if self.step % config.eval_every == 0 or done:
                eval_metrics = self.evaluate()
            signum = self._agreed_stop(stop, log_point)
            if self.step % config.checkpoint_every == 0 or done or signum:
                self._save_checkpoint(stats)
            if signum:
                bar.close()
                raise RunInterrupted(signum, self._stopped_message(signum))
        bar.close()
        if not eval_metrics:  # resumed at its last step: nothing ran, so evaluate what was saved
            eval_metrics = self.evaluate()
        summary = {"step": self.step, "method": config.method.name, **eval_metrics}
        self.folder.write_summary(summary)
        return summary

    def _agreed_stop(self, stop: StopRequest, log_point: bool) -> int:
        """The signal to stop on (0 = go on). One process stops at once; several processes agree at
        log points only, so that all of them leave after the same step (a rank that ran one more
        step would wait in its gradient all-reduce forever)."""
        if not self.dist.enabled:
            return stop.signum or 0
        if not log_point:
            return 0
        flag = torch.tensor([stop.signum or 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # SYNC: log point
        return int(flag.item())

    def _train_step(self, batch: Batch, stats: TrainStats) -> None:
        if not self._captured:
            self._captured = True
            self._maybe_capture(batch)
        position = self.plan.position(self.step)
        self.switch.apply(self.plan.transitions_before(self.step))
        # fill_ with a Python float is a kernel launch, not a sync
        self.lr.fill_(lr_at(self.step, self.config.num_steps, self.config.optim, self.config.global_batch_size))
        result = self.stepper(position.phase, batch.images, batch.labels, batch.targets)
        stats.update(result, batch.labels, self.step)
        self.step += 1

    def _batches(self) -> Iterator[Batch]:
        """Endless training batches from the saved data position; updates ``self.position``."""
        epoch, start = self.position.epoch, self.position.batch
        while True:
            for index, batch in enumerate(self.train_loader.epoch(epoch, start), start=start):
                self.position = DataPosition(epoch, index + 1)
                yield batch
            epoch, start = epoch + 1, 0
            self.position = DataPosition(epoch, 0)

    def _log_point(self, stats: TrainStats, tick: float, bar: tqdm) -> float:
        self._check_finite(stats)
        now = time.perf_counter()
        images = stats.num_images * self.dist.world_size
        position = self.plan.position(self.step - 1)
        record = {"kind": "train", "step": self.step, "phase": position.phase, "cycle": position.cycle, **stats.read_and_reset()}
        record["lr"] = lr_at(self.step - 1, self.config.num_steps, self.config.optim, self.config.global_batch_size)
        record["images_per_s"] = images / max(now - tick, 1e-9)
        self.folder.log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", phase=position.phase, img_s=f"{record['images_per_s']:.0f}")
        return time.perf_counter()

    def _check_finite(self, stats: TrainStats) -> None:
        bad_step = stats.first_bad()
        if bad_step >= 0:
            position = self.plan.position(bad_step)
            raise NonFiniteLoss(  # steps are counted from 1 for people, as in metrics.jsonl
                f"non-finite loss at step {bad_step + 1} ({position.phase} phase, cycle {position.cycle}); "
                f"stopping. The last good checkpoint ({self.folder.checkpoint_path}) is kept. "
                f"Try a lower --lr or check the data."
            )

    # -- evaluation and checkpoints -----------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        accumulator = EvalAccumulator(
            num_classes=self.eval_split.num_classes,
            thetas=self.config.eval_thetas,
            method_kind="softmax" if self.config.method.name == "softmax" else "sigmoid",
            has_multilabels=self.metric_flags["multilabel"],
            attributes=self.eval_split.label_kind is LabelKind.ATTRIBUTES,
            device=self.device,
        )
        self.learner.eval()
        for batch in self.eval_loader.epoch(0):
            with autocast_context(self.step_settings.autocast_dtype, self.device.type):
                logits = self.learner(batch.images)
            accumulator.update(logits.float(), batch.labels, batch.targets if self.metric_flags["multilabel"] else None)
        self.learner.train()
        metrics = accumulator.compute()  # SYNC: eval point
        last = self.plan.position(max(self.step - 1, 0))  # the phase the evaluated weights come from
        self.folder.log({"kind": "eval", "step": self.step, "phase": last.phase, "cycle": last.cycle, **metrics})
        return metrics

    def _save_checkpoint(self, stats: TrainStats) -> None:
        self._check_finite(stats)  # never checkpoint weights that a NaN step has touched
        if not self.dist.is_main:
            return
        saved = self.switch.saved_student
        payload = {
            "step": self.step,
            "phase": self.plan.position(self.step).__dict__,
            "learner": self.learner.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "saved_student": [t.clone() for t in saved.tensors] if saved is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "data_position": self.position.__dict__,
            "config": self.config.to_json(),
        }
        save_checkpoint(self.folder.checkpoint_path, payload)

    def _load(self, path) -> None:
        payload = load_checkpoint(path, self.device)
        self.learner.load_state_dict(payload["learner"])
        if self.teacher is not None:
            self.teacher.load_state_dict(payload["teacher"])
        self.optimizer.load_state_dict(payload["optimizer"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr  # keep the device tensor the steps read
        self._saved_student = payload["saved_student"]
        set_rng_state(payload["rng"])
        self.step = int(payload["step"])
        self.position = DataPosition(**payload["data_position"])
        self.folder.truncate_metrics_after(self.step)
        if self.dist.is_main:
            log.info("resumed %s at step %d (%s)", path, self.step, payload["phase"])

    def _stopped_message(self, signum: int) -> str:
        name = signal.Signals(signum).name
        return (
            f"stopped by {name} at step {self.step}; checkpoint saved to {self.folder.checkpoint_path}. "
            f"Continue with: engine-run --out {self.config.out_dir} --resume"
        )


def _check_metric_request(config: RunConfig, kind: LabelKind) -> dict[str, bool]:
    has = kind.has_targets
    if config.multilabel_metrics == "on" and not has:
        raise ConfigError(
            f"--multilabel-metrics on: eval split {config.data.eval_split!r} has no multi-labels "
            f"(label kind {kind.value}); use a split with multi-label sets or --multilabel-metrics auto"
        )
    return {"multilabel": has and config.multilabel_metrics != "off"}
