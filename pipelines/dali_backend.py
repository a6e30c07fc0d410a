"""The NVIDIA DALI input pipeline: webdataset reader, decode (nvJPEG "mixed" on GPU, CPU otherwise), augment.

Labels arrive as fixed binary fields (``KEY.lbl`` int32, ``KEY.tgt`` uint8 multi-hot), so no
per-sample Python runs anywhere. Sharding is DALI's own sample-level ``shard_id``/``num_shards``
split, which is ``pipelines.contract.rank_range`` (verified by tests against the torch backend).

Epochs and resume. A DALI reader cannot seek and carries its shuffle state from epoch to epoch,
so an epoch of a long-lived pipeline depends on every epoch before it. Instead, ``epoch(e)`` builds
a fresh pipeline seeded from (seed, e, rank): DALI's outputs are then a function of those numbers
alone (checked: identical for any thread count), and ``epoch(e, start_batch=k)`` gives exactly
the tail of ``epoch(e)`` by running and discarding the first k batches (they are read and
decoded: resuming late in an epoch costs that share of an epoch's loader time). Differences from
the torch backend, by design of the DALI reader:

- shuffling is local: a buffer of ``shuffle_buffer`` samples (``initial_fill``) over tars read in
  order (hence the writer's shuffle across classes), not a global permutation;
- in training, rank r reads the contiguous share of rank (r + e) mod world_size in epoch e, which
  is what one long-lived DALI reader does with ``stick_to_shard=False``; evaluation always reads
  the rank's own share (``stick_to_shard=True``), like the torch backend;
- augmentation draws from DALI's generators, so the crops differ from the torch backend's (same
  distributions), and a pipeline build (and shuffle-buffer fill) happens at the start of every
  training epoch; ``EpochIterator`` keeps that pipeline from running batches past the epoch's end
  (the cost of both is measured in docs/PERFORMANCE.md, "Where the DALI CPU time goes").

Evaluation has no randomness and no shuffle, so its pipeline is built once and its iterator reset
after every complete pass (NVIDIA's ResNet-50 recipe does the same); each pass gives exactly the
batches of a fresh pipeline. A pass abandoned midway drops the pipeline (DALI cannot reset
mid-epoch) and the next pass builds a new one.

Set-up follows NVIDIA's DALI ResNet-50 recipe: ``num_threads`` from the CPU affinity per local rank
when ``num_workers`` is auto, and for GPU decoding the hardware-decoder share and the memory
pre-allocation hints of ``decoder_args``. On the GPU, half-precision batches are written as fp16 by
DALI itself (``dali_output_dtype``): no float32 batch is written and converted afterwards.

Damaged shards. At construction every index file is checked against its tar and the manifest
(``check_index_file``): DALI trusts index offsets, and ones past the end of a tar have crashed it.
Bytes damaged inside a tar pass that check; DALI's decoder then raises from the iterator, which
``epoch`` re-raises as ``ShardDataError`` naming the shards the failing batch came from (DALI does
not say which sample failed).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipelines.contract import Batch, LoaderConfig, ShardDataError, batches_per_epoch, rank_range, verify_advice
from pipelines.transforms import TransformSpec, transform_spec
from shards.format import FIELD_IMAGE, FIELD_LABEL, FIELD_TARGETS
from shards.manifest import SplitManifest, check_index_file

READER_NAME = "Reader"
_MAX_SHARDS_NAMED = 8


@dataclass(frozen=True)
class PipelineSpec:
    """Everything a pipeline graph depends on (no globals)."""

    tar_paths: tuple[str, ...]
    index_paths: tuple[str, ...]
    has_targets: bool
    train: bool
    transform: TransformSpec  # decode and augmentation, described once for both backends
    output_dtype: Any  # types.DALIDataType of the images
    shuffle_buffer: int
    gpu: bool


def read_samples(spec: PipelineSpec, shard_id: int, num_shards: int) -> list[DataNode]:
    """[jpegs, labels, (targets)] from the webdataset reader; eval pads the shard's last batch
    (the iterator drops the padding) and sticks to the rank's own shard."""
    train = spec.train
    exts = [FIELD_IMAGE, FIELD_LABEL] + ([FIELD_TARGETS] if spec.has_targets else [])
    return fn.readers.webdataset(
        paths=list(spec.tar_paths),
        index_paths=list(spec.index_paths),
        ext=exts,
        dtypes=[types.UINT8, types.INT32, types.UINT8][: len(exts)],
        missing_component_behavior="error",
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=train,
        initial_fill=spec.shuffle_buffer,
        pad_last_batch=not train,
        stick_to_shard=not train,
        name=READER_NAME,
    )


