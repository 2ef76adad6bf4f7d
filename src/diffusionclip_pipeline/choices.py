"""Every choice list of the package, in one place and without heavy imports, so that the pipeline, the training
config, the commands' ``--help`` and the app offer exactly the same names.
"""

from __future__ import annotations

__all__ = [
    "ENCODINGS",
    "INVERSION_STARTS",
    "KEEP_BEST",
    "L1_SPACES",
    "LOSS_TYPES",
    "LOSS_WEIGHTS",
    "MIXED_PRECISION",
    "OUTPUT_TYPES",
    "SCHEMES",
]

# how `invert` brings an image to t0: deterministic DDIM (or flow) inversion, or EffDiff's closed-form forward noise
ENCODINGS = ("ddim", "noise")
# where the DDIM inversion starts: the clean image (ours), or as the official code (x at t = 0)
INVERSION_STARTS = ("clean", "official")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")  # "latent": the denoiser-space result, not decoded (the call only)
# the fine-tuning schemes: the paper's GPU-efficient one, its original full chain, EffDiff's one step
SCHEMES = ("efficient", "full_chain", "one_step")
MIXED_PRECISION = ("no", "fp16", "bf16")
L1_SPACES = ("pixel", "latent")
LOSS_TYPES = ("cosine", "neg_log")
LOSS_WEIGHTS = (
    "clip_loss_weight", "global_clip_loss_weight", "l1_loss_weight", "sparse_loss_weight", "identity_loss_weight",
)  # fmt: skip
# `keep_best` criteria: the validation scores (`evaluation.score_edits`); larger is better except for `mae`
KEEP_BEST = ("s_dir", "s_dir_2", "clip_score", "mae", "ssim")
