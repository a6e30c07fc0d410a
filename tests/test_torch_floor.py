"""What the declared floor (torch 2.11, pyproject.toml) lacks is feature-detected: DDP's options."""

from __future__ import annotations

import inspect

import torch

from engine.build import ddp_options


def test_ddp_options_fit_the_installed_torch() -> None:
    accepted = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    options, broadcast_after = ddp_options(accepted)
    assert set(options) <= set(accepted), f"torch {torch.__version__}: DDP has no {set(options) - set(accepted)}"
    assert options["gradient_as_bucket_view"] and options["static_graph"]
    assert broadcast_after == ("forward_sync_buffers" not in accepted)


def test_ddp_options_on_torch_2_11_and_on_newer_torch() -> None:
    older = {"module", "broadcast_buffers", "gradient_as_bucket_view", "static_graph"}  # torch 2.11
    options, broadcast_after = ddp_options(dict.fromkeys(older))
    assert options == {"gradient_as_bucket_view": True, "static_graph": True, "broadcast_buffers": False}
    assert broadcast_after, "broadcast_buffers=False also skips the construction sync: the engine broadcasts"
    options, broadcast_after = ddp_options(dict.fromkeys(older | {"forward_sync_buffers"}))  # torch >= 2.13
    assert options == {"gradient_as_bucket_view": True, "static_graph": True, "forward_sync_buffers": False}
    assert not broadcast_after
