"""Training: CLIP-directional LoRA fine-tuning of the UNet (DiffusionCLIP, arXiv 2110.02711, Sec. 3.2).

One concern per module, each importing only those above it in this list:

- `config`: `FinetuneConfig` (validated settings), `FinetuneOutput`, `NonFiniteLossError`;
- `losses`: the whole objective (`CLIPDirectionalLoss`, `FinetuneLoss`, `build_losses`);
- `data`: the training images and their latents ``x_t0`` (precomputed once, optionally cached);
- `state`: what a run changes on the modules and how it is put back (the rollback);
- `checkpointing`: resumable checkpoints, written atomically and read back validated;
- `callbacks`: validation on held-out images, keep-best, the progress bar and the trackers;
- `trainer`: `finetune` (the entry point), `fit` (the epoch loop), the schemes and `Trainer` (the optimizer step).

The names below are imported when first used, so that importing one module (e.g. `losses`, which `evaluation`
uses) does not import the trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_EXPORTS = {
    "FinetuneConfig": "config",
    "FinetuneOutput": "config",
    "NonFiniteLossError": "config",
    "CLIPDirectionalLoss": "losses",
    "FinetuneLoss": "losses",
    "build_losses": "losses",
    "direction_loss": "losses",
    "Checkpoint": "checkpointing",
    "read_checkpoint": "checkpointing",
    "Trainer": "trainer",
    "finetune": "trainer",
    "fit": "trainer",
}

__all__ = [
    "CLIPDirectionalLoss", "Checkpoint", "FinetuneConfig", "FinetuneLoss", "FinetuneOutput", "NonFiniteLossError",
    "Trainer", "build_losses", "direction_loss", "finetune", "fit", "read_checkpoint",
]  # fmt: skip

if TYPE_CHECKING:
    from .checkpointing import Checkpoint, read_checkpoint
    from .config import FinetuneConfig, FinetuneOutput, NonFiniteLossError
    from .losses import CLIPDirectionalLoss, FinetuneLoss, build_losses, direction_loss
    from .trainer import Trainer, finetune, fit


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
