"""The adapter state of a denoiser, as peft and diffusers keep it (``model.peft_config`` and the LoRA layers: names,
ranks, active set, scales, enabled flag), read and changed through diffusers' `PeftAdapterMixin`; plus the one thing
added, each adapter's provenance (prompts and settings), kept next to ``peft_config`` and written into its file.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..families.base import DEFAULT_TARGET_MODULES
from ..families.unet_adapter_api import with_adapter_api
from ..utils.checks import check_adapter_name, check_int, check_number, short_repr

__all__ = [
    "LoraSettings",
    "MAX_RANK",
    "active_adapters",
    "active_state",
    "adapter_names",
    "adapter_parameters",
    "adapter_settings",
    "adapter_weights",
    "lora_scaled",
    "adapters_disabled",
    "adapters_enabled",
    "add_adapter",
    "get_provenance",
    "remove_adapter",
    "remove_all_adapters",
    "require_adapter",
    "restore_active_state",
    "set_adapters",
    "set_adapters_enabled",
    "set_provenance",
    "tuner_layers",
    "unit_scale_alpha",
    "using_adapters",
]

MAX_RANK = 4096


@dataclass
class LoraSettings:
    """The LoRA shape of an adapter (what is needed to re-create its layers before loading its weights)."""

    rank: int = 4
    alpha: float = 4.0
    target_modules: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGET_MODULES)

    def __post_init__(self):
        self.rank = check_int(self.rank, "lora_rank", minimum=1, maximum=MAX_RANK)
        self.alpha = check_number(self.alpha, "lora_alpha", minimum=0, min_inclusive=False)
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        if not isinstance(self.target_modules, (list, tuple)):
            raise TypeError(f"`lora_target_modules` must be a list of names, got {short_repr(self.target_modules)}.")
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"`lora_target_modules` must be a non-empty list of names, got {self.target_modules!r}.")

    def to_peft(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules))

    @classmethod
    def from_peft(cls, config: LoraConfig) -> LoraSettings:
        return cls(rank=config.r, alpha=config.lora_alpha, target_modules=tuple(sorted(config.target_modules)))


def unit_scale_alpha(rank: int) -> float:
    """The ``lora_alpha`` that keeps the LoRA scale ``alpha / rank`` at 1 for ``rank``: the policy of the front-ends
    (CLI, app), which offer the rank alone, so that a user changing the rank does not also change the scale (as
    `FinetuneConfig`'s defaults, rank 4 and alpha 4)."""
    return float(check_int(rank, "lora_rank", minimum=1, maximum=MAX_RANK))


# ---- reading the state peft holds ----------------------------------------------------------------------------


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """All peft tuner (LoRA) layers of ``model``."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters loaded into ``model``, in the order they were added (``model.peft_config``)."""
    return list(getattr(model, "peft_config", None) or {})


def adapter_settings(model: nn.Module, adapter_name: str) -> LoraSettings:
    return LoraSettings.from_peft(model.peft_config[adapter_name])


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters the LoRA layers currently apply (empty when none is loaded)."""
    layers = tuner_layers(model)
    return list(layers[0].active_adapters) if layers else []


def adapters_enabled(model: nn.Module) -> bool:
    """False when every LoRA layer is bypassed (`disable_adapters`), or when there is none."""
    return any(not layer.disable_adapters for layer in tuner_layers(model))


def adapter_weights(model: nn.Module) -> dict[str, float]:
    """The weight of each active adapter (the factor `set_adapters` applied to ``alpha / r``)."""
    weights = {}
    for layer in tuner_layers(model):
        for name in layer.active_adapters:
            if name not in weights and name in layer.scaling:
                weights[name] = float(layer.scaling[name] / (layer.lora_alpha[name] / layer.r[name]))
    return weights


def require_adapter(model: nn.Module, adapter_name: str) -> None:
    if adapter_name not in adapter_names(model):
        raise ValueError(f"No adapter named {adapter_name!r}; the UNet has {adapter_names(model)}.")


# ---- changing it -------------------------------------------------------------------------------------------


def add_adapter(model: nn.Module, settings: LoraSettings, adapter_name: str) -> None:
    """Injects a fresh LoRA adapter (A random, B zero: the output is unchanged) and makes it the only active one."""
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another `adapter_name`.")
    with warnings.catch_warnings():  # several named adapters in one model is what we want
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        with_adapter_api(model).add_adapter(settings.to_peft(), adapter_name=adapter_name)
    model.enable_adapters()


def set_adapters(model: nn.Module, names: list[str], weights: list[float]) -> None:
    """Activates ``names``, each scaled by its weight, and enables the adapter layers (diffusers' `set_adapters`)."""
    unknown = [n for n in names if n not in adapter_names(model)]
    if not names or unknown:
        raise ValueError(f"`adapter_names` must name loaded adapters {adapter_names(model)}, got {names}.")
    if len(weights) != len(names):
        raise ValueError(f"`adapter_weights` has {len(weights)} entries for {len(names)} adapters.")
    weights = [check_number(w, f"adapter_weights[{i}]") for i, w in enumerate(weights)]
    model.set_adapters(list(names), weights)
    model.enable_adapters()
    for name in names:  # peft marks active adapters trainable; only fine-tuning trains
        for p in adapter_parameters(model, name):
            p.requires_grad_(False)


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Enables or bypasses every adapter layer (the active set and the weights are kept)."""
    if adapter_names(model):
        model.enable_adapters() if enabled else model.disable_adapters()


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Deletes one adapter (diffusers' `delete_adapters`); when none is left, the peft wrappers are removed too."""
    require_adapter(model, adapter_name)
    if adapter_names(model) == [adapter_name]:
        model.unload_lora()  # original modules back, ``peft_config`` deleted
    else:
        model.delete_adapters(adapter_name)
        _unwrap_empty_layers(model)
    model.__dict__.get("_diffusionclip_provenance", {}).pop(adapter_name, None)


def _unwrap_empty_layers(model: nn.Module) -> None:
    """Puts the original module back where a LoRA wrapper holds no adapter any more (as if it was never wrapped)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and not module.lora_A:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())


def remove_all_adapters(model: nn.Module) -> None:
    if adapter_names(model):
        model.unload_lora()
    model.__dict__.pop("_diffusionclip_provenance", None)


def adapter_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n and f".{adapter_name}." in n]


def set_provenance(model: nn.Module, adapter_name: str, provenance: dict) -> None:
    """Records where adapter ``adapter_name`` came from (prompts, settings); written into its file's metadata."""
    require_adapter(model, adapter_name)
    model.__dict__.setdefault("_diffusionclip_provenance", {})[adapter_name] = dict(provenance)


def get_provenance(model: nn.Module, adapter_name: str) -> dict:
    """The provenance recorded for ``adapter_name`` (empty if none)."""
    return dict(model.__dict__.get("_diffusionclip_provenance", {}).get(adapter_name, {}))


# ---- snapshots and temporary changes ---------------------------------------------------------------------------


def active_state(model: nn.Module) -> dict[str, tuple[list[str], bool, dict]]:
    """Every LoRA layer's active set, enabled flag and scales, by module name (restored exactly, bit for bit)."""
    return {
        name: (list(m.active_adapters), bool(m.disable_adapters), dict(m.scaling))
        for name, m in model.named_modules()
        if isinstance(m, BaseTunerLayer)
    }


def restore_active_state(model: nn.Module, state: dict) -> None:
    """Undoes changes of the active set, scales and enabled flags since `active_state` (adapters still loaded)."""
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and name in state:
            active, disabled, scaling = state[name]
            module.set_adapter([a for a in active if a in module.lora_A])
            module.scaling.update({k: v for k, v in scaling.items() if k in module.scaling})
            module.enable_adapters(not disabled)
    for p in (p for n, p in model.named_parameters() if "lora_" in n):
        p.requires_grad_(False)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Runs the block with every LoRA layer of ``model`` bypassed (the original model); restores them after, and
    the LoRA weights' ``requires_grad`` (peft's re-enabling sets it to False: an adapter being trained would be
    frozen by an inversion in the middle of its training)."""
    state = active_state(model)
    trainable = [(p, p.requires_grad) for name, p in model.named_parameters() if "lora_" in name]
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        restore_active_state(model, state)
        for parameter, requires_grad in trainable:
            parameter.requires_grad_(requires_grad)


@contextlib.contextmanager
def lora_scaled(model: nn.Module, scale: float):
    """Runs the block with every LoRA layer's scaling multiplied by ``scale`` (diffusers' `scale_lora_layers`, what
    ``cross_attention_kwargs={"scale": ...}`` does in its pipelines), then divides it back; ``scale = 0`` bypasses the
    adapters instead (dividing by 0 is not undoable)."""
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    if scale == 1.0:
        yield model
        return
    if scale == 0:
        with adapters_disabled(model):
            yield model
        return
    scale_lora_layers(model, scale)
    try:
        yield model
    finally:
        unscale_lora_layers(model, scale)


@contextlib.contextmanager
def using_adapters(model: nn.Module, names: list[str], weights: list[float] | None = None):
    """Runs the block with exactly ``names`` active (weights 1 by default), then restores the previous state."""
    state = active_state(model)
    try:
        set_adapters(model, names, weights or [1.0] * len(names))
        yield model
    finally:
        restore_active_state(model, state)
