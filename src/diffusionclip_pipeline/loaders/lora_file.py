"""Adapter files: the format, fingerprints, the fit checks and a pipeline folder's adapter index. With `lora_state`,
the only code that reads or writes adapter state or adapter files.

File format (version 2, ``pytorch_lora_weights.safetensors``): diffusers' layout, as
`StableDiffusionPipeline.save_lora_weights` writes it: peft's keys with a ``unet.`` prefix
(``unet.down_blocks.0.resnets.0.conv1.lora_A.weight``) and, in the safetensors metadata, ``lora_adapter_metadata``
(the `LoraConfig` as a dict, keys prefixed ``unet.``; diffusers reads it to restore ``lora_alpha``) plus a
``diffusionclip`` entry (format version, base-model config fingerprint, provenance, package version). Version 1 files
(metadata ``format: diffusionclip-lora``, unprefixed keys, a ``lora_config`` entry) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from torch import nn

from .._version import __version__
from ..families.unet_adapter_api import base_state_dict, with_adapter_api
from ..utils.checks import check_adapter_name, short_repr
from ..utils.io import atomic_write
from .lora_state import (
    LoraSettings,
    active_adapters,
    active_state,
    adapter_names,
    adapter_settings,
    adapter_weights,
    adapters_enabled,
    get_provenance,
    layer_weight,
    remove_adapter,
    require_adapter,
    restore_active_state,
    set_adapters,
    set_adapters_enabled,
)

__all__ = [
    "ADAPTERS_FOLDER",
    "AdapterFile",
    "DIFFUSERS_METADATA_KEY",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "LEGACY_FORMAT_NAME",
    "LORA_WEIGHT_NAME",
    "METADATA_KEY",
    "PREFIX",
    "PREFIXES",
    "adapter_tensors",
    "component_prefix",
    "atomic_save_file",
    "config_fingerprint",
    "hotswap_adapter",
    "load_adapter",
    "load_adapters_folder",
    "read_adapter_file",
    "save_adapter",
    "save_adapters_folder",
    "weights_fingerprint",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LEGACY_FORMAT_NAME = "diffusionclip-lora"  # version 1's marker
FORMAT_VERSION = 2
METADATA_KEY = "diffusionclip"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PREFIX = "unet"  # the UNet's key prefix; a flow-matching transformer's is "transformer" (`component_prefix`)
PREFIXES = ("unet", "transformer")

# LoraConfig fields that change what a file's weights mean; a file that sets them otherwise is refused
_REQUIRED_DEFAULTS = {
    "use_dora": False, "use_rslora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}
}  # fmt: skip
_KEY = re.compile(r"(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<part>[AB])\.weight")
MAX_TARGET_MODULES = 1024  # more names than any UNet has module-name suffixes worth targeting: a crafted file
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what `isfinite` and peft handle


# ---- fingerprints ----------------------------------------------------------------------------------------------


def config_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the base model's architecture config (what an adapter must match to fit)."""
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the base model's config and weights (adapters excluded): the identity of the original model."""
    digest = hashlib.sha256(config_fingerprint(model).encode())
    for key, value in sorted(base_state_dict(model).items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- files -------------------------------------------------------------------------------------------------------


def component_prefix(model: nn.Module) -> str:
    """The key prefix of ``model``'s LoRA weights in diffusers' pipeline files: ``unet`` for a UNet, ``transformer``
    for a flow-matching transformer (SD3), as the stock pipelines' `save_lora_weights` write them."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    return PREFIX if isinstance(model, (UNet2DModel, UNet2DConditionModel)) else "transformer"


def _file_prefix(tensors: dict) -> str:
    """The component prefix a file's keys share (``unet`` or ``transformer``); ``unet`` when they share none, so that
    the key check reports the stray keys."""
    heads = {key.split(".", 1)[0] for key in tensors}
    return heads.pop() if len(heads) == 1 and heads <= set(PREFIXES) else PREFIX


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """A safetensors file written through the atomic writer (`utils.io.atomic_write`). The bytes are made in memory
    (`safetensors.torch.save`) and written by the atomic writer itself: ``save_file`` would leave its own temporary
    file (``.tmpXXXXXX``) behind when killed, which no later write could tell from a live writer's."""
    from safetensors.torch import save

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    atomic_write(path, write)


def _peft_metadata(settings: LoraSettings) -> dict:
    """The `LoraConfig` as diffusers stores it (JSON-ready: sets become sorted lists)."""
    config = settings.to_peft().to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def adapter_tensors(model: nn.Module, adapter_name: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter's LoRA weights with diffusers' keys (the component prefix, peft's ``lora_A`` / ``lora_B``)."""
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    prefix = component_prefix(model)
    return {f"{prefix}.{k}": v.to(dtype) if dtype is not None else v for k, v in state_dict.items()}


def save_adapter(model: nn.Module, path: str, adapter_name: str, dtype: torch.dtype | None = None) -> str:
    """Writes one adapter to ``path`` (a folder gets ``pytorch_lora_weights.safetensors``); returns the file path.

    ``dtype`` (e.g. ``torch.float16``) stores the weights in that precision (half the file); loading casts them back
    to the UNet's dtype. By default they are stored as they are, so a reload reproduces edits bit for bit.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"`dtype` must be a floating-point torch.dtype, got {dtype!r}.")
    require_adapter(model, adapter_name)
    if os.path.isdir(path) or not path.endswith(".safetensors"):
        path = os.path.join(path, LORA_WEIGHT_NAME)
    tensors = adapter_tensors(model, adapter_name, dtype)
    prefix = component_prefix(model)
    peft_metadata = {f"{prefix}.{k}": v for k, v in _peft_metadata(adapter_settings(model, adapter_name)).items()}
    ours = {
        "format_version": FORMAT_VERSION,
        "base_config_fingerprint": config_fingerprint(model),
        "provenance": get_provenance(model, adapter_name),
        "package_version": __version__,
    }
    metadata = {
        "format": "pt",
        DIFFUSERS_METADATA_KEY: json.dumps(peft_metadata, indent=2, sort_keys=True),
        METADATA_KEY: json.dumps(ours, sort_keys=True, default=str),
    }
    atomic_save_file(tensors, path, metadata)
    return path


@dataclass
class AdapterFile:
    """A validated adapter file: its weights (peft keys, no prefix), LoRA settings and our metadata."""

    path: str
    state_dict: dict[str, torch.Tensor]
    settings: LoraSettings
    base_config_fingerprint: str | None
    provenance: dict
    format_version: int
    prefix: str = PREFIX  # the component the file's keys name: "unet" or "transformer"


def _settings_from_tensors(path: str, tensors: dict, prefix: str) -> LoraSettings:
    """The settings of a diffusers-layout file without ``lora_adapter_metadata`` (as older diffusers scripts and
    other tools write them), as diffusers reads such a file: the rank from the weights, ``alpha = rank`` (a scale of
    1), the wrapped modules as targets. One rank for every module (a per-module rank pattern is refused)."""
    ranks, modules = set(), []
    for key, value in tensors.items():
        match = _KEY.fullmatch(key.removeprefix(f"{prefix}."))
        if key.startswith(f"{prefix}.") and match and match["part"] == "A" and value.ndim in (2, 4):
            ranks.add(int(value.shape[0]))
            modules.append(match["module"])
    if not modules:
        raise ValueError(f"{path!r} has no LoRA config in its metadata and no '{prefix}.*.lora_A.weight' tensors.")
    if len(ranks) != 1:
        raise ValueError(f"{path!r} has no LoRA config and its modules have different ranks {sorted(ranks)}.")
    rank = ranks.pop()
    return LoraSettings(rank=rank, alpha=float(rank), target_modules=tuple(sorted(modules)))


def _settings_from_metadata(
    path: str, metadata: dict[str, str], tensors: dict, prefix: str
) -> tuple[LoraSettings, dict]:
    """(settings, our metadata) from a v2 or v1 file's metadata (or, without any, from its tensors as diffusers
    does); `ValueError` for anything else."""
    if metadata.get("format") == LEGACY_FORMAT_NAME:  # version 1
        raw = json.loads(metadata["lora_config"])
        settings = LoraSettings(rank=raw["rank"], alpha=raw["alpha"], target_modules=tuple(raw["target_modules"]))
        ours = {
            "format_version": 1,
            "base_config_fingerprint": metadata.get("base_config_fingerprint"),
            "provenance": json.loads(metadata.get("provenance", "{}")),
        }
        return settings, ours
    if DIFFUSERS_METADATA_KEY not in metadata:
        return _settings_from_tensors(path, tensors, prefix), {}
    packed = json.loads(metadata[DIFFUSERS_METADATA_KEY])
    config = {k.removeprefix(f"{prefix}."): v for k, v in packed.items() if k.startswith(f"{prefix}.")}
    for key, default in _REQUIRED_DEFAULTS.items():
        if config.get(key, default) not in (default, None):
            raise ValueError(f"{path!r} sets LoRA option {key}={config[key]!r}, which is not supported.")
    settings = LoraSettings(rank=config["r"], alpha=config["lora_alpha"], target_modules=config["target_modules"])
    ours = json.loads(metadata.get(METADATA_KEY, "{}"))
    if not isinstance(ours, dict) or not isinstance(ours.get("provenance", {}), dict):
        raise ValueError(f"{path!r} has malformed '{METADATA_KEY}' metadata.")
    return settings, ours


def read_adapter_file(path: str) -> AdapterFile:
    """Reads and validates an adapter file (v2 or v1; safetensors only, never pickle); `ValueError` otherwise.

    Checked before anything is built from it: the metadata, the key names, that every tensor is finite, and that
    every LoRA pair has the rank of the metadata (so the layers built from it are no larger than the file).
    """
    if os.path.isdir(path):
        path = os.path.join(path, LORA_WEIGHT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No LoRA weights at {path!r} (expected a folder with {LORA_WEIGHT_NAME} or a file).")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt headers and data
        raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupt?): {error}") from error
    prefix = _file_prefix(tensors)
    try:
        settings, ours = _settings_from_metadata(path, metadata, tensors, prefix)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"The adapter at {path!r} has unreadable LoRA metadata: {short_repr(error)}") from None
    if len(settings.target_modules) > MAX_TARGET_MODULES:
        raise ValueError(f"The adapter at {path!r} lists {len(settings.target_modules)} target modules, more than "
                         f"{MAX_TARGET_MODULES}: not a file this package or diffusers writes.")  # fmt: skip
    version = ours.get("format_version", FORMAT_VERSION)
    key_prefix = f"{prefix}." if version >= 2 else ""
    state_dict = {k.removeprefix(key_prefix): v for k, v in tensors.items() if k.startswith(key_prefix)}
    _check_tensors(path, tensors, state_dict, settings, key_prefix)
    return AdapterFile(
        path=path,
        state_dict=state_dict,
        settings=settings,
        base_config_fingerprint=ours.get("base_config_fingerprint"),
        provenance=ours.get("provenance", {}) or {},
        format_version=int(version),
        prefix=prefix if version >= 2 else PREFIX,
    )


def _check_tensors(path: str, tensors: dict, state_dict: dict, settings: LoraSettings, key_prefix: str) -> None:
    stray = [k for k in tensors if k.removeprefix(key_prefix) not in state_dict]  # e.g. a text encoder's keys
    bad_keys = [k for k in state_dict if not _KEY.fullmatch(k)] + stray
    if bad_keys or not state_dict:
        raise ValueError(f"{path!r} holds no LoRA weights or unexpected keys: {bad_keys[:5]}.")
    for key, value in state_dict.items():
        if value.dtype not in _DTYPES or value.ndim not in (2, 4):
            raise ValueError(f"{path!r}: {key} is not a 2-d or 4-d float16/bfloat16/float32/float64 tensor "
                             f"({value.dtype}, {value.ndim}-d).")  # fmt: skip
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{path!r}: {key} holds non-finite values (NaN or infinity).")
        part = _KEY.fullmatch(key)["part"]
        rank = value.shape[0] if part == "A" else value.shape[1]
        if rank != settings.rank:
            raise ValueError(f"{path!r}: {key} has rank {rank}, its metadata says {settings.rank}.")
    parts = {"A": set(), "B": set()}
    for key in state_dict:
        match = _KEY.fullmatch(key)
        parts[match["part"]].add(match["module"])
    if parts["A"] != parts["B"]:  # peft would fill the missing half: lora_A randomly, lora_B with zeros
        half = sorted(parts["A"] ^ parts["B"])
        raise ValueError(f"{path!r} holds half a LoRA pair (lora_A without lora_B or the reverse) for {len(half)} "
                         f"module(s), e.g. {half[:3]}: the file is incomplete.")  # fmt: skip


def _base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s modules by name as they were before any adapter (peft's wrappers and LoRA layers looked through)."""
    modules = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            modules[name] = module.get_base_layer()
        elif not any(part.startswith("lora_") or part == "base_layer" for part in name.split(".")):
            modules[name] = module
    return modules


def _check_fits(model: nn.Module, adapter: AdapterFile) -> None:
    """The file's pairs are exactly the modules its targets select in ``model``, with matching shapes. Targets that
    select nothing in ``model`` are dropped from ``adapter.settings`` before peft sees them (peft ignores them, at a
    cost that grows with targets x modules)."""
    modules = _base_modules(model)
    by_suffix: dict[str, set[str]] = {}  # every dotted suffix of a layer's name -> the layers it selects (peft's rule)
    for name, m in modules.items():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            parts = name.split(".")
            for i in range(len(parts)):
                by_suffix.setdefault(".".join(parts[i:]), set()).add(name)
    targets = tuple(dict.fromkeys(t for t in adapter.settings.target_modules if t in by_suffix))
    selected = set().union(*(by_suffix[t] for t in targets))
    if targets:
        adapter.settings = LoraSettings(adapter.settings.rank, adapter.settings.alpha, targets)
    in_file = {_KEY.fullmatch(k)["module"] for k in adapter.state_dict}
    if in_file != selected:
        missing, unexpected = sorted(selected - in_file), sorted(in_file - selected)
        raise ValueError(
            f"The adapter at {adapter.path!r} does not fit this UNet: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}."
        )
    for key, value in adapter.state_dict.items():
        m = _KEY.fullmatch(key)
        module = modules[m["module"]]
        r = adapter.settings.rank
        if isinstance(module, nn.Linear):
            expected = (r, module.in_features) if m["part"] == "A" else (module.out_features, r)
        else:
            kernel = tuple(module.kernel_size) if m["part"] == "A" else (1, 1)
            channels = (r, module.in_channels) if m["part"] == "A" else (module.out_channels, r)
            expected = channels + kernel
        if tuple(value.shape) != expected:
            raise ValueError(
                f"The adapter at {adapter.path!r} does not fit this UNet: {key} has shape {tuple(value.shape)}, "
                f"expected {expected}."
            )


def _read_for(model: nn.Module, path: str) -> AdapterFile:
    """`read_adapter_file`, then checked to be for ``model``'s kind of denoiser and (when the file records one) for
    its config fingerprint."""
    adapter = read_adapter_file(path)
    if adapter.prefix != component_prefix(model):
        raise ValueError(
            f"The adapter at {adapter.path!r} is for a `{adapter.prefix}` (its keys start with '{adapter.prefix}.'), "
            f"but this pipeline's denoiser is a `{component_prefix(model)}`."
        )
    fingerprint = config_fingerprint(model)
    if adapter.base_config_fingerprint is not None and adapter.base_config_fingerprint != fingerprint:
        raise ValueError(
            f"The adapter at {adapter.path!r} was trained for another UNet (config fingerprint "
            f"{adapter.base_config_fingerprint[:12]}..., this UNet's is {fingerprint[:12]}...)."
        )
    return adapter


def load_adapter(model: nn.Module, path: str, adapter_name: str, low_cpu_mem_usage: bool = False) -> AdapterFile:
    """Loads an adapter file into ``model`` under ``adapter_name`` with diffusers' `load_lora_adapter`.

    The file is validated first (`read_adapter_file`), then checked against ``model``: the same base-UNet config
    fingerprint (when the file records one), and LoRA pairs that match the modules and shapes of ``model``, all
    before any layer is built. On any failure ``model`` is left as it was. The active set is not changed.
    ``low_cpu_mem_usage=True`` is passed on to peft (`inject_adapter_in_model` / `set_peft_model_state_dict`): the
    LoRA layers are created on the meta device, without a random initialisation, and the file's tensors assigned.
    """
    check_adapter_name(adapter_name)
    adapter = _read_for(model, path)
    if adapter_name in adapter_names(model):
        raise ValueError(f"An adapter named {adapter_name!r} is already loaded; pass another `adapter_name`.")
    _check_fits(model, adapter)
    dtype = next(model.parameters()).dtype
    state = active_state(model)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            with_adapter_api(model).load_lora_adapter(
                {k: v.to(dtype) for k, v in adapter.state_dict.items()}, prefix=None, adapter_name=adapter_name,
                metadata=_peft_metadata(adapter.settings), low_cpu_mem_usage=low_cpu_mem_usage,
            )  # fmt: skip
    except BaseException:
        if adapter_name in adapter_names(model):
            remove_adapter(model, adapter_name)
        restore_active_state(model, state)
        raise
    restore_active_state(model, state)  # peft may have changed the active set; the caller decides
    model.__dict__.setdefault("_diffusionclip_provenance", {})[adapter_name] = dict(adapter.provenance)
    return adapter


def hotswap_adapter(model: nn.Module, path: str, adapter_name: str) -> AdapterFile:
    """Replaces the weights of the loaded adapter ``adapter_name`` with those of the file at ``path``, in place: the
    LoRA layers, their modules and their parameters stay the same objects (diffusers' ``hotswap=True``), so a
    compiled model runs the new weights without recompiling.

    The file must have the loaded adapter's rank and adapt exactly its modules; its alpha may differ (then each
    layer's ``lora_alpha`` and scaling are updated, keeping the weight `set_adapters` gave the layer). Everything is
    checked before any tensor is written; a failure while writing puts the old tensors back. The active set and the
    weights are not changed; the adapter's provenance becomes the file's.

    The tensors are copied here rather than by peft's `hotswap_adapter_from_state_dict`, which finds the old
    adapter's tensors by a substring of their names (an adapter ``"a"`` would zero the tensors of another adapter
    whose keys contain "a" and that the file does not hold) and resets each layer's scaling to ``alpha / r``,
    dropping the weight `set_adapters` gave it.
    """
    check_adapter_name(adapter_name)
    if adapter_name not in adapter_names(model):
        raise ValueError(
            f"`hotswap=True` replaces a loaded adapter, and there is none named {adapter_name!r} (loaded: "
            f"{adapter_names(model)}): load it first without `hotswap`, or pass the name of a loaded adapter."
        )
    adapter = _read_for(model, path)
    _check_fits(model, adapter)
    loaded = model.peft_config[adapter_name]
    changed = {k: getattr(loaded, k) for k, d in _REQUIRED_DEFAULTS.items() if getattr(loaded, k, d) not in (d, None)}
    if changed:
        raise ValueError(f"Adapter {adapter_name!r} uses LoRA options {changed}, which hotswapping does not support.")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and adapter_name in m.lora_A}
    if any(adapter_name in m.merged_adapters for m in layers.values()):
        raise ValueError(
            f"Adapter {adapter_name!r} is fused into the weights: call `unfuse_lora()` before hotswapping."
        )
    in_file = {_KEY.fullmatch(k)["module"] for k in adapter.state_dict}
    if in_file != set(layers):
        only_file, only_loaded = sorted(in_file - set(layers)), sorted(set(layers) - in_file)
        raise ValueError(
            f"The adapter at {adapter.path!r} cannot be hotswapped into {adapter_name!r}: their targets differ (it "
            f"adapts {len(in_file)} modules, {adapter_name!r} {len(layers)}; only in the file: {only_file[:3]}, only "
            f"in {adapter_name!r}: {only_loaded[:3]}). Load it under another name instead."
        )
    ranks = {int(m.r[adapter_name]) for m in layers.values()}
    if ranks != {adapter.settings.rank}:
        raise ValueError(
            f"The adapter at {adapter.path!r} cannot be hotswapped into {adapter_name!r}: its rank is "
            f"{adapter.settings.rank}, {adapter_name!r}'s is {sorted(ranks)[0] if len(ranks) == 1 else sorted(ranks)}."
            " Load it under another name instead."
        )
    targets = {}
    for key, value in adapter.state_dict.items():
        match = _KEY.fullmatch(key)
        parameter = getattr(layers[match["module"]], f"lora_{match['part']}")[adapter_name].weight
        if tuple(parameter.shape) != tuple(value.shape):  # unreachable after the checks above; never a partial copy
            raise ValueError(f"{key} has shape {tuple(value.shape)}, the loaded adapter's {tuple(parameter.shape)}.")
        targets[key] = (parameter, value)
    alpha = adapter.settings.alpha
    old = {key: parameter.detach().clone() for key, (parameter, _) in targets.items()}
    try:
        with torch.no_grad():
            for parameter, value in targets.values():
                parameter.copy_(value)  # casts to the parameter's dtype and device
    except BaseException:
        with torch.no_grad():
            for key, (parameter, _) in targets.items():
                parameter.copy_(old[key])
        raise
    _set_alpha(layers.values(), adapter_name, alpha)
    loaded.lora_alpha = alpha
    model.__dict__.setdefault("_diffusionclip_provenance", {})[adapter_name] = dict(adapter.provenance)
    return adapter


def _set_alpha(layers, adapter_name: str, alpha: float) -> None:
    """Each LoRA layer's alpha set to ``alpha``, its scaling rescaled so that it keeps its weight: w * alpha / r."""
    for layer in layers:
        factor = layer_weight(layer, adapter_name)
        layer.lora_alpha[adapter_name] = alpha
        scaling = factor * alpha / layer.r[adapter_name]
        if isinstance(layer.scaling[adapter_name], torch.Tensor):
            layer.scaling[adapter_name].fill_(float(scaling))
        else:
            layer.scaling[adapter_name] = float(scaling)


# ---- a pipeline folder's adapters ------------------------------------------------------------------------------

ADAPTERS_FOLDER = "lora"
INDEX_NAME = "adapters.json"


def save_adapters_folder(model: nn.Module, folder: str) -> None:
    """Writes every adapter to ``folder/<name>/`` and the index ``folder/adapters.json`` (names, active set, weights,
    enabled flag), so that `load_adapters_folder` restores the same state. ``folder`` must not exist yet."""
    os.makedirs(folder)
    for name in adapter_names(model):
        save_adapter(model, os.path.join(folder, name), name)
    weights = adapter_weights(model)
    active = [n for n in active_adapters(model) if n in weights]
    index = {
        "format_version": FORMAT_VERSION,
        "adapters": adapter_names(model),
        "active": active,
        "weights": [weights[n] for n in active],
        "enabled": adapters_enabled(model),
    }
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2)


