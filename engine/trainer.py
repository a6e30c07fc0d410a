"""The training loop: one loop for every method, the engine's phase plan deciding which step runs.

Hot-loop rule (docs/DESIGN.md, "Engine"): nothing between two log points waits for the device.
Losses, train accuracy and a non-finite flag accumulate in device tensors; the host reads them only
at log, eval and checkpoint points, each marked ``# SYNC``.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from engine.build import Engine, EngineSpec, build_engine
from engine.checkpoint import Progress, RngState, load_components, read_checkpoint, save_checkpoint
from engine.config import ConfigError, Method, RunConfig, Switch
from engine.data import build_loaders, compute_dtype, resolve_data_root
from engine.distributed import DistInfo
from engine.metrics import EvalAccumulator
from engine.phases import module_state
from engine.run_folder import RunFolder
from engine.steps import RunAheadLimit, StepResult, autocast_context
from pipelines.contract import Batch, ShardDataError
from shards.format import LabelKind
from shards.manifest import SplitManifest, load_split

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss or weights; the message names the step and phase."""


class TrainStats:
    """Device-side accumulators between two log points."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.num_images = 0  # host-side: batch sizes are known without asking the device
        self.num_steps = 0
        self.train_seconds = 0.0  # wall time of training steps only (no eval, checkpoint or capture)

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
        self.train_seconds = 0.0
        return out


class RunInterrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved. ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class _StopWhileWaiting(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class StopRequest:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint and exits at the next step boundary.

    While the loop waits for a batch (a loader starting, a slow disk) there is no step to finish,
    so the signal interrupts the wait at once (``waiting``); the checkpoint then holds the state
    after the last completed step."""

    signum: int | None = None
    waiting: bool = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if self.waiting:
            raise _StopWhileWaiting(signum)

    def next_batch(self, batches: Iterator[Batch], interruptible: bool) -> Batch:
        if not interruptible:
            return next(batches)
        self.waiting = True
        try:
            if self.signum:  # arrived between the last check and now
                raise _StopWhileWaiting(self.signum)
            return next(batches)
        finally:
            self.waiting = False


def check_against_data(config: RunConfig, train: SplitManifest, evaluation: SplitManifest, world_size: int) -> bool:
    """Config rules that need the data; True when the eval split's multi-hot targets are to be scored."""
    if train.label_kind is LabelKind.ATTRIBUTES and config.method.name is Method.SOFTMAX:
        raise ConfigError(
            f"--method softmax: split {config.data.train_split!r} holds independent binary attributes "
            f"(no single label per image); use --method sigmoid or mile"
        )
    per_rank_samples = train.num_samples // world_size
    if config.global_batch_size // world_size > per_rank_samples:
        raise ConfigError(
            f"global_batch_size (--batch-size) {config.global_batch_size} is larger than the training split "
            f"{config.data.train_split!r}, which holds {train.num_samples} samples"
            f"{f' ({per_rank_samples} per process)' if world_size > 1 else ''}; use a smaller --batch-size"
        )
    has = evaluation.label_kind.has_targets
    if config.multilabel_metrics is Switch.ON and not has:
        raise ConfigError(
            f"multilabel_metrics (--multilabel-metrics) on: eval split {config.data.eval_split!r} has no multi-labels "
            f"(label kind {evaluation.label_kind.value}); use a split with multi-label sets or auto"
        )
    return has and config.multilabel_metrics is not Switch.OFF


def steps_from_epochs(config: RunConfig, batches_per_epoch: int, is_main: bool = True) -> RunConfig:
    """``config`` with ``num_steps`` = ``num_epochs`` x full training batches per epoch when
    ``num_epochs`` is set (the split's size is known only here); unchanged otherwise."""
    if config.num_epochs == 0:
        return config
    num_steps = config.num_epochs * batches_per_epoch
    if is_main:
        log.info("num_epochs %d x %d batches per epoch = %d optimizer steps", config.num_epochs, batches_per_epoch, num_steps)
    return dataclasses.replace(config, num_steps=num_steps)