# NVIDIA's DALI ResNet-50 recipe (docs/examples/use_cases/pytorch/resnet50 in NVIDIA/DALI) for the
# "mixed" (nvJPEG) decoder. The paddings make nvJPEG allocate its device and pinned host buffers
# once, for the largest ImageNet sample, instead of growing them (a reallocation stalls the
# pipeline) during the first epochs; the width/height hints do the same for the A100/H100 hardware
# JPEG decoder's memory pool; hw_decoder_load is the share of each batch sent to that hardware
# decoder (the rest goes to the CUDA/hybrid decoder, run by the pipeline's CPU threads).
HW_DECODER_LOAD = 0.65
DEVICE_MEMORY_PADDING_BYTES = 211_025_920
HOST_MEMORY_PADDING_BYTES = 140_544_512
PREALLOCATE_WIDTH_PX = 5980
PREALLOCATE_HEIGHT_PX = 6430


def decoder_args(gpu: bool) -> dict[str, Any]:
    """Arguments of every ``fn.decoders.*`` call: the recipe's hints for the GPU ("mixed") decoder;
    none on the CPU, where these arguments mean nothing (DALI ignores them or rejects them)."""
    if not gpu:
        return {"device": "cpu"}
    return {
        "device": "mixed",
        "hw_decoder_load": HW_DECODER_LOAD,
        "device_memory_padding": DEVICE_MEMORY_PADDING_BYTES,
        "host_memory_padding": HOST_MEMORY_PADDING_BYTES,
        "preallocate_width_hint": PREALLOCATE_WIDTH_PX,
        "preallocate_height_hint": PREALLOCATE_HEIGHT_PX,
    }


def decode_and_augment(jpegs: DataNode, spec: PipelineSpec) -> DataNode:
    """The one augmentation helper: JPEG bytes -> normalised S×S×3 images (HWC), the DALI operators of
    the loader's ``TransformSpec`` (``pipelines/transforms.py``; the torch backend runs the same spec)."""
    return spec.transform.dali_graph(jpegs, decoder_args(spec.gpu), spec.output_dtype)


@pipeline_def
def loader_pipeline(spec: PipelineSpec, shard_id: int, num_shards: int) -> tuple[DataNode, ...]:
    jpegs, *labels = read_samples(spec, shard_id, num_shards)
    if spec.gpu:
        labels = [field.gpu() for field in labels]  # land on the device with the images: no host copy later
    return (decode_and_augment(jpegs, spec), *labels)


