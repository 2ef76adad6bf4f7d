"""Adapters in other layouts than our files: a LoRA state dict in memory (diffusers' ``unet.`` / ``transformer.``
keys, as `get_peft_model_state_dict` and the training scripts give them) and the kohya / A1111 layout
(``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) that diffusers converts, and back.

Each is turned into the tensors and metadata of a diffusers-layout file (`lora_file`), so that loading one runs every
check a file gets (finite values, ranks, the fit to the model) and nothing else: one loading path.
"""

from __future__ import annotations

import json

import torch

from ..utils.checks import short_repr
from .lora_file import _KEY, DIFFUSERS_METADATA_KEY, PREFIXES, _peft_metadata
from .lora_state import LoraSettings

__all__ = ["from_state_dict", "is_kohya", "to_kohya"]

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def is_kohya(state_dict: dict) -> bool:
    """Whether ``state_dict`` has kohya / A1111 keys (``lora_unet_...``)."""
    return any(key.startswith(KOHYA_PREFIXES) for key in state_dict)


def _check_tensors(state_dict) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, dict) or not state_dict:
        raise TypeError(f"A LoRA state dict must be a non-empty dict of tensors, got {short_repr(state_dict)}.")
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise TypeError(f"A LoRA state dict maps key strings to tensors; these entries do not: {bad[:3]!r:.200}.")
    return state_dict


def _from_kohya(state_dict: dict) -> tuple[dict[str, torch.Tensor], float]:
    """diffusers' kohya conversion (`_convert_non_diffusers_lora_to_diffusers`, then the peft key names) of the UNet's
    keys; the one ``alpha`` they share (per-module alphas differ: refused, as a rank pattern is)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    text_keys = sorted(k for k in state_dict if k.startswith(KOHYA_PREFIXES[1:]))
    if text_keys:
        raise ValueError(
            f"The kohya LoRA also adapts the text encoder ({text_keys[0]!r}, ...): only the UNet is adapted here."
        )
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(state_dict))
    unet = {k.removeprefix("unet."): v for k, v in converted.items() if k.startswith("unet.")}
    values = {float(a) for a in alphas.values()}
    if len(values) > 1:
        raise ValueError(f"The kohya LoRA has different alphas per module {sorted(values)[:4]}: not supported.")
    peft = convert_unet_state_dict_to_peft(unet)
    rank = next(int(v.shape[0]) for k, v in peft.items() if k.endswith("lora_A.weight"))
    return {f"unet.{k}": v for k, v in peft.items()}, values.pop() if values else float(rank)


def from_state_dict(state_dict: dict, metadata: dict | None = None) -> tuple[dict, dict[str, str]]:
    """The tensors and safetensors metadata of a diffusers-layout file holding ``state_dict``: diffusers' keys
    (``unet.`` or ``transformer.`` prefixed, peft's ``lora_A`` / ``lora_B``) or kohya's, which are converted.
    ``metadata`` is the `LoraConfig` as a dict (``lora_adapter_metadata``, unprefixed); without it the rank comes from
    the weights and ``alpha = rank``, as diffusers reads such files (kohya files carry their ``alpha``)."""
    state_dict = _check_tensors(state_dict)
    alpha = None
    if is_kohya(state_dict):
        state_dict, alpha = _from_kohya(state_dict)
    heads = {key.split(".", 1)[0] for key in state_dict}
    if len(heads) != 1 or not heads <= set(PREFIXES):
        raise ValueError(
            f"A LoRA state dict's keys must all start with one of {[p + '.' for p in PREFIXES]}, got the prefixes "
            f"{sorted(heads)[:4]}."
        )
    prefix = heads.pop()
    if metadata is None and alpha is not None:
        modules, ranks = [], set()
        for key, value in state_dict.items():
            match = _KEY.fullmatch(key.removeprefix(f"{prefix}."))
            if match and match["part"] == "A":
                modules.append(match["module"])
                ranks.add(int(value.shape[0]))
        if len(ranks) != 1:
            raise ValueError(f"The LoRA's modules have different ranks {sorted(ranks)}: not supported.")
        metadata = _peft_metadata(LoraSettings(rank=ranks.pop(), alpha=alpha, target_modules=tuple(sorted(modules))))
    if metadata is None:
        return dict(state_dict), {"format": "pt"}
    if not isinstance(metadata, dict):
        raise TypeError(f"`lora_adapter_metadata` must be a dict (a LoraConfig's), got {short_repr(metadata)}.")
    packed = {f"{prefix}.{k}": v for k, v in metadata.items()}
    return dict(state_dict), {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, sort_keys=True, default=list)}


def to_kohya(tensors: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """A ``unet.``-prefixed diffusers-layout state dict in kohya's layout (diffusers' `convert_state_dict_to_kohya`),
    with the adapter's real ``alpha`` on every module (the converter writes ``alpha = rank``, which would change the
    adapter's strength when ``alpha != rank``)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    if any(not k.startswith("unet.") for k in tensors):
        raise ValueError("The kohya layout is for UNet adapters (Stable Diffusion 1.x / 2.x, SDXL).")
    kohya = convert_state_dict_to_kohya(dict(tensors))
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(float(settings.alpha))
    return kohya
