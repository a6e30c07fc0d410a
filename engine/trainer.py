"""The training loop: one loop for every method, the engine's phase plan deciding which step runs.

Hot-loop rule (docs/DESIGN.md, "Engine"): nothing between two log points waits for the device.
Losses, train accuracy and a non-finite flag accumulate in device tensors; the host reads them only
at log, eval and checkpoint points, each marked ``# SYNC``.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from engine.build import Engine, build_engine
from engine.checkpoint import (
    CheckpointTargets,
    CheckpointWriter,
    Progress,
    RngState,
    check_resumed_config,
    load_components,
    read_checkpoint,
    remove_temporaries,
)
from engine.config import Method, RunConfig
from engine.data import build_loaders, compute_dtype
from engine.distributed import DistInfo, gather_floats
from engine.hooks import StepHooks, StepObserver
from engine.metrics import PseudoLabelStats, metric_key
from engine.phases import STUDENT, PhasePosition, module_state
from engine.plan import EvalSet, plan_run
from engine.run_folder import check_checkpoint_classes
from engine.scoring import score_split
from engine.steps import RunAheadLimit, StepResult
from pipelines.contract import Batch, Loader, ShardDataError
from shards.manifest import SplitManifest
from shards.progress import on_terminal

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss or weights; the message names the step and phase."""


class TrainStats:
    """Device-side accumulators between two log points (this rank's; ``reduce_log_rows`` combines the ranks')."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.num_images = 0  # host-side: batch sizes are known without asking the device
        self.num_labelled = 0  # images with ground truth: train accuracy counts only these
        self.num_steps = 0
        # wall time of the loop since the last log point, loader waits included, up to the device's end
        # (the trainer drains the device before reading it); eval, checkpoint and graph capture excluded
        self.train_seconds = 0.0
        self.data_wait_seconds = 0.0  # the part of it spent blocked waiting for the loader's next batch
        self._clock_started: float | None = None

    def start_clock(self) -> None:
        """Training resumes: count wall time from now (no-op while the clock already runs)."""
        if self._clock_started is None:
            self._clock_started = time.perf_counter()

    def stop_clock(self) -> None:
        """Training pauses (device drained; eval, checkpoint or capture next): add the time since ``start_clock``."""
        if self._clock_started is not None:
            self.train_seconds += time.perf_counter() - self._clock_started
            self._clock_started = None

    def update(self, result: StepResult, labels: torch.Tensor, step: int, labelled: bool = True) -> None:
        """``labelled`` False: a batch of an unlabelled split, whose labels are placeholders that
        must not count as correct or wrong."""
        self.loss_sum += result.loss
        if labelled:
            self.correct += (result.logits.argmax(dim=1) == labels).sum()
            self.num_labelled += labels.shape[0]
        bad = ~torch.isfinite(result.loss) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)
        self.num_images += labels.shape[0]
        self.num_steps += 1

    def first_bad(self) -> int:
        return int(self.first_bad_step)  # SYNC: read at log/checkpoint points only

    def read_and_reset(self) -> list[float]:
        """This rank's totals since the last log point, in ``LOCAL_FIELDS`` order; then zero."""
        values = [
            self.loss_sum.item(),
            float(self.correct.item()),
            float(self.num_images),
            float(self.num_labelled),  # SYNC: log point
            float(self.num_steps),
            self.train_seconds,
            self.data_wait_seconds,
        ]
        self.loss_sum.zero_()
        self.correct.zero_()
        self.num_images = self.num_labelled = self.num_steps = 0
        self.train_seconds = self.data_wait_seconds = 0.0
        return values


LOCAL_FIELDS = (
    "loss_sum",
    "correct",
    "num_images",
    "num_labelled",
    "num_steps",
    "train_seconds",
    "data_wait_s",
    "signum",
)