class DaliLoader:
    """``Loader`` built on DALI; see the module docstring for epoch and resume behaviour."""

    def __init__(self, root: Path, manifest: SplitManifest, config: LoaderConfig) -> None:
        for record in manifest.shards:
            check_index_file(root, record, manifest)
        self.config = config
        self._root, self._manifest = Path(root), manifest
        self.num_classes = manifest.num_classes
        self._num_total = manifest.num_samples
        start, stop = rank_range(manifest.num_samples, config.rank, config.world_size)
        self.num_samples = stop - start
        self.batches_per_epoch = batches_per_epoch(manifest.num_samples, config)
        self._device = torch.device(config.device)
        self._spec = _pipeline_spec(root, manifest, config, gpu=self._device.type == "cuda")
        self._outputs = ["images", "labels"] + (["targets"] if self._spec.has_targets else [])
        self.num_threads = max(1, config.resolved_workers)  # auto (-1) -> the CPU affinity per local rank
        self._eval_iterator: DALIGenericIterator | None = None
        self._in_use = OutputsInUse(self._device)

    def build_pipeline(self, epoch: int) -> Pipeline:
        """The pipeline of one epoch: its shard and seed depend only on (seed, epoch, rank)."""
        config = self.config
        train = config.train
        shard_id = (config.rank + epoch) % config.world_size if train else config.rank
        seed = int(np.random.SeedSequence([config.seed, epoch, config.rank]).generate_state(1)[0] & 0x7FFFFFFF)
        device_id = None
        if self._spec.gpu:
            device_id = self._device.index if self._device.index is not None else torch.cuda.current_device()
        return loader_pipeline(
            spec=self._spec,
            shard_id=shard_id,
            num_shards=config.world_size,
            batch_size=config.batch_size,
            num_threads=self.num_threads,
            device_id=device_id,
            seed=seed,
        )

    def _iterator(self, epoch: int) -> DALIGenericIterator:
        """Training: a new pipeline per epoch (see the module docstring). Evaluation: one pipeline
        for the loader's life, its iterator reset after each complete pass; an unseeded, unshuffled
        reader that sticks to its shard and pads the last batch starts every pass at the shard's
        first sample, so each pass gives the same batches as a fresh pipeline (tested)."""
        if self.config.train:
            return self._new_iterator(epoch)
        if self._eval_iterator is None:
            self._eval_iterator = self._new_iterator(0)
        return self._eval_iterator

    def _new_iterator(self, epoch: int) -> DALIGenericIterator:
        pipe = self.build_pipeline(epoch)
        if self.config.train:
            return EpochIterator(
                pipe,
                self._outputs,
                self.batches_per_epoch,
                reader_name=READER_NAME,
                last_batch_policy=LastBatchPolicy.DROP,
            )
        return DALIGenericIterator(
            [pipe], self._outputs, reader_name=READER_NAME, last_batch_policy=LastBatchPolicy.PARTIAL
        )

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from ``start_batch`` on (earlier batches are produced and dropped)."""
        if self.batches_per_epoch == 0:
            return
        iterator = self._iterator(epoch)
        complete = False
        try:
            for number in range(self.batches_per_epoch):
                outputs = self._next(iterator, epoch)
                if outputs is None:
                    break
                if number >= start_batch:
                    self._in_use.hand_out(outputs[0])
                    yield self._to_batch(outputs[0])
            complete = True
        finally:
            self._end_pass(iterator, complete)
            del iterator  # a training pipeline's buffers go before the next epoch builds its own

    def _end_pass(self, iterator: DALIGenericIterator, complete: bool) -> None:
        """After a pass: the eval iterator is reset for the next one, or dropped when the pass was
        abandoned or failed (DALI cannot reset mid-epoch; the next pass builds a new pipeline)."""
        if iterator is self._eval_iterator and complete:
            iterator.reset()
        elif iterator is self._eval_iterator:
            self._eval_iterator = None

    def _next(self, iterator: DALIGenericIterator, epoch: int) -> list[dict[str, torch.Tensor]] | None:
        """The iterator's next outputs (None at its end); a DALI failure becomes ``ShardDataError``."""
        try:
            return next(iterator)
        except StopIteration:
            return None
        except RuntimeError as error:  # DALI raises RuntimeError for decode and read failures
            raise ShardDataError(self._failure_message(epoch, error)) from None

    def _failure_message(self, epoch: int, error: RuntimeError) -> str:
        """Name the shard when DALI's message does, else every shard this epoch's pipeline reads."""
        text = str(error)
        named = [str(self._root / s.path) for s in self._manifest.shards if str(self._root / s.path) in text]
        where = f"shard {named[0]}" if named else self._epoch_shards(epoch)
        return (
            f"DALI could not read or decode a sample of split {self._manifest.name!r} in {self._root}, epoch {epoch}: "
            f"{where} ({_dali_reason(text)}); {verify_advice(self._root)}"
        )

    def _epoch_shards(self, epoch: int) -> str:
        """The shards of the sample range this rank's pipeline reads in ``epoch`` (see ``build_pipeline``)."""
        config = self.config
        reader_shard = (config.rank + epoch) % config.world_size if config.train else config.rank
        start, stop = rank_range(self._num_total, reader_shard, config.world_size)
        ends = np.cumsum([s.num_samples for s in self._manifest.shards])
        shards = self._manifest.shards
        paths = [str(self._root / s.path) for s, end in zip(shards, ends) if end > start and end - s.num_samples < stop]
        listed = ", ".join(paths[:_MAX_SHARDS_NAMED])
        if len(paths) > _MAX_SHARDS_NAMED:
            listed += f" and {len(paths) - _MAX_SHARDS_NAMED} more"
        return f"the failing sample cannot be pinpointed; it is in one of the shards {listed}"

    def _to_batch(self, outputs: dict[str, torch.Tensor]) -> Batch:
        # N×H×W×C in memory; the NCHW view of it is exactly the channels-last layout.
        images = outputs["images"].permute(0, 3, 1, 2)
        if images.dtype != self.config.dtype:
            images = images.to(self.config.dtype)  # bf16 only: DALI wrote fp16 or fp32 (see dali_output_dtype)
        labels = outputs["labels"].view(-1).to(torch.int64)
        if labels.device.type == "cpu":  # on a GPU the check would wait for the batch (a sync per step)
            self._check_labels(labels)
        targets = outputs.get("targets")
        if targets is not None:
            targets = targets.to(torch.float32)
        return Batch(images=images, labels=labels, targets=targets)

    def _check_labels(self, labels: torch.Tensor) -> None:
        """A label outside the split's classes (a damaged label member) as the torch loader reports it,
        a ShardDataError naming the split, not an index error inside the loss."""
        low, high = self._manifest.label_kind.label_range(self._manifest.num_classes)
        outside = labels[(labels < low) | (labels >= high)]
        if outside.numel():
            raise ShardDataError(
                f"a sample of split {self._manifest.name!r} in {self._root} has label {int(outside[0])} outside "
                f"[{low}, {high}); {verify_advice(self._root)}"
            )

    def close(self) -> None:
        """Free the evaluation pipeline (training pipelines are freed when their epoch ends)."""
        self._eval_iterator = None
        self._in_use.release_all()


