"""LoRA adapters on a plain diffusers `UNet2DModel`, injected with peft."""

from __future__ import annotations

import contextlib

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """All peft tuner (LoRA) layers of ``model``."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Runs the block with every LoRA layer of ``model`` bypassed (the original model); restores them after."""
    layers = [layer for layer in tuner_layers(model) if not layer.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