def reduce_log_rows(rows: list[list[float]]) -> dict[str, Any]:
    """One log record's figures from every rank's ``LOCAL_FIELDS`` (one row per rank): loss and
    accuracy over all ranks' images, images/s of the whole job and per process, and each rank's data
    wait. images/s is images over the wall time between log points (``TrainStats.train_seconds``,
    loader waits included, the device drained at the log point; the slowest rank's time bounds it:
    every step waits for every rank): on a GPU the host runs ahead of the device, so the time the
    host spends enqueueing steps says nothing of the rate."""
    by_field = {name: [row[i] for row in rows] for i, name in enumerate(LOCAL_FIELDS)}
    images, steps, labelled = sum(by_field["num_images"]), sum(by_field["num_steps"]), sum(by_field["num_labelled"])
    seconds = max(by_field["train_seconds"])
    images_per_s = images / max(seconds, 1e-9)
    return {
        "loss": sum(by_field["loss_sum"]) / max(1.0, steps),
        # over the images with ground truth; None when the interval read only unlabelled ones
        "train_top1": sum(by_field["correct"]) / labelled if labelled else None,
        "labelled_images": int(labelled),  # all processes; the rest came from the unlabelled split
        "unlabelled_images": int(images - labelled),
        "images_per_s": images_per_s,  # wall time between log points, all processes together
        "images_per_s_per_process": images_per_s / len(rows),
        "train_seconds": seconds,  # the wall time images_per_s divides by
        "data_wait_s": by_field["data_wait_s"][0],  # this log interval, rank 0 (part of train_seconds)
        "data_wait_s_max": max(by_field["data_wait_s"]),
        "data_wait_s_by_rank": by_field["data_wait_s"],
        "signum": int(max(by_field["signum"])),
    }


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # SIGUSR1: SLURM's warning before pre-emption


class RunInterrupted(Exception):
    """SIGTERM/SIGINT/SIGUSR1 arrived; a checkpoint was saved. ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class _StopWhileWaiting(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class StopRequest:
    """Set by SIGTERM/SIGINT/SIGUSR1; the loop saves a checkpoint and exits at the next step boundary
    (several processes: at the next log point, all after the same step).

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


class UnlabelledPlaceholders:
    """Labels and targets for batches of the unlabelled split, allocated once: the steps of every phase
    take one input layout (captured graphs replay on fixed buffers), and an imitation step never
    reads them. Labels are class 0 rather than NO_LABEL so that a supervised step run on them (graph
    capture warms every phase up on the first batch, whichever split it came from) stays in range;
    train accuracy never counts them (``TrainStats.update``)."""

    def __init__(self, like: Batch, train: SplitManifest) -> None:
        size, device = like.images.shape[0], like.images.device
        self.labels = torch.zeros(size, dtype=torch.long, device=device)
        self.targets = torch.zeros(size, train.num_classes, device=device) if train.label_kind.has_targets else None

    def fit(self, batch: Batch) -> Batch:
        return Batch(images=batch.images, labels=self.labels, targets=self.targets)


def describe_position(position: PhasePosition, method: Method) -> str:
    """A step's place in the phase plan for people: "teacher phase, cycle 2, its step 5" (MILe) or
    "train phase, its step 5"; steps counted from 1."""
    cycle = f", cycle {position.cycle}" if method is Method.MILE else ""
    return f"{position.phase} phase{cycle}, its step {position.step_in_phase + 1}"


def headline_metrics(metrics: dict[str, float], thetas: tuple[float, ...]) -> list[str]:
    """The keys of an eval record worth a console line: top-1, F1 and coverage (or balanced accuracy)
    at the first threshold, secondary mAP, and each extra eval set's top-1; those present, in order."""
    theta = thetas[0]
    wanted = ["top1", metric_key("f1", theta), metric_key("coverage", theta), metric_key("balanced_acc", theta)]
    wanted += ["secondary_map"] + [key for key in metrics if key.endswith("/top1")]
    return [key for key in wanted if key in metrics]


def eval_line(step: int, num_steps: int, where: str, metrics: dict[str, float], thetas: tuple[float, ...]) -> str:
    """One console line per eval point: "eval step 300/2000 (student phase, cycle 1, its step 20): top1 0.8125 ..."."""
    figures = " ".join(f"{key} {metrics[key]:.4f}" for key in headline_metrics(metrics, thetas))
    return f"eval step {step}/{num_steps} ({where}): {figures or 'no metrics'}"


