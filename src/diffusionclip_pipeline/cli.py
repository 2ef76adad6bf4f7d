"""The ``diffusionclip`` command: ``finetune | edit | translate``, mirroring the Python API, and plugin commands.

``--model`` takes a hub id (``google/ddpm-celebahq-256``; needs the internet), a local pipeline or DDPM folder, or
the name of a model a plugin registered. Bad arguments end with one line on stderr and exit status 2, never a
traceback; option values are checked with `diffusionclip_pipeline.validation` while parsing, before any model loads.

Plugins add ``--model`` names and sub-commands without this module knowing them. A plugin is a function without
arguments, published as an entry point of the group ``diffusionclip_pipeline.plugins``::

    [project.entry-points."diffusionclip_pipeline.plugins"]
    myplugin = "mypackage.cli_plugin:register"

that calls `register_model` (a name, its loader and its recommended ``finetune`` / ``edit`` settings) and
`register_command` (a sub-command: its arguments and what it runs). The CLI calls every plugin once, when it builds
its parser or resolves a ``--model``. Entry points, because the dependency then points one way only (a plugin
imports this module, never the reverse), a plugin in another distribution works exactly like one shipped here, and
a missing or broken plugin costs only its own names: it is reported in one line and the rest of the CLI works.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from .image_io import image_grid, read_images, save_atomic
from .validation import check_non_negative_int, check_number, check_positive_int

__all__ = [
    "PLUGIN_GROUP",
    "CLIError",
    "build_parser",
    "checked",
    "load_pipeline",
    "load_plugins",
    "main",
    "register_command",
    "register_model",
]

PLUGIN_GROUP = "diffusionclip_pipeline.plugins"
BUILTIN_COMMANDS = ("finetune", "edit", "translate")


class CLIError(Exception):
    """A user error: printed as one line."""


# ---- plugins ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredModel:
    """A ``--model`` name: its loader and the settings it recommends (read at each call, so edits to them count)."""

    load: Callable[[], Any]
    finetune_defaults: Mapping[str, Any]
    edit_defaults: Mapping[str, Any]
    help: str = ""


@dataclass(frozen=True)
class RegisteredCommand:
    """A sub-command: ``add_arguments(parser)`` fills its parser, ``run(args)`` runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


@dataclass
class _Registry:
    models: dict[str, RegisteredModel] = field(default_factory=dict)
    commands: dict[str, RegisteredCommand] = field(default_factory=dict)
    plugins_loaded: bool = False


_registry = _Registry()


def register_model(
    name: str,
    load: Callable[[], Any],
    finetune_defaults: Mapping[str, Any] | None = None,
    edit_defaults: Mapping[str, Any] | None = None,
    help: str = "",
) -> None:
    """Makes ``--model name`` load ``load()`` (a `DiffusionCLIPPipeline`), with ``finetune_defaults`` /
    ``edit_defaults`` under the options given on the command line."""
    if not isinstance(name, str) or not name or "/" in name or os.sep in name:
        raise ValueError(f"A model name must be a non-empty string without '/' (hub ids have one), got {name!r}.")
    if name in _registry.models:
        raise ValueError(f"The model {name!r} is already registered.")
    _registry.models[name] = RegisteredModel(load, finetune_defaults or {}, edit_defaults or {}, help)


def register_command(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], None],
) -> None:
    """Adds the sub-command ``diffusionclip name``; ``run`` may raise `CLIError`, `ValueError` or `OSError`."""
    if name in BUILTIN_COMMANDS or name in _registry.commands:
        raise ValueError(f"The command {name!r} already exists.")
    _registry.commands[name] = RegisteredCommand(help, add_arguments, run)


def load_plugins() -> None:
    """Calls each ``diffusionclip_pipeline.plugins`` entry point once; a failing one is reported and undone."""
    if _registry.plugins_loaded:
        return
    _registry.plugins_loaded = True
    seen = set()
    for entry_point in entry_points(group=PLUGIN_GROUP):
        if (entry_point.name, entry_point.value) in seen:  # one distribution found twice on sys.path
            continue
        seen.add((entry_point.name, entry_point.value))
        models, commands = dict(_registry.models), dict(_registry.commands)
        try:
            entry_point.load()()
        except Exception as error:  # a broken plugin must not take the other commands down
            _registry.models, _registry.commands = models, commands
            name = f"{entry_point.name!r} ({entry_point.value})"
            print(f"diffusionclip: plugin {name} not loaded: {type(error).__name__}: {error}", file=sys.stderr)


