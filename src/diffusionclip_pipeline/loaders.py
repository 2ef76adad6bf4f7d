"""`DiffusionCLIPLoraLoaderMixin`: the pipeline's adapter methods, with diffusers' names.

Every method delegates to `lora` (which delegates to diffusers' `PeftAdapterMixin` on the UNet); the pipeline keeps
no adapter state of its own, so ``pipe.unet.set_adapters(...)`` and ``pipe.set_adapters(...)`` are interchangeable.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import lora
from .validation import check_adapter_name, check_bool, check_number


class DiffusionCLIPLoraLoaderMixin:
    """Load, save, combine and remove LoRA adapters of ``self.unet`` (diffusers' pipeline adapter API)."""

    @property
    def lora_adapters(self) -> list[str]:
        """Names of the adapters loaded into the UNet."""
        return lora.adapter_names(self.unet)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """The loaded adapters by component, as diffusers' pipelines return them: ``{"unet": [...]}``."""
        return {"unet": lora.adapter_names(self.unet)}

    def get_active_adapters(self) -> list[str]:
        """The adapters the UNet currently applies (empty when none is loaded or all are disabled)."""
        return lora.active_adapters(self.unet) if lora.adapters_enabled(self.unet) else []

    @lora.serialised
    def save_lora_weights(
        self, save_directory: str | os.PathLike, adapter_name: str | None = None, dtype: torch.dtype | None = None
    ) -> str:
        """Writes one adapter as ``save_directory/pytorch_lora_weights.safetensors`` (safetensors only, atomic).

        The file uses diffusers' LoRA layout (``unet.``-prefixed keys, ``lora_adapter_metadata``) and records the
        base UNet's config fingerprint and the adapter's provenance (prompts, t0, steps, package version).
        ``adapter_name`` may be omitted when there is one adapter. ``dtype=torch.float16`` halves the file (2.4 MB
        instead of 4.8 MB for `google/ddpm-celebahq-256` at rank 4); by default the weights are stored as trained and
        reload bit for bit. Returns the file's path.
        """
        names = lora.adapter_names(self.unet)
        if adapter_name is None:
            if not names:
                raise ValueError("There is no adapter to save: fine-tune one (`finetune`) or load one first.")
            if len(names) != 1:
                raise ValueError(f"Pass `adapter_name`: the UNet has several adapters {names}.")
            adapter_name = names[0]
        check_adapter_name(adapter_name)
        return lora.save_adapter(self.unet, os.fspath(save_directory), adapter_name, dtype=dtype)

    @lora.serialised
    def load_lora_weights(
        self, path: str | os.PathLike, adapter_name: str | None = None, keep_active: bool = False
    ) -> str:
        """Loads an adapter (a folder with ``pytorch_lora_weights.safetensors``, or the file) and activates it.

        By default it becomes the only active adapter (with a warning when that deactivates others); with
        ``keep_active=True`` it joins the active ones at weight 1 (``set_adapters`` sets other weights).

        Files written by this package (both format versions) load; so does a diffusers LoRA file for the same UNet
        that records its `LoraConfig` (``lora_adapter_metadata``). A file of another format, a truncated or corrupt
        file, non-finite weights, or an adapter for a UNet of another config raises `ValueError` and leaves the
        pipeline unchanged. Returns the adapter's name (default: ``"default"``, or ``"default_<k>"`` if taken).
        """
        names = lora.adapter_names(self.unet)
        if adapter_name is None:
            adapter_name, k = "default", 1
            while adapter_name in names:
                adapter_name, k = f"default_{k}", k + 1
        check_adapter_name(adapter_name)
        check_bool(keep_active, "keep_active")
        previous = self.get_active_adapters()
        weights = lora.adapter_weights(self.unet)
        lora.load_adapter(self.unet, os.fspath(path), adapter_name)
        if keep_active and previous:
            lora.set_adapters(self.unet, previous + [adapter_name], [weights[n] for n in previous] + [1.0])
            return adapter_name
        if previous:
            warnings.warn(
                f"Loaded adapter {adapter_name!r} is now the only active one; {previous} are loaded but inactive. "
                "Pass `keep_active=True` (CLI: --keep-active) or call `set_adapters` to combine them.",
                stacklevel=3,
            )
        lora.set_adapters(self.unet, [adapter_name], [1.0])
        return adapter_name

    @lora.serialised
    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None):
        """Activates ``adapter_names`` with ``adapter_weights`` (1.0 each by default): their LoRA deltas are summed,
        each scaled by its weight (scaling the LoRA weights is the cheap approximation of edit strength)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (list, tuple)):
            weights = [check_number(w, f"adapter_weights[{i}]") for i, w in enumerate(adapter_weights)]
        else:
            weights = [check_number(adapter_weights, "adapter_weights")] * len(names)
        lora.set_adapters(self.unet, names, weights)

    @lora.serialised
    def disable_lora(self) -> None:
        """Bypasses every adapter (the original UNet) until `enable_lora`."""
        lora.set_adapters_enabled(self.unet, False)

    @lora.serialised
    def enable_lora(self) -> None:
        """Re-enables the active adapters after `disable_lora`."""
        lora.set_adapters_enabled(self.unet, True)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Removes the named adapters from the UNet (diffusers' name for `unload_lora_weights(name)`)."""
        for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            self.unload_lora_weights(name)

    @lora.serialised
    def unload_lora_weights(self, adapter_name: str | None = None) -> None:
        """Removes one adapter (or all, when ``adapter_name`` is None) from the UNet; the other active adapters keep
        their weights."""
        if adapter_name is None:
            lora.remove_all_adapters(self.unet)
            return
        weights = lora.adapter_weights(self.unet)
        active = [n for n in lora.active_adapters(self.unet) if n != adapter_name and n in weights]
        enabled = lora.adapters_enabled(self.unet)
        lora.remove_adapter(self.unet, adapter_name)
        if active:
            lora.set_adapters(self.unet, active, [weights[n] for n in active])
            lora.set_adapters_enabled(self.unet, enabled)
