"""The test-bed's part of the ``diffusionclip`` command: ``--model testbed`` and the ``demo`` sub-command.

pyproject.toml publishes `register` as the entry point ``testbed`` of the group ``diffusionclip_pipeline.plugins``;
the CLI calls it when it builds its parser (how and why: `diffusionclip_pipeline.cli`). This module depends on the
CLI, never the reverse: the library does not know the test-bed exists.
"""

from __future__ import annotations

import argparse

from ..cli import checked, register_command, register_model
from ..validation import check_choice, check_non_negative_int, check_positive_int
from .demo import run_demo
from .pipeline import load_pipeline
from .settings import RECOMMENDED_EDIT, RECOMMENDED_FINETUNE
from .world import COLOURS


def register() -> None:
    """Registers the model ``testbed`` (with `RECOMMENDED_FINETUNE` / `RECOMMENDED_EDIT`) and the ``demo`` command."""
    register_model(
        "testbed", load=load_pipeline, finetune_defaults=RECOMMENDED_FINETUNE, edit_defaults=RECOMMENDED_EDIT,
        help="the offline test-bed shipped with the package, with its recommended settings",
    )  # fmt: skip
    register_command(
        "demo", help="offline: fine-tune the test-bed for a colour edit, edit held-out images",
        add_arguments=add_demo_arguments, run=run_demo_command,
    )  # fmt: skip


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    colour = checked(check_choice, choices=tuple(COLOURS))
    parser.add_argument("--output", default="diffusionclip-demo", help="folder for the grid and the adapter")
    parser.add_argument("--source", default="red", action=colour, help=f"source colour ({', '.join(COLOURS)})")
    parser.add_argument("--target", default="blue", action=colour, help="target colour (blue <-> yellow fails)")
    parser.add_argument("--num-test", type=int, default=16, action=checked(check_positive_int),
                        help="held-out images to edit")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, action=checked(check_non_negative_int))


def run_demo_command(args: argparse.Namespace) -> None:
    if args.source == args.target:
        raise ValueError(f"`--source` and `--target` are the same colour ({args.source!r}): nothing to edit.")
    run_demo(output_dir=args.output, source=args.source, target=args.target, num_test=args.num_test, seed=args.seed)
