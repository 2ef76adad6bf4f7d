"""Deprecated location of the component checks: use `diffusionclip_pipeline.families` (removed in 0.3)."""

import warnings

from .families import check_components, check_layout  # noqa: F401

warnings.warn(
    "`diffusionclip_pipeline.components` moved to `diffusionclip_pipeline.families`; the old path will be removed "
    "in 0.3.",
    FutureWarning,
    stacklevel=2,
)
