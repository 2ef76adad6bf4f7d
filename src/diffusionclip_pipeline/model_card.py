"""Deprecated location of the adapter model card: use `diffusionclip_pipeline.loaders.model_card` (removed in 0.3)."""

from .loaders.model_card import *  # noqa: F403
from .loaders.model_card import CARD_MARKER, CARD_NAME, GRID_NAME, adapter_card, hub_model_id, is_adapter_card  # noqa: F401
