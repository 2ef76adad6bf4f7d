"""Editing many images: a folder, a list file or a video's frames, batch by batch, across the processes of
``accelerate launch`` / ``torchrun`` (one or several machines), resumable through a manifest (docs/scale-out.md).

Built on the pipeline's public call only (`DiffusionCLIPPipeline.edit`); the ``diffusionclip edit`` command's
``--input-dir`` / ``--input-list`` / ``--video`` modes are thin wrappers around `edit_images` and `edit_video`.
"""

from .editing import RESERVED_EDIT_ARGUMENTS, BatchEditOutput, edit_images, process_state
from .inputs import BatchItem, find_inputs, item_seed
from .manifest import adapter_fingerprint, read_manifest
from .video import VideoEditOutput, edit_video, flicker, read_video, write_video

__all__ = [
    "RESERVED_EDIT_ARGUMENTS",
    "BatchEditOutput",
    "BatchItem",
    "VideoEditOutput",
    "adapter_fingerprint",
    "edit_images",
    "edit_video",
    "find_inputs",
    "flicker",
    "item_seed",
    "process_state",
    "read_manifest",
    "read_video",
    "write_video",
]
