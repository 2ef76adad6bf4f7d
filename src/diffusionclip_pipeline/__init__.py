"""DiffusionCLIP for diffusers (Kim, Kwon, Ye, CVPR 2022, arXiv 2110.02711)."""

__version__ = "0.1.0"

from .clip_loss import CLIPDirectionalLoss, direction_loss
from .pipeline_diffusionclip import DiffusionCLIPPipeline
from .pipeline_output import DiffusionCLIPInversionOutput, DiffusionCLIPPipelineOutput
from .schedule import GridDDIMInverseScheduler, GridDDIMScheduler, ddim_timesteps
from .templates import IMAGENET_TEMPLATES

__all__ = [
    "CLIPDirectionalLoss",
    "DiffusionCLIPInversionOutput",
    "DiffusionCLIPPipeline",
    "DiffusionCLIPPipelineOutput",
    "GridDDIMInverseScheduler",
    "GridDDIMScheduler",
    "IMAGENET_TEMPLATES",
    "__version__",
    "ddim_timesteps",
    "direction_loss",
]
