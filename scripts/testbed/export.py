"""Export the trained test-bed models into ``src/diffusionclip_pipeline/testbed/weights/`` with measured metrics.

Layout written (diffusers / transformers ``save_pretrained``, safetensors)::

    weights/unet/        config.json + diffusion_pytorch_model.safetensors   (EMA weights, fp16 storage)
    weights/scheduler/   scheduler_config.json                               (DDPMScheduler, linear 1e-4..0.02,
                                                                               1000 steps, clip_sample=False)
    weights/clip/        config.json + model.safetensors                     (float32)
    weights/tokenizer/   tokenizer.json + tokenizer_config.json
    weights/clip_2/      config.json + model.safetensors                     (second CLIP, fp16 storage)
    weights/tokenizer_2/ tokenizer.json + tokenizer_config.json
    weights/METRICS.md   measured numbers (scripts/testbed/evaluate.py on the exported files) + commands

The export is staged in ``--stage`` (default ``build/testbed/export``), measured there with ``evaluate.py``
(float32 compute on the stored weights), and copied into ``--out`` only if every target is met (or with
``--force``; METRICS.md then says which targets were missed). Total size must be <= 10 MB.
Load fp16-stored weights with ``UNet2DModel.from_pretrained(dir, dtype=torch.float32)`` to compute in float32.

Run time: about 2 min (mostly the evaluation), one thread.

Usage::

    python scripts/testbed/export.py
    python scripts/testbed/export.py --unet build/testbed/ddpm/ema_unet --clip-dir build/testbed/clip --force
    python scripts/testbed/export.py --clip-2-dir ""          # without the second CLIP
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import evaluate as ev  # noqa: E402
from train_ddpm import build_scheduler  # noqa: E402

MAX_BYTES = 10 * 1024 * 1024


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def last_log(path: str, kind: str) -> dict | None:
    if not os.path.exists(path):
        return None
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if r.get("kind") == kind]
    return rows[-1] if rows else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ddpm-dir", default="build/testbed/ddpm")
    p.add_argument("--unet", help="defaults to <ddpm-dir>/ema_unet")
    p.add_argument("--clip-dir", default="build/testbed/clip")
    p.add_argument(
        "--clip-2-dir",
        default="build/testbed/clip2",
        help="the second CLIP (train_clip.py --mix-frac 0 --off-frac 0.3 --tint-frac 0.25); '' for none",
    )
    p.add_argument("--stage", default="build/testbed/export")
    p.add_argument("--out", default=ev.DEFAULT_WEIGHTS)
    p.add_argument("--no-fp16", action="store_true", help="store the UNet in float32")
    p.add_argument("--force", action="store_true", help="copy even if a target is missed")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import UNet2DModel
    from transformers import CLIPModel, CLIPTokenizer

    stage = args.stage
    if os.path.exists(stage):
        shutil.rmtree(stage)
    os.makedirs(stage)
    unet_dir = args.unet or os.path.join(args.ddpm_dir, "ema_unet")
    unet = UNet2DModel.from_pretrained(unet_dir, dtype=torch.float32 if args.no_fp16 else torch.float16)
    unet.save_pretrained(os.path.join(stage, "unet"), safe_serialization=True)
    build_scheduler().save_pretrained(os.path.join(stage, "scheduler"))
    clip = CLIPModel.from_pretrained(os.path.join(args.clip_dir, "clip"), dtype=torch.float32)
    clip.save_pretrained(os.path.join(stage, "clip"), safe_serialization=True)
    CLIPTokenizer.from_pretrained(os.path.join(args.clip_dir, "tokenizer")).save_pretrained(
        os.path.join(stage, "tokenizer")
    )
    clip_2 = None
    if args.clip_2_dir:  # stored in fp16 to stay under 10 MB; loaded (and measured) in float32
        clip_2 = CLIPModel.from_pretrained(os.path.join(args.clip_2_dir, "clip"), dtype=torch.float16)
        clip_2.save_pretrained(os.path.join(stage, "clip_2"), safe_serialization=True)
        CLIPTokenizer.from_pretrained(os.path.join(args.clip_2_dir, "tokenizer")).save_pretrained(
            os.path.join(stage, "tokenizer_2")
        )
    size = dir_bytes(stage)
    if size > MAX_BYTES:
        raise SystemExit(f"export is {size / 1e6:.2f} MB > 10 MB")

    res = ev.main(
        [
            "--weights",
            stage,
            "--json",
            os.path.join(stage, "metrics.json"),
            "--grid",
            os.path.join(stage, "..", "export_samples.png"),
            "--threads",
            str(args.threads),
        ]
    )
    ddpm_done = last_log(os.path.join(os.path.dirname(os.path.abspath(unet_dir)), "log.jsonl"), "eval") or {}
    clip_done = last_log(os.path.join(args.clip_dir, "log.jsonl"), "eval") or {}
    parts = ("unet", "scheduler", "clip", "tokenizer") + (("clip_2", "tokenizer_2") if clip_2 is not None else ())
    sizes = {d: dir_bytes(os.path.join(stage, d)) for d in parts}
    clip_2_done = (last_log(os.path.join(args.clip_2_dir, "log.jsonl"), "eval") or {}) if clip_2 is not None else {}
    cmd = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    md = (
        [
            "# Test-bed weights: measured metrics",
            "",
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `scripts/testbed/evaluate.py` on the "
            "exported files (float32 compute, 1 CPU thread).",
            "",
            ev.table(res),
            "",
            f"All targets met: **{res['all_targets_met']}**.",
            "",
            "## Provenance",
            f"- UNet: EMA weights after {ddpm_done.get('step', '?')} steps of `scripts/testbed/train_ddpm.py` "
            f"({sum(q.numel() for q in unet.parameters())} parameters, stored "
            f"{'float32' if args.no_fp16 else 'float16'}).",
            f"- CLIP: {clip_done.get('step', '?')} steps of `scripts/testbed/train_clip.py` "
            f"({sum(q.numel() for q in clip.parameters())} parameters, float32).",
        ]
        + (
            [
                f"- Second CLIP (`clip_2/`): {clip_2_done.get('step', '?')} steps of `scripts/testbed/train_clip.py "
                "--mix-frac 0 --off-frac 0.3 --tint-frac 0.25` "
                f"({sum(q.numel() for q in clip_2.parameters())} parameters, "
                "stored float16).",
            ]
            if clip_2 is not None
            else []
        )
        + [
            "- Sizes (bytes): " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + f"; total {sum(sizes.values())}.",
            "",
            "## Commands",
            "```",
            cmd,
            "python scripts/testbed/evaluate.py   # re-measure the shipped weights",
            "```",
            "",
        ]
    )
    with open(os.path.join(stage, "METRICS.md"), "w") as f:
        f.write("\n".join(md))
    os.remove(os.path.join(stage, "metrics.json"))
    if not (res["all_targets_met"] or args.force):
        raise SystemExit(f"targets missed; staged in {stage}, not copied (use --force to ship anyway)")
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    shutil.copytree(stage, args.out)
    print(f"exported to {args.out} ({sum(sizes.values()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
