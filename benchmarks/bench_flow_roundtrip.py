"""Round-trip error of the flow inversion against the step count (issue 31), on the tiny SD3 components of the tests
(random weights, 16 px, 8 x 8 x 4 latents, shift 3) or the tiny Flux components (``--family flux``: 8 x 8 x 4
latents packed into 16 tokens, dynamic shift, guidance embedding; ``--guidance`` sets the embedded guidance value,
`FluxFamily.guidance`, default 1.0).

The round trip is `edit` with no adapter: invert to ``t0`` with S Euler steps, regenerate with S steps; the error is
the mean absolute difference of the regenerated latents from the clean latents (the VAE's own reconstruction error is
left out), for plain Euler inversion and with fixed-point refinement.

Usage::

    python benchmarks/bench_flow_roundtrip.py                  # tiny SD3 components
    python benchmarks/bench_flow_roundtrip.py --t0 600 --steps 2 4 8 16 32 64
    python benchmarks/bench_flow_roundtrip.py --family flux --guidance 1.0   # tiny Flux; 3.5 = the stock default
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def tiny_pipeline(family: str = "sd3"):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from conftest import make_flux_components, make_sd3_components

    from diffusionclip_pipeline import DiffusionCLIPPipeline

    return DiffusionCLIPPipeline(**(make_flux_components(0) if family == "flux" else make_sd3_components(0)))


@torch.no_grad()
def round_trip_errors(pipe, images, t0: int, steps: list[int], fixed_point: int) -> list[float]:
    z0 = pipe.encode_image(pipe.prepare_image(images))
    errors = []
    for s in steps:
        out = pipe.edit(
            images, t0=t0, num_inversion_steps=s, num_inference_steps=s, num_fixed_point_iterations=fixed_point,
            output_type="latent",
        )  # fmt: skip
        errors.append(float((out.images - z0).abs().mean()))
    return errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t0", type=int, default=600)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--family", choices=("sd3", "flux"), default="sd3")
    parser.add_argument("--guidance", type=float, default=None, help="Flux: the embedded guidance (default 1.0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = tiny_pipeline(args.family)
    pipe.set_progress_bar_config(disable=True)
    if args.guidance is not None:
        if args.family != "flux":
            parser.error("--guidance is Flux's embedded guidance; pass --family flux")
        pipe.family.guidance = args.guidance  # this pipeline's family object only, not the class
    images = torch.rand(args.images, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # [0, 1], as diffusers
    plain = round_trip_errors(pipe, images, args.t0, args.steps, 0)
    fixed = round_trip_errors(pipe, images, args.t0, args.steps, 3)
    name = "SD3" if args.family == "sd3" else f"Flux, guidance {pipe.family.guidance}"
    print(f"tiny {name} (random weights), t0 {args.t0}, {args.images} images: latent MAE of the round trip")
    print("| steps | Euler inversion | + 3 fixed-point iterations |")
    print("|---|---|---|")
    for s, a, b in zip(args.steps, plain, fixed):
        print(f"| {s} | {a:.2e} | {b:.2e} |")


if __name__ == "__main__":
    main()
