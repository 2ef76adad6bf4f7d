"""The flow test-bed's round trip through `DiffusionCLIPPipeline.edit` with no adapter (issue 32): invert fresh world
images to ``t0`` by Euler steps up the shifted sigma grid and regenerate them; MAE in [0, 1] against the input, for
several step counts (each way). The autoencoder's own reconstruction error (0.0050, weights_flow/METRICS.md) is part
of every figure.

    python scripts/testbed/flow_round_trip.py                      # t0 400, 8 / 16 / 32 steps, 64 images, seed 11
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import world  # noqa: E402  (puts src/ on the path)

from diffusionclip_pipeline.testbed import load_pipeline  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--t0", type=int, default=400)
    p.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(kind="flow")
    images, _ = world.render_dataset(args.num_images, seed=args.seed)
    source = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    print(f"flow test-bed, edit() with no adapter, t0 {args.t0}, {args.num_images} images (seed {args.seed})")
    print("| steps each way | MAE ([0, 1]) |\n|---|---|")
    for steps in args.steps:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No adapter is active")
            out = pipe.edit(images, t0=args.t0, num_inversion_steps=steps, num_inference_steps=steps, output_type="np")
        print(f"| {steps} | {float(np.abs(out.images - source).mean()):.4f} |", flush=True)


if __name__ == "__main__":
    main()
