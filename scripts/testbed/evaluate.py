"""Measure the test-bed models and print a table.

Measurements (all in float32, on fresh data that training never saw as such):

- CLIP zero-shot accuracy on 256 rendered images (seed 31337): argmax over the 12 prompts
  "a photo of a {colour} {shape}"; colour, shape and joint accuracy. Also the mean cosine between image and text
  directions for 64 same-geometry colour swaps (``E_I(b) - E_I(a)`` vs ``E_T("a blue circle") - E_T("a red
  circle")``). The same for the second CLIP (``clip_2/``) when the weights folder has one.
- DDPM: fraction of 64 unconditional DDIM samples (50 steps, eta 0, clip_sample=False, noise seed 0) that are
  one clean shape (``world.is_clean_shape``), with counts per colour / shape of the clean ones.
- DDIM invert -> regenerate MAE on a [0, 1] scale over 64 rendered images (seed 2025): t0 = 500, 40 + 40 steps
  on ``round(linspace(0, 500, 41))``, UNet at the source timestep during inversion; also at t0 = 400 and 300, and
  the fraction of images whose regenerated foreground mask keeps IoU >= 0.7 with the source (a few images come
  back as another shape, which the mean hides).

Run time: about 1.5 min on one thread.

Usage::

    python scripts/testbed/evaluate.py                                  # the shipped weights
    python scripts/testbed/evaluate.py --weights build/testbed/export   # another export
    python scripts/testbed/evaluate.py --unet build/testbed/ddpm/ema_unet --scheduler build/testbed/ddpm/scheduler \
        --clip build/testbed/clip/clip --tokenizer build/testbed/clip/tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import batch_to_tensor, ddim_sample, invert_regenerate, save_grid, score_samples, tensor_to_uint8, world  # noqa: E402,I001

DEFAULT_WEIGHTS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "src", "diffusionclip_pipeline", "testbed", "weights"
)

TARGETS = {"colour_acc": 0.95, "shape_acc": 0.90, "clean_frac": 0.80, "inv_mae": 0.03}


def load(args):
    from diffusers import DDPMScheduler, UNet2DModel
    from transformers import CLIPModel, CLIPTokenizer

    w = args.weights
    unet = UNet2DModel.from_pretrained(args.unet or os.path.join(w, "unet")).float().eval()
    sched = DDPMScheduler.from_pretrained(args.scheduler or os.path.join(w, "scheduler"))
    clip = CLIPModel.from_pretrained(args.clip or os.path.join(w, "clip")).float().eval()
    tok = CLIPTokenizer.from_pretrained(args.tokenizer or os.path.join(w, "tokenizer"))
    second = None
    if not (args.clip or args.tokenizer) and os.path.isdir(os.path.join(w, "clip_2")):
        second = (
            CLIPModel.from_pretrained(os.path.join(w, "clip_2")).float().eval(),
            CLIPTokenizer.from_pretrained(os.path.join(w, "tokenizer_2")),
        )
    return unet, sched, clip, tok, second


@torch.no_grad()
def eval_clip(clip, tok, n: int = 256, seed: int = 31337) -> dict:
    from train_clip import colour_peak
    from train_clip import evaluate as clip_eval  # same measurement as the training log, other seed

    size = clip.config.vision_config.image_size
    return {**clip_eval(clip, tok, size, n=n, seed=seed), **colour_peak(clip, tok, size, seed=seed + 1)}


@torch.no_grad()
def eval_ddpm(unet, sched, n_samples: int = 64, n_inv: int = 64, grid: str | None = None) -> dict:
    samples = tensor_to_uint8(ddim_sample(unet, sched, n_samples, seed=0, num_steps=50))
    if grid:
        save_grid(samples, grid)
    out = score_samples(samples)
    imgs, _ = world.render_dataset(n_inv, seed=2025, size=unet.config.sample_size)
    src = [np.asarray(i) for i in imgs]
    x0 = batch_to_tensor(np.stack(src))
    for t0, k in ((500, 0), (400, 0), (300, 0), (500, 1)):
        _, rec = invert_regenerate(unet, sched, x0, t0=t0, n_inv=40, n_gen=40, fixed_point=k)
        fp = f"_fp{k}" if k else ""
        suffix = ("" if t0 == 500 else f"_{t0}") + fp
        error = (rec.clamp(-1, 1) - x0).abs() / 2
        out["inv_mae" + suffix], out["inv_max_abs" + suffix] = float(error.mean()), float(error.max())
        # a mean can hide a few images regenerated as another shape or colour: count the ones that keep them
        rec_u8 = tensor_to_uint8(rec)
        ious = [world.mask_iou(world.foreground_mask(a), world.foreground_mask(b)) for a, b in zip(src, rec_u8)]
        out[f"inv_iou_ok_{t0}{fp}"] = float(np.mean(np.array(ious) >= 0.7))
        kept = [world.dominant_colour(a) == world.dominant_colour(b) for a, b in zip(src, rec_u8)]
        out[f"inv_colour_kept_{t0}{fp}"] = float(np.mean(kept))
    return out


def table(res: dict) -> str:
    rows = [
        ("CLIP zero-shot colour acc (256 imgs)", f"{res['colour_acc']:.4f}", ">= 0.95", res["colour_acc"] >= 0.95),
        ("CLIP zero-shot shape acc (256 imgs)", f"{res['shape_acc']:.4f}", ">= 0.90", res["shape_acc"] >= 0.90),
        ("CLIP zero-shot joint acc (256 imgs)", f"{res['joint_acc']:.4f}", "", None),
        ("CLIP direction cosine (64 colour swaps)", f"{res['dir_cos']:.3f}", "", None),
        (
            "CLIP text score: palette colour above off-palette / 25-50 % towards another palette colour / "
            "over-saturated / background tinted 6 % (128 scenes each)",
            " / ".join(
                f"{res['peak_vs_' + k]:.2f}" for k in ("off_palette", "mixed", "saturated", "tinted_background")
            ),
            "",
            None,
        ),
    ]
    if "clip2_colour_acc" in res:
        rows += [
            (
                "Second CLIP (clip_2): zero-shot colour / shape / joint acc (256 imgs)",
                f"{res['clip2_colour_acc']:.4f} / {res['clip2_shape_acc']:.4f} / {res['clip2_joint_acc']:.4f}",
                ">= 0.95 / >= 0.90",
                res["clip2_colour_acc"] >= 0.95 and res["clip2_shape_acc"] >= 0.90,
            ),
            ("Second CLIP: direction cosine (64 colour swaps)", f"{res['clip2_dir_cos']:.3f}", "", None),
            (
                "Second CLIP: text score palette colour above off-palette / mixed / over-saturated / tinted "
                "background",
                " / ".join(
                    f"{res['clip2_peak_vs_' + k]:.2f}"
                    for k in ("off_palette", "mixed", "saturated", "tinted_background")
                ),
                "",
                None,
            ),
        ]
    rows += [
        ("DDPM clean samples (64, DDIM 50)", f"{res['clean_frac']:.3f}", ">= 0.80", res["clean_frac"] >= 0.80),
        ("  clean per colour", json.dumps(res["clean_colours"]), "", None),
        ("  clean per shape", json.dumps(res["clean_shapes"]), "", None),
        (
            "  failures blob / colour / background",
            f"{res['fail_blob']} / {res['fail_colour']} / {res['fail_background']}",
            "",
            None,
        ),
        ("DDIM invert->regenerate MAE (64, t0=500)", f"{res['inv_mae']:.4f}", "<= 0.03", res["inv_mae"] <= 0.03),
        ("  same at t0 = 400 / 300", f"{res['inv_mae_400']:.4f} / {res['inv_mae_300']:.4f}", "", None),
        (
            "  regenerated foreground mask IoU >= 0.7, t0 = 500 / 400 / 300",
            " / ".join(f"{res[f'inv_iou_ok_{t}']:.3f}" for t in (500, 400, 300)),
            "",
            None,
        ),
        (
            "  regenerated foreground keeps its palette colour, t0 = 500 / 400 / 300",
            " / ".join(f"{res[f'inv_colour_kept_{t}']:.3f}" for t in (500, 400, 300)),
            "",
            None,
        ),
        (
            "  t0 = 500 with one fixed-point iteration per inversion step: MAE / IoU >= 0.7 / colour kept",
            f"{res['inv_mae_fp1']:.4f} / {res['inv_iou_ok_500_fp1']:.3f} / {res['inv_colour_kept_500_fp1']:.3f}",
            "",
            None,
        ),
    ]
    lines = ["| measurement | value | target | ok |", "|---|---|---|---|"]
    for name, val, tgt, ok in rows:
        lines.append(f"| {name} | {val} | {tgt} | {'' if ok is None else ('yes' if ok else 'NO')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=DEFAULT_WEIGHTS)
    p.add_argument("--unet")
    p.add_argument("--scheduler")
    p.add_argument("--clip")
    p.add_argument("--tokenizer")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--grid", help="save the 64 DDIM samples as a PNG grid here")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t = time.time()
    unet, sched, clip, tok, second = load(args)
    res = eval_clip(clip, tok)
    if second is not None:  # the optional second CLIP (`clip_2/`), same measurements, keys prefixed "clip2_"
        res.update({f"clip2_{k}": v for k, v in eval_clip(*second).items()})
    res.update(eval_ddpm(unet, sched, grid=args.grid))
    res["eval_s"] = round(time.time() - t, 1)
    res["all_targets_met"] = bool(
        res["colour_acc"] >= TARGETS["colour_acc"]
        and res["shape_acc"] >= TARGETS["shape_acc"]
        and res["clean_frac"] >= TARGETS["clean_frac"]
        and res["inv_mae"] <= TARGETS["inv_mae"]
        and res.get("clip2_colour_acc", 1.0) >= TARGETS["colour_acc"]
        and res.get("clip2_shape_acc", 1.0) >= TARGETS["shape_acc"]
    )
    print(table(res))
    print(f"\nall targets met: {res['all_targets_met']}  ({res['eval_s']} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
