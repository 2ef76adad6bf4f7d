"""Deprecated: the adapter functions now live in `diffusionclip_pipeline.loaders.lora_state` (the state peft keeps)
and `diffusionclip_pipeline.loaders.lora_file` (files, fingerprints, fit checks); the lock in `utils.locking`. This
module re-exports them for one release (removed in 0.3)."""

from .families.base import DEFAULT_TARGET_MODULES  # noqa: F401
from .families.unet_adapter_api import base_state_dict  # noqa: F401
from .loaders.lora_file import *  # noqa: F403
from .loaders.lora_file import (  # noqa: F401
    ADAPTERS_FOLDER,
    DIFFUSERS_METADATA_KEY,
    FORMAT_VERSION,
    INDEX_NAME,
    LEGACY_FORMAT_NAME,
    LORA_WEIGHT_NAME,
    METADATA_KEY,
    PREFIX,
    AdapterFile,
    atomic_save_file,
    config_fingerprint,
    load_adapter,
    load_adapters_folder,
    read_adapter_file,
    save_adapter,
    save_adapters_folder,
    weights_fingerprint,
)
from .loaders.lora_state import *  # noqa: F403
from .loaders.lora_state import MAX_RANK, LoraSettings, require_adapter  # noqa: F401
from .utils.locking import serialised, unet_lock  # noqa: F401
