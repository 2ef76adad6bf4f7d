"""DiffusionCLIP for diffusers (Kim, Kwon, Ye, CVPR 2022, arXiv 2110.02711)."""

from ._version import __version__
from .clip_loss import CLIPDirectionalLoss, direction_loss
from .finetune import FinetuneConfig, FinetuneOutput, NonFiniteLossError
from .loaders import DiffusionCLIPLoraLoaderMixin
from .pipeline_diffusionclip import DiffusionCLIPPipeline, NoAdapterWarning
from .pipeline_output import DiffusionCLIPInversionOutput, DiffusionCLIPPipelineOutput
from .schedule import GridDDIMInverseScheduler, GridDDIMScheduler, ddim_timesteps
from .templates import IMAGENET_TEMPLATES
from .unet import LoraUNet2DModel

__all__ = [
    "CLIPDirectionalLoss",
    "DiffusionCLIPLoraLoaderMixin",
    "DiffusionCLIPInversionOutput",
    "DiffusionCLIPPipeline",
    "DiffusionCLIPPipelineOutput",
    "FinetuneConfig",
    "FinetuneOutput",
    "GridDDIMInverseScheduler",
    "GridDDIMScheduler",
    "IMAGENET_TEMPLATES",
    "LoraUNet2DModel",
    "NoAdapterWarning",
    "NonFiniteLossError",
    "__version__",
    "ddim_timesteps",
    "direction_loss",
]
