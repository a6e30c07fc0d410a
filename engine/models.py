"""Models by name: torchvision/timm ResNets and a small convnet for the digit grid on a CPU."""

from __future__ import annotations

import math

import torch
from torch import nn

ARCHITECTURES = ("grid_cnn", "resnet18", "resnet50", "resnet50d")


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
    """A freshly initialised model; sigmoid heads start with bias -log(C) (as the released code)."""
    if arch == "grid_cnn":
        model: nn.Module = GridCNN(num_classes)
    elif arch in ("resnet18", "resnet50"):
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    elif arch == "resnet50d":
        import timm

        model = timm.create_model("resnet50d", pretrained=False, num_classes=num_classes)
    else:
        raise ValueError(f"--arch must be one of {ARCHITECTURES}, got {arch!r}")
    if multi_label_head:
        # Start every class at sigmoid ≈ 1/C, the prior of a one-hot label: the first BCE steps then
        # do not spend themselves pushing C-1 outputs down from 0.5.
        nn.init.constant_(classifier_of(model).bias, -math.log(num_classes))
    return model


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final linear layer of any supported architecture."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
    else:
        head = model.fc
    if not isinstance(head, nn.Linear):
        raise TypeError(f"classifier of {type(model).__name__} is {type(head).__name__}, expected nn.Linear")
    return head
