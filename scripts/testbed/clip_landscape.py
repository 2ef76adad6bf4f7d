"""Which colour does the CLIP loss ask for? The loss of flat-coloured edits of the same shapes, per CLIP and averaged.

For each colour edit ("{src} {shape}" -> "{tar} {shape}") and 8 rendered source images (seed 11), the fine-tuning CLIP
loss (direction + ``--global-weight`` x global term, no random views) of the same shapes recoloured:

- over a grid of 512 flat colours (8 levels per channel, 16 ... 240) plus the palette target: the rank of the palette
  colour (1 = the loss's optimum) and the optimum's colour and RGB distance from the palette colour;
- along the straight path from the source to the target palette colour (8 points, 5 % ... 100 %), and at the other
  palette colours (a wrong-colour attractor scores low here).

Rows for each shipped CLIP and for their average (what fine-tuning with both minimises). About 1 min on one thread.

    python scripts/testbed/clip_landscape.py
    python scripts/testbed/clip_landscape.py --weights DIR   # other CLIPs (a folder laid out like the shipped one)
    python scripts/testbed/clip_landscape.py --edits blue:yellow:circle   # other edits (source:target:shape)
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from diffusionclip_pipeline.testbed import load_pipeline, world  # noqa: E402
from diffusionclip_pipeline.training.losses import CLIPDirectionalLoss  # noqa: E402

EDITS = ["red:blue:circle", "blue:red:square", "green:yellow:triangle", "yellow:green:circle"]
PATH = np.linspace(0.05, 1.0, 8)


@torch.no_grad()
def losses(pipe, loss_fn, src, tar, shape, colours, global_weight, n=8, seed=11):
    """The CLIP loss of the n source scenes recoloured with each of ``colours`` (mean over scenes)."""
    images, metas = world.render_dataset(n, seed=seed, size=32, shape=shape, colour=src)
    source = loss_fn.encode_images(pipe.prepare_image(images, name="images"))
    direction = loss_fn.text_direction(f"{src} {shape}", f"{tar} {shape}")
    target = F.normalize(loss_fn.template_embedding(f"{tar} {shape}"), dim=-1)
    out = []
    for rgb in colours:
        rgb = tuple(int(round(v)) for v in rgb)
        edited = [world.render_shape(m["shape"], tar, m["cx"], m["cy"], m["r"], 32, rgb=rgb) for m in metas]
        embeds = loss_fn.encode_images(pipe.prepare_image(edited, name="images"))
        cos_dir = F.cosine_similarity(embeds - source, direction[None].expand_as(embeds), dim=-1).mean().item()
        out.append((1 - cos_dir) + global_weight * (1 - (embeds @ target).mean().item()))
    return np.array(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--global-weight", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", help="another test-bed weights folder (default: the shipped one)")
    p.add_argument("--edits", nargs="+", default=EDITS, metavar="SRC:TAR:SHAPE", help="colour edits to score")
    args = p.parse_args()
    edits = [spec.split(":") for spec in args.edits]
    for spec, parts in zip(args.edits, edits):
        if len(parts) != 3 or parts[0] not in world.COLOURS or parts[1] not in world.COLOURS:
            p.error(f"--edits: expected colour:colour:shape, colours from {list(world.COLOURS)}, got {spec!r}")
        if parts[2] not in world.SHAPES:
            p.error(f"--edits: the shape must be one of {list(world.SHAPES)}, got {spec!r}")
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.weights)
    loss_fns = [CLIPDirectionalLoss(model, tokenizer) for model, tokenizer in pipe.clip_models]
    levels = np.arange(16, 256, 32)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    palette = {name: np.array(rgb, float) for name, rgb in world.COLOURS.items()}
    print("| edit | CLIP | palette rank (of 513) | optimum (distance) | path 5 % ... 100 % | other palette colours |")
    print("|---|---|---|---|---|---|")
    for src, tar, shape in edits:
        candidates = np.concatenate([grid, palette[tar][None]])
        path = [(1 - t) * palette[src] + t * palette[tar] for t in PATH]
        others = [c for c in palette if c not in (src, tar)]
        rows = []
        for fn in loss_fns:
            rows.append([losses(pipe, fn, src, tar, shape, colours, args.global_weight)
                         for colours in (candidates, path, [palette[c] for c in others])])  # fmt: skip
        names = ["first", "second"][: len(rows)]
        if len(rows) > 1:
            rows.append([sum(parts) / len(rows) for parts in zip(*rows)])
            names.append("average")
        for name, (grid_loss, path_loss, other_loss) in zip(names, rows):
            rank = int((grid_loss < grid_loss[-1]).sum()) + 1
            best = candidates[int(np.argmin(grid_loss))]
            distance = np.linalg.norm(best - palette[tar])
            print(f"| {src} → {tar} {shape} | {name} | {rank} | {tuple(int(v) for v in best)} ({distance:.0f}) | "
                  f"{' '.join(f'{v:.2f}' for v in path_loss)} | "
                  f"{', '.join(f'{c} {v:.2f}' for c, v in zip(others, other_loss))} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