class OutputsInUse:
    """DALI's output buffers, held until the device work queued on them has run (CUDA only).

    With DALI's dynamic executor the iterator hands out its own buffers through DLPack, no copy
    (``DALIGenericIterator.__next__``: ``copy = not exec_dynamic``); they go back to DALI when the
    last reference goes, and DALI's documentation promises nothing about when it reuses them
    relative to torch's stream. Work on a batch is only queued when ``_to_batch`` returns: the
    bf16 cast and the int64 labels are fresh tensors written later by kernels that read DALI's
    buffers, and a consumer's own queued reads (the trainer's step, an evaluation's forward) come
    after. So every buffer handed out is kept here until an event recorded after the consumer
    queued its work on it (at the next hand-out, or at ``release_all``) has completed: by
    ``event.query()``, never a wait. At most the batches still in flight on the device are held.
    """

    def __init__(self, device: torch.device, new_event: Callable[[], Any] | None = None) -> None:
        self.enabled = device.type == "cuda"
        self.new_event = new_event or torch.cuda.Event
        self.held: deque[tuple[Any, dict[str, torch.Tensor]]] = deque()  # (event or None, outputs)

    def hand_out(self, outputs: dict[str, torch.Tensor]) -> None:
        """Before ``outputs`` go to the consumer: mark the work queued on the earlier ones, drop
        those whose work has run, hold these."""
        if not self.enabled:
            return
        if self.held:
            event = self.new_event()
            event.record()  # after everything the consumer queued on the batches handed out so far
            self.held = deque((event if e is None else e, o) for e, o in self.held)
        while self.held and self.held[0][0] is not None and self.held[0][0].query():
            self.held.popleft()
        self.held.append((None, outputs))

    def release_all(self) -> None:
        """The loader closes: wait for the work on what is still held, then let it go."""
        if self.enabled and self.held:
            torch.cuda.current_stream().synchronize()  # SYNC: loader close
        self.held.clear()


