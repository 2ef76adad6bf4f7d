"""diffusers' adapter API (`PeftAdapterMixin`) for the pixel `UNet2DModel`, which lacks it in diffusers 0.42
(`UNet2DConditionModel` has it natively). With it the calls are the same for both: `add_adapter`, `set_adapters`,
`disable_adapters` / `enable_adapters`, `delete_adapters`, `load_lora_adapter`, and peft's
`get_peft_model_state_dict`.

The pipeline gives a plain `UNet2DModel` the API without changing anything the caller holds: `adapter_view` makes a
new `UNet2DModel` that shares the weight tensors and binds `PeftAdapterMixin`'s methods to it. It stays of type
`UNet2DModel`, so stock pipelines take it (`DDPMPipeline.from_pipe(ours)`), and `save_pretrained` writes a plain
`UNet2DModel` folder (base weights only: adapters are saved as their own files). `LoraUNet2DModel`, the subclass
with the mixin, remains for code that loads a UNet with the API directly.
"""

from __future__ import annotations

import inspect
import types

import torch
from diffusers import ModelMixin, UNet2DModel  # noqa: F401  (diffusers' loader looks up `ModelMixin` here)
from diffusers.loaders import PeftAdapterMixin

__all__ = [
    "LoraUNet2DModel", "adapter_view", "base_state_dict", "bind_adapter_api", "has_adapter_api", "plain_unet",
    "with_adapter_api",
]  # fmt: skip


class LoraUNet2DModel(UNet2DModel, PeftAdapterMixin):
    r"""
    A [`~diffusers.UNet2DModel`] with [`~diffusers.loaders.PeftAdapterMixin`]: LoRA adapters through diffusers' own
    adapter API. Loads any `UNet2DModel` folder (``LoraUNet2DModel.from_pretrained("google/ddpm-celebahq-256",
    subfolder="unet")``) and saves as a plain `UNet2DModel` folder without the adapters.
    """

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves the base model as a plain `UNet2DModel` folder; adapters are not part of it (see `lora`)."""
        return plain_unet(self).save_pretrained(save_directory, *args, **kwargs)


def has_adapter_api(unet) -> bool:
    """Whether ``unet`` has diffusers' adapter API (natively, as `LoraUNet2DModel`, or bound by `adapter_view`)."""
    return isinstance(unet, PeftAdapterMixin) or bool(unet.__dict__.get("_adapter_api_bound", False))


def bind_adapter_api(unet) -> None:
    """Binds `PeftAdapterMixin`'s methods to the `UNet2DModel` instance ``unet`` (its type is unchanged)."""
    for name, value in vars(PeftAdapterMixin).items():
        if inspect.isfunction(value):
            unet.__dict__[name] = types.MethodType(value, unet)
    # saved as its base weights, as `LoraUNet2DModel.save_pretrained` does (adapters are saved as their own files)
    unet.__dict__["save_pretrained"] = types.MethodType(LoraUNet2DModel.save_pretrained, unet)
    unet.__dict__.update(
        _hf_peft_config_loaded=False,
        _prepare_lora_hotswap_kwargs=None,
        _optionally_disable_offloading=PeftAdapterMixin._optionally_disable_offloading,
        _adapter_api_bound=True,
    )


def with_adapter_api(unet):
    """``unet`` itself, with diffusers' adapter API: bound in place to a plain `UNet2DModel` (its type is kept); a
    model that already has it is returned as it is."""
    if has_adapter_api(unet):
        return unet
    if type(unet) is UNet2DModel:
        bind_adapter_api(unet)
        return unet
    raise _not_a_unet(unet)


def adapter_view(unet):
    """``unet`` with diffusers' adapter API, without changing the caller's object: a model that has it is returned
    as it is; for a plain `UNet2DModel`, a new `UNet2DModel` that shares its weight tensors (no copy), with the API
    bound (`bind_adapter_api`). Adapters added to the view wrap the view's modules only, so the caller's model (and
    the stock pipeline that holds it, e.g. a `DDPMPipeline` given to `from_pipe`) is unchanged."""
    if has_adapter_api(unet):
        return unet
    if type(unet) is not UNet2DModel:
        raise _not_a_unet(unet)
    with torch.device("meta"):
        view = UNet2DModel.from_config(unet.config)
    view.load_state_dict(unet.state_dict(), assign=True)  # the same tensors
    view.train(unet.training)
    name = unet.config.get("_name_or_path")
    if name is not None:
        view.register_to_config(_name_or_path=name)
    bind_adapter_api(view)
    return view


def _not_a_unet(unet) -> TypeError:
    return TypeError(
        "`unet` must be a diffusers `UNet2DModel` or a model with `PeftAdapterMixin` (e.g. `UNet2DConditionModel`), "
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
