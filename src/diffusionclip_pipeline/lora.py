"""LoRA adapters on a plain diffusers `UNet2DModel`, injected with peft, and their safetensors files.

diffusers 0.42's `UNet2DModel` has no `PeftAdapterMixin`, so adapters are injected with peft directly
(`inject_adapter_in_model`) and the UNet stays a plain `UNet2DModel` on disk. The file format is
``pytorch_lora_weights.safetensors`` holding peft's adapter state dict (keys without the adapter name, e.g.
``down_blocks.0.resnets.0.conv1.lora_A.weight``) and, in its metadata, the LoRA config and the provenance.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FORMAT_NAME = "diffusionclip-lora"
FORMAT_VERSION = "1"

# Pixel DDPMs have attention only at low resolution (16x16 in the CelebA-HQ DDPM), so attention alone is a weak
# handle: the ResNet convolutions and their time-embedding projections are targeted as well.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")


@dataclass
class LoraSettings:
    """The LoRA shape of an adapter (what is needed to re-create its layers before loading its weights)."""

    rank: int = 4
    alpha: float = 4.0
    target_modules: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGET_MODULES)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"`lora_rank` must be a positive integer, got {self.rank!r}.")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"`lora_alpha` must be a positive number, got {self.alpha!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"`lora_target_modules` must be a non-empty list of names, got {self.target_modules!r}.")
        self.alpha = float(self.alpha)

    def to_peft(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules))


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """All peft tuner (LoRA) layers of ``model``."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters injected into ``model``, in order of first appearance."""
    names: list[str] = []
    for layer in tuner_layers(model):
        for name in layer.lora_A.keys():
            if name not in names:
                names.append(name)
    return names


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


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in tuner_layers(model):
        layer.enable_adapters(enabled)


def activate_adapters(model: nn.Module, names: list[str], weights: list[float]) -> None:
    """Makes ``names`` the active adapters of every LoRA layer, each scaled by its weight (``alpha / r`` times)."""
    for layer in tuner_layers(model):
        present = [n for n in names if n in layer.lora_A]
        layer.set_adapter(present)
        for name, weight in zip(names, weights):
            if name in layer.lora_A:
                layer.set_scale(name, weight)


def add_adapter(model: nn.Module, settings: LoraSettings, adapter_name: str) -> None:
    """Injects a fresh LoRA adapter (A random, B zero: the model's output is unchanged) and activates it alone."""
    if adapter_name in adapter_names(model):
        raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another `adapter_name`.")
    _inject(settings, model, adapter_name)
    activate_adapters(model, [adapter_name], [1.0])


def _inject(settings: LoraSettings, model: nn.Module, adapter_name: str) -> None:
    with warnings.catch_warnings():  # several named adapters in one model is what we want
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(settings.to_peft(), model, adapter_name=adapter_name)


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Deletes one adapter; when none is left, the peft wrappers are removed and the original modules restored."""
    remaining = [n for n in adapter_names(model) if n != adapter_name]
    if not remaining:
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(model)
        return
    for layer in tuner_layers(model):
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)


def adapter_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n and f".{adapter_name}." in n]


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without any adapter (peft's ``base_layer`` wrappers unwrapped)."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


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


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """``safetensors.save_file`` to a temporary file in the target folder, then an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapter(
    model: nn.Module,
    path: str,
    adapter_name: str,
    settings: LoraSettings,
    provenance: dict | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Writes one adapter to ``path`` (a folder gets ``pytorch_lora_weights.safetensors``); returns the file path.

    ``dtype`` (e.g. ``torch.float16``) stores the weights in that precision (half the file); loading casts them back
    to the UNet's dtype. By default they are stored as they are, so a reload reproduces edits bit for bit.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"`dtype` must be a floating-point torch.dtype, got {dtype!r}.")
    if adapter_name not in adapter_names(model):
        raise ValueError(f"No adapter named {adapter_name!r}; the UNet has {adapter_names(model)}.")
    if os.path.isdir(path) or not path.endswith(".safetensors"):
        path = os.path.join(path, LORA_WEIGHT_NAME)
    from . import __version__

    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lora_config": json.dumps(asdict(settings)),
        "base_config_fingerprint": config_fingerprint(model),
        "provenance": json.dumps(provenance or {}, default=str),
        "package_version": __version__,
    }
    atomic_save_file(state_dict, path, metadata)
    return path


