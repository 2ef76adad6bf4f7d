"""`load_pipeline()`: a ready `DiffusionCLIPPipeline` from the test-bed weights shipped inside the package."""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS_DIR = os.path.join(_HERE, "weights")
LATENT_WEIGHTS_DIR = os.path.join(_HERE, "weights_latent")
"""The latent test-bed: a Stable-Diffusion-layout folder (``model_index.json``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``unet/``, ``scheduler/``) that the stock `StableDiffusionPipeline.from_pretrained` loads too. The
CLIP of the loss is the pixel test-bed's (``WEIGHTS_DIR/clip``), not copied."""

FLOW_WEIGHTS_DIR = os.path.join(_HERE, "weights_flow")
"""The flow test-bed: a Stable-Diffusion-3-layout folder (``transformer/``, ``vae/``, two CLIP text encoders, no T5;
docs/testbed-flow.md) that the stock `StableDiffusion3Pipeline.from_pretrained` loads too (with
``text_encoder_3=None, tokenizer_3=None``). The CLIP of the loss is the pixel test-bed's."""

KINDS = ("pixel", "latent", "flow")


def load_pipeline(
    weights_dir: str | os.PathLike | None = None, dtype=None, second_clip: bool = True, kind: str = "pixel"
):
    """The test-bed pipeline, loaded offline: the tiny pixel DDPM (``kind="pixel"``) or the tiny Stable-Diffusion-
    shaped latent model (``kind="latent"``) of the shapes world, with the tiny CLIP(s) of the loss.

    Args:
        weights_dir (`str`, *optional*): For ``kind="pixel"``, a folder with ``unet/``, ``scheduler/``, ``clip/`` and
            ``tokenizer/``, and optionally ``clip_2/`` + ``tokenizer_2/`` (default: the weights shipped in the
            package). For ``kind="latent"``, a Stable Diffusion folder (default: `LATENT_WEIGHTS_DIR`), for
            ``kind="flow"`` a Stable Diffusion 3 folder (default: `FLOW_WEIGHTS_DIR`); the CLIPs then come from the
            shipped pixel test-bed folder.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): Some weights are stored in fp16; all are
            cast to ``dtype``.
        second_clip (`bool`, *optional*, defaults to `True`): Load the second CLIP (``clip_2/``) if the folder has
            one; fine-tuning then averages the CLIP loss over both (why: docs/testbed-experiments.md, "Two CLIPs").
        kind (`str`, *optional*, defaults to `"pixel"`): ``"pixel"``, ``"latent"`` (docs/testbed-latent.md) or
            ``"flow"``, the flow-matching SD3-shaped model (docs/testbed-flow.md).

    Returns:
        [`DiffusionCLIPPipeline`]: on the CPU, progress bars off (also while loading).
    """
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from ..pipeline_diffusionclip import DiffusionCLIPPipeline
    from ..utils.logging import quiet_loading

    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    dtype = torch.float32 if dtype is None else dtype
    if kind != "pixel":
        return _load_folder(weights_dir, dtype, second_clip, kind)

    root = os.fspath(weights_dir or WEIGHTS_DIR)
    missing = [d for d in ("unet", "scheduler", "clip", "tokenizer") if not os.path.isdir(os.path.join(root, d))]
    if missing:
        raise FileNotFoundError(f"The test-bed weights folder {root!r} lacks {missing}.")
    with quiet_loading():  # no "Loading weights: 100%|...| 110/110" bars for a local, tiny model
        unet = UNet2DModel.from_pretrained(os.path.join(root, "unet"), dtype=dtype)
        scheduler = DDPMScheduler.from_pretrained(os.path.join(root, "scheduler"))
        pipe = DiffusionCLIPPipeline(unet=unet, scheduler=scheduler, **_load_clips(root, second_clip, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_clips(root: str, second_clip: bool, dtype) -> dict:
    """The CLIP(s) of the loss from ``root/clip`` (+ ``root/clip_2``), as `DiffusionCLIPPipeline` keywords."""
    from transformers import CLIPModel, CLIPTokenizer

    clips = {
        "clip_model": CLIPModel.from_pretrained(os.path.join(root, "clip"), dtype=dtype),
        "clip_tokenizer": CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer")),
    }
    if second_clip and os.path.isdir(os.path.join(root, "clip_2")):
        clips["clip_model_2"] = CLIPModel.from_pretrained(os.path.join(root, "clip_2"), dtype=dtype)
        clips["clip_tokenizer_2"] = CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer_2"))
    return clips


def _load_folder(weights_dir, dtype, second_clip: bool, kind: str):
    """The latent (Stable Diffusion layout) or flow (Stable Diffusion 3 layout, no T5) test-bed folder."""
    from ..pipeline_diffusionclip import DiffusionCLIPPipeline
    from ..utils.logging import quiet_loading

    default, script, doc = {
        "latent": (LATENT_WEIGHTS_DIR, "export_latent.py", "testbed-latent.md"),
        "flow": (FLOW_WEIGHTS_DIR, "export_flow.py", "testbed-flow.md"),
    }[kind]
    root = os.fspath(weights_dir or default)
    if not os.path.isfile(os.path.join(root, "model_index.json")):
        raise FileNotFoundError(
            f"The {kind} test-bed folder {root!r} has no model_index.json; build it with "
            f"`python scripts/testbed/{script}` (docs/{doc})."
        )
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if kind == "flow" else {}
    with quiet_loading():
        pipe = DiffusionCLIPPipeline.from_pretrained(
            root, dtype=dtype, **no_t5, **_load_clips(WEIGHTS_DIR, second_clip, dtype)
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
