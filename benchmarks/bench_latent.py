"""Fine-tuning through a decoder: time per step and peak memory on Stable Diffusion 1.5's real architecture.

Random weights in SD 1.5's UNet (860 M), VAE (84 M) and text encoder (123 M) configs, and TAESD's `AutoencoderTiny`
config, at ``--resolution`` (latents at 1/8); one process per configuration, so each peak RSS is its own. Side by
side with the pixel CelebA-HQ DDPM architecture (`google/ddpm-celebahq-256`'s config) at the same resolution. The
CLIP of the loss is the test-bed's tiny shipped CLIP in every configuration (its cost is the same for all).

    python benchmarks/bench_latent.py --resolution 256          # the table of docs/latent.md
    python benchmarks/bench_latent.py --tiny                    # smoke run at toy size (used by the tests)

Columns: seconds per optimizer step (median over the timed steps, scheme "efficient", batch 1: one UNet forward,
one decode, CLIP and a backward through both), peak RSS of the process above the models' own memory, and an edit's
cost (UNet calls and seconds for 40 + 40 steps, extrapolated from a 4 + 4 step edit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)  # fmt: skip
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu",
)  # fmt: skip
CELEBA_UNET = dict(
    in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
)  # fmt: skip
CONFIGS = ("pixel CelebA-HQ DDPM", "SD 1.5, full VAE decoder", "SD 1.5, checkpointed decoder", "SD 1.5, TAESD decoder")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(name: str, resolution: int, tiny: bool):
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffusionclip_pipeline import DiffusionCLIPPipeline
    from diffusionclip_pipeline.testbed import WEIGHTS_DIR

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(WEIGHTS_DIR, "tokenizer"))
    clip = dict(clip_model=CLIPModel.from_pretrained(os.path.join(WEIGHTS_DIR, "clip")), clip_tokenizer=tokenizer)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear" if "SD" in name else "linear")
    shrink = 8 if tiny else 1
    if name.startswith("pixel"):
        channels = tuple(c // shrink for c in CELEBA_UNET["block_out_channels"])
        unet = UNet2DModel(**{**CELEBA_UNET, "block_out_channels": channels}, sample_size=resolution,
                           norm_num_groups=32 // shrink)  # fmt: skip
        return DiffusionCLIPPipeline(unet=unet, scheduler=scheduler, **clip), None
    unet = UNet2DConditionModel(
        **{**SD15_UNET, "block_out_channels": tuple(c // shrink for c in SD15_UNET["block_out_channels"])},
        norm_num_groups=32 // shrink if tiny else 32,
    ).eval()
    unet.register_to_config(sample_size=resolution // 8)
    vae = AutoencoderKL(
        **{**SD15_VAE, "block_out_channels": tuple(c // shrink for c in SD15_VAE["block_out_channels"])},
        norm_num_groups=32 // shrink if tiny else 32,
    ).eval()
    text_config = dict(SD15_TEXT, num_hidden_layers=2) if tiny else SD15_TEXT
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
    pipe = DiffusionCLIPPipeline(
        unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, **clip
    )
    loss_vae = AutoencoderTiny().eval() if "TAESD" in name else None  # TAESD's architecture (its default config)
    return pipe, loss_vae


def time_finetune_steps(pipe, loss_vae, name: str, image, steps: int) -> tuple[float, float, int]:
    """``steps + 1`` optimizer steps of the efficient scheme on ``image`` (the first one warms up), timed at every
    `Trainer.backward_and_step`; returns the median seconds per step, the whole fine-tuning's seconds and the number
    of steps timed. ``name`` containing "checkpointed" checkpoints the loss's decoder."""
    from diffusionclip_pipeline.training.trainer import Trainer

    stamps = []
    original = Trainer.backward_and_step

    def timed(self, loss, where):
        original(self, loss, where)
        stamps.append(time.perf_counter())

    Trainer.backward_and_step = timed
    settings = dict(t0=500, num_inversion_steps=2, num_train_steps=steps + 1, num_epochs=1, batch_size=1,
                    clip_num_augmentations=0, lora_rank=4)  # fmt: skip
    if "checkpointed" in name:
        settings["decoder_gradient_checkpointing"] = True
    start = time.perf_counter()
    try:
        pipe.finetune("red circle", "blue circle", images=image, loss_vae=loss_vae, **settings)
    finally:
        Trainer.backward_and_step = original
    total = time.perf_counter() - start
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:])), total, len(stamps) - 1


def worker(name: str, resolution: int, tiny: bool, steps: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    pipe, loss_vae = build(name, resolution, tiny)
    pipe.set_progress_bar_config(disable=True)
    models_mb = rss_mb()
    image = torch.rand(1, 3, resolution, resolution) * 2 - 1
    per_step, total, _ = time_finetune_steps(pipe, loss_vae, name, image, steps)
    start = time.perf_counter()
    pipe.edit(image, t0=500, num_inversion_steps=4, num_inference_steps=4, output_type="pt")
    edit_s = (time.perf_counter() - start) / 8 * 80
    return {"name": name, "step_s": per_step, "finetune_s": total, "peak_mb": rss_mb(), "models_mb": models_mb,
            "edit_80_calls_s": edit_s}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per configuration")
    parser.add_argument("--tiny", action="store_true", help="toy-size models (a smoke run)")
    parser.add_argument("--only", default=None, help="run one configuration in this process (internal)")
    args = parser.parse_args(argv)
    if args.only is not None:
        print(json.dumps(worker(args.only, args.resolution, args.tiny, args.steps)))
        return
    rows = []
    for name in CONFIGS:
        cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--resolution", str(args.resolution),
               "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            rows.append({"name": name, "error": (result.stderr.strip().splitlines() or ["?"])[-1][:80]})
        else:
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"  done {name}", file=sys.stderr)
    base = next((r for r in rows if "step_s" in r and r["name"].startswith("SD 1.5, full")), None)
    print(f"\nFine-tuning step at {args.resolution} px ({'toy size' if args.tiny else 'real configs'}, CPU, "
          f"{os.environ.get('BENCH_THREADS', '1')} thread(s))\n")  # fmt: skip
    print("| configuration | s / step | vs full decoder | peak RSS MB | models MB | edit 40+40 s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} | | | | |")
            continue
        ratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"
        print(f"| {r['name']} | {r['step_s']:.2f} | {ratio} | {r['peak_mb']:.0f} | {r['models_mb']:.0f} | "
              f"{r['edit_80_calls_s']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
