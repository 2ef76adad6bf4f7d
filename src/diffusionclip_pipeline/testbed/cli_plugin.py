"""The test-bed's part of the ``diffusionclip`` command: ``--model testbed`` and the ``demo`` sub-command.

pyproject.toml publishes `register` as the entry point ``testbed`` of the group ``diffusionclip_pipeline.plugins``;
the CLI calls it when it builds its parser (how and why: `diffusionclip_pipeline.commands`). This module depends on
the commands' registry, never the reverse: the library does not know the test-bed exists. It imports the models,
torch and the settings only when a command runs, so that building the CLI's parser (``diffusionclip --help``) stays
quick.

The test-bed's models are tiny (32 px), so they run fastest on one CPU thread, above all on a machine another
process keeps busy (editing one image: 7.3 s with 1 thread, 53-90 s with 2 on a busy 2-core machine): ``--model
testbed`` and ``demo`` use one thread unless ``--threads`` or ``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import argparse
import re

from ..commands import check_output, checked, register_command, register_model
from .world import COLOURS, DEFAULT_SIZE, SHAPES

NUM_THREADS = 1


def register() -> None:
    """Registers the models ``testbed`` (with `RECOMMENDED_FINETUNE` / `RECOMMENDED_EDIT`, `FAST_FINETUNE` /
    `FAST_EDIT` for ``--fast``, one thread, and `render_training_images`) and ``testbed-latent`` (the latent
    test-bed, with its own recommendations), ``testbed-flow`` (the flow-matching test-bed; ``edit --fast`` with
    `FAST_EDIT_FLOW`, no fast fine-tune) and the ``demo`` command."""
    register_model(
        "testbed", load=_load_pipeline, finetune_defaults=_recommended_finetune, edit_defaults=_recommended_edit,
        help="the offline test-bed shipped with the package, with its recommended settings",
        render=render_training_images, num_threads=NUM_THREADS,
        fast_finetune_defaults=_fast_finetune, fast_edit_defaults=_fast_edit,
    )  # fmt: skip
    register_model(
        "testbed-latent", load=_load_latent_pipeline, finetune_defaults=_recommended_finetune_latent,
        edit_defaults=_recommended_edit_latent, render=render_training_images, num_threads=NUM_THREADS,
        help="the offline latent test-bed (a tiny Stable-Diffusion-shaped model) shipped with the package",
    )  # fmt: skip
    register_model(
        "testbed-flow", load=_load_flow_pipeline, finetune_defaults=_recommended_finetune_flow,
        edit_defaults=_recommended_edit_flow, render=render_training_images, num_threads=NUM_THREADS,
        help="the offline flow-matching test-bed (a tiny SD3-shaped model) shipped with the package",
        fast_edit_defaults=_fast_edit_flow,
    )  # fmt: skip
    register_command(
        "demo", help="offline: fine-tune the test-bed for a colour edit, edit held-out images",
        add_arguments=add_demo_arguments, run=run_demo_command, num_threads=NUM_THREADS,
    )  # fmt: skip


def _load_pipeline():
    from .pipeline import load_pipeline

    return load_pipeline()


def _load_latent_pipeline():
    from .pipeline import load_pipeline

    return load_pipeline(kind="latent")


def _load_flow_pipeline():
    from .pipeline import load_pipeline

    return load_pipeline(kind="flow")


def _recommended_finetune_flow() -> dict:
    from .settings import recommended

    return recommended("flow")[0]


def _recommended_edit_flow() -> dict:
    from .settings import recommended

    return recommended("flow")[1]


def _recommended_finetune_latent() -> dict:
    from .settings import recommended

    return recommended("latent")[0]


def _recommended_edit_latent() -> dict:
    from .settings import recommended

    return recommended("latent")[1]


def _fast_finetune() -> dict:
    from .settings import FAST_FINETUNE

    return FAST_FINETUNE


def _fast_edit() -> dict:
    from .settings import FAST_EDIT

    return FAST_EDIT


def _fast_edit_flow() -> dict:
    from .settings import FAST_EDIT_FLOW

    return FAST_EDIT_FLOW


def _recommended_finetune() -> dict:
    from .settings import RECOMMENDED_FINETUNE

    return RECOMMENDED_FINETUNE


def _recommended_edit() -> dict:
    from .settings import RECOMMENDED_EDIT

    return RECOMMENDED_EDIT


def parse_prompt(prompt: str) -> tuple[str, str]:
    """The ``(colour, shape)`` a prompt names, e.g. ``"a photo of a red circle"`` -> ``("red", "circle")``.

    Raises:
        `ValueError`: the prompt names no colour or no shape of the world, or several.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    colours = sorted({w for w in words if w in COLOURS})
    shapes = sorted({w for w in words if w in SHAPES})
    if len(colours) == 1 and len(shapes) == 1:
        return colours[0], shapes[0]
    missing = " and ".join(
        f"{'several' if len(found) > 1 else 'no'} {kind}s ({', '.join(found)})" if len(found) > 1
        else f"no {kind} ({', '.join(names)})"
        for kind, found, names in (("colour", colours, COLOURS), ("shape", shapes, SHAPES))
        if len(found) != 1
    )  # fmt: skip
    raise ValueError(f"{prompt!r} names {missing} of the test-bed world")


def render_training_images(prompt: str, num_images: int, seed: int) -> list:
    """``num_images`` rendered 32 px images of the colour and shape ``prompt`` names (`parse_prompt`), drawn from
    the world with ``seed`` (`world.render_dataset`): the CLI's training images for ``--model testbed``."""
    from .world import render_dataset

    colour, shape = parse_prompt(prompt)
    return render_dataset(num_images, seed=seed, size=DEFAULT_SIZE, shape=shape, colour=colour)[0]


def _colour(value, name):
    from ..utils.checks import check_choice

    return check_choice(value, name, tuple(COLOURS))


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    colour = checked(_colour)
    parser.add_argument("--output", default="diffusionclip-demo", help="folder for the grid and the adapter")
    parser.add_argument("--source", default="red", action=colour, help=f"source colour ({', '.join(COLOURS)})")
    parser.add_argument("--target", default="blue", action=colour, help="target colour (blue <-> yellow fails)")
    parser.add_argument("--num-test", type=int, default=16, action=checked("check_positive_int"),
                        help="held-out images to edit")  # fmt: skip
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        action=checked("check_non_negative_int"),
        help="data seed: which circles are rendered for fine-tuning (seed) and editing (seed + 1)",
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--latent", action="store_true", help="the latent test-bed (VAE + text-conditioned UNet, SD's layout)"
    )
    kind.add_argument(
        "--flow", action="store_true", help="the flow-matching test-bed (VAE + SD3-shaped transformer, SD3's layout)"
    )
    parser.add_argument(
        "--recommended-edit", action="store_true",
        help="edit with the recommended 32 + 32-step DDIM edit instead of the fast 6-step one (pixel test-bed)",
    )  # fmt: skip


def run_demo_command(args: argparse.Namespace) -> None:
    from .demo import run_demo

    if args.source == args.target:
        raise ValueError(f"`--source` and `--target` are the same colour ({args.source!r}): nothing to edit.")
    check_output(args.output)
    run_demo(output_dir=args.output, source=args.source, target=args.target, num_test=args.num_test, seed=args.seed,
             progress_bars=not args.quiet, kind="latent" if args.latent else "flow" if args.flow else "pixel",
             fast_edit=not (args.latent or args.flow or args.recommended_edit))  # fmt: skip
