"""How `edit_strength` acts on a test-bed adapter (issue 27): success rate and colour progress vs strength.

Fine-tunes "red circle" -> "blue circle" once (the test-bed's recommended settings, 12 images at data seed 0), then
edits ``--num-test`` held-out circles (seed 1) with the recommended edit at each strength r and reports, per r:
``success`` (the shape-aware `testbed.edit_success`), ``progress`` (the mean foreground colour's move from the source
towards the target colour, projected on red -> blue: 0 = unchanged, 1 = the palette blue) and ``mae`` against the
source. One torch thread; one JSON line per strength in ``--json``.

    python scripts/testbed/strength_curve.py --json build/strength_curve.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from diffusionclip_pipeline.testbed import RECOMMENDED_EDIT, RECOMMENDED_FINETUNE, load_pipeline, world  # noqa: E402

STRENGTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def colour_progress(src: np.ndarray, edited: np.ndarray, source: str, target: str) -> float:
    """Mean foreground colour change along the source -> target palette direction (0 unchanged, 1 the target)."""
    mask = world.foreground_mask(src)
    direction = np.subtract(world.COLOURS[target], world.COLOURS[source], dtype=np.float64)
    change = edited[mask].astype(np.float64).mean(0) - src[mask].astype(np.float64).mean(0)
    return float(change @ direction / (direction @ direction))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-train", type=int, default=12)
    parser.add_argument("--num-test", type=int, default=32)
    parser.add_argument("--json", default="build/strength_curve.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    train, _ = world.render_dataset(args.num_train, seed=0, shape="circle", colour="red")
    test, _ = world.render_dataset(args.num_test, seed=1, shape="circle", colour="red")
    start = time.perf_counter()
    pipe.finetune("red circle", "blue circle", images=train, **RECOMMENDED_FINETUNE)
    print(f"fine-tuned in {time.perf_counter() - start:.0f} s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    latents = pipe.invert(test, t0=RECOMMENDED_EDIT["t0"], num_inversion_steps=RECOMMENDED_EDIT["num_inversion_steps"])
    with open(args.json, "w") as out:
        for r in STRENGTHS:
            edited = pipe.edit(
                latents=latents.x_t0, t0=RECOMMENDED_EDIT["t0"],
                num_inference_steps=RECOMMENDED_EDIT["num_inference_steps"], edit_strength=r, output_type="pil",
            ).images  # fmt: skip
            sources = [world.to_array(s) for s in test]
            arrays = [world.to_array(e) for e in edited]
            reports = [world.edit_success(s, e, "blue") for s, e in zip(sources, arrays)]
            row = {
                "edit_strength": r,
                "success": float(np.mean([report["success"] for report in reports])),
                "progress": float(np.mean([colour_progress(s, e, "red", "blue") for s, e in zip(sources, arrays)])),
                "mae": float(np.mean([np.abs(s / 255.0 - e / 255.0).mean() for s, e in zip(sources, arrays)])),
            }
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
