"""Deprecated location of the noise mixing (edit strength, multi-adapter weights and masks): use
`diffusionclip_pipeline.noise_mixing` (removed in 0.3)."""

import warnings

from .noise_mixing import MixComponent, build_mix, check_mask, constant, piecewise_weights  # noqa: F401

warnings.warn(
    "`diffusionclip_pipeline.mixing` moved to `diffusionclip_pipeline.noise_mixing`; the old path will be removed in "
    "0.3.",
    FutureWarning,
    stacklevel=2,
)
