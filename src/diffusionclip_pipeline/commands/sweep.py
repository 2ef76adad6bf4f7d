"""``diffusionclip sweep``: edits held-out images over edit strengths x inversion depths (`evaluation.sweep`) and
writes the grid and the table of scores. Its step, adapter and run options are `edit`'s."""

from __future__ import annotations

import argparse
import os
import warnings

from . import loading, output
from .defaults import signature_defaults, with_model_defaults
from .edit import adapter_arguments, describe_steps, generators, run_arguments, step_arguments
from .options import POSITIVE, checked, describe, model_arguments
from .registry import RegisteredCommand

__all__ = ["COMMAND", "add_arguments", "run"]

STEP_NAMES = ("num_inversion_steps", "num_inference_steps", "num_fixed_point_iterations")  # t0 is swept
# the swept options -> `evaluation.sweep`'s arguments, and their help (the defaults are `sweep`'s)
SWEPT = {"t0": "t0s", "edit_strength": "edit_strengths"}
SWEPT_HELP = {
    "t0": "inversion depths to sweep",
    "edit_strength": "edit strengths r to sweep (0: reconstruction, 1: full edit, > 1: extrapolate)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    parser.add_argument("--images", nargs="+", required=True, help="held-out image files/folders")
    adapter_arguments(parser, "adapter folders/files, all active at once (default: none)")
    parser.add_argument("--src", required=True, help="source text of the edit, e.g. 'face' (for the scores)")
    parser.add_argument("--tar", required=True, help="target text of the edit, e.g. 'smiling face'")
    parser.add_argument("--clip-2", default=None, help="a second CLIP (id or folder): also reports s_dir_2")
    parser.add_argument("--output", required=True, help="folder for grid.png and metrics.csv")
    parser.add_argument("--t0", nargs="+", type=int, action=POSITIVE, default=None, help=SWEPT_HELP["t0"])
    parser.add_argument("--edit-strength", nargs="+", type=float, action=checked("check_number"), default=None,
                        help=SWEPT_HELP["edit_strength"])  # fmt: skip
    step_arguments(parser, STEP_NAMES)
    run_arguments(parser)
    output.add_overwrite_argument(parser)
    parser.describe_defaults = describe_defaults


def describe_defaults(parser: argparse.ArgumentParser) -> None:
    """The step options' help (`edit.describe_steps`), and the swept lists' defaults: `evaluation.sweep`'s."""
    from ..evaluation import sweep

    describe_steps(parser, STEP_NAMES)
    describe(parser, SWEPT_HELP, signature_defaults(sweep, SWEPT))


def run(args: argparse.Namespace) -> None:
    """``diffusionclip sweep``: checks, loads the model, the adapters and the scoring CLIP, sweeps, writes."""
    # 1. Check everything before any work: images, adapters, output, model, device, settings
    images, files, registered = loading.check_before_editing(args, args.lora_weights, args.clip_2)
    output.check_outputs(args, ["grid.png", "metrics.csv"], files)
    settings = with_model_defaults(args.model, {name: getattr(args, name) for name in STEP_NAMES}, "edit", args.fast)
    settings = {k: v for k, v in settings.items() if k not in ("t0", "edit_strength")}  # swept here
    loading.set_threads_for(args, registered)

    # 2. Load the model, the adapters and the CLIP that scores
    pipe = loading.load_pipeline(args.model, args.clip, args.device, clip_2=args.clip_2)
    loading.load_adapters(pipe, args.lora, args.lora_weights)
    loading.ensure_clip(pipe, args.clip)
    if not pipe.get_active_adapters():
        output.note(args, f"{'no --lora given' if not args.lora else 'no adapter is active'}: every setting is a "
                          "reconstruction (edit strength has no adapter to scale)")  # fmt: skip
    output.say_resolution(args, pipe, images, files)

    # 3. Sweep, then write the grid and the table
    from .. import NoAdapterWarning
    from ..evaluation import sweep

    kwargs = {SWEPT[name]: getattr(args, name) for name in SWEPT if getattr(args, name) is not None}  # else sweep's
    output.progress(pipe, args, "sweeping")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoAdapterWarning)  # said once above, in the CLI's words
        out = sweep(
            pipe, images, args.src, args.tar, **kwargs, batch_size=args.batch_size,
            generator=generators(args.seed, 0, len(images)), **settings,
        )  # fmt: skip
    output.makedirs(args.output)
    output.save_image(args, out.grid, os.path.join(args.output, "grid.png"))
    output.write_text(args, output.csv_text(out.table), os.path.join(args.output, "metrics.csv"))
    print(output.markdown_table(out.table))
    print(f"wrote grid.png (rows: the {output.count(len(images), 'input')} as the model sees them, then one row per "
          f"setting in the table's order) and metrics.csv to {args.output}")  # fmt: skip


COMMAND = RegisteredCommand(
    help="edit held-out images over edit strengths x inversion depths; grid and table",
    add_arguments=add_arguments, run=run, sets_threads=True,
)  # fmt: skip
