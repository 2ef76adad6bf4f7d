"""`load_pipeline()`: a ready `DiffusionCLIPPipeline` from the test-bed weights shipped inside the package."""

from __future__ import annotations

import os

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def load_pipeline(weights_dir: str | os.PathLike | None = None, dtype=None, second_clip: bool = True):
    """The test-bed pipeline (tiny DDPM + tiny CLIP of the shapes world), loaded offline from ``weights_dir``.

    Args:
        weights_dir (`str`, *optional*): A folder with ``unet/``, ``scheduler/``, ``clip/`` and ``tokenizer/``, and
            optionally ``clip_2/`` + ``tokenizer_2/`` (default: the weights shipped in the package).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): Some weights are stored in fp16; all are
            cast to ``dtype``.
        second_clip (`bool`, *optional*, defaults to `True`): Load the second CLIP (``clip_2/``) if the folder has
            one; fine-tuning then averages the CLIP loss over both (why: docs/testbed-experiments.md, "Two CLIPs").

    Returns:
        [`DiffusionCLIPPipeline`]: on the CPU, progress bars off (also while loading).
    """
    import torch
    from diffusers import DDPMScheduler, UNet2DModel
    from transformers import CLIPModel, CLIPTokenizer

    from ..cli import quiet_loading
    from ..pipeline_diffusionclip import DiffusionCLIPPipeline

    dtype = torch.float32 if dtype is None else dtype

    root = os.fspath(weights_dir or WEIGHTS_DIR)
    missing = [d for d in ("unet", "scheduler", "clip", "tokenizer") if not os.path.isdir(os.path.join(root, d))]
    if missing:
        raise FileNotFoundError(f"The test-bed weights folder {root!r} lacks {missing}.")
    with quiet_loading():  # no "Loading weights: 100%|...| 110/110" bars for a local, tiny model
        unet = UNet2DModel.from_pretrained(os.path.join(root, "unet"), dtype=dtype)
        scheduler = DDPMScheduler.from_pretrained(os.path.join(root, "scheduler"))
        clip_model = CLIPModel.from_pretrained(os.path.join(root, "clip"), dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
        clip_model_2 = tokenizer_2 = None
        if second_clip and os.path.isdir(os.path.join(root, "clip_2")):
            clip_model_2 = CLIPModel.from_pretrained(os.path.join(root, "clip_2"), dtype=dtype)
            tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer_2"))
    pipe = DiffusionCLIPPipeline(
        unet=unet, scheduler=scheduler, clip_model=clip_model, clip_tokenizer=tokenizer,
        clip_model_2=clip_model_2, clip_tokenizer_2=tokenizer_2,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