def read_adapter_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads and validates one of our adapter files; a clear `ValueError` for anything else."""
    if os.path.isdir(path):
        path = os.path.join(path, LORA_WEIGHT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No LoRA weights at {path!r} (expected a folder with {LORA_WEIGHT_NAME} or a file).")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(path)
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt headers and data
        raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupt?): {error}") from error
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path!r} is not a DiffusionCLIP LoRA file (metadata 'format' is {metadata.get('format')!r}, "
            f"expected {FORMAT_NAME!r})."
        )
    bad_keys = [k for k in state_dict if ".lora_A." not in k and ".lora_B." not in k]
    if bad_keys or not state_dict:
        raise ValueError(f"{path!r} holds no LoRA weights or unexpected keys: {bad_keys[:5]}.")
    return state_dict, metadata


def load_adapter(model: nn.Module, path: str, adapter_name: str) -> tuple[LoraSettings, dict]:
    """Loads an adapter file into ``model`` under ``adapter_name`` and makes it the only active adapter.

    The file's metadata must name our format and the same base-UNet config fingerprint, and its keys must be exactly
    the adapter's; on any failure ``model`` is left as it was (the half-injected adapter is removed again).
    """
    state_dict, metadata = read_adapter_file(path)
    fingerprint = config_fingerprint(model)
    if metadata.get("base_config_fingerprint") != fingerprint:
        raise ValueError(
            f"The adapter at {path!r} was trained for another UNet (config fingerprint "
            f"{metadata.get('base_config_fingerprint', '?')[:12]}..., this UNet's is {fingerprint[:12]}...)."
        )
    try:
        raw = json.loads(metadata["lora_config"])
        settings = LoraSettings(rank=raw["rank"], alpha=raw["alpha"], target_modules=tuple(raw["target_modules"]))
        provenance = json.loads(metadata.get("provenance", "{}"))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"The adapter at {path!r} has unreadable LoRA metadata: {error}") from error
    if adapter_name in adapter_names(model):
        raise ValueError(f"An adapter named {adapter_name!r} is already loaded; pass another `adapter_name`.")

    previous_active = active_state(model)
    _inject(settings, model, adapter_name)
    try:
        expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
        if set(state_dict) != expected:
            missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
            raise ValueError(
                f"The adapter at {path!r} does not fit this UNet: missing {missing[:3]}, unexpected {unexpected[:3]}."
            )
        dtype = next(model.parameters()).dtype
        result = set_peft_model_state_dict(
            model, {k: v.to(dtype) for k, v in state_dict.items()}, adapter_name=adapter_name
        )
        if result.unexpected_keys:
            raise ValueError(f"The adapter at {path!r} has keys this UNet lacks: {result.unexpected_keys[:3]}.")
    except Exception:
        remove_adapter(model, adapter_name)
        restore_active_state(model, previous_active)
        raise
    activate_adapters(model, [adapter_name], [1.0])
    for p in adapter_parameters(model, adapter_name):
        p.requires_grad_(False)
    return settings, provenance


def active_state(model: nn.Module) -> list[tuple[BaseTunerLayer, list[str], bool, dict]]:
    return [
        (layer, list(layer.active_adapters), layer.disable_adapters, dict(layer.scaling))
        for layer in tuner_layers(model)
    ]


def restore_active_state(model: nn.Module, state) -> None:
    for layer, active, disabled, scaling in state:
        layer.set_adapter(active)
        layer.scaling.update({k: v for k, v in scaling.items() if k in layer.scaling})
        layer.enable_adapters(not disabled)


@contextlib.contextmanager
def using_adapters(model: nn.Module, names: list[str], weights: list[float] | None = None):
    """Runs the block with exactly ``names`` active (weights 1 by default), then restores the previous state."""
    state = active_state(model)
    try:
        activate_adapters(model, names, weights or [1.0] * len(names))
        set_adapters_enabled(model, True)
        yield model
    finally:
        restore_active_state(model, state)


def set_provenance(model: nn.Module, adapter_name: str, provenance: dict) -> None:
    """Records where adapter ``adapter_name`` came from (prompts, settings); written into its file's metadata."""
    store = model.__dict__.setdefault("_diffusionclip_provenance", {})
    store[adapter_name] = dict(provenance)


def get_provenance(model: nn.Module, adapter_name: str) -> dict:
    """The provenance recorded for ``adapter_name`` (empty if none)."""
    return dict(model.__dict__.get("_diffusionclip_provenance", {}).get(adapter_name, {}))
