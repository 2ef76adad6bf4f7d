"""`LoraUNet2DModel`: diffusers' pixel `UNet2DModel` with diffusers' adapter API (`PeftAdapterMixin`).

diffusers 0.42's `UNet2DModel` lacks `PeftAdapterMixin`, which `UNet2DConditionModel` has natively. With this
subclass the calls are the same for both: `add_adapter`, `set_adapters`, `disable_adapters` / `enable_adapters`,
`delete_adapters`, `load_lora_adapter`, and peft's `get_peft_model_state_dict`. It adds no weights and no config, so
a plain `UNet2DModel` becomes one in place (`with_adapter_api`), and `save_pretrained` writes a plain `UNet2DModel`
folder (base weights only: adapters are saved as their own files, see `lora.save_adapter`).
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DModel  # noqa: F401  (diffusers' loader looks up `ModelMixin` here)
from diffusers.loaders import PeftAdapterMixin

__all__ = ["LoraUNet2DModel", "base_state_dict", "plain_unet", "with_adapter_api"]


class LoraUNet2DModel(UNet2DModel, PeftAdapterMixin):
    r"""
    A [`~diffusers.UNet2DModel`] with [`~diffusers.loaders.PeftAdapterMixin`]: LoRA adapters through diffusers' own
    adapter API. Loads any `UNet2DModel` folder (``LoraUNet2DModel.from_pretrained("google/ddpm-celebahq-256",
    subfolder="unet")``) and saves as a plain `UNet2DModel` folder without the adapters.
    """

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves the base model as a plain `UNet2DModel` folder; adapters are not part of it (see `lora`)."""
        return plain_unet(self).save_pretrained(save_directory, *args, **kwargs)


def with_adapter_api(unet):
    """``unet`` with diffusers' adapter API: a `UNet2DModel` becomes a `LoraUNet2DModel` in place (same object, same
    tensors); a model that already has `PeftAdapterMixin` (e.g. `UNet2DConditionModel`) is returned as it is."""
    if isinstance(unet, PeftAdapterMixin):
        return unet
    if type(unet) is UNet2DModel:
        unet.__class__ = LoraUNet2DModel  # the subclass adds methods only: no state to initialise
        return unet
    raise TypeError(
        f"`unet` must be a diffusers `UNet2DModel` or a model with `PeftAdapterMixin` (e.g. `UNet2DConditionModel`), "
        f"got {type(unet).__name__}."
    )


def plain_unet(unet):
    """A plain diffusers model of ``unet``'s base class sharing its base weights (no copy), without any adapter."""
    cls = UNet2DModel if isinstance(unet, LoraUNet2DModel) else type(unet)
    with torch.device("meta"):
        base = cls.from_config(unet.config)
    base.load_state_dict(base_state_dict(unet), assign=True)
    return base.to(unet.dtype) if base.dtype != unet.dtype else base


def base_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict without any adapter (peft's ``base_layer`` wrappers unwrapped)."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
