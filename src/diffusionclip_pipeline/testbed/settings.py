"""The test-bed's recommended `finetune` / `edit` settings, where they differ from the library defaults.

They were chosen by measuring edit success on the test-bed world (four colour edits over several data seeds): the
results are in docs/testbed.md and how they were found, setting by setting, in docs/testbed-experiments.md.
"""

from ..families.base import DEFAULT_TARGET_MODULES

# the library's LoRA targets less the ResNet blocks' time-embedding projection, whose per-channel shift tinted
# the backgrounds (docs/testbed-experiments.md)
TARGET_MODULES_WITHOUT_TIME_EMBEDDING = tuple(m for m in DEFAULT_TARGET_MODULES if m != "time_emb_proj")

RECOMMENDED_FINETUNE: dict = dict(
    global_clip_loss_weight=0.5,
    num_epochs=15,
    l1_loss_weight=0.45,
    num_fixed_point_iterations=1,
    lora_rank=8,
    lora_alpha=8.0,
    lora_target_modules=TARGET_MODULES_WITHOUT_TIME_EMBEDDING,
)
RECOMMENDED_EDIT: dict = dict(t0=400, num_inversion_steps=32, num_inference_steps=32)

# EffDiff-class speed (docs/fast.md): forward-noise encoding (0 UNet calls) and 6 DDIM steps. On adapters of
# RECOMMENDED_FINETUNE it edits 81 / 100 / 97 % of held-out red -> blue circles at data seeds 0 / 7 / 13 (the
# 32 + 32-step edit: 97 / 91 / 94 %) in 6 UNet calls instead of 64 (re-measured 2026-12-06 with the shape-aware
# edit_success, docs/remeasured.md; published 94 / 100 / 97 against 100 / 94 / 94). Stochastic: pass `generator=`.
FAST_EDIT: dict = dict(t0=400, encoding="noise", num_inference_steps=6)

# EffDiff's one-step scheme on forward-noised latents: 0.16x today's fine-tuning time, but it does NOT keep today's
# quality: its adapters edit 41 / 75 / 44 % of red -> blue circles at data seeds 0 / 7 / 13 (re-measured 2026-12-06,
# shape-aware; published 44 / 78 / 47; the recommended recipe 91-97 %; the failures are tinted backgrounds) and 0 %
# of green -> yellow triangles (docs/fast.md has the curve).
FAST_FINETUNE: dict = dict(
    {k: v for k, v in RECOMMENDED_FINETUNE.items() if k != "num_fixed_point_iterations"},  # no inversion to refine
    scheme="one_step",
    encoding="noise",
    learning_rate=2e-3,
)


# The latent test-bed (docs/testbed-latent.md), chosen by a bounded search at data seed 5 (reported at seed 0): the
# pixel recipe (L1 in pixel space: L1 on the latents edited 22 % against 72 %), editing from the adapter's own t0 500
# with 40 + 40 steps: from 400, as for pixels, 72 %; from 500, 100 % (re-measured 2026-12-06 on the shipped weights
# with the shape-aware measure; published 31 / 59 / 100 % on an earlier checkpoint).
RECOMMENDED_FINETUNE_LATENT: dict = dict(RECOMMENDED_FINETUNE)
RECOMMENDED_EDIT_LATENT: dict = dict(t0=500, num_inversion_steps=40, num_inference_steps=40)


# The flow test-bed (SD3-shaped, docs/testbed-flow.md): the pixel recipe with the flow family's own LoRA targets (the
# transformer has no ResNet convolutions), editing from t0 500 (sigma 0.75) with 32 + 32 Euler steps. Chosen by a
# bounded search at data seed 5 (4 fine-tunes x 3 edits on the four colour edits; `scripts/testbed/settings_search.py
# --kind flow`): the mean success of the four was 73 % from t0 500 against 64 % from 400 (the pixel depth); learning
# rates 1e-3 / 2e-3 and 25 epochs did not do better. Reported at data seed 7 in docs/testbed-flow.md (issue 32).
RECOMMENDED_FINETUNE_FLOW: dict = {k: v for k, v in RECOMMENDED_FINETUNE.items() if k != "lora_target_modules"}
RECOMMENDED_EDIT_FLOW: dict = dict(t0=500, num_inversion_steps=32, num_inference_steps=32)

# The flow test-bed's fast edit: the stock `scale_noise` to t0 400 (no transformer call) and 6 Euler steps, as
# `FAST_EDIT` on the pixel test-bed (the only fast variant searched). At data seed 5 it edited 81 / 75 / 75 / 0 % of
# the four colour edits (the recommended edit: 100 / 97 / 97 / 0 %); at seed 7 see docs/testbed-flow.md. Stochastic:
# pass `generator=`.
FAST_EDIT_FLOW: dict = dict(t0=400, encoding="noise", num_inference_steps=6)


def recommended(kind: str = "pixel") -> tuple[dict, dict]:
    """The recommended ``(finetune, edit)`` settings of the ``"pixel"``, ``"latent"`` or ``"flow"`` test-bed
    (copies)."""
    if kind == "flow":
        return dict(RECOMMENDED_FINETUNE_FLOW), dict(RECOMMENDED_EDIT_FLOW)
    if kind == "latent":
        return dict(RECOMMENDED_FINETUNE_LATENT), dict(RECOMMENDED_EDIT_LATENT)
    if kind == "pixel":
        return dict(RECOMMENDED_FINETUNE), dict(RECOMMENDED_EDIT)
    raise ValueError(f"`kind` must be 'pixel', 'latent' or 'flow', got {kind!r}.")
