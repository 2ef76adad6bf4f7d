"""Offline test-bed world (coloured shapes on white) and the tiny models trained on it.

The names below are imported when first used (PEP 562), so that importing the package, or its CLI plugin
(`cli_plugin`, loaded by every ``diffusionclip`` command), does not import torch: ``diffusionclip --help`` stays
quick. ``from diffusionclip_pipeline.testbed import load_pipeline`` works as usual.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS = {
    "WEIGHTS_DIR": "pipeline",
    "load_pipeline": "pipeline",
    "FAST_EDIT": "settings",
    "FAST_EDIT_FLOW": "settings",
    "FAST_FINETUNE": "settings",
    "LATENT_WEIGHTS_DIR": "pipeline",
    "RECOMMENDED_EDIT": "settings",
    "RECOMMENDED_FINETUNE": "settings",
    **{
        name: "world"
        for name in (
            "COLOURS", "SHAPES", "TEMPLATES", "background_change", "caption", "classify_shape", "colour_fraction",
            "dominant_colour", "edit_success", "foreground_mask", "is_clean_shape", "mask_iou", "render_dataset",
            "render_shape", "sample_scene",
        )
    },
}  # fmt: skip

__all__ = [
    "FAST_EDIT",
    "FAST_EDIT_FLOW",
    "FAST_FINETUNE",
    "LATENT_WEIGHTS_DIR",
    "RECOMMENDED_EDIT",
    "RECOMMENDED_FINETUNE",
    "WEIGHTS_DIR",
    "load_pipeline",
    "COLOURS",
    "SHAPES",
    "TEMPLATES",
    "background_change",
    "caption",
    "classify_shape",
    "colour_fraction",
    "dominant_colour",
    "edit_success",
    "foreground_mask",
    "is_clean_shape",
    "mask_iou",
    "render_dataset",
    "render_shape",
    "sample_scene",
]


_SUBMODULES = ("cli_plugin", "demo", "pipeline", "settings", "world")


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), submodules=_SUBMODULES)
