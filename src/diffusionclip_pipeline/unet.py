"""Deprecated location of `LoraUNet2DModel`: use `diffusionclip_pipeline.families.unet_adapter_api` (removed in 0.3).

No warning on import: pipelines saved by 0.1 may name this module, and diffusers imports it to load them.
"""

from diffusers import ModelMixin  # noqa: F401  (diffusers' loader looks up `ModelMixin` here)

from .families.unet_adapter_api import LoraUNet2DModel, base_state_dict, plain_unet, with_adapter_api  # noqa: F401
