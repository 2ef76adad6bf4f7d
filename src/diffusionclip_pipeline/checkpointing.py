"""Deprecated location of fine-tuning checkpoints: use `diffusionclip_pipeline.training.checkpointing` (removed in
0.3)."""

import warnings

from .training.checkpointing import *  # noqa: F403
from .training.checkpointing import __all__  # noqa: F401

warnings.warn(
    "`diffusionclip_pipeline.checkpointing` moved to `diffusionclip_pipeline.training.checkpointing`; the old path "
    "will be removed in 0.3.",
    FutureWarning,
    stacklevel=2,
)
