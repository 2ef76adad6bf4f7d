"""The adapter state of a denoiser, as peft and diffusers keep it (``model.peft_config`` and the LoRA layers: names,
ranks, active set, scales, enabled flag), read and changed through diffusers' `PeftAdapterMixin`; plus the one thing
added, each adapter's provenance (prompts and settings), kept next to ``peft_config`` and written into its file.
"""

from __future__ import annotations

import contextlib
import copy
import math
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
    "check_adapter_weight",
    "get_provenance",
    "layer_weight",
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


def adapter_weights(model: nn.Module) -> dict[str, float | dict]:
    """The weight of each active adapter (the factor `set_adapters` applied to ``alpha / r``): a number when all its
    layers share it; the per-block dict `set_adapters` was given while the layers still hold what it set (so that
    passing the result back to `set_adapters` restores the same state); else the first layer's."""
    weights = {}
    records = model.__dict__.get("_diffusionclip_block_weights", {})
    for name in active_adapters(model):
        factors = _layer_factors(model, name)
        if not factors:
            continue
        values = list(factors.values())
        if all(math.isclose(v, values[0], rel_tol=1e-9, abs_tol=1e-12) for v in values):
            weights[name] = values[0]
        elif name in records and _same_factors(records[name][1], factors):
            weights[name] = copy.deepcopy(records[name][0])
        else:
            weights[name] = values[0]
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


def set_adapters(model: nn.Module, names: list[str], weights: list[float | dict]) -> None:
    """Activates ``names``, each scaled by its weight, and enables the adapter layers (diffusers' `set_adapters`).

    A weight is a number, or for a UNet a dict of per-block weights (see `check_adapter_weight`), expanded by
    diffusers' own function and applied per LoRA layer by diffusers' `set_weights_and_activate_adapters`, as
    `PeftAdapterMixin.set_adapters` does. Everything is checked before any layer changes.
    """
    unknown = [n for n in names if n not in adapter_names(model)]
    if not names or unknown:
        raise ValueError(f"`adapter_names` must name loaded adapters {adapter_names(model)}, got {names}.")
    if len(weights) != len(names):
        raise ValueError(f"`adapter_weights` has {len(weights)} entries for {len(names)} adapters.")
    weights = [check_adapter_weight(model, w, f"adapter_weights[{i}]") for i, w in enumerate(weights)]
    expanded = _expand_block_weights(model, weights)
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    set_weights_and_activate_adapters(model, list(names), expanded)
    model.enable_adapters()
    for name in names:  # peft marks active adapters trainable; only fine-tuning trains
        for p in adapter_parameters(model, name):
            p.requires_grad_(False)
    records = model.__dict__.setdefault("_diffusionclip_block_weights", {})
    for name, weight in zip(names, weights):
        if isinstance(weight, dict):  # what `adapter_weights` reports while the layers still hold these weights
            records[name] = (copy.deepcopy(weight), _layer_factors(model, name))


# ---- per-block weights (diffusers' `set_adapters` with a dict, for UNets) -------------------------------------

_BLOCK_KEYS = ("down", "mid", "up")


def _block_weight_expander(model: nn.Module):
    """diffusers' expansion of per-block weights for ``model``'s class (`_SET_ADAPTER_SCALE_FN_MAPPING`:
    `UNet2DConditionModel`, `UNetMotionModel`), or `_maybe_expand_lora_scales` for the pixel `UNet2DModel`, which has
    the same ``down_blocks`` / ``mid_block`` / ``up_blocks`` layout (diffusers' own mapping leaves it out because
    diffusers gives `UNet2DModel` no adapter API); `None` for a model without blocks (SD3 / Flux transformers, where
    diffusers' mapping is the identity and a dict is not expanded)."""
    from diffusers import UNet2DModel
    from diffusers.loaders.peft import _SET_ADAPTER_SCALE_FN_MAPPING
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    # a defaultdict, which diffusers' own `set_adapters` fills with the identity for every class it meets: an entry
    # that is the default's identity (the same code) is no expansion
    expand = dict.get(_SET_ADAPTER_SCALE_FN_MAPPING, type(model).__name__)
    identity = _SET_ADAPTER_SCALE_FN_MAPPING.default_factory().__code__
    if expand is not None and getattr(expand, "__code__", None) is not identity:
        return expand
    return _maybe_expand_lora_scales if isinstance(model, UNet2DModel) else None


