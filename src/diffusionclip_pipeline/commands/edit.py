"""``diffusionclip edit``: edits images with one or more adapters (`DiffusionCLIPPipeline.edit`).

With ``--images`` it decodes each image only when its batch comes, writes each edit as soon as its batch is done,
then a before/after grid. With ``--input-dir`` (and ``--glob``), ``--input-list`` or ``--video`` it runs the batch
editor (`diffusionclip_pipeline.batch`): outputs mirror the inputs' relative paths, a manifest makes the run
resumable, and under ``accelerate launch`` / ``torchrun`` the processes share the work (docs/scale-out.md). Also the
options ``sweep`` shares with it."""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

from . import loading, output
from .defaults import edit_defaults, with_model_defaults
from .errors import CLIError
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
                             "(--images: image i of the inputs seed + i; --input-dir / --input-list: from the "
                             "seed and the image's relative path; --video: the seed, for all frames)")  # fmt: skip


def describe_steps(parser: argparse.ArgumentParser, names: tuple[str, ...] = tuple(STEP_OPTIONS)) -> None:
    """Completes the step options' help with `DiffusionCLIPPipeline.edit`'s defaults (and the registered models'
    recommendations), when ``--help`` is shown."""
    describe(parser, STEP_OPTIONS, edit_defaults(*names), kind="edit")


def generators(seed: int, start: int, n: int) -> list:
    """One generator per image, image ``i`` (counted over all inputs) seeded ``seed + i``: the noise of
    ``encoding="noise"`` (e.g. a --fast preset's) is then the image's own, whatever the batch size."""
    import torch

    return [torch.Generator().manual_seed(seed + i) for i in range(start, start + n)]


def input_arguments(parser: argparse.ArgumentParser) -> None:
    """``--images`` or one of the batch editor's inputs (``--input-dir`` with ``--glob``, ``--input-list``,
    ``--video``)."""
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", nargs="+", help="image files/folders: <name>_edited.png each, and grid.png")
    inputs.add_argument("--input-dir", help="a folder, searched recursively: the edits mirror its relative paths in "
                                            "--output, with a manifest (resumable; several processes share the work "
                                            "under accelerate launch / torchrun)")  # fmt: skip
    inputs.add_argument("--input-list", help="a text file naming one image a line (relative to its folder), edited "
                                             "as --input-dir is")  # fmt: skip
    inputs.add_argument("--video", help="a video (GIF; MP4 with the 'video' extra) or a folder of frames: every frame "
                                        "edited with one shared encoding, written at the source's frame rate, with "
                                        "its flicker measure")  # fmt: skip
    parser.add_argument("--glob", default=None, help="with --input-dir: only the files whose relative path or "
                                                     "name matches, e.g. '*.jpg' (default: images)")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    input_arguments(parser)
    adapter_arguments(
        parser, "adapter folders/files, all active at once (default: none, which writes reconstructions)"
    )
    parser.add_argument("--output", required=True, help="output folder")
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
    if args.images is None:
        return _run_batch_editor(args)
    if args.glob is not None:
        raise CLIError("--glob applies to --input-dir, not to --images")
    from ..image_io import unique_stems

    # 1. Check everything before any work: images (headers only: each is decoded when its batch comes), adapters,
    # output, model, device
    files, sizes = _probe_images(args.images)
    registered = _check_the_rest(args)
    stems = unique_stems(files)
    output.check_outputs(args, [f"{stem}_edited.png" for stem in stems] + ["grid.png"], files)
    settings = _settings(args)
    loading.set_threads_for(args, registered)

    # 2. Load the model and the adapters
    pipe, reconstructing = _load(args)
    output.say_resolution(args, pipe, [SimpleNamespace(size=size) for size in sizes], files)  # sizes of the headers

    # 3. Edit batch by batch, writing each image (atomically) as soon as it is done
    _edit_batches(args, pipe, files, stems, settings, reconstructing)


def _probe_images(paths: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """The ``--images`` files and their sizes, read from each header (a non-image or a decompression bomb is refused
    here, before any work, without decoding pixels; a file truncated after its header fails when its batch comes)."""
    import PIL.Image

    from ..image_io import find_images

    try:
        files = find_images(paths)
    except (OSError, ValueError) as error:
        raise CLIError(f"--images: {error}") from None
    sizes = []
    for file in files:
        try:
            with warnings.catch_warnings():  # as `image_io.read_image`: PIL only warns between 1x and 2x its limit
                warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
                with PIL.Image.open(file) as image:
                    sizes.append(image.size)
        except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
            raise CLIError(f"cannot read image {file}: refused as a possible decompression bomb ({error})") from None
        except (OSError, ValueError, SyntaxError) as error:
            raise CLIError(f"cannot read image {file}: {error}") from None
    return files, sizes


def _check_the_rest(args: argparse.Namespace):
    """The checks after the inputs', in `loading.check_before_editing`'s order; returns the registered model."""
    loading.check_adapters(args.lora, args.lora_weights)
    loading.check_output(args.output)
    registered = loading.check_model(args.model, args.clip)
    loading.check_timesteps_of_folder(args)
    loading.check_device(args.device)
    return registered


def _settings(args: argparse.Namespace) -> dict:
    settings = {name: getattr(args, name) for name in STEP_OPTIONS}
    return with_model_defaults(args.model, settings, "edit", fast=args.fast)


def _load(args: argparse.Namespace, device: str | None = None, say=True):
    """The pipeline with the ``--lora`` adapters active; whether it only reconstructs (said on stderr)."""
    pipe = loading.load_pipeline(args.model, args.clip, device or args.device)
    loading.load_adapters(pipe, args.lora, args.lora_weights)
    reconstructing = not pipe.get_active_adapters() or args.edit_strength == 0
    if reconstructing and say:
        active = pipe.get_active_adapters()
        why = "--edit-strength 0" if active else "no --lora given" if not args.lora else "no adapter is active"
        output.note(args, f"{why}: writing reconstructions, not edits")
    elif not args.lora and say:
        output.note(args, f"no --lora given: editing with the --model folder's active adapters "
                          f"{pipe.get_active_adapters()}")  # fmt: skip
    return pipe, reconstructing


def _edit_batches(args, pipe, files: list[str], stems: list[str], settings: dict, reconstructing: bool):
    from .. import NoAdapterWarning
    from ..image_io import image_grid, read_image

    output.makedirs(args.output)
    kind = "reconstructed" if reconstructing else "edited"
    before, after, renamed = [], [], []
    n = len(files)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoAdapterWarning)  # said once above, in the CLI's words
        for start in range(0, n, args.batch_size):
            batch = [read_image(f) for f in files[start : start + args.batch_size]]  # decoded now, not up front
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


