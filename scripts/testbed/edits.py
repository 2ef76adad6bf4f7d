"""End-to-end edit quality on the shipped test-bed, for several edits with one set of settings (prints a table).

Every colour pair of the world is a different edit; the settings must be the same for all of them. For each edit:
fine-tune on 16 rendered source images (seed ``--seed``), edit ``--num-test`` others (seed ``--seed + 1``), score
with `testbed.edit_success`. About 80-100 s per edit of 64 images on one CPU thread.

    python scripts/testbed/edits.py                                   # RECOMMENDED_FINETUNE, seed 0, 64 images
    python scripts/testbed/edits.py --set global_clip_loss_weight=1.0 # one setting changed on top of it
    python scripts/testbed/edits.py --edits red:blue:circle green:yellow:triangle
    python scripts/testbed/edits.py --seed 5 --num-test 32 --set global_clip_loss_weight=1.0   # a README sweep row
    python scripts/testbed/edits.py --edit-set num_fixed_point_iterations=1       # exact inversion when editing
    python scripts/testbed/edits.py --single-clip                     # the shipped CLIP alone (no clip_2/)
    python scripts/testbed/edits.py --kind latent                     # the latent test-bed, its recommendations
    python scripts/testbed/edits.py --kind flow                       # the flow-matching test-bed (SD3-shaped)
    python scripts/testbed/edits.py --save-images build/edits          # also keep the images, to score them again

Since 2026-12-06 `edit_success` is shape-aware: a colour edit must also keep the source's shape (``shape_ok``), so the
"shape" column is filled for colour edits too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import parse_settings, save_edits  # noqa: E402  (puts src/ on the path)

from diffusionclip_pipeline.testbed import load_pipeline  # noqa: E402
from diffusionclip_pipeline.testbed.demo import run_edit_experiment  # noqa: E402
from diffusionclip_pipeline.testbed.settings import recommended  # noqa: E402

# one edit per source colour, each on a different shape, plus the shape edit the issue asks for
DEFAULT_EDITS = ["red:blue:circle", "green:yellow:triangle", "blue:red:square", "yellow:green:circle",
                 "red:red:circle:square"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edits", nargs="+", default=DEFAULT_EDITS,
                   help="source:target:shape[:target_shape]; target == source: a shape edit")  # fmt: skip
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="finetune settings over RECOMMENDED")
    p.add_argument("--edit-set", nargs="*", default=[], metavar="NAME=VALUE", help="edit settings over RECOMMENDED")
    p.add_argument("--num-test", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", help="another test-bed weights folder (default: the shipped one)")
    p.add_argument("--single-clip", action="store_true", help="leave out the second CLIP (clip_2/): one CLIP loss")
    p.add_argument("--json", help="also append the results here (JSON lines)")
    p.add_argument("--kind", choices=("pixel", "latent", "flow"), default="pixel", help="which test-bed")
    p.add_argument("--save-images", metavar="DIR",
                   help="write each edit's source and edited images (uint8 arrays 'sources' and 'edited') to "
                        "DIR/<source>-<target>-<shape>[-<target shape>]-<kind>-seed<seed>.npz, to score them again "
                        "without fine-tuning")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    try:
        overrides, edit_overrides = parse_settings(args.set), parse_settings(args.edit_set, "--edit-set")
    except ValueError as error:
        p.error(str(error))
    recommended_finetune, recommended_edit = recommended(args.kind)
    settings = {**recommended_finetune, **overrides}
    edit_settings = {**recommended_edit, **edit_overrides}
    clips = "the shipped CLIP only" if args.single_clip else "both CLIPs if the weights have two"
    print(f"settings: {settings}; edit: {edit_settings}; {clips}; seed {args.seed}; {args.num_test} held-out images "
          "per edit\n")  # fmt: skip
    header = "edit | success | colour | ≥ 75 % target-coloured | IoU ≥ 0.7 | shape | background ≤ 0.03 | mean bg"
    print(f"| {header} |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.edits:
        parts = spec.split(":")
        if len(parts) not in (3, 4):
            p.error(f"--edits takes source:target:shape[:target_shape], got {spec!r}")
        source, target, shape = parts[:3]
        target_shape = parts[3] if len(parts) == 4 else None
        pipe = load_pipeline(args.weights, second_clip=not args.single_clip, kind=args.kind)
        pipe.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        result = run_edit_experiment(
            pipe, source, None if target == source else target, shape=shape, target_shape=target_shape,
            num_test=args.num_test, seed=args.seed, finetune_kwargs=overrides, edit_kwargs=edit_overrides,
        )  # fmt: skip
        c = result["criteria"]
        if args.save_images:
            name = f"{spec.replace(':', '-')}-{args.kind}-seed{args.seed}"
            save_edits(args.save_images, name, result["sources"], result["edited"])
        bg = sum(r["background"] for r in result["reports"]) / len(result["reports"])

        def pct(key, c=c):
            return f"{100 * c[key]:.0f} %" if key in c else ""

        name = f"{source} {shape} → {target} {target_shape or shape}"
        print(f"| {name} | **{100 * result['success_rate']:.0f} %** | {pct('colour_ok') or pct('colour_kept')} | "
              f"{pct('fraction_ok')} | {pct('iou_ok')} | {pct('shape_ok')} | {pct('background_ok')} | {bg:.3f} |",
              flush=True)  # fmt: skip
        if args.json:
            record = dict(edit=name, kind=args.kind, settings=settings, edit_settings=edit_settings, seed=args.seed,
                          clip_models=len(pipe.clip_models),
                          num_test=args.num_test, success=result["success_rate"], criteria=c,
                          mean_background_change=bg, seconds=round(time.perf_counter() - start, 1),
                          train_seconds=round(result["train_seconds"], 1),
                          edit_seconds=round(result["edit_seconds"], 1))  # fmt: skip
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
