"""DiffusionCLIP for diffusers (Kim, Kwon, Ye, CVPR 2022, arXiv 2110.02711).

The names below are imported when first used (PEP 562), so that `diffusionclip_pipeline.commands` (the
``diffusionclip`` command) starts without importing torch, diffusers or transformers: ``diffusionclip --help`` and
usage errors are quick. ``from diffusionclip_pipeline import DiffusionCLIPPipeline`` works as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__
from .utils.lazy import lazy_exports

_EXPORTS = {
    "CLIPDirectionalLoss": "training",
    "direction_loss": "training",
    "FinetuneConfig": "training",
    "FinetuneOutput": "training",
    "NonFiniteLossError": "training",
    "DiffusionCLIPLoraLoaderMixin": "loaders",
    "DiffusionCLIPPipeline": "pipeline_diffusionclip",
    "NoAdapterWarning": "pipeline_diffusionclip",
    "NonFiniteResultError": "pipeline_diffusionclip",
    "DiffusionCLIPInversionOutput": "pipeline_output",
    "DiffusionCLIPPipelineOutput": "pipeline_output",
    "GridDDIMInverseScheduler": "scheduling_ddim_grid",
    "GridDDIMScheduler": "scheduling_ddim_grid",
    "ddim_timesteps": "scheduling_ddim_grid",
    "IMAGENET_TEMPLATES": "templates",
    "LoraUNet2DModel": "families.unet_adapter_api",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
    from .families.unet_adapter_api import LoraUNet2DModel
    from .loaders import DiffusionCLIPLoraLoaderMixin
    from .pipeline_diffusionclip import DiffusionCLIPPipeline, NoAdapterWarning, NonFiniteResultError
    from .pipeline_output import DiffusionCLIPInversionOutput, DiffusionCLIPPipelineOutput
    from .scheduling_ddim_grid import GridDDIMInverseScheduler, GridDDIMScheduler, ddim_timesteps
    from .templates import IMAGENET_TEMPLATES
    from .training import CLIPDirectionalLoss, FinetuneConfig, FinetuneOutput, NonFiniteLossError, direction_loss


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
