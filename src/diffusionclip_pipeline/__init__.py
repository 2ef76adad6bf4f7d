"""DiffusionCLIP for diffusers (Kim, Kwon, Ye, CVPR 2022, arXiv 2110.02711)."""

__version__ = "0.1.0"
