"""``diffusionclip edit``: edits images with one or more adapters (`DiffusionCLIPPipeline.edit`), writing each
edited image as soon as its batch is done, then a before/after grid. Also the options ``sweep`` shares with it."""

from __future__ import annotations

import argparse
import os
import warnings

from . import loading, output
from .defaults import edit_defaults, with_model_defaults
from .options import NON_NEGATIVE, POSITIVE, checked, describe, fast_models, model_arguments
from .registry import RegisteredCommand

__all__ = ["COMMAND", "add_arguments", "describe_steps", "generators", "run"]

# `edit` keyword argument -> its option's help (the default is read from `DiffusionCLIPPipeline.edit`)
STEP_OPTIONS = {
    "t0": "inversion depth: the timestep the input is inverted to and regenerated from (larger edits more)",
    "num_inversion_steps": "DDIM steps of the inversion",
    "num_inference_steps": "DDIM steps of the regeneration",
    "num_fixed_point_iterations": "fixed-point refinements per inversion step (exact inversion; 0: the paper's)",
}


# ---- arguments shared with sweep ----------------------------------------------------------------------------------


def adapter_arguments(parser: argparse.ArgumentParser, lora_help: str) -> None:
    """``--lora`` and ``--lora-weights``."""
    parser.add_argument("--lora", nargs="*", help=lora_help)
    parser.add_argument("--lora-weights", nargs="*", type=float, action=checked("check_number"),
                        help="one weight per --lora adapter (default: 1 each)")  # fmt: skip


def step_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """The `edit` step options ``names`` (help and defaults: `describe_steps`)."""
    for name in names:
        action = NON_NEGATIVE if name == "num_fixed_point_iterations" else POSITIVE
        parser.add_argument("--" + name.replace("_", "-"), type=int, action=action, default=None,
                            help="see `DiffusionCLIPPipeline.edit`")  # fmt: skip


def run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--fast`` and ``--seed``."""
    parser.add_argument("--batch-size", type=int, action=POSITIVE, default=8, help="images edited at once")
    parser.add_argument("--fast", action="store_true",
                        help=f"the --model's fast edit preset instead of its recommended settings (options given "
                             f"still win){fast_models('edit')}")  # fmt: skip
    parser.add_argument("--seed", type=int, action=NON_NEGATIVE, default=0,
                        help="seed of the encoding noise of a setting with encoding='noise', e.g. a --fast preset's "
                             "(image i of the inputs: seed + i)")  # fmt: skip


def describe_steps(parser: argparse.ArgumentParser, names: tuple[str, ...] = tuple(STEP_OPTIONS)) -> None:
    """Completes the step options' help with `DiffusionCLIPPipeline.edit`'s defaults (and the registered models'
    recommendations), when ``--help`` is shown."""
    describe(parser, STEP_OPTIONS, edit_defaults(*names), kind="edit")


def generators(seed: int, start: int, n: int) -> list:
    """One generator per image, image ``i`` (counted over all inputs) seeded ``seed + i``: the noise of
    ``encoding="noise"`` (e.g. a --fast preset's) is then the image's own, whatever the batch size."""
    import torch

    return [torch.Generator().manual_seed(seed + i) for i in range(start, start + n)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    parser.add_argument("--images", nargs="+", required=True, help="image files/folders")
    adapter_arguments(
        parser, "adapter folders/files, all active at once (default: none, which writes reconstructions)"
    )
    parser.add_argument("--output", required=True, help="folder for <name>_edited.png and grid.png")
    step_arguments(parser, tuple(STEP_OPTIONS))
    parser.add_argument("--edit-strength", "--strength", dest="edit_strength", type=float, default=1.0,
                        action=checked("check_number"),
                        help="edit strength r (0: reconstruction, 1: full edit)")  # fmt: skip
    run_arguments(parser)
    output.add_overwrite_argument(parser)
    parser.describe_defaults = describe_steps


# ---- running ----------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    """``diffusionclip edit``: checks, loads the model and the adapters, edits batch by batch."""
    from ..image_io import unique_stems

    # 1. Check everything before any work: images, adapters, output, model, device
    images, files, registered = loading.check_before_editing(args, args.lora_weights)
    stems = unique_stems(files)
    output.check_outputs(args, [f"{stem}_edited.png" for stem in stems] + ["grid.png"], files)
    settings = {name: getattr(args, name) for name in STEP_OPTIONS}
    settings = with_model_defaults(args.model, settings, "edit", fast=args.fast)
    loading.set_threads_for(args, registered)

    # 2. Load the model and the adapters
    pipe = loading.load_pipeline(args.model, args.clip, args.device)
    loading.load_adapters(pipe, args.lora, args.lora_weights)
    reconstructing = not pipe.get_active_adapters() or args.edit_strength == 0
    if reconstructing:
        active = pipe.get_active_adapters()
        why = "--edit-strength 0" if active else "no --lora given" if not args.lora else "no adapter is active"
        output.note(args, f"{why}: writing reconstructions, not edits")
    elif not args.lora:
        output.note(args, f"no --lora given: editing with the --model folder's active adapters "
                          f"{pipe.get_active_adapters()}")  # fmt: skip
    output.say_resolution(args, pipe, images, files)

    # 3. Edit batch by batch, writing each image (atomically) as soon as it is done
    _edit_batches(args, pipe, images, files, stems, settings, reconstructing)


def _edit_batches(args, pipe, images: list, files: list[str], stems: list[str], settings: dict, reconstructing: bool):
    from .. import NoAdapterWarning
    from ..image_io import image_grid

    output.makedirs(args.output)
    kind = "reconstructed" if reconstructing else "edited"
    before, after, renamed = [], [], []
    n = len(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoAdapterWarning)  # said once above, in the CLI's words
        for start in range(0, n, args.batch_size):
            batch = images[start : start + args.batch_size]
            output.progress(pipe, args, f"{'reconstructing' if reconstructing else 'editing'} images "
                                        f"{start + 1}-{start + len(batch)} of {n}")  # fmt: skip
            generator = generators(args.seed, start, len(batch))
            edited = pipe.edit(batch, edit_strength=args.edit_strength, generator=generator, **settings).images
            for file, stem, out in zip(files[start:], stems[start:], edited):
                name = f"{stem}_edited.png"
                output.save_image(args, out, os.path.join(args.output, name))
                if stem != os.path.splitext(os.path.basename(file))[0]:
                    renamed.append(f"{file} -> {name}")
            before += output.as_model_sees_them(pipe, batch)
            after += edited
    output.save_image(args, image_grid([before, after]), os.path.join(args.output, "grid.png"))
    if renamed:
        output.note(args, "inputs with the same name got distinct outputs: " + ", ".join(renamed))
    print(f"wrote {n} {kind} images and grid.png (top: input as the model sees it, bottom: {kind}) to {args.output}")


COMMAND = RegisteredCommand(
    help="edit images with one or more adapters; writes edited images and a grid",
    add_arguments=add_arguments, run=run, sets_threads=True,
)  # fmt: skip
