"""The torch input pipeline: random-access reads from the shards, torchvision decoding and augmentation.

How it works:

- The main process plans each epoch as a list of batches of sample indices: in training a global
  permutation fixed by (seed, epoch), cut into global batches of batch_size x world_size samples, of
  which this rank takes its contiguous slice (``contract.train_batch_range``): a step trains on the
  same samples whatever the number of processes, so a run resumes exactly on another number of
  processes too. In evaluation the rank's ``rank_range`` in file order, the last batch possibly
  partial. ``epoch(e, start_batch=k)`` simply starts at batch k.
- DataLoader worker processes (persistent across epochs) turn a planned batch into tensors: they
  read member bytes with ``pread`` through the ``.idx`` offsets and, when the device is the CPU,
  decode, augment and normalise each image, writing it into the batch's N×S×S×C tensor, which is
  allocated in shared memory so that handing it to the main process copies nothing. Decoding,
  augmentation and normalisation are the torch side of the loader's one ``TransformSpec``
  (``pipelines/transforms.py``, which the DALI backend builds its graph from too). Augmentation
  draws from a generator seeded by (seed, epoch, sample index): the images do not depend on
  ``num_workers``. Normalising image by image in the workers, while the image is still in the
  cache, costs less than normalising the whole batch in the main process, and spreads over the
  workers (docs/PERFORMANCE.md, "Where the torch backend's CPU time goes").
- When the device is CUDA, the batch crosses to the device as uint8 (a quarter of float32's bytes)
  and is normalised there; with nvJPEG (the default there) workers return the batch's JPEG bytes
  only, packed in one buffer, and the main process decodes the whole batch
  (``decode_jpeg(list, device=...)``) and augments on the GPU.
- The main process moves the batch to the device (normalising it there when the workers did not).
- A sample that cannot be read or decoded raises ``ShardDataError`` naming the shard and the
  sample's key (a worker's error reaches the main process with the same type and message).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipelines.contract import Batch, LoaderConfig, ShardDataError, batches_per_epoch, rank_range, train_batch_range
from pipelines.sample_table import SampleTable, ShardReader, build_sample_table
from pipelines.transforms import Decode, TransformSpec, epoch_permutation, sample_rng, transform_spec
from shards.manifest import SplitManifest


@dataclass(frozen=True)
class BatchRequest:
    """One planned batch: the epoch (for augmentation seeds) and the sample indices, in file order numbering."""

    epoch: int
    indices: np.ndarray


class _EpochPlan:
    """The DataLoader's sampler: the current epoch's batch requests, replaced by ``TorchLoader.epoch``.

    DataLoader iterates its sampler in the main process at the start of every pass, so a new plan
    takes effect on the next ``iter(loader)`` while the persistent workers stay alive."""

    def __init__(self) -> None:
        self.requests: list[BatchRequest] = []

    def __iter__(self) -> Iterator[BatchRequest]:
        return iter(self.requests)

    def __len__(self) -> int:
        return len(self.requests)


class BatchReader(Dataset):
    """Runs in DataLoader workers: a ``BatchRequest`` -> dict of batch tensors (CPU).

    ``decode``: decode and augment (else return the JPEG bytes: ``encoded`` and ``encoded_sizes``);
    ``normalise``: normalise too, into ``spec.normalize.dtype`` (else the batch stays uint8)."""

    def __init__(self, table: SampleTable, spec: TransformSpec, seed: int, decode: bool, normalise: bool) -> None:
        self.reader = ShardReader(table)
        self.spec, self.seed, self.decode, self.normalise = spec, seed, decode, normalise
        self._normalise_into = spec.normalize.torch_normaliser(torch.device("cpu"))

    def __len__(self) -> int:
        return len(self.reader.table)

    def __getitem__(self, request: BatchRequest) -> dict[str, Any]:
        indices = [int(i) for i in request.indices]
        out: dict[str, Any] = {
            "indices": torch.as_tensor(request.indices, dtype=torch.int64),
            "labels": torch.tensor([self.reader.label(i) for i in indices], dtype=torch.int64),
        }
        if self.reader.table.targets_offset is not None:
            out["targets"] = torch.from_numpy(np.stack([self.reader.targets(i) for i in indices]))
        if not self.decode:  # decoded on the GPU by the main process
            out["encoded"], out["encoded_sizes"] = self._packed_bytes(indices)
            return out
        out["images"] = self._images(self._encoded(indices), request.epoch, indices)
        return out

    def _packed_bytes(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's JPEG bytes in one buffer, and their sizes: one shared-memory block (and one
        pinned one on CUDA) per batch rather than one per image."""
        sizes = self.reader.table.image_size[indices]
        packed = self._new_batch((int(sizes.sum()),), torch.uint8)
        for data, image in zip(torch.split(packed, sizes.tolist()), indices):
            self.reader.read_into(image, data.numpy().data, int(self.reader.table.image_offset[image]))
        return packed, torch.from_numpy(sizes)

    def _encoded(self, indices: list[int]) -> list[torch.Tensor]:
        """Each sample's JPEG bytes, as a uint8 1-D tensor."""
        return [torch.frombuffer(self.reader.image_bytes(i), dtype=torch.uint8) for i in indices]

    def _images(self, encoded: list[torch.Tensor], epoch: int, indices: list[int]) -> torch.Tensor:
        """Decoded, augmented (and normalised) N×S×S×C, each image written into the batch as it is made."""
        batch: torch.Tensor | None = None
        for slot, (data, index) in enumerate(zip(encoded, indices)):
            image = self._decode_one(data, epoch, index)
            if batch is None:
                dtype = self.spec.normalize.dtype if self.normalise else torch.uint8
                batch = self._new_batch((len(indices), *image.shape), dtype)
            if self.normalise:
                self._normalise_into(image[None], out_nhwc=batch[slot : slot + 1])
            else:
                batch[slot].copy_(image)
        assert batch is not None, "a planned batch has at least one sample"
        return batch

    def _new_batch(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return batch_tensor(shape, dtype)

    def _decode_one(self, data: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        """One JPEG -> uint8 H×W×C (the batch is stacked N×H×W×C: channels-last once viewed as NCHW)."""
        image = decode_or_raise(self.spec.decode, data, index, self.reader)
        rng = sample_rng(self.seed, epoch, index) if self.spec.random else None
        return self.spec.torch_image(image, rng)


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch being assembled, in shared memory when in a DataLoader
    worker, as DataLoader's own ``default_collate`` allocates: sending it to the main process then
    passes a handle instead of copying the batch into shared memory."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def decode_or_raise(decode: Decode, data: torch.Tensor, index: int, reader: ShardReader) -> torch.Tensor:
    """Decode one JPEG on the CPU; damaged bytes raise ``ShardDataError`` naming shard and key."""
    try:
        return decode.apply_torch(data)
    except (RuntimeError, ValueError) as error:  # torchvision reports libjpeg failures as RuntimeError
        raise reader.data_error(index, f"JPEG cannot be decoded ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _worker_message(error: ShardDataError) -> str:
    """The original message of a ``ShardDataError`` re-raised by DataLoader (which prefixes the
    worker's traceback): the last line, after the class name."""
    text = str(error)
    marker = f"{ShardDataError.__name__}: "
    if "Original Traceback" not in text or marker not in text:
        return text
    return text[text.rindex(marker) + len(marker) :].strip()


class TorchLoader:
    """``Loader`` over one split with DataLoader workers; see the module docstring."""

    reader_class: type[BatchReader] = BatchReader  # what the workers run (a subclass may run its own)

    def __init__(
        self, root: Path, manifest: SplitManifest, config: LoaderConfig, decode_on_device: bool | None = None
    ) -> None:
        """``decode_on_device``: workers read bytes only and the main process decodes whole batches on
        ``config.device``; default: exactly when that device is CUDA (nvJPEG)."""
        self.config = config
        self.num_workers = config.resolved_workers  # auto (-1) -> the CPU affinity per local rank
        self.table = build_sample_table(root, manifest)
        self.num_classes = manifest.num_classes
        self._range = rank_range(manifest.num_samples, config.rank, config.world_size)
        self.num_samples = self._range[1] - self._range[0]
        self.batches_per_epoch = batches_per_epoch(manifest.num_samples, config)
        self._device = torch.device(config.device)
        self._decode_on_device = self._device.type == "cuda" if decode_on_device is None else decode_on_device
        self._spec = transform_spec(config)
        self._normalise = self._spec.normalize.torch_normaliser(self._device)
        # On the CPU the workers normalise too (module docstring); on CUDA uint8 crosses to the device.
        self._normalise_in_workers = not self._decode_on_device and self._device.type == "cpu"
        self._plan = _EpochPlan()
        self._reader = self.reader_class(
            self.table, self._spec, config.seed, decode=not self._decode_on_device, normalise=self._normalise_in_workers
        )
        self._workers_started = False
        self._dataloader: DataLoader | None = _make_dataloader(
            self._reader, self._plan, self.num_workers, pin=self._device.type == "cuda"
        )

    def batch_indices(self, epoch: int) -> list[np.ndarray]:
        """Sample indices (file order numbering) of every batch of ``epoch`` on this rank."""
        start, stop = self._range
        batch = self.config.batch_size
        if not self.config.train:
            return [np.arange(i, min(i + batch, stop)) for i in range(start, stop, batch)]
        order = epoch_permutation(len(self.table), self.config.seed, epoch)
        rank, world_size = self.config.rank, self.config.world_size
        return [order[slice(*train_batch_range(i, batch, rank, world_size))] for i in range(self.batches_per_epoch)]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from ``start_batch`` on; one epoch at a time per loader."""
        if self._dataloader is None:
            raise RuntimeError("loader is closed")
        self._plan.requests = [BatchRequest(epoch, idx) for idx in self.batch_indices(epoch)[start_batch:]]
        if self.num_workers > 0 and not self._workers_started:
            # Collect unreachable objects before the DataLoader forks its workers: one that owns
            # threads (a DALI pipeline no longer referenced) would otherwise be finalised inside a
            # forked worker, where its threads do not exist, and hang it (seen in the test suite).
            # Persistent workers fork on the first pass only; a collection every epoch took ~0.2 s
            # each time (docs/PERFORMANCE.md, "Where the torch backend's CPU time goes").
            gc.collect()
            self._workers_started = True
        try:
            for raw in self._dataloader:
                yield self._to_batch(raw, epoch)
        except ShardDataError as error:
            raise ShardDataError(_worker_message(error)) from None

    def _to_batch(self, raw: dict[str, Any], epoch: int) -> Batch:
        # non_blocking: the DataLoader pinned these tensors when the device is CUDA.
        if self._normalise_in_workers:
            images = raw["images"].permute(0, 3, 1, 2)  # N×C×H×W view of N×H×W×C: channels-last
        elif self._decode_on_device:
            encoded = torch.split(raw["encoded"], raw["encoded_sizes"].tolist())
            images = self._normalise(self._decode_batch(list(encoded), raw["indices"], epoch))
        else:
            images = self._normalise(raw["images"].to(self._device, non_blocking=True))
        labels = raw["labels"].to(self._device, non_blocking=True)
        targets = raw.get("targets")
        if targets is not None:
            targets = targets.to(self._device, non_blocking=True).to(torch.float32)
        return Batch(images=images, labels=labels, targets=targets)

    def _decode_batch(self, encoded: list[torch.Tensor], indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """Decode the batch in one call (nvJPEG on CUDA), then augment image by image on the device:
        sizes differ until resized, so this loop is per-sample Python; DALI is the fast GPU path."""
        try:
            images = self._decode_images(encoded)
        except (RuntimeError, ValueError) as error:
            self._raise_for_batch(encoded, indices, error)
        random = self._spec.random
        rngs = [sample_rng(self.config.seed, epoch, int(i)) if random else None for i in indices.tolist()]
        return torch.stack([self._spec.torch_image(image, rng) for image, rng in zip(images, rngs)])

    def _decode_images(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        """The device's decoder on the whole batch: uint8 3×H×W each."""
        return self._spec.decode.apply_torch_batch(encoded, self._device)

    def _raise_for_batch(self, encoded: list[torch.Tensor], indices: torch.Tensor, error: BaseException) -> NoReturn:
        """A batch decode failed: find the damaged sample by decoding each on the CPU, else name the
        shards of the whole batch (the device decoder may reject what the CPU accepts)."""
        reader = self._reader.reader
        for data, index in zip(encoded, indices.tolist()):
            decode_or_raise(self._spec.decode, data.cpu(), int(index), reader)
        shards = sorted({self.table.shard_paths[int(self.table.shard[int(i)])] for i in indices.tolist()})
        raise ShardDataError(
            f"batch of {len(encoded)} samples from shard(s) {', '.join(shards)} cannot be decoded on {self._device} "
            f"({_first_line(error)}); the failing sample cannot be pinpointed; run `make-shards verify "
            f"{self.table.root}`"
        ) from None

    def close(self) -> None:
        # Dropping the DataLoader drops its persistent iterator, whose destructor stops the workers
        # (they close their own descriptors on exit); the main process's are closed here.
        self._dataloader = None
        self._reader.reader.close()


def _make_dataloader(reader: BatchReader, plan: _EpochPlan, num_workers: int, pin: bool) -> DataLoader:
    # batch_size=None: each sampler item is already a whole batch, read and collated by one worker.
    # Persistent workers keep their open shard descriptors and skip the fork cost every epoch.
    return DataLoader(
        reader,
        batch_size=None,
        sampler=plan,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin,
    )