class Trainer:
    def __init__(self, config: RunConfig, dist: DistInfo, resume: bool = False) -> None:
        self.config, self.dist, self.device = config, dist, dist.device
        self.folder = RunFolder(config.out_dir, is_main=dist.is_main)
        self.folder.check_start(resume)  # refuse before any work: another run's folder, or nothing to resume
        root = resolve_data_root(config.data)
        self.train_split = load_split(root, config.data.train_split)
        self.eval_split = load_split(root, config.data.eval_split)
        self.score_targets = check_against_data(config, self.train_split, self.eval_split, dist.world_size)
        self.train_loader, self.eval_loader = build_loaders(config, root, dist.rank, dist.world_size, self.device)
        self.config = config = steps_from_epochs(config, self.train_loader.batches_per_epoch, dist.is_main)
        spec = EngineSpec(self.train_split.num_classes, self.train_split.label_kind is LabelKind.ATTRIBUTES)
        self.engine: Engine = build_engine(config, spec, self.device, distributed=dist.enabled, init_weights=not resume)
        self.progress, self.rng = Progress(), RngState()
        if resume:
            self._load(self.folder.checkpoint_path)
        self.folder.prepare(config, resume)  # only now, with everything checked, is the folder written
        self._captured = False

    @property
    def step(self) -> int:
        return self.progress.step

    def components(self) -> dict[str, Any]:
        """Everything with state, by checkpoint name: the checkpoint is their collection."""
        return {**self.engine.components(), "progress": self.progress, "rng": self.rng}

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
        stats = TrainStats(self.device)
        batches = self._batches()
        bar = tqdm(total=self.config.num_steps, initial=self.step, unit="step", disable=not self.dist.is_main, dynamic_ncols=True)
        eval_metrics: dict[str, float] = {}
        self.engine.learner.train()
        with bar:
            while self.step < self.config.num_steps:
                self._timed_step(self._next_batch(stop, batches, stats), stats)
                bar.update(1)
                eval_metrics = self._step_points(stop, stats, bar) or eval_metrics
        if not eval_metrics:  # resumed at its last step: nothing ran; the finished run's summary stands
            finished = self.folder.read_summary()
            if finished is not None:
                return finished
            eval_metrics = self.evaluate()
        summary = {"step": self.step, "method": self.config.method.name.value, **eval_metrics}
        self.folder.write_summary(summary)
        return summary

    def _next_batch(self, stop: StopRequest, batches: Iterator[Batch], stats: TrainStats) -> Batch:
        try:
            # several processes must leave after the same step: they agree at log points instead
            return stop.next_batch(batches, interruptible=not self.dist.enabled)
        except _StopWhileWaiting as stopped:
            self._save_checkpoint(stats)
            raise RunInterrupted(stopped.signum, self._stopped_message(stopped.signum)) from None
        except ShardDataError as error:  # damaged data: stop cleanly, the last checkpoint stays as it was
            advice = "Repair or re-convert the data, then continue with --resume."
            raise ShardDataError(f"{error}\n{self._kept_message(advice)}") from None

    def _step_points(self, stop: StopRequest, stats: TrainStats, bar: tqdm) -> dict[str, float] | None:
        """Log, eval and checkpoint points after a step; the eval metrics when it evaluated."""
        config, eval_metrics = self.config, None
        done = self.step == config.num_steps
        log_point = self.step % config.log_every == 0 or done
        eval_point = self.step % config.eval_every == 0 or done
        if log_point or eval_point:
            self._drain(stats)
        if log_point:
            self._log_point(stats, bar)
        if eval_point:
            eval_metrics = self.evaluate()
        signum = self._agreed_stop(stop, log_point)
        if self.step % config.checkpoint_every == 0 or done or signum:
            self._drain(stats)
            self._save_checkpoint(stats)
        if signum:
            raise RunInterrupted(signum, self._stopped_message(signum))
        return eval_metrics

    def _timed_step(self, batch: Batch, stats: TrainStats) -> None:
        """One training step; its wall time counts towards images/s (the first batch's capture does not)."""
        if not self._captured:
            self._captured = True
            self._run_ahead = RunAheadLimit(self.device)  # the host stays at most RUN_AHEAD_STEPS ahead
            reason = self.engine.capture(batch)
            if reason and self.dist.is_main:
                log.info(reason)
        started = time.perf_counter()
        self._run_ahead.wait_turn()  # the device is busy meanwhile: counted as training time, like _drain
        result = self.engine.train_step(self.step, batch)
        stats.update(result, batch.labels, self.step)
        self._run_ahead.step_queued(batch)
        self.progress.step += 1
        stats.train_seconds += time.perf_counter() - started

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

    def _batches(self) -> Iterator[Batch]:
        """Endless training batches from the saved data position; keeps ``self.progress`` current."""
        progress = self.progress
        epoch, start = progress.epoch, progress.batch
        while True:
            for index, batch in enumerate(self.train_loader.epoch(epoch, start), start=start):
                progress.epoch, progress.batch = epoch, index + 1
                yield batch
            epoch, start = epoch + 1, 0
            progress.epoch, progress.batch = epoch, 0

    def _drain(self, stats: TrainStats) -> None:
        """Wait for the queued steps, counting the wait as training time: the host runs ahead of
        the device, so images/s is only right once the device has caught up."""
        if self.device.type == "cuda":
            started = time.perf_counter()
            torch.cuda.current_stream(self.device).synchronize()  # SYNC: log/eval/checkpoint point
            stats.train_seconds += time.perf_counter() - started

    def _log_point(self, stats: TrainStats, bar: tqdm) -> None:
        self._check_finite(stats)
        images = stats.num_images * self.dist.world_size
        seconds = stats.train_seconds
        position = self.engine.plan.position(self.step - 1)
        record = {"kind": "train", "step": self.step, "phase": position.phase.value, "cycle": position.cycle, **stats.read_and_reset()}
        record["lr"] = self.engine.lr_at(self.step - 1)
        record["images_per_s"] = images / max(seconds, 1e-9)  # training steps only
        self.folder.log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", phase=position.phase.value, img_s=f"{record['images_per_s']:.0f}")

    def _check_finite(self, stats: TrainStats) -> None:
        bad_step = stats.first_bad()
        if bad_step >= 0:
            position = self.engine.plan.position(bad_step)
            # steps are counted from 1 for people, as in metrics.jsonl
            raise NonFiniteLoss(f"non-finite loss at step {bad_step + 1} ({position.phase} phase, cycle {position.cycle}); {self._kept_message()}")

    def _check_finite_state(self) -> None:
        """Weights and BatchNorm statistics must be finite before they are checkpointed."""
        floats = [t for t in module_state(self.engine.learner) if t.is_floating_point()]
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(floats))).all()):  # SYNC: checkpoint point
            raise NonFiniteLoss(f"non-finite weights or BatchNorm statistics after step {self.step}; {self._kept_message()}")

    def _kept_message(self, advice: str = "Try a lower --lr or check the data.") -> str:
        path = self.folder.checkpoint_path
        kept = f"the last good checkpoint ({path}) is kept" if path.is_file() else "no checkpoint had been written yet"
        return f"stopping; {kept}. {advice}"

    # -- evaluation and checkpoints -----------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        started = time.perf_counter()
        accumulator = EvalAccumulator(
            num_classes=self.eval_split.num_classes,
            thetas=self.config.eval_thetas,
            method_kind="softmax" if self.config.method.name is Method.SOFTMAX else "sigmoid",
            has_targets=self.score_targets,
            attributes=self.eval_split.label_kind is LabelKind.ATTRIBUTES,
            device=self.device,
        )
        learner = self.engine.learner
        learner.eval()
        for batch in self.eval_loader.epoch(0):
            with autocast_context(compute_dtype(self.config, self.device, train=False), self.device.type):
                logits = learner(batch.images)
            accumulator.update(logits.float(), batch.labels, batch.targets if self.score_targets else None)
        learner.train()
        metrics = accumulator.compute()  # SYNC: eval point
        last = self.engine.plan.position(max(self.step - 1, 0))  # the phase the evaluated weights come from
        record = {"kind": "eval", "step": self.step, "phase": last.phase.value, "cycle": last.cycle, **metrics}
        self.folder.log({**record, "eval_seconds": time.perf_counter() - started})
        return metrics

    def _save_checkpoint(self, stats: TrainStats) -> None:
        self._check_finite(stats)  # never checkpoint weights that a NaN step has touched
        self._check_finite_state()
        if self.dist.is_main:
            save_checkpoint(self.folder.checkpoint_path, self.components(), self.config.to_json())

    def _load(self, path: Path) -> None:
        payload = read_checkpoint(path, self.device)
        load_components(payload, self.components(), path)
        self.folder.truncate_metrics_after(self.step)
        if self.dist.is_main:
            log.info("resumed %s at step %d (%s)", path, self.step, self.engine.plan.position(self.step))

    def _stopped_message(self, signum: int) -> str:
        name = signal.Signals(signum).name
        return (
            f"stopped by {name} at step {self.step}; checkpoint saved to {self.folder.checkpoint_path}. "
            f"Continue with: engine-run --out {self.config.out_dir} --resume"
        )
