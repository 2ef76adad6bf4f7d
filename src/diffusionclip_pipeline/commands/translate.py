"""``diffusionclip translate``: pulls out-of-domain images (strokes) onto the model's domain, then edits them
(`DiffusionCLIPPipeline.translate`); writes the results and a three-row grid."""

from __future__ import annotations

import argparse
import os

from . import loading, output
from .defaults import signature_defaults
from .options import NON_NEGATIVE, POSITIVE, describe, model_arguments
from .registry import RegisteredCommand

__all__ = ["COMMAND", "add_arguments", "run"]

# `DiffusionCLIPPipeline.translate`'s arguments given as options (defaults: the method's, read when help is shown)
OPTIONS = {
    "t0": "noising depth of each round",
    "n_iter": "rounds of noising to --t0 and denoising with the original model",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    parser.add_argument("--images", nargs="+", required=True, help="image files/folders (strokes, other backgrounds)")
    parser.add_argument("--lora", nargs="*",
                        help="adapter(s) for the final edit (default: none, domain translation only)")  # fmt: skip
    parser.add_argument("--output", required=True, help="folder for <name>_translated.png and grid.png")
    parser.add_argument("--t0", type=int, action=POSITIVE, default=None, help=OPTIONS["t0"])
    parser.add_argument("--edit-t0", type=int, action=POSITIVE, default=None,
                        help="inversion depth of the final edit (default: --t0)")  # fmt: skip
    parser.add_argument("--n-iter", type=int, action=POSITIVE, default=None, help=OPTIONS["n_iter"])
    parser.add_argument("--seed", type=int, action=NON_NEGATIVE, default=0, help="seed of the noise the rounds add")
    output.add_overwrite_argument(parser)
    parser.describe_defaults = describe_defaults


def describe_defaults(parser: argparse.ArgumentParser) -> None:
    """``--t0`` and ``--n-iter``'s defaults: `DiffusionCLIPPipeline.translate`'s."""
    from .. import DiffusionCLIPPipeline

    describe(parser, OPTIONS, signature_defaults(DiffusionCLIPPipeline.translate, {k: k for k in OPTIONS}))


def run(args: argparse.Namespace) -> None:
    """``diffusionclip translate``: checks, loads the model and the adapters, translates, writes."""
    from ..image_io import image_grid, unique_stems

    # 1. Check everything before any work
    images, files, registered = loading.check_before_editing(args)
    stems = unique_stems(files)
    output.check_outputs(args, [f"{stem}_translated.png" for stem in stems] + ["grid.png"], files)
    loading.set_threads_for(args, registered)
    import torch

    # 2. Load, then translate
    pipe = loading.load_pipeline(args.model, args.clip, args.device)
    loading.load_adapters(pipe, args.lora, None)
    if not pipe.get_active_adapters():
        output.note(args, "no --lora given: translating onto the model's domain only, without an edit")
    output.say_resolution(args, pipe, images, files)
    output.progress(pipe, args, "translating")
    generator = torch.Generator().manual_seed(args.seed)
    given = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None}  # else translate's defaults
    out = pipe.translate(images, edit_t0=args.edit_t0, generator=generator, **given)

    # 3. Write the results and the grid
    output.makedirs(args.output)
    for stem, final in zip(stems, out.images):
        output.save_image(args, final, os.path.join(args.output, f"{stem}_translated.png"))
    rows = [output.as_model_sees_them(pipe, images), list(out.domain_images), list(out.images)]
    output.save_image(args, image_grid(rows), os.path.join(args.output, "grid.png"))
    print(f"wrote {len(images)} images and grid.png (rows: input as the model sees it, in-domain, final) to "
          f"{args.output}")  # fmt: skip


COMMAND = RegisteredCommand(
    help="pull out-of-domain images (strokes) onto the model's domain, then edit",
    add_arguments=add_arguments, run=run, sets_threads=True,
)  # fmt: skip
