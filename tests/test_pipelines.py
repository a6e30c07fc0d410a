"""Input pipelines: the batch contract, rank sharding, shuffling, resume, and DALI/torch agreement."""

from __future__ import annotations

import sys
import tarfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dataset_layouts import member_bytes
from torchvision.io import decode_jpeg
from torchvision.transforms.v2 import functional as F

from pipelines import build_loader, dali_import_error, rank_range
from pipelines.contract import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, LoaderConfig
from pipelines.torch_backend import TorchLoader
from pipelines.transforms import (
    CentreCrop,
    Decode,
    Flip,
    Normalize,
    RandomResizedCrop,
    Resize,
    ResizeShorter,
    Step,
    TransformSpec,
    transform_spec,
)
from shards.format import LabelKind
from shards.manifest import load_split
from shards.writer import SourceItem, SplitSpec, WriterSettings, write_split

HAS_DALI = dali_import_error() is None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="DALI not importable")
BACKENDS = ["torch", pytest.param("dali", marks=[pytest.mark.dali, needs_dali])]
# torchvision 0.29 deprecates torchvision.io's image decoders (pointing to TorchCodec); the torch
# backend keeps them because it must work from torchvision 0.26 on, without another dependency.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

NUM_MULTI = 45  # odd, so the two ranks get 22 and 23 samples
NUM_MULTI_CLASSES = 64  # label i is unique per sample, so labels identify samples
IMAGE_PX = 32
# Measured on these fixtures: per-image mean |torch - DALI| after normalisation is <= 0.0025
# (decoder chroma upsampling and resampling rounding). Before the eval crop and resize rounding
# were aligned, one-pixel shifts gave 0.015-0.036 per image: the tolerance tells them apart.
EVAL_IMAGE_TOLERANCE = 0.01
NO_AUGMENT = AugmentConfig(random_resized_crop=False, flip=False)


def smooth_pixels(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like image: a colour gradient with a soft-edged blob (little high-frequency content)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    base = (
        rng.uniform(40, 215, size=3)
        + 40 * x[..., None] * rng.uniform(-1, 1, 3)
        + 40 * y[..., None] * rng.uniform(-1, 1, 3)
    )
    cx, cy = rng.uniform(0.2, 0.8, 2)
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02)[..., None] * rng.uniform(-60, 60, 3)
    return np.clip(base + blob, 0, 255).astype(np.uint8)


def multi_labels(label: int) -> tuple[int, ...]:
    return tuple(sorted({label, (label * 7 + 3) % NUM_MULTI_CLASSES}))


