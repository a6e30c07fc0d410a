"""Per-sample image transforms of the torch backend (train crop/flip, plain resize, eval centre crop).

They work on uint8 C×H×W tensors on any device (CPU in DataLoader workers, CUDA after GPU
decoding). Randomness comes from a numpy generator the caller seeds from (seed, epoch, sample
index), so an augmented image depends only on those three numbers, never on worker count or
scheduling. The crop sampling is torchvision's ``RandomResizedCrop.get_params`` algorithm.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from pipelines.contract import AugmentConfig, LoaderConfig

CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop's count; DALI's image_random_crop gets the same
_AUGMENT_STREAM = 1  # seed-sequence tag separating augmentation draws from the shuffle
_SHUFFLE_STREAM = 2


class Mode(str, enum.Enum):
    TRAIN = "train"  # random-resized crop and/or flip, as configured
    PLAIN = "plain"  # training without augmentation: resize to a square
    EVAL = "eval"  # resize the shorter side, centre crop


@dataclass(frozen=True)
class TransformSpec:
    """What happens to every image; picklable, so DataLoader workers receive it."""

    mode: Mode
    image_size_px: int
    augment: AugmentConfig
    eval_resize_px: int


def transform_spec(config: LoaderConfig) -> TransformSpec:
    augment = config.augment
    if not config.train:
        mode = Mode.EVAL
    elif augment.random_resized_crop or augment.flip:
        mode = Mode.TRAIN
    else:
        mode = Mode.PLAIN
    return TransformSpec(mode, config.image_size_px, augment, eval_resize_px(config))


def eval_resize_px(config: LoaderConfig) -> int:
    """Shorter side before the eval centre crop (256 for 224 at 0.875); shared by both backends."""
    return max(config.image_size_px, round(config.image_size_px / config.eval_crop_fraction))


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation generator of one sample in one epoch."""
    return np.random.default_rng([seed, epoch, _AUGMENT_STREAM, index])


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The global sample order of a training epoch."""
    return np.random.default_rng([seed, epoch, _SHUFFLE_STREAM]).permutation(num_samples)


def random_crop_box(
    height: int, width: int, augment: AugmentConfig, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) with area fraction in the scale range and aspect ratio
    log-uniform in the ratio range; after ``CROP_ATTEMPTS`` misses, a centre crop clamped to the ratio range."""
    area = height * width
    log_ratio = (math.log(augment.ratio_min), math.log(augment.ratio_max))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(augment.scale_min, augment.scale_max)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    crop_w, crop_h = width, height
    if in_ratio < augment.ratio_min:
        crop_h = round(width / augment.ratio_min)
    elif in_ratio > augment.ratio_max:
        crop_w = round(height * augment.ratio_max)
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def resize_shorter(image: torch.Tensor, shorter_px: int) -> torch.Tensor:
    """Resize so the shorter side is ``shorter_px``; the longer side is rounded half up, as DALI's
    ``resize_shorter`` does (torchvision's ``resize`` truncates, one pixel less at times)."""
    height, width = image.shape[-2:]
    new_height = shorter_px if height <= width else int(height * shorter_px / width + 0.5)
    new_width = shorter_px if width <= height else int(width * shorter_px / height + 0.5)
    return F.resize(image, [new_height, new_width], antialias=True)


def centre_crop(image: torch.Tensor, size_px: int) -> torch.Tensor:
    """The central ``size_px`` square; a half-pixel offset rounds up, as DALI's crop does
    (torchvision's ``center_crop`` rounds half to even, which shifts some images by one pixel)."""
    top = (image.shape[-2] - size_px + 1) // 2
    left = (image.shape[-1] - size_px + 1) // 2
    return F.crop(image, top, left, size_px, size_px)


def transform_image(image: torch.Tensor, spec: TransformSpec, rng: np.random.Generator | None) -> torch.Tensor:
    """uint8 C×H×W -> uint8 C×S×S (S = image_size_px); ``rng`` is needed in TRAIN mode only."""
    size = [spec.image_size_px, spec.image_size_px]
    if spec.mode is Mode.EVAL:
        return centre_crop(resize_shorter(image, spec.eval_resize_px), spec.image_size_px)
    if spec.mode is Mode.PLAIN:
        return F.resize(image, size, antialias=True)
    assert rng is not None, "training augmentation needs a generator"
    if spec.augment.random_resized_crop:
        top, left, crop_h, crop_w = random_crop_box(image.shape[-2], image.shape[-1], spec.augment, rng)
        image = F.resized_crop(image, top, left, crop_h, crop_w, size, antialias=True)
    else:
        image = F.resize(image, size, antialias=True)
    if spec.augment.flip and rng.random() < 0.5:
        image = F.horizontal_flip(image)
    return image
