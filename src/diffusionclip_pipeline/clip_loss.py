"""Deprecated location of the CLIP loss: use `diffusionclip_pipeline.training.losses` (removed in 0.3)."""

import warnings

from .choices import LOSS_TYPES  # noqa: F401
from .training.losses import (  # noqa: F401
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPDirectionalLoss,
    direction_loss,
    unknown_words,
)

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "CLIPDirectionalLoss", "direction_loss", "unknown_words"]

warnings.warn(
    "`diffusionclip_pipeline.clip_loss` moved to `diffusionclip_pipeline.training.losses` (the whole fine-tuning "
    "objective in one module); the old path will be removed in 0.3.",
    FutureWarning,
    stacklevel=2,
)
