"""Models by name: a small convnet for the digit grid on a CPU, torchvision's ResNets, any timm model."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import BUILTIN_ARCHS

TORCHVISION_ARCHS = ("resnet18", "resnet50")  # timm has these names too: torchvision's are the ones built


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class GridCNN(nn.Module):
    """Three conv stages and a spatial head for 24–84 px digit grids.

    The head pools to 3×3 (one cell per grid digit) and keeps positions instead of a global
    average: the grid's single label is "the centre digit, usually", so where a digit sits matters.
    """

    def __init__(self, num_classes: int, width: int = 24, hidden: int = 256) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(3, width),
            nn.MaxPool2d(2),
            _conv_block(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(3),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 9, hidden), nn.ReLU(inplace=True))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.features(images)))


def build_model(arch: str, num_classes: int, multi_label_head: bool) -> nn.Module:
    """A freshly initialised model (never downloaded weights); sigmoid heads start with bias -log(C),
    as the released code. ``arch``: grid_cnn, torchvision's resnet18/resnet50, or any timm model name."""
    if arch == "grid_cnn":
        model: nn.Module = GridCNN(num_classes)
    elif arch in TORCHVISION_ARCHS:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    else:
        import timm

        if arch not in timm.list_models():
            raise ValueError(
                f"--arch {arch!r} is not one of {BUILTIN_ARCHS} nor a timm model name (timm.list_models())"
            )
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    if multi_label_head:
        init_sigmoid_head(model, num_classes)
    return model


def init_sigmoid_head(model: nn.Module, num_classes: int) -> None:
    # Start every class at sigmoid ≈ 1/C, the prior of a one-hot label: the first BCE steps then
    # do not spend themselves pushing C-1 outputs down from 0.5.
    bias = classifier_of(model).bias
    if bias is None:
        raise TypeError(f"the classifier of {type(model).__name__} has no bias: a sigmoid head needs one")
    nn.init.constant_(bias, -math.log(num_classes))


def classifier_of(model: nn.Module) -> nn.Linear | nn.Conv2d:
    """The final layer of any supported architecture: ``fc``, or what timm's ``get_classifier`` names
    (a Linear, or a 1×1 convolution in a few timm models)."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if get_classifier is not None else model.fc
    if not isinstance(head, (nn.Linear, nn.Conv2d)):
        raise TypeError(
            f"classifier of {type(model).__name__} is {type(head).__name__}, expected nn.Linear or nn.Conv2d"
        )
    return head


def classifier_prefix(model: nn.Module) -> str:
    """The classifier's name in the model's state dict, with a trailing dot (``"fc."``, ``"head.fc."``)."""
    head = classifier_of(model)
    for name, module in model.named_modules():
        if module is head:
            return f"{name}."
    raise ValueError(f"classifier of {type(model).__name__} is not one of its submodules")  # a model bug


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone, classifier) parameters, each in the model's parameter order."""
    head_ids = {id(p) for p in classifier_of(model).parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return backbone, [p for p in model.parameters() if id(p) in head_ids]