class Trainer:
    """Runs the loop of a planned run: the plan (``engine.plan``) has read and checked everything; the
    trainer builds the engine and the loaders from it, resumes, and trains."""

    def __init__(self, config: RunConfig, dist: DistInfo, resume: bool = False) -> None:
        self.plan = plan = plan_run(config, dist, resume)  # every check, before any work
        self.config, self.dist, self.device = plan.config, dist, dist.device
        self.folder = plan.folder
        self.eval_sets = list(plan.eval_sets)
        loaders = build_loaders(plan)
        self.train_loader, self.unlabelled_loader = loaders.train, loaders.unlabelled
        self.eval_loaders = loaders.evaluation
        self.engine: Engine = build_engine(
            plan.config, plan.engine_spec, self.device, distributed=dist.enabled, init_weights=not resume
        )
        self.progress, self.rng = Progress(), RngState()
        if resume:
            self._load(self.folder.checkpoint_path)
        self.folder.prepare(plan.config, resume, plan.classes)  # only now, with everything checked, is it written
        self.checkpoints = (
            CheckpointWriter(self.folder.checkpoints_dir, plan.config.checkpoint.keep_last, plan.classes.to_json())
            if dist.is_main
            else None
        )
        if dist.is_main and remove_temporaries(self.folder.checkpoints_dir):
            log.warning(
                "removed the temporary files of a checkpoint write that was killed; %s is whole",
                self.folder.checkpoint_path,
            )
        self._captured = False
        self._placeholders: UnlabelledPlaceholders | None = None
        self.hooks = StepHooks()  # named points of the loop that checks and profilers observe

    def observe(self, observer: StepObserver) -> None:
        """Call ``observer`` at the loop's named points (``engine.hooks``) from the next step on."""
        self.hooks.add(observer)

    @property
    def step(self) -> int:
        return self.progress.step

    def reads_unlabelled(self, step: int) -> bool:
        """Whether step ``step`` trains on the unlabelled split: imitation steps of a semi-supervised run."""
        return self.unlabelled_loader is not None and self.engine.plan.position(step).phase is STUDENT

    def components(self) -> dict[str, Any]:
        """Everything with state, by checkpoint name: the checkpoint is their collection."""
        return {**self.engine.components(), "progress": self.progress, "rng": self.rng}

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        stop = StopRequest()
        previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
        completed = False
        try:
            summary = self._loop(stop)
            self._wait_for_checkpoint()
            completed = True
            return summary
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._wait_for_checkpoint(report=False)  # an error is on its way already: keep it
            self.train_loader.close()
            for loader in self.eval_loaders:
                loader.close()
            if self.unlabelled_loader is not None:
                self.unlabelled_loader.close()
            self._close_folder(report=completed)

    def _close_folder(self, report: bool) -> None:
        """Close the run folder's writers. When the run is failing already (a full disk: the metrics
        write failed), the TensorBoard writer's failure from the same cause is one log line, not a
        second error that would replace the first."""
        try:
            self.folder.close()
        except OSError as error:
            if report:
                raise
            log.warning("TensorBoard writer of %s: %s", self.folder.root, error)

    def _loop(self, stop: StopRequest) -> dict[str, Any]:
        stats = TrainStats(self.device)
        # one stream per split, each at its own data position; a stream is read only by the steps that need it
        streams = {False: self._batches(self.train_loader, "epoch", "batch")}
        if self.unlabelled_loader is not None:
            streams[True] = self._batches(self.unlabelled_loader, "unlabelled_epoch", "unlabelled_batch")
        # a bar on a terminal; in a log file (a cluster job) the log points print plain lines instead
        bar = tqdm(
            total=self.config.num_steps,
            initial=self.step,
            unit="step",
            disable=not self._on_terminal(),
            dynamic_ncols=True,
        )
        eval_metrics: dict[str, float] = {}
        self.engine.learner.train()
        # log lines go through the bar's writer on a terminal, so that they never land inside the bar
        with bar, logging_redirect_tqdm():
            while self.step < self.config.num_steps:
                self._timed_step(self._next_batch(stop, streams[self.reads_unlabelled(self.step)], stats), stats)
                bar.update(1)
                eval_metrics = self._step_points(stop, stats, bar) or eval_metrics
                stats.start_clock()  # after a log, eval or checkpoint point: training resumes
        if not eval_metrics:  # resumed at its last step: nothing ran; the finished run's summary stands
            finished = self.folder.read_summary()
            if finished is not None:
                return finished
            eval_metrics = self.evaluate()
        summary = {"step": self.step, "method": self.config.method.name.value, **eval_metrics}
        self.folder.write_summary(summary)
        return summary

    def _on_terminal(self) -> bool:
        return self.dist.is_main and on_terminal()

    def _next_batch(self, stop: StopRequest, batches: Iterator[Batch], stats: TrainStats) -> Batch:
        self.hooks.before_fetch(self.step)
        started = time.perf_counter()
        try:
            # several processes must leave after the same step: they agree at log points instead
            batch = stop.next_batch(batches, interruptible=not self.dist.enabled)
        except _StopWhileWaiting as stopped:
            self._save_checkpoint(stats, CheckpointTargets(self.step))
            self._wait_for_checkpoint()
            raise RunInterrupted(stopped.signum, self._stopped_message(stopped.signum)) from None
        except ShardDataError as error:  # damaged data: stop cleanly, the last checkpoint stays as it was
            advice = "Repair or re-convert the data, then continue with --resume."
            raise ShardDataError(f"{error}\n{self._kept_message(advice)}") from None
        finally:
            stats.data_wait_seconds += time.perf_counter() - started
        self.hooks.after_fetch(self.step, batch)
        return batch

    def _step_points(self, stop: StopRequest, stats: TrainStats, bar: tqdm) -> dict[str, float] | None:
        """Log, eval and checkpoint points after a step; the eval metrics when it evaluated."""
        config, eval_metrics = self.config, None
        done = self.step == config.num_steps
        log_point = self.step % config.log_every == 0 or done
        eval_point = self.step % config.eval_every == 0 or done
        phase_end = self._ends_phase()
        if log_point or eval_point or phase_end:
            self._drain(stats)
        # one process stops at once; several agree at log points, so that all leave after the same
        # step (a rank that ran one more step would wait in its gradient all-reduce forever)
        signum = 0 if self.dist.enabled else (stop.signum or 0)
        if log_point:
            signum = self._log_point(stats, bar, stop)
        if eval_point:
            eval_metrics = self.evaluate()
        if phase_end:
            self._phase_eval()
        best = self._improves_best(eval_metrics)
        if self.step % config.checkpoint_every == 0 or done or signum or best:
            last = self.step % config.checkpoint_every == 0 or done or bool(signum)
            self._drain(stats)
            self._save_checkpoint(stats, CheckpointTargets(self.step, last=last, best=best))
        if signum:
            self._wait_for_checkpoint()
            raise RunInterrupted(signum, self._stopped_message(signum))
        return eval_metrics

    def _timed_step(self, batch: Batch, stats: TrainStats) -> None:
        """Enqueue one training step (the first batch's graph capture is left out of the wall time)."""
        step = self.step
        unlabelled = self.reads_unlabelled(step)
        step_batch = self._with_placeholders(batch) if unlabelled else batch
        if not self._captured:
            self._captured = True
            self._run_ahead = RunAheadLimit(self.device)  # the host stays at most RUN_AHEAD_STEPS ahead
            reason = self.engine.capture(step_batch)
            if reason and self.dist.is_main:
                log.info(reason)
            # the clock starts here: the loader's start-up (the first fetch) and the capture are not training
            stats.data_wait_seconds = 0.0
            stats.start_clock()
        self._run_ahead.wait_turn()
        actions = self.engine.plan.transitions_before(step)
        if actions:
            self.hooks.at_phase_switch(step, actions)
        self.hooks.before_step(step, step_batch)
        result = self.engine.train_step(step, step_batch)
        stats.update(result, batch.labels, step, labelled=not unlabelled)
        self._run_ahead.step_queued(batch)
        self.hooks.after_step(step, result)
        self.progress.step += 1

    def _with_placeholders(self, batch: Batch) -> Batch:
        """A batch of the unlabelled split as the step reads it: its images with placeholder labels."""
        if self._placeholders is None:  # allocated once, on the device, with the first unlabelled batch
            self._placeholders = UnlabelledPlaceholders(batch, self.plan.train.manifest)
        return self._placeholders.fit(batch)

    def _batches(self, loader: Any, epoch_field: str, batch_field: str) -> Iterator[Batch]:
        """Endless batches of ``loader`` from the data position saved in ``self.progress`` under
        ``epoch_field``/``batch_field``, kept current as batches are taken (the train split's
        stream: ``epoch``/``batch``; the unlabelled split's: ``unlabelled_epoch``/``unlabelled_batch``)."""
        progress = self.progress
        epoch, start = getattr(progress, epoch_field), getattr(progress, batch_field)
        while True:
            for index, batch in enumerate(loader.epoch(epoch, start), start=start):
                setattr(progress, epoch_field, epoch)
                setattr(progress, batch_field, index + 1)
                yield batch
            epoch, start = epoch + 1, 0
            setattr(progress, epoch_field, epoch)
            setattr(progress, batch_field, 0)

    def _drain(self, stats: TrainStats) -> None:
        """Wait for the queued steps, then stop the training clock: the host runs ahead of the
        device, so the wall time is only the steps' time once the device has caught up; what
        follows (log, eval, checkpoint) is not training (``_loop`` restarts the clock after it)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # SYNC: log/eval/checkpoint point
        stats.stop_clock()

    def _log_point(self, stats: TrainStats, bar: tqdm, stop: StopRequest) -> int:
        """Log the ranks' loss, accuracy, images/s and data wait (one all-gather); the signal the
        ranks agree to stop on (0 = go on)."""
        self._check_finite(stats)
        rows = gather_floats([*stats.read_and_reset(), float(stop.signum or 0)], self.device)  # SYNC: log point
        reduced = reduce_log_rows(rows)
        signum = reduced.pop("signum")
        position = self.engine.plan.position(self.step - 1)
        record = {"kind": "train", "step": self.step, "phase": position.phase.value, "cycle": position.cycle, **reduced}
        record["lr"] = self.engine.lr_at(self.step - 1)
        self.folder.log(record)
        self.hooks.at_log_point(self.step, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", phase=position.phase.value, img_s=f"{record['images_per_s']:.0f}")
        if self.dist.is_main and not self._on_terminal():
            top1 = "-" if record["train_top1"] is None else f"{record['train_top1']:.3f}"
            ranks = f" (max over ranks {record['data_wait_s_max']:.2f}s)" if self.dist.world_size > 1 else ""
            log.info(
                "step %d/%d %s loss %.4f top1 %s lr %.4g %.0f images/s data wait %.2fs%s",
                self.step,
                self.config.num_steps,
                position.phase.value,
                record["loss"],
                top1,
                record["lr"],
                record["images_per_s"],
                record["data_wait_s"],
                ranks,
            )
        return signum

    def _check_finite(self, stats: TrainStats) -> None:
        bad_step = stats.first_bad()
        if bad_step >= 0:
            position = self.engine.plan.position(bad_step)
            # steps are counted from 1 for people, as in metrics.jsonl
            raise NonFiniteLoss(
                f"non-finite loss at step {bad_step + 1} "
                f"({describe_position(position, self.config.method.name)}); {self._kept_message()}"
            )

    def _check_finite_state(self) -> None:
        """Weights and BatchNorm statistics must be finite before they are checkpointed."""
        floats = [t for t in module_state(self.engine.learner) if t.is_floating_point()]
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(floats))).all()):  # SYNC: checkpoint point
            raise NonFiniteLoss(
                f"non-finite weights or BatchNorm statistics after step {self.step}; {self._kept_message()}"
            )

    def _kept_message(self, advice: str = "Try a lower --lr or check the data.") -> str:
        self._wait_for_checkpoint(report=False)
        path = self.folder.checkpoint_path
        kept = f"the last good checkpoint ({path}) is kept" if path.is_file() else "no checkpoint had been written yet"
        return f"stopping; {kept}. {advice}"

    # -- evaluation and checkpoints -----------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Score every eval set; one metrics record with all their keys (and each set's eval seconds)."""
        self.engine.sync_buffers()  # every rank evaluates its share with rank 0's BatchNorm statistics
        metrics: dict[str, float] = {}
        seconds: dict[str, float] = {}
        self.engine.learner.eval()
        for eval_set, loader in zip(self.eval_sets, self.eval_loaders):
            started = time.perf_counter()
            metrics.update({eval_set.key(k): v for k, v in self._score(eval_set, loader).items()})
            seconds[eval_set.key("eval_seconds")] = time.perf_counter() - started
        self.engine.learner.train()
        last = self.engine.plan.position(max(self.step - 1, 0))  # the phase the evaluated weights come from
        record = {"kind": "eval", "step": self.step, "phase": last.phase.value, "cycle": last.cycle, **metrics}
        self.folder.log({**record, **seconds})
        if self.dist.is_main:
            where = describe_position(last, self.config.method.name)
            log.info(eval_line(self.step, self.config.num_steps, where, metrics, self.config.eval_thetas))
        return metrics

    def _ends_phase(self) -> bool:
        """Whether the step just taken ended a MILe phase (the run's last step included)."""
        if not self.config.eval_phase_ends or self.config.method.name is not Method.MILE or self.step == 0:
            return False
        plan = self.engine.plan
        return (
            self.step == self.config.num_steps or plan.position(self.step).phase != plan.position(self.step - 1).phase
        )

    @torch.no_grad()
    def _phase_eval(self) -> None:
        """The learner at the end of a MILe phase (the teacher about to be snapshotted, or the student
        that imitated it) scored on the eval split, with the pseudo-labels it would pass on at rho: a
        ``phase_eval`` record (docs/METRICS.md), so a reader sees in which phase ranking is won or lost."""
        ended = self.engine.plan.position(self.step - 1)
        self.engine.sync_buffers()
        self.engine.learner.eval()
        pseudo = PseudoLabelStats(self.config.method.rho, self.device)
        metrics = self._score(self.eval_sets[0], self.eval_loaders[0], pseudo)
        self.engine.learner.train()
        self.folder.log(
            {"kind": "phase_eval", "step": self.step, "role": ended.phase.value, "cycle": ended.cycle, **metrics}
        )

    def _score(self, eval_set: EvalSet, loader: Loader, pseudo: PseudoLabelStats | None = None) -> dict[str, float]:
        dtype = compute_dtype(self.config, self.device, train=False)
        return score_split(
            self.engine.learner, loader, self.plan.new_accumulator(eval_set), dtype, self.device, pseudo
        )  # SYNC: eval point

    def _improves_best(self, metrics: dict[str, float] | None) -> bool:
        """Whether ``metrics`` beat the best value of ``checkpoint.best_metric`` so far (recorded if so)."""
        name = self.config.checkpoint.best_metric
        if not name or not metrics or not math.isfinite(metrics.get(name, math.nan)):
            return False
        progress = self.progress
        if progress.best_value is not None and metrics[name] <= progress.best_value:
            return False
        progress.best_value, progress.best_step = metrics[name], self.step
        if self.checkpoints is not None:  # the main rank writes checkpoints
            log.info(
                "best %s so far: %.4f at step %d -> %s", name, metrics[name], self.step, self.checkpoints.best_path
            )
        return True

    def _save_checkpoint(self, stats: TrainStats, targets: CheckpointTargets) -> None:
        """Check, copy the state to host memory, and let the writer's thread put it on disk."""
        self._check_finite(stats)  # never checkpoint weights that a NaN step has touched
        self._check_finite_state()
        if self.checkpoints is not None:
            self.checkpoints.save(self.components(), self.config.to_json(), targets)

    def _wait_for_checkpoint(self, report: bool = True) -> None:
        """Until the checkpoint being written is on disk; its error unless ``report`` is off."""
        if self.checkpoints is None:
            return
        try:
            self.checkpoints.wait()
        except Exception:
            if report:
                raise

    def _load(self, path: Path) -> None:
        payload = read_checkpoint(path, self.device)
        check_checkpoint_classes(payload, self.plan.classes, path)
        changes = check_resumed_config(payload, self.config, path)  # config.toml edited by hand, or flags
        load_components(payload, self.components(), path)
        if changes and self.dist.is_main:
            log.info("resuming with changed resume-safe keys: %s", "; ".join(changes))
        self.folder.truncate_metrics_after(self.step)
        if self.dist.is_main:
            where = describe_position(self.engine.plan.position(self.step), self.config.method.name)
            log.info("resumed %s at step %d (next: %s)", path, self.step, where)

    def _stopped_message(self, signum: int) -> str:
        name = signal.Signals(signum).name
        return (
            f"stopped by {name} at step {self.step}; checkpoint saved to {self.folder.checkpoint_path}. "
            f"Continue with: engine-run --out {self.config.out_dir} --resume"
        )
