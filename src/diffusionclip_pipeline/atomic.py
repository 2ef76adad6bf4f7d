"""Deprecated location of the atomic writers: use `diffusionclip_pipeline.utils.io` (removed in 0.3)."""

import warnings

from .utils.io import atomic_directory, exchange  # noqa: F401

warnings.warn(
    "`diffusionclip_pipeline.atomic` moved to `diffusionclip_pipeline.utils.io`; the old path will be removed in 0.3.",
    FutureWarning,
    stacklevel=2,
)