def load_pipeline(model: str, clip: str | None = None, device: str | None = None, clip_2: str | None = None):
    """A `DiffusionCLIPPipeline` from a registered model name, a folder or a hub id; ``clip_2`` sets a second CLIP."""
    load_plugins()
    registered = _registry.models.get(model)
    if registered is not None:
        if clip:
            raise CLIError(f"--clip does not apply to --model {model}: it brings its own CLIP")
        pipe = registered.load()
    else:
        if not os.path.exists(model) and model.count("/") != 1:
            known = ", ".join(_registry.models) or f"none; plugins are the '{PLUGIN_GROUP}' entry points"
            raise CLIError(f"unknown model {model!r}: not a registered model (registered: {known}), a folder, or a "
                           "hub id owner/name")  # fmt: skip
        from .pipeline_diffusionclip import DiffusionCLIPPipeline

        pipe = DiffusionCLIPPipeline.from_pretrained(model, clip_model_name_or_path=clip)
    if clip_2:
        try:
            pipe.load_clip(clip_2, second=True)
        except OSError as error:
            raise CLIError(f"cannot load --clip-2 {clip_2!r}: {error}") from error
    if device:
        pipe.to(device)
    return pipe


def checked(check: Callable, **bounds) -> type[argparse.Action]:
    """An argparse action passing the option's value (or each of its values) through a `validation` check.

    ``add_argument("--batch-size", type=int, action=checked(check_positive_int))``: ``--batch-size 0`` ends
    parsing with the one line ``"diffusionclip edit: error: `--batch-size` must be a positive integer, got 0."``
    and exit status 2.
    """

    class CheckedAction(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            name = option_string or self.dest
            try:
                if isinstance(values, list):
                    values = [check(value, name, **bounds) for value in values]
                else:
                    values = check(values, name, **bounds)
            except (TypeError, ValueError) as error:
                parser.exit(2, f"{parser.prog}: error: {error}\n")
            setattr(namespace, self.dest, values)

    return CheckedAction


# ---- sub-commands ------------------------------------------------------------------------------------------------


def _with_model_defaults(model: str, settings: dict, kind: str) -> dict:
    """The options given (``None``: not given) over a registered model's recommended ``kind`` settings."""
    settings = {k: v for k, v in settings.items() if v is not None}
    registered = _registry.models.get(model)
    if registered is None:
        return settings
    return {**(registered.finetune_defaults if kind == "finetune" else registered.edit_defaults), **settings}


def _finetune(args) -> None:
    images = read_images(args.images)[0] if args.images else None
    pipe = load_pipeline(args.model, args.clip, args.device, clip_2=args.clip_2)
    settings = dict(
        t0=args.t0, num_inversion_steps=args.num_inversion_steps, num_train_steps=args.num_train_steps,
        num_epochs=args.num_epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
        lora_rank=args.lora_rank, l1_loss_weight=args.l1_loss_weight, scheme=args.scheme, seed=args.seed,
        num_fixed_point_iterations=args.num_fixed_point_iterations,
    )  # fmt: skip
    if args.lora_rank is not None:  # keep the LoRA scale alpha / r at 1, as the library's defaults do
        settings["lora_alpha"] = float(args.lora_rank)
    settings = _with_model_defaults(args.model, settings, "finetune")
    output = pipe.finetune(args.src, args.tar, images=images, **settings)
    path = pipe.save_lora_weights(args.output)
    print(f"saved {path} (loss {output.loss_history[0]:.4f} -> {output.loss_history[-1]:.4f})")


def _load_adapters(pipe, paths: list[str] | None, weights: list[float] | None) -> None:
    if not paths:
        return
    names = [pipe.load_lora_weights(p, adapter_name=f"adapter_{i}") for i, p in enumerate(paths)]
    if weights and len(weights) != len(names):
        raise CLIError(f"--lora-weights has {len(weights)} values for {len(names)} --lora adapters")
    pipe.set_adapters(names, weights or [1.0] * len(names))


def _edit(args) -> None:
    images, names = read_images(args.images)
    pipe = load_pipeline(args.model, args.clip, args.device)
    _load_adapters(pipe, args.lora, args.lora_weights)
    settings = dict(
        t0=args.t0, num_inversion_steps=args.num_inversion_steps, num_inference_steps=args.num_inference_steps,
        num_fixed_point_iterations=args.num_fixed_point_iterations,
    )  # fmt: skip
    settings = _with_model_defaults(args.model, settings, "edit")
    os.makedirs(args.output, exist_ok=True)
    rows = []
    for start in range(0, len(images), args.batch_size):
        batch = images[start : start + args.batch_size]
        edited = pipe.edit(batch, edit_strength=args.edit_strength, **settings).images
        for name, source, out in zip(names[start:], batch, edited):
            save_atomic(out, os.path.join(args.output, os.path.splitext(name)[0] + "_edited.png"))
            rows.append([source.resize(out.size), out])
    save_atomic(image_grid(_transpose(rows)), os.path.join(args.output, "grid.png"))
    print(f"wrote {len(rows)} edited images and grid.png (top: input, bottom: edited) to {args.output}")


def _translate(args) -> None:
    import torch

    images, names = read_images(args.images)
    pipe = load_pipeline(args.model, args.clip, args.device)
    _load_adapters(pipe, args.lora, None)
    os.makedirs(args.output, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    out = pipe.translate(images, t0=args.t0, n_iter=args.n_iter, edit_t0=args.edit_t0, generator=generator)
    rows = []
    for name, source, domain, final in zip(names, images, out.domain_images, out.images):
        save_atomic(final, os.path.join(args.output, os.path.splitext(name)[0] + "_translated.png"))
        rows.append([source.resize(final.size), domain, final])
    save_atomic(image_grid(_transpose(rows)), os.path.join(args.output, "grid.png"))
    print(f"wrote {len(rows)} images and grid.png (rows: input, in-domain, edited) to {args.output}")


def _transpose(rows: list[list]) -> list[list]:
    return [list(column) for column in zip(*rows)] if rows else rows


# ---- argument parsing ------------------------------------------------------------------------------------------

POSITIVE = checked(check_positive_int)
NON_NEGATIVE = checked(check_non_negative_int)


def build_parser() -> argparse.ArgumentParser:
    load_plugins()
    commands = [*BUILTIN_COMMANDS, *_registry.commands]
    parser = argparse.ArgumentParser(
        prog="diffusionclip",
        description="DiffusionCLIP (CVPR 2022) text-driven image editing with LoRA-fine-tuned diffusers DDPMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(commands) + "}")
    registered = "".join(f"; {name}: {m.help}" if m.help else f"; {name}" for name, m in _registry.models.items())

    def model_args(p):
        p.add_argument("--model", required=True, help=f"hub id, pipeline/DDPM folder or registered name{registered}")
        p.add_argument("--clip", default=None, help="CLIP id or folder if the model has none")
        p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")

    p = sub.add_parser("finetune", help="train a LoRA adapter for a text edit and save it")
    model_args(p)
    p.add_argument("--src", required=True, help="source text, e.g. 'face'")
    p.add_argument("--tar", required=True, help="target text, e.g. 'smiling face'")
    p.add_argument("--images", nargs="*", help="training image files/folders (default: sampled from the model)")
    p.add_argument("--output", required=True, help="folder for pytorch_lora_weights.safetensors")
    p.add_argument(
        "--clip-2",
        default=None,
        help="a second CLIP (id or folder): the CLIP loss is averaged over both (e.g. ViT-B/32 + B/16)",
    )
    positive_float = checked(check_number, minimum=0.0, min_inclusive=False)
    for flag, kind, action in [
        ("--t0", int, POSITIVE), ("--num-inversion-steps", int, POSITIVE), ("--num-train-steps", int, POSITIVE),
        ("--num-epochs", int, POSITIVE), ("--learning-rate", float, positive_float), ("--batch-size", int, POSITIVE),
        ("--lora-rank", int, POSITIVE), ("--l1-loss-weight", float, checked(check_number, minimum=0.0)),
        ("--seed", int, NON_NEGATIVE), ("--num-fixed-point-iterations", int, NON_NEGATIVE),
    ]:  # fmt: skip
        note = "; LoRA alpha is set to it (scale 1)" if flag == "--lora-rank" else ""
        p.add_argument(flag, type=kind, action=action, default=None,
                       help=f"see FinetuneConfig (default: its value, or the registered model's){note}")  # fmt: skip
    p.add_argument("--scheme", choices=("efficient", "full_chain"), default=None)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("edit", help="edit images with one or more adapters; writes edited images and a grid")
    model_args(p)
    p.add_argument("--images", nargs="+", required=True, help="image files/folders")
    p.add_argument("--lora", nargs="*", help="adapter folders/files (mixed with --lora-weights)")
    p.add_argument("--lora-weights", nargs="*", type=float, action=checked(check_number),
                   help="one weight per --lora adapter")  # fmt: skip
    p.add_argument("--output", required=True)
    for flag in ("--t0", "--num-inversion-steps", "--num-inference-steps", "--num-fixed-point-iterations"):
        action = NON_NEGATIVE if flag == "--num-fixed-point-iterations" else POSITIVE
        p.add_argument(flag, type=int, action=action, default=None,
                       help="see `edit` (default: its value, or the registered model's)")  # fmt: skip
    p.add_argument("--edit-strength", "--strength", dest="edit_strength", type=float, default=1.0,
                   action=checked(check_number), help="edit strength r (0: reconstruction, 1: full edit)")  # fmt: skip
    p.add_argument("--batch-size", type=int, action=POSITIVE, default=8, help="images edited at once")
    p.set_defaults(func=_edit)

    p = sub.add_parser("translate", help="pull out-of-domain images (strokes) onto the model's domain, then edit")
    model_args(p)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--lora", nargs="*", help="adapter(s) for the final edit (none: domain translation only)")
    p.add_argument("--output", required=True)
    p.add_argument("--t0", type=int, action=POSITIVE, default=500)
    p.add_argument("--edit-t0", type=int, action=POSITIVE, default=None)
    p.add_argument("--n-iter", type=int, action=POSITIVE, default=10)
    p.add_argument("--seed", type=int, action=NON_NEGATIVE, default=0)
    p.set_defaults(func=_translate)

    for name, command in _registry.commands.items():
        p = sub.add_parser(name, help=command.help)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``diffusionclip``; returns 0, or 2 after a one-line error (bad usage exits with 2 while parsing)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ValueError, TypeError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"diffusionclip {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # `python -m`: this file runs as `__main__`, but plugins register with the module `diffusionclip_pipeline.cli`
    sys.exit(importlib.import_module(__spec__.name).main())