def load_adapters_folder(model: nn.Module, folder: str) -> None:
    """Loads the adapters that `save_adapters_folder` wrote (only files inside ``folder``) and restores their state."""
    path = os.path.join(folder, INDEX_NAME)
    try:
        with open(path) as f:
            index = json.load(f)
        names, active, weights, enabled = index["adapters"], index["active"], index["weights"], index["enabled"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"The adapter index {path!r} is unreadable or malformed: {error!r}") from error
    if not isinstance(names, list) or not isinstance(active, list) or not isinstance(weights, list):
        raise ValueError(f"The adapter index {path!r} is malformed: 'adapters', 'active', 'weights' must be lists.")
    for name in names + active:
        check_adapter_name(name, f"{INDEX_NAME} adapter name")  # a name is a folder inside `folder`, never a path
    if not set(active) <= set(names) or len(weights) != len(active) or not isinstance(enabled, bool):
        raise ValueError(f"The adapter index {path!r} is inconsistent: {index!r:.300}")
    real_folder = os.path.realpath(folder)
    for name in names:  # a link (lora/<name> -> elsewhere) would read outside the pipeline folder
        for part in (os.path.join(folder, name), os.path.join(folder, name, LORA_WEIGHT_NAME)):
            if os.path.islink(part) or os.path.dirname(os.path.realpath(part)) not in (
                real_folder, os.path.join(real_folder, name)
            ):  # fmt: skip
                raise ValueError(f"The adapter {name!r} of {path!r} is a link ({part!r}): only files inside the "
                                 "pipeline folder are loaded.")  # fmt: skip
    state = active_state(model)
    loaded = []
    try:
        for name in names:
            load_adapter(model, os.path.join(folder, name), name)
            loaded.append(name)
        if active:
            set_adapters(model, active, weights)
        set_adapters_enabled(model, enabled)
    except BaseException:
        for name in reversed(loaded):
            remove_adapter(model, name)
        restore_active_state(model, state)
        raise
