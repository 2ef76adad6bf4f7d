"""The paper's editing modes measured on the shipped test-bed (prints a report; about 5 minutes on 1 CPU thread).

1. Edit strength r: the foreground's share of target-coloured pixels for r = 0, 0.25, ..., 1 (should rise with r).
2. Multi-attribute: a colour adapter (red -> blue circle) and a shape adapter (circle -> square), mixed;
   success = blue by every colour criterion and classified as a square.
3. Stroke -> image: crude inputs (an outline, a noisy scribble fill, the shape on a tinted background) pulled onto
   the world by `translate`; success = one clean shape whose mask overlaps the stroke's filled shape (IoU >= 0.5).

    python scripts/testbed/modes.py
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from diffusionclip_pipeline.noise_mixing import piecewise_weights  # noqa: E402
from diffusionclip_pipeline.testbed import (  # noqa: E402
    RECOMMENDED_EDIT,
    RECOMMENDED_FINETUNE,
    colour_fraction,
    edit_success,
    foreground_mask,
    is_clean_shape,
    load_pipeline,
    mask_iou,
    render_dataset,
)


def strokes(seed: int, n: int) -> list[tuple[str, Image.Image, np.ndarray]]:
    """(kind, crude image, mask of the filled shape it stands for)."""
    rng = np.random.default_rng(seed)
    images, _ = render_dataset(n, seed=seed)
    out = []
    for i, image in enumerate(images):
        mask = foreground_mask(image)
        a = np.asarray(image).astype(np.float32)
        kind = ("outline", "scribble", "background")[i % 3]
        if kind == "outline":  # keep only the boundary pixels of the shape
            inner = mask.copy()
            inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
            a[inner] = 255.0
        elif kind == "scribble":  # a noisy, partial fill: 40 % of the shape's pixels whitened, colour jittered
            holes = mask & (rng.random(mask.shape) < 0.4)
            a[mask] += rng.normal(0, 35, size=a[mask].shape)
            a[holes] = 255.0
        else:  # the shape on a wrongly coloured background
            a[~mask] = np.array([200.0, 225.0, 245.0])
        out.append((kind, Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)), mask))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-test", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline()
    train, _ = render_dataset(16, seed=0, shape="circle", colour="red")
    test, _ = render_dataset(args.num_test, seed=1, shape="circle", colour="red")

    # 1. strength
    pipe.finetune("red circle", "blue circle", images=train, adapter_name="blue", **RECOMMENDED_FINETUNE)
    print("\n1. edit strength r (red circle -> blue circle): mean share of blue foreground pixels")
    print("| r | blue share | shape kept | success |\n|---|---|---|---|")
    shares = []
    for r in (0.0, 0.25, 0.5, 0.75, 1.0):
        edited = pipe.edit(test, edit_strength=r, **RECOMMENDED_EDIT).images
        share = np.mean([colour_fraction(e, "blue", foreground_mask(e)) for e in edited])
        reports = [edit_success(s, e, target_colour="blue") for s, e in zip(test, edited)]
        kept, success = np.mean([r["shape_ok"] for r in reports]), np.mean([r["success"] for r in reports])
        shares.append(share)
        print(f"| {r:.2f} | {share:.3f} | {kept:.0%} | {success:.0%} |")
    print(f"monotonic in r: {all(b >= a for a, b in zip(shares, shares[1:]))}")

    # 2. multi-attribute
    # the shape adapter's prompts name no colour; without the global term (which tints the background pink on shape
    # edits, as measured) it changes the shape and little else
    shape_settings = {**RECOMMENDED_FINETUNE, "global_clip_loss_weight": 0.0}
    pipe.finetune("circle", "square", images=train, adapter_name="square", **shape_settings)
    print("\n2. multi-attribute: blue adapter + square adapter -> 'blue square'")
    print("| mix | colour ok | shape ok | both |\n|---|---|---|---|")
    mixes = {
        "0.5 / 0.5": {"blue": 0.5, "square": 0.5},
        "1 / 1 (sum 2)": {"blue": 1.0, "square": 1.0},
        "square t>=250, blue below": piecewise_weights({250: {"square": 1, "blue": 0}, 0: {"square": 0, "blue": 1}}),
        "blue t>=250, square below": piecewise_weights({250: {"square": 0, "blue": 1}, 0: {"square": 1, "blue": 0}}),
    }
    for name, mix in mixes.items():
        edited = pipe.edit(test, adapters=mix, **RECOMMENDED_EDIT).images
        reports = [edit_success(s, e, target_colour="blue", target_shape="square") for s, e in zip(test, edited)]
        colour = np.mean([r["colour_ok"] and r["fraction_ok"] for r in reports])
        shape = np.mean([r["shape_ok"] for r in reports])
        both = np.mean([r["colour_ok"] and r["fraction_ok"] and r["shape_ok"] for r in reports])
        print(f"| {name} | {colour:.0%} | {shape:.0%} | {both:.0%} |")

    # 3. strokes
    pipe.disable_lora()
    print("\n3. stroke -> image: translate(t0=500, n_iter=10), then clean shape with IoU >= 0.5 to the stroke's shape")
    print("| input | clean | overlap | success |\n|---|---|---|---|")
    items = strokes(seed=7, n=3 * args.num_test)
    generator = torch.Generator().manual_seed(0)
    domain = pipe.translate([im for _, im, _ in items], t0=500, n_iter=10, generator=generator).domain_images
    for kind in ("outline", "scribble", "background"):
        rows = [(d, m) for (k, _, m), d in zip(items, domain) if k == kind]
        clean = [is_clean_shape(d) for d, _ in rows]
        overlap = [mask_iou(foreground_mask(d), m) >= 0.5 for d, m in rows]
        both = [c and o for c, o in zip(clean, overlap)]
        print(f"| {kind} | {np.mean(clean):.0%} | {np.mean(overlap):.0%} | {np.mean(both):.0%} |")


if __name__ == "__main__":
    main()