# ---- the batch editor: --input-dir, --input-list, --video -------------------------------------------------------


def _batch_inputs(args: argparse.Namespace):
    """The batch editor's items (files are listed, none is opened), or the ``--video`` path; a `CLIError` each."""
    from ..batch import find_inputs

    if args.glob is not None and args.input_dir is None:
        raise CLIError("--glob applies to --input-dir")
    if args.video is not None:
        if not os.path.exists(args.video):
            raise CLIError(f"--video {args.video}: no such file or folder")
        return None
    option, path = ("--input-dir", args.input_dir) if args.input_dir is not None else ("--input-list", args.input_list)
    try:
        return find_inputs(args.input_dir, args.input_list, args.glob, exclude=args.output)
    except (OSError, ValueError) as error:  # the library's message, with the option's name for the argument's
        message = str(error).replace("`input_dir` ", "--input-dir ").replace("`input_list` ", "--input-list ")
        raise CLIError(message if option in message else f"{option} {path}: {message}") from None


def _run_batch_editor(args: argparse.Namespace) -> None:
    """``edit --input-dir / --input-list / --video``: `batch.edit_images` / `batch.edit_video`, in this process's
    share under ``accelerate launch`` / ``torchrun`` (each process on its own device: ``--device`` unset or ``cuda``
    becomes accelerate's ``cuda:<local rank>``)."""
    from ..batch import edit_images, edit_video
    from ..batch.editing import process_state

    # 1. Check everything before any work (the same on every process)
    items = _batch_inputs(args)
    registered = _check_the_rest(args)
    settings = _settings(args)
    loading.set_threads_for(args, registered)
    # 2. Load the model and the adapters on this process's device
    state = process_state(cpu=args.device == "cpu" or None)
    device = str(state.device) if state.num_processes > 1 and args.device in (None, "cuda") else args.device
    pipe, _ = _load(args, device, say=state.is_main_process)
    pipe.set_progress_bar_config(disable=True)  # the batch editor's bar (images/s, time left) replaces the steps'
    common = dict(batch_size=args.batch_size, seed=args.seed, overwrite=args.overwrite, show_progress=not args.quiet,
                  edit_strength=args.edit_strength, **settings)  # fmt: skip
    # 3. Edit
    try:
        if args.video is not None:
            result = edit_video(pipe, args.video, args.output, **common)
            frames = result.frames
        else:
            result = frames = edit_images(pipe, items, args.output, **common)
    except BaseException:  # Ctrl-C, an error: the files this run finished, as its manifest lines name them
        folder = os.path.join(args.output, "frames") if args.video is not None else args.output
        args.written += _written_by_this_run(folder, state.process_index)
        raise
    who = f"process {frames.process_index} of {frames.num_processes}: " if frames.num_processes > 1 else ""
    rate = f"{frames.images_per_second:.2f} images/s" if frames.num_done else "nothing left to do"
    print(f"{who}edited {output.count(frames.num_done, 'image')} in {output.duration(frames.seconds)} ({rate}); "
          f"{frames.num_skipped} of {frames.num_inputs} were done already; manifest {frames.manifest}")  # fmt: skip
    for failure in frames.failures:
        output.note(args, f"failed: {failure['input']}: {failure['error']}")
    if args.video is not None and result.video is not None:
        print(
            f"wrote {result.video} ({result.num_frames} frames at {result.fps:g} fps); flicker {result.flicker:+.4f} "
            f"(edit {result.edit_flicker:.4f} - source {result.source_flicker:.4f}, mean frame-to-frame change)"
        )


def _written_by_this_run(folder: str, rank: int) -> list[str]:
    """The outputs that this process's manifest shard records as done since its last ``run`` line (this run's)."""
    from ..batch.manifest import shard_path

    done, path = [], shard_path(folder, rank)
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines() if os.path.isfile(path) else []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:  # a torn last line
            continue
        if isinstance(entry, dict) and entry.get("run"):
            done = []  # a run's first line: what follows is that run's
        elif isinstance(entry, dict) and entry.get("status") == "done":
            done.append(os.path.join(folder, entry["output"]))
    return done


COMMAND = RegisteredCommand(
    help="edit images with one or more adapters; writes edited images and a grid",
    add_arguments=add_arguments, run=run, sets_threads=True,
)  # fmt: skip