def _attention_blocks(model: nn.Module, side: str) -> list[str]:
    """The ``block_<i>`` names that per-block weights may set on ``side`` ("down" or "up"): the blocks with attention
    layers, as diffusers' `_maybe_expand_lora_scales` counts them."""
    return [f"block_{i}" for i, block in enumerate(getattr(model, f"{side}_blocks")) if hasattr(block, "attentions")]


def _check_scales(value, name: str) -> float | list[float]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"`{name}` must be a number or a non-empty list of numbers, got {value!r}.")
        return [check_number(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return check_number(value, name)


def check_adapter_weight(model: nn.Module, weight, name: str = "adapter_weights") -> float | dict:
    """One adapter's weight for `set_adapters`: a finite number, or (``None``) 1.0, or for a UNet a dict of
    per-block weights as diffusers takes them, e.g. ``{"down": 0.5, "mid": 1.0, "up": {"block_0": 0.2,
    "block_1": [0, 1, 0.5]}}``: ``"down"`` / ``"up"`` hold a number for all their attention blocks or a dict by
    ``block_<i>`` (a number, or one per attention layer of the block), ``"mid"`` a number; what is left out is 1.0.
    A weight applies to the LoRA layers of the blocks' attention layers, and, as in diffusers, to the other layers of
    the block that have the same index (``resnets.<j>`` with ``attentions.<j>``); LoRA layers elsewhere keep 1.0.
    Returns the checked weight (numbers as floats); `ValueError` / `TypeError` naming ``name`` otherwise."""
    if weight is None:
        return 1.0
    if not isinstance(weight, dict):
        return check_number(weight, name)
    if _block_weight_expander(model) is None:
        raise ValueError(
            f"`{name}` is a dict of per-block weights, which diffusers' `set_adapters` expands for UNets only; "
            f"this {type(model).__name__} has no down / mid / up blocks: pass one number per adapter."
        )
    unknown = [k for k in weight if k not in _BLOCK_KEYS]
    if unknown:
        raise ValueError(f"`{name}` has the key {unknown[0]!r}; per-block weights take 'down', 'mid' and 'up'.")
    checked = {}
    for side, value in weight.items():
        if side == "mid" or not isinstance(value, dict):
            checked[side] = _check_scales(value, f"{name}['{side}']")
            continue
        blocks = _attention_blocks(model, side)
        for block in value:
            if block not in blocks:
                raise ValueError(
                    f"`{name}['{side}']` has the key {block!r}; the {side} blocks of this {type(model).__name__} "
                    f"that have attention layers are {blocks}."
                )
        checked[side] = {block: _check_scales(v, f"{name}['{side}'][{block!r}]") for block, v in value.items()}
    return checked


def _expand_block_weights(model: nn.Module, weights: list[float | dict]) -> list[float | dict]:
    """Checked weights with the dicts expanded by diffusers into ``{"down_blocks.1.attentions.0": w, ...}``."""
    if not any(isinstance(w, dict) for w in weights):
        return list(weights)
    try:
        expanded = _block_weight_expander(model)(model, copy.deepcopy(weights))
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"`adapter_weights` does not fit this {type(model).__name__}: {error}") from None
    keys = [k for w in expanded if isinstance(w, dict) for k in w]
    outside = [
        name for name, _ in _named_tuner_layers(model) if len(name.split(".")) < 4 and not any(k in name for k in keys)
    ]
    if outside:  # diffusers' `set_weights_and_activate_adapters` would fail on them with an IndexError
        raise ValueError(
            f"Per-block `adapter_weights` weight the LoRA layers inside down_blocks / mid_block / up_blocks; this "
            f"{type(model).__name__} also has LoRA layers outside them ({outside[:3]}): pass one number per adapter."
        )
    return expanded


def _same_factors(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-9) for k in a)


def _named_tuner_layers(model: nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def layer_weight(layer: BaseTunerLayer, adapter_name: str) -> float:
    """The weight `set_adapters` gave ``layer`` for ``adapter_name``: its scaling over ``alpha / r``."""
    return float(layer.scaling[adapter_name] / (layer.lora_alpha[adapter_name] / layer.r[adapter_name]))


def _layer_factors(model: nn.Module, adapter_name: str) -> dict[str, float]:
    """Each LoRA layer's weight for ``adapter_name`` (`layer_weight`)."""
    return {
        name: layer_weight(layer, adapter_name)
        for name, layer in _named_tuner_layers(model)
        if adapter_name in layer.scaling
    }


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
    model.__dict__.get("_diffusionclip_block_weights", {}).pop(adapter_name, None)


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
    model.__dict__.pop("_diffusionclip_block_weights", None)


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
