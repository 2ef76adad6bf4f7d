"""What a fine-tuning run changes on the pipeline's modules besides adding its adapter, and how it is put back: the
parameters' ``requires_grad`` flags, train/eval modes, gradient checkpointing and, after a failed run, the adapters
as they were (the rollback that makes `finetune` all or nothing)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable

import torch

from ..loaders import lora_state

__all__ = ["GradFlags", "UNetState", "frozen", "frozen_decoders"]


class GradFlags:
    """The ``requires_grad`` flag of each parameter, as it is when this is made; `restore` sets them back."""

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.flags = [(p, p.requires_grad) for p in params]

    def restore(self) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def frozen(params: Iterable[torch.nn.Parameter]):
    """No gradients for ``params`` inside the block; their flags as they were afterwards."""
    flags = GradFlags(params)
    for p, _ in flags.flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        flags.restore()


@contextlib.contextmanager
def frozen_decoders(decoders: Iterable[torch.nn.Module | None], gradient_checkpointing: bool):
    """The autoencoders the loss decodes through get no gradients of their own (and, with
    ``gradient_checkpointing``, recompute their activations in backward); both as before afterwards."""
    modules = list({id(m): m for m in decoders if m is not None}.values())
    checkpointing = [(m, bool(getattr(m, "is_gradient_checkpointing", False))) for m in modules]
    with frozen(p for m in modules for p in m.parameters()):
        if gradient_checkpointing:
            for m in modules:
                if getattr(m, "_supports_gradient_checkpointing", False):
                    m.enable_gradient_checkpointing()
        try:
            yield
        finally:
            for m, was in checkpointing:
                if m.is_gradient_checkpointing and not was:
                    m.disable_gradient_checkpointing()


class UNetState:
    """What a run changes on the UNet besides adding its adapter, taken before it: the adapters' active state (active
    set, scales, enabled flag), every parameter's ``requires_grad``, the train/eval mode and gradient checkpointing."""

    def __init__(self, unet):
        self.adapters = lora_state.active_state(unet)
        self.requires_grad = GradFlags(unet.parameters())
        self.training = unet.training
        self.checkpointing = bool(unet.is_gradient_checkpointing)

    def restore_modes(self, unet) -> None:
        """Train/eval mode and gradient checkpointing as they were (after a run, failed or not)."""
        unet.train(self.training)
        if unet.is_gradient_checkpointing and not self.checkpointing:
            unet.disable_gradient_checkpointing()

    def discard(self, unet, adapter_name: str) -> None:
        """Removes the new adapter and restores the previous adapters exactly (after a failed run)."""
        if adapter_name in lora_state.adapter_names(unet):
            with warnings.catch_warnings():  # peft's "Adapter ... was active which is now deleted": restored below
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                lora_state.remove_adapter(unet, adapter_name)
        lora_state.restore_active_state(unet, self.adapters)
        self.requires_grad.restore()
