"""Deprecated location of the grid DDIM schedulers: use `diffusionclip_pipeline.scheduling_ddim_grid` (removed in
0.3)."""

import warnings

from .scheduling_ddim_grid import GridDDIMInverseScheduler, GridDDIMScheduler, ddim_timesteps  # noqa: F401

warnings.warn(
    "`diffusionclip_pipeline.schedule` moved to `diffusionclip_pipeline.scheduling_ddim_grid`; the old path will be "
    "removed in 0.3.",
    FutureWarning,
    stacklevel=2,
)
