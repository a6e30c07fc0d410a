"""The per-image transform, described once (``TransformSpec``) and run by both backends: torch and DALI.

``transform_spec(config)`` builds the description once per loader from its ``LoaderConfig``, the way
timm's ``transforms_factory`` does: ``Decode`` (JPEG bytes -> RGB), the per-image steps of the mode
(evaluation: ``ResizeShorter`` + ``CentreCrop``; training: ``RandomResizedCrop`` or ``Resize``, then
``Flip`` when configured), then ``Normalize`` (mean, std and the batch dtype). Each transform is one
small frozen dataclass holding its parameters, with its two implementations side by side:

- ``apply_torch``: on uint8 C×H×W tensors on any device (CPU in DataLoader workers, CUDA after nvJPEG
  decoding). Randomness comes from a numpy generator the caller seeds from (seed, epoch, sample
  index), so an augmented image depends only on those three numbers, never on worker count or
  scheduling. The crop sampling is torchvision's ``RandomResizedCrop.get_params`` algorithm.
- ``apply_dali``: adds its operator to a DALI graph (``DaliImages``). DALI fuses operators, so decoding is
  deferred to the first step (a random-resized crop decodes only its window:
  ``fn.decoders.image_random_crop``), and the centre crop, flip, normalisation, layout and dtype are
  arguments of the one ``fn.crop_mirror_normalize`` that ends the graph. DALI draws from its own
  generators: training crops and flips differ from torch's (same distributions); the deterministic
  transforms give the same pixels up to decoder rounding (tested per transform).

Both backends' images are H×W×C per sample (``IMAGE_LAYOUT``): a stacked batch is N×H×W×C, whose
N×C×H×W view is exactly the channels-last layout of the ``Batch`` contract. DALI is imported only
inside the ``apply_dali`` methods, so this module works without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from pipelines.contract import LoaderConfig

CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop's count; DALI's image_random_crop gets the same
FLIP_PROBABILITY = 0.5
IMAGE_LAYOUT = "HWC"  # per image, on both backends (see the module docstring)
_AUGMENT_STREAM = 1  # seed-sequence tag separating augmentation draws from the shuffle
_SHUFFLE_STREAM = 2


@dataclass(frozen=True)
class DaliImages:
    """A DALI graph being built from a ``TransformSpec``: ``node`` holds the encoded JPEGs while
    ``decoder`` (the decoder's arguments) is set, decoded H×W×C images after; ``finish`` gathers the
    arguments of the ``crop_mirror_normalize`` that ends the graph."""

    node: Any  # nvidia.dali DataNode
    decoder: dict[str, Any] | None
    finish: dict[str, Any] = field(default_factory=dict)

    def decoded(self) -> DaliImages:
        """The images decoded whole (a no-op once a step has decoded them)."""
        if self.decoder is None:
            return self
        from nvidia.dali import fn

        return DaliImages(fn.decoders.image(self.node, **self.decoder), None, self.finish)

    def then(self, node: Any) -> DaliImages:
        """The graph continued by operator output ``node``."""
        if self.finish:  # they would run after ``node`` although their steps came before it
            raise ValueError(
                f"a DALI operator cannot follow the steps fused into crop_mirror_normalize ({self.finish})"
            )
        return replace(self, node=node)

    def fused(self, **arguments: Any) -> DaliImages:
        """The graph with ``arguments`` added to the final ``crop_mirror_normalize``."""
        return replace(self, finish={**self.finish, **arguments})


class Step:
    """One per-image step between decoding and normalisation: uint8 image -> uint8 image."""

    random: ClassVar[bool] = False  # draws from the sample's generator (torch) or a DALI generator

    def apply_torch(self, image: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
        """uint8 C×H×W -> uint8 C×H'×W'; ``rng`` is used by random steps only."""
        raise NotImplementedError

    def apply_dali(self, images: DaliImages) -> DaliImages:
        """The graph with this step added."""
        raise NotImplementedError


@dataclass(frozen=True)
class Decode:
    """JPEG bytes -> uint8 RGB image."""

    def apply_torch(self, data: torch.Tensor) -> torch.Tensor:
        """One JPEG (uint8 1-D tensor of its bytes) -> uint8 3×H×W, on the CPU."""
        return decode_jpeg(data, mode=ImageReadMode.RGB)

    def apply_torch_batch(self, data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """Many JPEGs decoded in one call on ``device`` (nvJPEG on CUDA) -> uint8 3×H×W each."""
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    def apply_dali(self, images: DaliImages) -> DaliImages:
        """Deferred: the first step decodes (``DaliImages.decoded``, or fused with a random crop)."""
        from nvidia.dali import types

        assert images.decoder is not None, "Decode starts the graph"
        return replace(images, decoder={**images.decoder, "output_type": types.DALIImageType.RGB})


@dataclass(frozen=True)
class RandomResizedCrop(Step):
    """A random window resized to a ``size_px`` square: area fraction uniform in ``scale``, aspect ratio
    (width / height) log-uniform in ``ratio``; after ``attempts`` windows that do not fit, a centre
    crop clamped to the ratio range. DALI decodes only the window (so this step comes first)."""

    size_px: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    attempts: int = CROP_ATTEMPTS
    random: ClassVar[bool] = True

    def box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) of the window in a ``height``×``width`` image."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(self.attempts):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(rng.integers(0, height - crop_h + 1))
                left = int(rng.integers(0, width - crop_w + 1))
                return top, left, crop_h, crop_w
        in_ratio = width / height
        crop_w, crop_h = width, height
        if in_ratio < self.ratio[0]:
            crop_h = round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            crop_w = round(height * self.ratio[1])
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def apply_torch(self, image: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
        assert rng is not None, "a random crop needs the sample's generator"
        top, left, crop_h, crop_w = self.box(image.shape[-2], image.shape[-1], rng)
        return F.resized_crop(image, top, left, crop_h, crop_w, [self.size_px, self.size_px], antialias=True)

    def apply_dali(self, images: DaliImages) -> DaliImages:
        from nvidia.dali import fn

        if images.decoder is None:
            raise ValueError("RandomResizedCrop must directly follow Decode: DALI decodes only the crop window")
        window = fn.decoders.image_random_crop(
            images.node,
            **images.decoder,
            random_area=list(self.scale),
            random_aspect_ratio=list(self.ratio),
            num_attempts=self.attempts,
        )
        return Resize(self.size_px).apply_dali(DaliImages(window, None, images.finish))


@dataclass(frozen=True)
class Resize(Step):
    """The whole image resized to a ``size_px`` square, aspect ratio not kept (training without a
    random crop: the digit grid trains that way, since a crop can remove a digit)."""

    size_px: int

    def apply_torch(self, image: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
        return F.resize(image, [self.size_px, self.size_px], antialias=True)

    def apply_dali(self, images: DaliImages) -> DaliImages:
        from nvidia.dali import fn

        images = images.decoded()
        return images.then(fn.resize(images.node, resize_x=self.size_px, resize_y=self.size_px))


@dataclass(frozen=True)
class ResizeShorter(Step):
    """Resize so the shorter side is ``shorter_px``, keeping the aspect ratio; the longer side is
    rounded half up, as DALI's ``resize_shorter`` does (torchvision's ``resize`` truncates, one pixel
    less at times)."""

    shorter_px: int

    def apply_torch(self, image: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
        height, width = image.shape[-2:]
        new_height = self.shorter_px if height <= width else int(height * self.shorter_px / width + 0.5)
        new_width = self.shorter_px if width <= height else int(width * self.shorter_px / height + 0.5)
        return F.resize(image, [new_height, new_width], antialias=True)

    def apply_dali(self, images: DaliImages) -> DaliImages:
        from nvidia.dali import fn

        images = images.decoded()
        # subpixel_scale=False: map the whole image onto the rounded output size, as torchvision does
        return images.then(fn.resize(images.node, resize_shorter=self.shorter_px, subpixel_scale=False))


@dataclass(frozen=True)
class CentreCrop(Step):
    """The central ``size_px`` square; a half-pixel offset rounds up, as DALI's crop does
    (torchvision's ``center_crop`` rounds half to even, which shifts some images by one pixel)."""

    size_px: int

    def apply_torch(self, image: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
        top = (image.shape[-2] - self.size_px + 1) // 2
        left = (image.shape[-1] - self.size_px + 1) // 2
        return F.crop(image, top, left, self.size_px, self.size_px)

    def apply_dali(self, images: DaliImages) -> DaliImages:
        return images.decoded().fused(crop=(self.size_px, self.size_px))  # centred: crop_pos_x = crop_pos_y = 0.5


@dataclass(frozen=True)
class Flip(Step):
    """A horizontal mirror with probability ``probability``."""

    probability: float = FLIP_PROBABILITY
    random: ClassVar[bool] = True

    def apply_torch(self, image: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
        assert rng is not None, "a random flip needs the sample's generator"
        return F.horizontal_flip(image) if rng.random() < self.probability else image

    def apply_dali(self, images: DaliImages) -> DaliImages:
        from nvidia.dali import fn

        return images.decoded().fused(mirror=fn.random.coin_flip(probability=self.probability))


@dataclass(frozen=True)
class Normalize:
    """uint8 pixels -> ``(x / 255 - mean) / std`` per channel, in the batch's ``dtype``."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dtype: torch.dtype

    def torch_normaliser(self, device: torch.device) -> Callable[..., torch.Tensor]:
        """uint8 N×H×W×C batches on ``device`` -> N×C×H×W channels-last batches (``normalise``;
        keyword ``out_nhwc``: write them there)."""
        scale, bias = normalisation(self.mean, self.std, device)
        return partial(normalise, scale=scale, bias=bias, dtype=self.dtype)

    def apply_dali(self, images: DaliImages) -> DaliImages:
        """Mean and std of 0..255 pixels; the DALI dtype written is the backend's choice (``dali_graph``)."""
        return images.fused(mean=[255.0 * m for m in self.mean], std=[255.0 * s for s in self.std])


@dataclass(frozen=True)
class TransformSpec:
    """What happens to every image of a loader, from JPEG bytes to a normalised image; picklable, so
    DataLoader workers receive it."""

    decode: Decode
    steps: tuple[Step, ...]
    normalize: Normalize

    @property
    def random(self) -> bool:
        """Whether an image depends on the sample's generator (training augmentation)."""
        return any(step.random for step in self.steps)

    def torch_image(self, image: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
        """Decoded uint8 3×H×W -> uint8 S×S×3 (``IMAGE_LAYOUT``), ready to stack into a batch."""
        return transform_image(image, self, rng).permute(1, 2, 0)

    def dali_graph(self, jpegs: Any, decoder: dict[str, Any], output_dtype: Any) -> Any:
        """DALI operators from the JPEG bytes node ``jpegs`` to normalised S×S×3 images (``IMAGE_LAYOUT``)
        of DALI type ``output_dtype``; ``decoder``: the decoder's device arguments."""
        from nvidia.dali import fn

        images = self.decode.apply_dali(DaliImages(jpegs, dict(decoder)))
        for step in self.steps:
            images = step.apply_dali(images)
        images = self.normalize.apply_dali(images).decoded()
        arguments = {"mirror": 0, **images.finish}
        return fn.crop_mirror_normalize(images.node, **arguments, dtype=output_dtype, output_layout=IMAGE_LAYOUT)


def transform_spec(config: LoaderConfig) -> TransformSpec:
    """The one description of ``config``'s per-image transform, for every backend."""
    return TransformSpec(Decode(), _steps(config), Normalize(config.mean, config.std, config.dtype))


def _steps(config: LoaderConfig) -> tuple[Step, ...]:
    size_px, augment = config.image_size_px, config.augment
    if not config.train:
        return ResizeShorter(eval_resize_px(config)), CentreCrop(size_px)
    crop: Step = Resize(size_px)
    if augment.random_resized_crop:
        scale, ratio = (augment.scale_min, augment.scale_max), (augment.ratio_min, augment.ratio_max)
        crop = RandomResizedCrop(size_px, scale, ratio)
    return (crop, Flip()) if augment.flip else (crop,)


def eval_resize_px(config: LoaderConfig) -> int:
    """Shorter side before the eval centre crop (256 for 224 at 0.875)."""
    return max(config.image_size_px, round(config.image_size_px / config.eval_crop_fraction))


def transform_image(image: torch.Tensor, spec: TransformSpec, rng: np.random.Generator | None) -> torch.Tensor:
    """The torch implementation of ``spec``'s steps: decoded uint8 C×H×W -> uint8 C×S×S; ``rng`` is
    needed when ``spec.random``."""
    for step in spec.steps:
        image = step.apply_torch(image, rng)
    return image


def normalise(
    images_nhwc: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    dtype: torch.dtype,
    out_nhwc: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 N×H×W×C -> ``dtype`` N×C×H×W channels-last ``x * scale + bias`` (= (x/255 - mean) / std),
    written into ``out_nhwc`` (N×H×W×C of ``dtype``) when given.

    The NCHW view of NHWC memory is channels-last already, so the conversion is a straight pass
    and the fused ``addcmul`` keeps the strides (measured ~40% faster than converting from NCHW and
    normalising in two passes). Every element goes through the same ``addcmul`` whether a batch
    or one image is normalised, into a new tensor or into ``out_nhwc``: the values are the same."""
    images = images_nhwc.permute(0, 3, 1, 2).to(torch.float32)
    if out_nhwc is not None and dtype == torch.float32:
        return torch.addcmul(bias, images, scale, out=out_nhwc.permute(0, 3, 1, 2))
    torch.addcmul(bias, images, scale, out=images)
    result = images if dtype == torch.float32 else images.to(dtype)
    return result if out_nhwc is None else out_nhwc.permute(0, 3, 1, 2).copy_(result)


def normalisation(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) of ``normalise`` for per-channel ``mean`` and ``std`` of [0, 1] pixels."""
    std_255 = torch.tensor(std, dtype=torch.float32) * 255.0
    mean_255 = torch.tensor(mean, dtype=torch.float32) * 255.0
    scale = (1.0 / std_255).view(1, 3, 1, 1).to(device)
    bias = (-mean_255 / std_255).view(1, 3, 1, 1).to(device)
    return scale, bias


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation generator of one sample in one epoch."""
    return np.random.default_rng([seed, epoch, _AUGMENT_STREAM, index])


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The global sample order of a training epoch."""
    return np.random.default_rng([seed, epoch, _SHUFFLE_STREAM]).permutation(num_samples)