def items(count: int, num_classes: int, multi: bool) -> list[SourceItem]:
    sizes = [(60, 45), (120, 90), (90, 120), (100, 75), (75, 75)]  # landscape, portrait, square
    out = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        label = i if multi else i % num_classes
        out.append(
            SourceItem(
                key=f"k{i:03d}",
                label=label,
                source=f"mem/{i}",
                pixels=smooth_pixels(width, height, i),
                label_set=multi_labels(label) if multi else None,
            )
        )
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two splits: ``multi`` (45 samples in 3 shards, unique labels, multi-hot targets), ``single``."""
    out = tmp_path_factory.mktemp("pipeline-shards")
    settings = WriterSettings(max_samples_per_shard=16, workers=1, progress=False)
    classes = [f"c{i}" for i in range(NUM_MULTI_CLASSES)]
    write_split(out, SplitSpec("multi", LabelKind.MULTI, classes), items(NUM_MULTI, NUM_MULTI_CLASSES, True), settings)
    write_split(out, SplitSpec("single", LabelKind.SINGLE, classes[:5]), items(20, 5, False), settings)
    return out


def file_order_labels(root: Path, split: str) -> list[int]:
    """Labels in file order, read with tarfile (independently of the index files)."""
    labels = []
    for shard in load_split(root, split).shards:
        with tarfile.open(root / shard.path) as tar:
            labels += [int(member_bytes(tar, m)) for m in tar if m.name.endswith(".cls")]
    return labels


def config(backend: str, train: bool = False, **overrides) -> LoaderConfig:
    settings = dict(
        batch_size=8, image_size_px=IMAGE_PX, train=train, backend=backend, num_workers=0 if backend == "torch" else 2
    )
    return LoaderConfig(**{**settings, **overrides})


def run_epoch(root: Path, split: str, cfg: LoaderConfig, epoch: int = 0, start_batch: int = 0) -> list:
    loader = build_loader(root, split, cfg)
    try:
        return list(loader.epoch(epoch, start_batch))
    finally:
        loader.close()


def cat(batches: list, field: str) -> torch.Tensor:
    return torch.cat([getattr(b, field) for b in batches])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_reads_every_sample_in_file_order(root: Path, backend: str) -> None:
    batches = run_epoch(root, "multi", config(backend))
    assert cat(batches, "labels").tolist() == file_order_labels(root, "multi")
    assert [len(b) for b in batches] == [8] * 5 + [5]  # last eval batch partial


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True])
def test_batch_contract(root: Path, backend: str, train: bool) -> None:
    batches = run_epoch(root, "multi", config(backend, train=train))
    for batch in batches[: len(batches) - (not train)]:  # eval: all but the (partial) last
        assert batch.images.shape == (8, 3, IMAGE_PX, IMAGE_PX)
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
        assert batch.images.dtype == torch.float32 and batch.labels.dtype == torch.int64
        assert batch.targets is not None and batch.targets.shape == (8, NUM_MULTI_CLASSES)
        assert batch.targets.dtype == torch.float32
    images = cat(batches, "images")
    assert -2.2 < images.min() and images.max() < 2.7  # ImageNet-normalised, not 0..255 or 0..1
    assert 0.1 < images.std() < 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalisation_and_dtype(root: Path, backend: str) -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    raw = cat(run_epoch(root, "single", config(backend, mean=(0.0,) * 3, std=(1.0,) * 3)), "images")
    normalised = cat(run_epoch(root, "single", config(backend, mean=mean, std=std)), "images")
    expected = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalised, expected, atol=1e-4, rtol=1e-4)
    assert raw.min() >= 0.0 and raw.max() <= 1.0
    low = run_epoch(root, "single", config(backend, dtype=torch.bfloat16))[0].images
    assert low.dtype == torch.bfloat16 and low.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_multi_hot_or_none(root: Path, backend: str) -> None:
    batches = run_epoch(root, "multi", config(backend, train=True))
    for label, targets in zip(cat(batches, "labels").tolist(), cat(batches, "targets")):
        assert torch.nonzero(targets).flatten().tolist() == list(multi_labels(label))
    assert all(b.targets is None for b in run_epoch(root, "single", config(backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_sharding_covers_each_sample_once(root: Path, backend: str) -> None:
    every = file_order_labels(root, "multi")
    for rank in range(2):
        labels = cat(run_epoch(root, "multi", config(backend, rank=rank, world_size=2)), "labels").tolist()
        start, stop = rank_range(NUM_MULTI, rank, 2)
        assert labels == every[start:stop]  # 22 then 23 samples: disjoint and complete


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_fixed_batches_drop_last_partial(root: Path, backend: str) -> None:
    for world_size in (1, 2):
        for rank in range(world_size):
            batches = run_epoch(root, "multi", config(backend, train=True, rank=rank, world_size=world_size))
            assert [len(b) for b in batches] == [8] * ((NUM_MULTI // world_size) // 8)
            labels = cat(batches, "labels").tolist()
            assert len(set(labels)) == len(labels)  # no sample twice within an epoch


def test_torch_global_batch_is_the_same_on_any_number_of_processes(root: Path) -> None:
    """Step s of an epoch trains on the same samples and images whether 1, 2 or 4 processes share a
    global batch of 8: rank r's batch is the r-th contiguous slice of the one-process batch. So a
    data position (epoch, batch) means the same samples after a restart on another number of processes."""
    single = run_epoch(root, "multi", config("torch", train=True, augment=AugmentConfig()), epoch=1)
    assert len(single) == NUM_MULTI // 8
    for world_size in (2, 4):
        shards = [
            run_epoch(
                root,
                "multi",
                config(
                    "torch",
                    train=True,
                    augment=AugmentConfig(),
                    batch_size=8 // world_size,
                    rank=rank,
                    world_size=world_size,
                ),
                epoch=1,
            )
            for rank in range(world_size)
        ]
        for step, whole in enumerate(single):
            parts = [shard[step] for shard in shards]
            assert torch.equal(cat(parts, "labels"), whole.labels), (world_size, step)
            assert torch.equal(cat(parts, "images"), whole.images), (world_size, step)  # augmentation seeded per sample


@pytest.mark.parametrize("backend", BACKENDS)
def test_epochs_shuffle_differently(root: Path, backend: str) -> None:
    cfg = config(backend, train=True, shuffle_buffer=64)
    first, second = (cat(run_epoch(root, "multi", cfg, epoch=e), "labels").tolist() for e in (0, 1))
    assert first != second
    assert first == cat(run_epoch(root, "multi", cfg, epoch=0), "labels").tolist()  # fixed by (seed, epoch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_equals_tail_of_epoch(root: Path, backend: str) -> None:
    cfg = config(backend, train=True)
    full = run_epoch(root, "multi", cfg, epoch=3)
    tail = run_epoch(root, "multi", cfg, epoch=3, start_batch=2)
    assert len(tail) == len(full) - 2
    for a, b in zip(full[2:], tail):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)


def test_torch_augmentation_independent_of_workers(root: Path) -> None:
    serial = run_epoch(root, "multi", config("torch", train=True, num_workers=0), epoch=2)
    parallel = run_epoch(root, "multi", config("torch", train=True, num_workers=2), epoch=2)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)


def test_torch_main_process_decode_equals_worker_decode(root: Path) -> None:
    """The GPU path's code (workers read bytes, the main process decodes the batch), run on the CPU."""
    cfg = config("torch", train=True)
    manifest = load_split(root, "multi")
    in_workers, in_main = TorchLoader(root, manifest, cfg), TorchLoader(root, manifest, cfg, decode_on_device=True)
    for a, b in zip(in_workers.epoch(1), in_main.epoch(1), strict=True):
        assert a.targets is not None and b.targets is not None  # the multi split has target sets
        assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


