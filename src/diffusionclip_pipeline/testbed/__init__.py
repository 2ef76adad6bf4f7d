"""Offline test-bed world (coloured shapes on white) and the tiny models trained on it."""

from .pipeline import WEIGHTS_DIR, load_pipeline
from .settings import RECOMMENDED_EDIT, RECOMMENDED_FINETUNE
from .world import (
    COLOURS,
    SHAPES,
    TEMPLATES,
    background_change,
    caption,
    classify_shape,
    colour_fraction,
    dominant_colour,
    edit_success,
    foreground_mask,
    is_clean_shape,
    mask_iou,
    render_dataset,
    render_shape,
    sample_scene,
)

__all__ = [
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
