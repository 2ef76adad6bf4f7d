"""Deprecated location of the argument checks: use `diffusionclip_pipeline.utils.checks` (removed in 0.3)."""

import warnings

from .utils.checks import *  # noqa: F403
from .utils.checks import __all__  # noqa: F401

warnings.warn(
    "`diffusionclip_pipeline.validation` moved to `diffusionclip_pipeline.utils.checks` (the name `validation` now "
    "means held-out scoring during fine-tuning); the old path will be removed in 0.3.",
    FutureWarning,
    stacklevel=2,
)