def test_torch_abandoned_epoch_does_not_leak_into_the_next(root: Path) -> None:
    loader = build_loader(root, "multi", config("torch", train=True, num_workers=2))
    expected = [b.labels for b in loader.epoch(1)]
    next(iter(loader.epoch(0)))  # stop after one batch, with more prefetched by the workers
    assert [b.labels.tolist() for b in loader.epoch(1)] == [t.tolist() for t in expected]
    loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_rank_shares_are_disjoint(root: Path, backend: str) -> None:
    for epoch in (0, 1):
        shares = [
            cat(
                run_epoch(root, "multi", config(backend, train=True, batch_size=1, rank=r, world_size=2), epoch),
                "labels",
            )
            for r in range(2)
        ]
        assert [len(s) for s in shares] == [NUM_MULTI // 2] * 2  # same step count on both ranks
        assert len(set(shares[0].tolist()) | set(shares[1].tolist())) == 2 * (NUM_MULTI // 2)


def by_label(batches: list) -> torch.Tensor:
    labels = cat(batches, "labels")
    return cat(batches, "images")[labels.argsort()]


def decoded(root: Path, split: str, label: int) -> torch.Tensor:
    """The stored JPEG of the sample with ``label`` (unique in the ``multi`` split), decoded."""
    for shard in load_split(root, split).shards:
        with tarfile.open(root / shard.path) as tar:
            members = {m.name: m for m in tar}
            for name, member in members.items():
                if name.endswith(".cls") and int(member_bytes(tar, member)) == label:
                    data = member_bytes(tar, members[name[:-3] + "jpg"])
                    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    raise KeyError(label)


def test_torch_no_augmentation_is_plain_resize(root: Path) -> None:
    cfg = config("torch", train=True, augment=NO_AUGMENT, mean=(0.0,) * 3, std=(1.0,) * 3)
    first, second = (run_epoch(root, "multi", cfg, epoch=e) for e in (0, 1))
    first_images, second_images = images_by_label(first), images_by_label(second)
    for label in set(first_images) & set(second_images):  # deterministic across epochs
        assert torch.equal(first_images[label], second_images[label])
    batch = first[0]
    for image, label in zip(batch.images, batch.labels.tolist()):
        expected = F.resize(decoded(root, "multi", label), [IMAGE_PX, IMAGE_PX], antialias=True)
        torch.testing.assert_close(image, expected.float() / 255, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flip_only_mirrors_the_plain_image(root: Path, backend: str) -> None:
    plain = by_label(run_epoch(root, "multi", config(backend, train=True, augment=NO_AUGMENT)))
    flip_only = AugmentConfig(random_resized_crop=False, flip=True)
    flipped = by_label(run_epoch(root, "multi", config(backend, train=True, augment=flip_only)))
    same = [torch.equal(a, b) for a, b in zip(flipped, plain)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, plain)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 0 < sum(mirrored) < len(mirrored)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("split", ["multi", "single"])
@pytest.mark.dali
@needs_dali
def test_backends_agree(root: Path, split: str, train: bool) -> None:
    """Same labels in the same order in eval; the same images (eval crop, or plain resize in
    training) up to decoder rounding, matched by the unique labels of the ``multi`` split."""
    cfg: dict[str, Any] = dict(train=train, augment=NO_AUGMENT, batch_size=4 if train else 8)
    torch_batches = run_epoch(root, split, config("torch", **cfg))
    dali_batches = run_epoch(root, split, config("dali", **cfg))
    if not train:
        assert cat(torch_batches, "labels").tolist() == cat(dali_batches, "labels").tolist()
    if split == "multi":
        torch_images, dali_images = images_by_label(torch_batches), images_by_label(dali_batches)
        common = sorted(set(torch_images) & set(dali_images))  # training: each backend drops a different sample
        assert len(common) >= NUM_MULTI - 2
        diff = torch.stack([(torch_images[k] - dali_images[k]).abs().mean() for k in common])
        assert diff.max() < EVAL_IMAGE_TOLERANCE, diff


def images_by_label(batches: list) -> dict[int, torch.Tensor]:
    return dict(zip(cat(batches, "labels").tolist(), cat(batches, "images")))


def test_random_crop_box_respects_ranges() -> None:
    crop = RandomResizedCrop(IMAGE_PX, scale=(0.25, 0.5), ratio=(0.5, 2.0))
    rng = np.random.default_rng(0)
    for height, width in [(45, 60), (120, 90), (10, 300)]:
        for _ in range(50):
            top, left, crop_h, crop_w = crop.box(height, width, rng)
            assert 0 <= top and top + crop_h <= height and 0 <= left and left + crop_w <= width
            if (height, width) != (10, 300):  # 10×300 cannot hold these crops: centre-crop fallback
                assert 0.2 < crop_h * crop_w / (height * width) < 0.56


def test_one_transform_description_per_loader_config() -> None:
    """The augmentation a user configures, as the one description both backends build from."""
    evaluation = transform_spec(LoaderConfig(image_size_px=224, train=False))
    assert evaluation.steps == (ResizeShorter(256), CentreCrop(224)) and not evaluation.random  # 224 / 0.875
    assert evaluation.decode == Decode()
    assert evaluation.normalize == Normalize(IMAGENET_MEAN, IMAGENET_STD, torch.float32)
    augment = AugmentConfig(scale_min=0.35, ratio_max=1.5)
    train = transform_spec(LoaderConfig(image_size_px=224, augment=augment, dtype=torch.bfloat16))
    assert train.steps == (RandomResizedCrop(224, scale=(0.35, 1.0), ratio=(3 / 4, 1.5)), Flip(0.5)) and train.random
    assert train.normalize.dtype == torch.bfloat16
    assert transform_spec(LoaderConfig(image_size_px=64, augment=NO_AUGMENT)).steps == (Resize(64),)
    flip_only = AugmentConfig(random_resized_crop=False)
    assert transform_spec(LoaderConfig(image_size_px=64, augment=flip_only)).steps == (Resize(64), Flip(0.5))


def stored_jpegs(root: Path, split: str) -> list[np.ndarray]:
    """The JPEG bytes of every sample of ``split``, in file order."""
    jpegs = []
    for shard in load_split(root, split).shards:
        with tarfile.open(root / shard.path) as tar:
            members = [tar.extractfile(m) for m in tar if m.name.endswith(".jpg")]
            jpegs += [np.frombuffer(member.read(), np.uint8) for member in members if member is not None]
    return jpegs


def torch_transformed(spec: TransformSpec, jpegs: list[np.ndarray]) -> torch.Tensor:
    """``spec`` run by its torch implementations, as the torch backend runs it: N×C×S×S."""
    rng = np.random.default_rng(0)
    images = [spec.torch_image(spec.decode.apply_torch(torch.from_numpy(data.copy())), rng) for data in jpegs]
    return spec.normalize.torch_normaliser(torch.device("cpu"))(torch.stack(images))


def dali_transformed(spec: TransformSpec, jpegs: list[np.ndarray]) -> torch.Tensor:
    """``spec`` run by its DALI operators on the CPU (``device_id=None``): N×C×S×S."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def graph():
        data = fn.external_source(source=lambda: jpegs, batch=True, dtype=types.UINT8)
        return spec.dali_graph(data, {"device": "cpu"}, types.FLOAT)

    pipe = graph(batch_size=len(jpegs), num_threads=1, device_id=None, seed=0)
    pipe.build()
    (images,) = pipe.run()
    return torch.stack([torch.from_numpy(np.array(images[i])) for i in range(len(jpegs))]).permute(0, 3, 1, 2)


WIDE = 4 / 3  # the landscape fixture images' width / height
# Transforms whose result their parameters fix; the whole-image random crop only on WIDE images.
DETERMINISTIC_STEPS: dict[str, tuple[Step, ...]] = {
    "eval resize and centre crop": (ResizeShorter(37), CentreCrop(IMAGE_PX)),
    "square resize": (Resize(IMAGE_PX),),
    "always flip": (Resize(IMAGE_PX), Flip(1.0)),
    "never flip": (Resize(IMAGE_PX), Flip(0.0)),
    "whole-image random crop": (RandomResizedCrop(IMAGE_PX, scale=(1.0, 1.0), ratio=(WIDE, WIDE)),),
}


@pytest.mark.parametrize("name", list(DETERMINISTIC_STEPS))
@pytest.mark.dali
@needs_dali
def test_each_transform_gives_the_same_pixels_on_both_backends(root: Path, name: str) -> None:
    """One description, two implementations: each transform's torch code and its DALI operators (CPU
    path) give the same pixels up to decoder rounding, parameters and normalisation included."""
    jpegs = stored_jpegs(root, "multi")
    if "random crop" in name:
        shapes = [decode_jpeg(torch.from_numpy(data.copy())).shape for data in jpegs]
        jpegs = [data for data, (_, height, width) in zip(jpegs, shapes) if width * 3 == height * 4]
    spec = TransformSpec(Decode(), DETERMINISTIC_STEPS[name], Normalize(IMAGENET_MEAN, IMAGENET_STD, torch.float32))
    from_torch, from_dali = torch_transformed(spec, jpegs), dali_transformed(spec, jpegs)
    assert from_torch.shape == from_dali.shape == (len(jpegs), 3, IMAGE_PX, IMAGE_PX)
    diff = (from_torch - from_dali).abs().mean(dim=(1, 2, 3))
    assert diff.max() < EVAL_IMAGE_TOLERANCE, diff
    if name == "always flip":
        plain = TransformSpec(spec.decode, (Resize(IMAGE_PX),), spec.normalize)
        assert torch.equal(from_torch, torch_transformed(plain, jpegs).flip(-1))


def test_dali_requested_without_dali_is_a_clear_error(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import now raises ImportError
    with pytest.raises(RuntimeError, match="NVIDIA DALI cannot be imported.*backend 'torch'"):
        build_loader(root, "multi", config("dali"))
    loader = build_loader(root, "multi", config("auto"))
    assert isinstance(loader, TorchLoader)
    loader.close()


def cloned(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) copies: DALI's iterator reuses its output buffers in later passes."""
    return [(b.images.clone(), b.labels.clone()) for b in batches]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (images_a, labels_a), (images_b, labels_b) in zip(a, b):
        assert torch.equal(labels_a, labels_b) and torch.equal(images_a, images_b)


@pytest.mark.dali
@needs_dali
def test_dali_eval_pipeline_is_built_once_and_repeats_exactly(root: Path) -> None:
    """Every evaluation reuses one pipeline (reset, not rebuilt) and gives the batches a fresh pipeline gives."""
    from pipelines.dali_backend import DaliLoader

    loader = build_loader(root, "multi", config("dali", rank=1, world_size=2))
    assert isinstance(loader, DaliLoader)
    try:
        first = cloned(loader.epoch(0))
        pipeline = loader._eval_iterator
        assert pipeline is not None
        second = cloned(loader.epoch(0))
        assert loader._eval_iterator is pipeline  # kept, not rebuilt
        third = cloned(loader.epoch(5))  # evaluation does not depend on the epoch number
    finally:
        loader.close()
    fresh = cloned(run_epoch(root, "multi", config("dali", rank=1, world_size=2)))
    assert [len(labels) for _, labels in first] == [8, 8, 7]  # rank 1's 23 samples, last batch partial
    for other in (second, third, fresh):
        assert_same_batches(first, other)


@pytest.mark.dali
@needs_dali
def test_dali_eval_after_an_abandoned_pass_is_complete(root: Path) -> None:
    """A pass stopped early cannot be reset (DALI refuses mid-epoch): the next pass starts afresh."""
    loader = build_loader(root, "multi", config("dali"))
    try:
        stream = loader.epoch(0)
        assert isinstance(stream, Generator)  # closing it abandons the pass
        next(stream)
        stream.close()
        after = cloned(loader.epoch(0))
    finally:
        loader.close()
    assert_same_batches(after, cloned(run_epoch(root, "multi", config("dali"))))


@pytest.mark.dali
@needs_dali
def test_dali_decoder_args_gpu_hints_only_for_the_mixed_decoder() -> None:
    from pipelines.dali_backend import decoder_args

    assert decoder_args(False) == {"device": "cpu"}  # GPU-only arguments never reach the CPU decoder
    gpu = decoder_args(True)
    assert gpu == {
        "device": "mixed", "hw_decoder_load": 0.65, "device_memory_padding": 211_025_920,
        "host_memory_padding": 140_544_512, "preallocate_width_hint": 5980, "preallocate_height_hint": 6430,
    }  # fmt: skip


@pytest.mark.dali
@needs_dali
def test_dali_output_dtype_of_half_precision_batches(root: Path) -> None:
    from nvidia.dali import types

    from pipelines.dali_backend import dali_output_dtype

    assert dali_output_dtype(torch.bfloat16, gpu=True) == dali_output_dtype(torch.float16, gpu=True) == types.FLOAT16
    assert dali_output_dtype(torch.float16, gpu=False) == types.FLOAT16
    assert dali_output_dtype(torch.bfloat16, gpu=False) == types.FLOAT  # DALI's CPU fp16 conversion is slow
    assert dali_output_dtype(torch.float32, gpu=True) == dali_output_dtype(torch.float32, gpu=False) == types.FLOAT
    with pytest.raises(ValueError, match="float64 is not supported"):
        dali_output_dtype(torch.float64, gpu=True)
    full = cat(run_epoch(root, "single", config("dali")), "images")
    for dtype in (torch.bfloat16, torch.float16):
        low = cat(run_epoch(root, "single", config("dali", dtype=dtype)), "images")
        assert low.dtype == dtype
        torch.testing.assert_close(low.float(), full, atol=0.02, rtol=0.01)  # half-precision rounding


def test_auto_workers_from_cpu_affinity_and_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from pipelines.contract import auto_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert auto_workers() == 12 and LoaderConfig().resolved_workers == 12  # auto is the default
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert auto_workers() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert auto_workers() == 1  # at least one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert LoaderConfig(num_workers=-1).resolved_workers == 3
    assert LoaderConfig(num_workers=0).resolved_workers == 0  # torch: in-process, as asked
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "four")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='four'"):
        auto_workers()
    with pytest.raises(ValueError, match="num_workers must be >= 0, or -1 for auto, got -2"):
        LoaderConfig(num_workers=-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_resolve_auto_workers(root: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    loader = build_loader(root, "single", config(backend, num_workers=-1))
    try:
        assert getattr(loader, "num_threads" if backend == "dali" else "num_workers") == 2
    finally:
        loader.close()


@pytest.mark.dali
@needs_dali
def test_dali_training_epoch_runs_no_batch_past_its_end(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A training epoch's pipeline runs exactly the epoch's batches: DALI's iterator would queue
    prefetch_queue_depth more, decoded and thrown away with the pipeline (20% of an 8-batch epoch)."""
    from nvidia.dali.pipeline import Pipeline

    runs = []
    iter_setup = Pipeline._iter_setup

    def counted_iter_setup(self: Pipeline) -> Any:  # once per run
        runs.append(1)
        return iter_setup(self)

    monkeypatch.setattr(Pipeline, "_iter_setup", counted_iter_setup)
    cfg = config("dali", train=True, batch_size=4)
    loader = build_loader(root, "multi", cfg)
    try:
        assert loader.batches_per_epoch == NUM_MULTI // 4 == 11
        for epoch, start, handed_out in ((0, 0, 11), (1, 0, 11), (1, 9, 2)):
            runs.clear()
            assert len(list(loader.epoch(epoch, start))) == handed_out
            assert len(runs) == 11  # resume: the skipped batches are run too, and no more
    finally:
        loader.close()


def test_torch_collects_garbage_only_before_its_workers_fork(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full collection took ~0.2 s per epoch in a large process (docs/PERFORMANCE.md, "Where the
    torch backend's CPU time goes"); persistent workers fork once, so one collection is enough."""
    import gc

    calls: list[int] = []

    def counting_collect(*args: int) -> int:
        calls.append(1)
        return 0

    monkeypatch.setattr(gc, "collect", counting_collect)
    loader = build_loader(root, "multi", config("torch", train=True, num_workers=2))
    for epoch in range(3):
        assert len(list(loader.epoch(epoch))) > 0
    loader.close()
    assert len(calls) == 1