class EpochIterator(DALIGenericIterator):
    """The iterator of a one-epoch training pipeline: it schedules no pipeline run past the
    epoch's ``runs`` batches. DALIGenericIterator keeps ``prefetch_queue_depth`` runs queued ahead
    of the consumer; on a pipeline that is dropped at the epoch's end those runs decode, augment
    and normalise batches only to throw them away: measured as the whole 20% gap between this
    backend and a long-lived plain DALI pipeline on 8-batch epochs (docs/PERFORMANCE.md, "Where the
    DALI CPU time goes"). Relies on DALI's ``_schedule_runs`` hook (DALI 1.x-2.4); the test
    counting pipeline runs per epoch fails if that hook changes."""

    def __init__(self, pipe: Pipeline, outputs: list[str], runs: int, **kwargs: Any) -> None:
        self._runs_left = runs
        super().__init__([pipe], outputs, **kwargs)

    def _schedule_runs(self, release_outputs: bool = True) -> None:
        if self._runs_left <= 0:
            self._ever_scheduled = True
            if release_outputs:
                for pipe in self._pipes:
                    with pipe._check_api_type_scope(types.PipelineAPIType.ITERATOR):
                        pipe.release_outputs()
            return
        first = not self._ever_scheduled  # the first call queues prefetch_queue_depth runs at once
        super()._schedule_runs(release_outputs)
        depth = self._pipes[0].prefetch_queue_depth
        depth = max(depth.values()) if isinstance(depth, dict) else depth  # separated CPU/GPU queues
        self._runs_left -= depth if first else 1


def _dali_reason(text: str) -> str:
    """The core of a DALI error message (between "encountered:" and "Current pipeline ...")."""
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and "pipeline object is no longer valid" not in line
    ]
    return " ".join(lines)[:300] or "no details"


def _pipeline_spec(root: Path, manifest: SplitManifest, config: LoaderConfig, gpu: bool) -> PipelineSpec:
    return PipelineSpec(
        tar_paths=tuple(str(Path(root) / s.path) for s in manifest.shards),
        index_paths=tuple(str(Path(root) / s.index_path) for s in manifest.shards),
        has_targets=manifest.label_kind.has_targets,
        train=config.train,
        transform=transform_spec(config),
        output_dtype=dali_output_dtype(config.dtype, gpu),
        shuffle_buffer=config.shuffle_buffer,
        gpu=gpu,
    )


def dali_output_dtype(dtype: torch.dtype, gpu: bool) -> Any:
    """What ``crop_mirror_normalize`` writes for batches of ``dtype``; ``_to_batch`` casts the rest.

    DALI has no bfloat16. On the GPU, bf16 batches (the engine's CUDA runs) are written as fp16
    (normalised pixels lie in about [-2.2, 2.7], where fp16 is finer than bf16) and cast fp16 ->
    bf16 on the device: one elementwise kernel reading half the bytes of an fp32 -> bf16 cast, and
    no float32 batch written. On the CPU, DALI's fp16 conversion is slow: measured with
    ``tools/bench.py dali-gap``, fp16 output + cast gave 0.53x and uint8 output + normalising in
    torch 0.54x the plain pipeline's images/s, float32 output + cast 0.66x; so CPU bf16 batches
    are written as float32. uint8 output is not used: it only moves the normalisation pass out of
    DALI and changes the ``Batch`` contract."""
    if dtype == torch.float16 or (dtype == torch.bfloat16 and gpu):
        return types.FLOAT16
    if dtype in (torch.float32, torch.bfloat16):
        return types.FLOAT
    raise ValueError(f"DALI backend: image dtype {dtype} is not supported (float32, float16 or bfloat16)")
