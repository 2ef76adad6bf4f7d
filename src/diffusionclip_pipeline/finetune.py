"""Deprecated location of fine-tuning: use `diffusionclip_pipeline.training` (`training.trainer.finetune`,
`training.config.FinetuneConfig`, `training.losses`, `training.data`, `training.callbacks`); removed in 0.3."""

import warnings

from .choices import ENCODINGS, KEEP_BEST, L1_SPACES, LOSS_WEIGHTS, MIXED_PRECISION  # noqa: F401
from .training.callbacks import TRACKER_PACKAGES, TRACKER_PROJECT, check_report_to  # noqa: F401
from .training.checkpointing import Checkpoint, read_checkpoint  # noqa: F401
from .training.config import FinetuneConfig, FinetuneOutput, NonFiniteLossError  # noqa: F401
from .training.data import precompute_latents, training_images  # noqa: F401
from .training.losses import SPARSE_EPS, FinetuneLoss, SourceBatch, build_losses, sparse_change  # noqa: F401
from .training.trainer import MIN_LOSS_SCALE, Trainer, finetune  # noqa: F401
from .training.trainer import TRAINING_SCHEMES as SCHEMES  # noqa: F401

__all__ = [
    "FinetuneConfig", "FinetuneLoss", "FinetuneOutput", "NonFiniteLossError", "SourceBatch", "build_losses",
    "check_report_to", "finetune", "precompute_latents", "read_checkpoint", "sparse_change", "training_images",
]  # fmt: skip

warnings.warn(
    "`diffusionclip_pipeline.finetune` moved to `diffusionclip_pipeline.training` (e.g. `from "
    "diffusionclip_pipeline.training import FinetuneConfig, finetune`); the old path will be removed in 0.3.",
    FutureWarning,
    stacklevel=2,
)
