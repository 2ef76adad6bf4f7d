"""Export the latent test-bed (``train_latent.py``'s VAE + EMA UNet) as a Stable Diffusion folder, measured.

Layout written into ``src/diffusionclip_pipeline/testbed/weights_latent/`` (what ``StableDiffusionPipeline`` and
``DiffusionCLIPPipeline.from_pretrained`` read; no safety checker, no feature extractor)::

    model_index.json   StableDiffusionPipeline, requires_safety_checker false
    vae/               AutoencoderKL, fp16 storage, scaling_factor = 1 / std of the latents
    text_encoder/      CLIPTextModel: the text tower of the pixel test-bed's CLIP (weights/clip), fp16 storage
    tokenizer/         that CLIP's tokenizer (16 tokens)
    unet/              UNet2DConditionModel, EMA weights, fp16 storage
    scheduler/         DDPMScheduler (the pixel test-bed's linear 1e-4..0.02 schedule)
    METRICS.md         the measurements below, with the commands

Measured on the staged files (float32 compute), as issue 22 asks:

- autoencoder reconstruction MAE on 256 fresh images (the pipeline's encoding: posterior mean), target <= 0.02;
- 64 samples of the **stock** ``StableDiffusionPipeline`` loaded from the folder, conditioned on "a {colour}
  {shape}" (cycling over the 12 pairs; DDIM 50 steps, eta 0, guidance 1): the fraction that is one clean shape of
  that colour and shape, target >= 0.8;
- 64 samples with the empty prompt: fraction of clean shapes, target >= 0.8;
- ``DiffusionCLIPPipeline.edit`` without an adapter (DDIM invert -> regenerate, t0 500, 40 + 40 steps, empty
  prompt) on 64 fresh images: MAE, target <= 0.03.

The whole package's shipped weights must stay <= 20 MB. Run time: about 3 min, one thread.

Usage::

    python scripts/testbed/export_latent.py                 # build/testbed/latent -> the package
    python scripts/testbed/export_latent.py --measure-only  # re-measure the shipped folder
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402,I001
    command_line, dir_bytes, done_record, export_folder, met, metrics_table, read_log, save_grid, ship,
    subfolder_bytes, to_uint8, world, write_metrics,
)  # fmt: skip
from train_latent import load_text_encoder  # noqa: E402

from diffusionclip_pipeline.testbed.pipeline import LATENT_WEIGHTS_DIR, WEIGHTS_DIR  # noqa: E402

MAX_PACKAGE_BYTES = 20 * 1024 * 1024
PACKAGE_WEIGHTS = os.path.dirname(WEIGHTS_DIR)


def stage_folder(src: str, stage: str) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(os.path.join(src, "vae", "export"), dtype=torch.float16)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(src, "unet", "ema_unet"), dtype=torch.float16)
    # steps_offset 1 as SD's schedulers (the stock pipeline warns otherwise); DiffusionCLIPPipeline's grids ignore it
    scheduler = DDPMScheduler.from_pretrained(os.path.join(src, "unet", "scheduler"), steps_offset=1)
    text_encoder, tokenizer = load_text_encoder(WEIGHTS_DIR)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.half(), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(stage, safe_serialization=True)


@torch.no_grad()
def measure(folder: str) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffusionclip_pipeline.evaluation import mean_absolute_error
    from diffusionclip_pipeline.image_processing import preprocess_image
    from diffusionclip_pipeline.pipeline_diffusionclip import NoAdapterWarning
    from diffusionclip_pipeline.testbed import load_pipeline

    res = {}
    # 1. autoencoder, through the pipeline's own encoding (posterior mean x scaling factor)
    pipe = load_pipeline(folder, kind="latent", second_clip=False)
    imgs, _ = world.render_dataset(256, seed=2024)
    x = preprocess_image(imgs, 32)
    rec = pipe.decode_latents(pipe.encode_image(x))
    res["vae_mae"] = float(((rec.clamp(-1, 1) - x).abs() / 2).mean())

    # 2./3. samples of the stock StableDiffusionPipeline
    sd = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    sd.set_progress_bar_config(disable=True)
    pairs = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    prompts = [world.caption(*pairs[k % len(pairs)]) for k in range(64)]
    out = sd(prompts, num_inference_steps=50, guidance_scale=1.0, output_type="np",
             generator=torch.Generator().manual_seed(1234)).images  # fmt: skip
    cond = to_uint8(out)
    right = []
    for k, im in enumerate(cond):
        rep = world.clean_shape_report(im)
        colour, shape = pairs[k % len(pairs)]
        right.append(bool(rep["clean"] and rep["colour"] == colour and world.classify_shape(im)[0] == shape))
    res["cond_right"] = float(np.mean(right))
    out = sd([""] * 64, num_inference_steps=50, guidance_scale=1.0, output_type="np",
             generator=torch.Generator().manual_seed(4321)).images  # fmt: skip
    uncond = to_uint8(out)
    res["uncond_clean"] = float(np.mean([world.is_clean_shape(im) for im in uncond]))

    # 4. DDIM round trip through DiffusionCLIPPipeline.edit without an adapter
    imgs, _ = world.render_dataset(64, seed=2025)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoAdapterWarning)
        rec = pipe.edit(imgs, t0=500, num_inversion_steps=40, num_inference_steps=40, output_type="np").images
    res["round_trip_mae"] = mean_absolute_error(rec, imgs)
    res["samples"] = np.concatenate([cond[:32], uncond[:32]])
    return res


TARGETS = {"vae_mae": ("<=", 0.02), "cond_right": (">=", 0.8), "uncond_clean": (">=", 0.8),
           "round_trip_mae": ("<=", 0.03)}  # fmt: skip
LABELS = {
    "vae_mae": "autoencoder reconstruction MAE (256 fresh images)",
    "cond_right": 'stock StableDiffusionPipeline, 64 samples of "a {colour} {shape}": one clean shape, right both',
    "uncond_clean": "stock StableDiffusionPipeline, 64 samples of the empty prompt: one clean shape",
    "round_trip_mae": "DiffusionCLIPPipeline.edit without adapter (t0 500, 40 + 40 steps), 64 fresh images: MAE",
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", default="build/testbed/latent")
    p.add_argument("--stage", default="build/testbed/export_latent")
    p.add_argument("--out", default=LATENT_WEIGHTS_DIR)
    p.add_argument("--measure-only", action="store_true", help="measure --out as it is")
    p.add_argument("--force", action="store_true", help="copy even if a target is missed")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = export_folder(args, lambda: stage_folder(args.src, args.stage))
    t = time.time()
    res = measure(folder)
    save_grid(res.pop("samples"), os.path.join(os.path.dirname(os.path.abspath(folder)), "latent_samples.png"))
    ok = {k: met(TARGETS, k, v) for k, v in res.items()}
    sizes = subfolder_bytes(folder)
    pixel_bytes = dir_bytes(WEIGHTS_DIR)
    total = pixel_bytes + sum(sizes.values())
    logs = {}
    for stage in ("vae", "unet"):
        rows = read_log(os.path.join(args.src, stage, "log.jsonl"))
        if rows is not None:
            logs[stage] = done_record(rows)
    cmd = command_line(__file__, argv)
    lines = [
        "# Latent test-bed weights: measured metrics",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `scripts/testbed/export_latent.py` on the "
        f"exported files (float32 compute, {args.threads} CPU thread(s), {time.time() - t:.0f} s).",
        "",
        *metrics_table(res, LABELS, TARGETS, ok),
        "",
        "## Provenance",
        f"- VAE: {logs.get('vae', {}).get('step', '?')} steps of `scripts/testbed/train_latent.py --stage vae`, "
        f"scaling_factor {logs.get('vae', {}).get('scaling_factor', '?')}.",
        f"- UNet: EMA weights after {logs.get('unet', {}).get('step', '?')} steps of "
        "`scripts/testbed/train_latent.py --stage unet`.",
        "- Text encoder: the text tower of the pixel test-bed's CLIP (`weights/clip`), frozen during training.",
        "- Sizes (bytes): " + ", ".join(f"{k} {v}" for k, v in sizes.items())
        + f"; this folder {sum(sizes.values())}; with the pixel test-bed {total} (limit {MAX_PACKAGE_BYTES}).",
        "",
        "## Commands",
        "```",
        "python scripts/testbed/train_latent.py --stage vae ...   # see docs/testbed-latent.md",
        "python scripts/testbed/train_latent.py --stage unet ...",
        cmd,
        "```",
        "",
    ]  # fmt: skip
    write_metrics(os.path.join(folder, "METRICS.md"), "\n".join(lines))
    if total > MAX_PACKAGE_BYTES:
        raise SystemExit(f"shipped weights would be {total} bytes > {MAX_PACKAGE_BYTES}")
    ship(args, ok)


if __name__ == "__main__":
    main()
