"""``diffusionclip finetune``: trains a LoRA adapter for a text edit and saves it (`DiffusionCLIPPipeline.finetune`).

Every option that is a `FinetuneConfig` field takes its help and default from the dataclass (read when ``--help``
is shown); ``--lora-rank`` also sets LoRA alpha (`defaults.rank_settings`).
"""

from __future__ import annotations

import argparse
import os
import time

from . import loading, output
from .defaults import finetune_defaults, finetune_fields, rank_settings, with_model_defaults
from .errors import CLIError, one_line
from .options import NON_NEGATIVE, POSITIVE, POSITIVE_NUMBER, checked, describe, fast_models, model_arguments
from .registry import RegisteredCommand, RegisteredModel, registered_models

__all__ = ["COMMAND", "add_arguments", "run"]

DEFAULT_NUM_RENDERED = 16  # training images a registered model renders when --num-images is not given
# the options that are `FinetuneConfig` fields, with their checks (help and defaults: the dataclass's)
CONFIG_OPTIONS = {
    "t0": (int, POSITIVE), "num_inversion_steps": (int, POSITIVE), "num_train_steps": (int, POSITIVE),
    "num_epochs": (int, POSITIVE), "learning_rate": (float, POSITIVE_NUMBER), "batch_size": (int, POSITIVE),
    "lora_rank": (int, POSITIVE), "l1_loss_weight": (float, checked("check_number", minimum=0.0)),
    "seed": (int, NON_NEGATIVE), "num_fixed_point_iterations": (int, NON_NEGATIVE),
}  # fmt: skip
NOTES = {"lora_rank": "; LoRA alpha is set to it (scale 1)", "seed": "; also of rendered training images"}


# ---- arguments ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the edit, the training images, the `FinetuneConfig` options and the validation options."""
    from ..choices import SCHEMES

    model_arguments(parser)
    parser.add_argument("--src", required=True, help="source text, e.g. 'face'")
    parser.add_argument("--tar", required=True, help="target text, e.g. 'smiling face'")
    parser.add_argument("--images", nargs="*",
                        help="training image files/folders (default: rendered from --src by a model that renders, "
                             "e.g. testbed, else sampled from the model)")  # fmt: skip
    parser.add_argument(
        "--render",
        default=None,
        metavar="PROMPT",
        help="train on images the --model renders of PROMPT (e.g. 'red circle' for testbed)",
    )
    parser.add_argument("--num-images", type=int, action=POSITIVE, default=None,
                        help="training images to render or sample")  # fmt: skip
    parser.add_argument("--output", required=True, help="folder for pytorch_lora_weights.safetensors")
    parser.add_argument("--clip-2", default=None,
                        help="a second CLIP (id or folder): the CLIP loss is averaged over both (e.g. ViT-B/32 + "
                             "B/16)")  # fmt: skip
    for name, (kind, action) in CONFIG_OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, action=action, default=None,
                            help="see FinetuneConfig")  # fmt: skip
    parser.add_argument("--scheme", choices=SCHEMES, default=None, help="see FinetuneConfig")
    parser.add_argument("--fast", action="store_true",
                        help=f"the --model's fast fine-tuning preset instead of its recommended settings (options "
                             f"given still win){fast_models('finetune')}")  # fmt: skip
    _validation_arguments(parser)
    parser.describe_defaults = describe_defaults


def _validation_arguments(parser: argparse.ArgumentParser) -> None:
    from ..choices import KEEP_BEST

    parser.add_argument("--validation-images", nargs="+", default=None, metavar="PATHS",
                        help="held-out image files/folders: edited and scored (s_dir, mae, ssim, clip_score) after "
                             "every --validation-epochs epochs and after the last; writes validation.csv and "
                             "validation.png next to the adapter")  # fmt: skip
    parser.add_argument("--validation-epochs", type=int, action=POSITIVE, default=None, metavar="K",
                        help="validate after every K-th epoch, and after the last (default: 1)")  # fmt: skip
    parser.add_argument("--keep-best", choices=KEEP_BEST, default=None, metavar="METRIC",
                        help=f"keep the adapter of the best validated epoch by METRIC ({', '.join(KEEP_BEST)}; mae: "
                             "the smallest, the others: the largest) instead of the last one's")  # fmt: skip
    parser.add_argument(
        "--keep-best-min-ssim",
        type=float,
        default=None,
        metavar="X",
        action=checked("check_number", minimum=-1.0, maximum=1.0),
        help="identity floor for --keep-best: epochs whose ssim is below X are not eligible",
    )
    parser.add_argument("--report-to", default=None, metavar="NAME",
                        help="an accelerate tracker (tensorboard, wandb, ...; its package installed) for the loss, "
                             "the validation scores and grids, logging to --output/logs")  # fmt: skip
    parser.add_argument("--early-stopping-patience", type=int, action=POSITIVE, default=None, metavar="N",
                        help="stop once the validated score has not improved for N validations and keep the best "
                             "epoch; the held-out images' scores, or without --validation-images the training "
                             "images' (a proxy)")  # fmt: skip
    parser.add_argument("--early-stopping-threshold", type=float, default=None, metavar="X",
                        action=checked("check_number", minimum=0.0),
                        help="the least improvement that counts (default 0)")  # fmt: skip
    parser.add_argument("--early-stopping-metric", choices=KEEP_BEST, default=None, metavar="METRIC",
                        help="the score early stopping watches (default: --keep-best, else s_dir)")  # fmt: skip


def describe_defaults(parser: argparse.ArgumentParser) -> None:
    """Completes the help of the `FinetuneConfig` options with the dataclass's help and defaults (and the registered
    models' recommendations), when ``--help`` is shown."""
    fields = finetune_fields()
    names = [*CONFIG_OPTIONS, "scheme"]
    helps = {name: fields[name].metadata.get("help", "").rstrip(".") + NOTES.get(name, "") for name in names}
    describe(parser, helps, finetune_defaults(*names), kind="finetune")
    for action in parser._actions:
        if action.dest == "num_images":
            action.help = (f"training images to render (--render, or --src on a model that renders: "
                           f"{DEFAULT_NUM_RENDERED}) or to sample from the model "
                           f"({finetune_defaults('num_sampled_images')['num_sampled_images']})")  # fmt: skip


# ---- checks -----------------------------------------------------------------------------------------------------


def _training_images(args: argparse.Namespace, registered: RegisteredModel | None):
    """``--images``, or what ``--render`` (or, by default, ``--src``) renders, or `None`: sample from the model."""
    if args.images:
        if args.render:
            raise CLIError("--render and --images both choose the training images: pass one of them")
        if args.num_images is not None:
            raise CLIError("--num-images counts rendered or sampled images; with --images, pass the files you want")
        return loading.read_inputs(args.images)
    render = registered.render if registered is not None else None
    seed = args.seed or 0
    if args.render:
        if render is None:
            can = [name for name, m in registered_models().items() if m.render is not None]
            raise CLIError(f"--render needs a --model that renders images ({', '.join(can) or 'none is registered'});"
                           f" {args.model} does not: pass --images")  # fmt: skip
        try:
            images = render(args.render, args.num_images or DEFAULT_NUM_RENDERED, seed)
        except ValueError as error:
            raise CLIError(f"--render {args.render!r}: {one_line(error)}") from error
        output.note(args, f"rendering {len(images)} training images of {args.render!r} (--render, seed {seed})")
        return images, [f"rendered-{i}.png" for i in range(len(images))]
    if render is not None:
        try:
            images = render(args.src, args.num_images or DEFAULT_NUM_RENDERED, seed)
        except ValueError as error:
            args.sampling_reason = one_line(error)  # said when the number of samples is known
        else:
            output.note(args, f"no --images: rendering {len(images)} training images of {args.src!r} from --model "
                              f"{args.model}'s world (seed {seed}; --images to use your own)")  # fmt: skip
            return images, [f"rendered-{i}.png" for i in range(len(images))]
    return None, []


def _validation_options(args: argparse.Namespace) -> dict:
    """``--validation-images`` (read and checked now), the options that need them, and ``--report-to`` (a known
    tracker whose package is installed; it logs to ``--output``/logs): `DiffusionCLIPPipeline.finetune`'s keyword
    arguments, only those given."""
    if args.validation_images is None:
        for option, value in (("--validation-epochs", args.validation_epochs), ("--keep-best", args.keep_best)):
            if value is not None:
                raise CLIError(f"{option} needs --validation-images (the held-out images to validate on)")
        images = None
    else:
        images, _ = loading.read_inputs(args.validation_images, "--validation-images")
    if args.keep_best_min_ssim is not None and args.keep_best is None:
        raise CLIError("--keep-best-min-ssim is a floor for --keep-best: pass --keep-best METRIC too")
    for option in ("threshold", "metric"):
        if getattr(args, f"early_stopping_{option}") is not None and args.early_stopping_patience is None:
            raise CLIError(f"--early-stopping-{option} is a setting of early stopping: pass --early-stopping-patience")
    logging_dir = None
    if args.report_to is not None:
        from ..training.callbacks import check_report_to

        logging_dir = os.path.join(args.output, "logs")
        try:
            check_report_to(args.report_to, logging_dir)
        except (ImportError, ValueError, TypeError) as error:
            raise CLIError(f"--report-to {args.report_to}: {one_line(error)}") from None
    validation = dict(
        validation_images=images, validation_epochs=args.validation_epochs, keep_best=args.keep_best,
        keep_best_min_ssim=args.keep_best_min_ssim, report_to=args.report_to, logging_dir=logging_dir,
        early_stopping_patience=args.early_stopping_patience, early_stopping_threshold=args.early_stopping_threshold,
        early_stopping_metric=args.early_stopping_metric,
    )  # fmt: skip
    return {k: v for k, v in validation.items() if v is not None}


def _config(args: argparse.Namespace, sampling: bool):
    """The `FinetuneConfig` of the options given over the ``--model``'s recommended (or ``--fast``) settings; its
    errors come now, before loading."""
    from .. import FinetuneConfig

    settings = {name: getattr(args, name) for name in CONFIG_OPTIONS}
    settings.update(scheme=args.scheme, num_sampled_images=args.num_images if sampling else None)
    if args.lora_rank is not None:
        settings.update(rank_settings(args.lora_rank))
    return FinetuneConfig.from_kwargs(**with_model_defaults(args.model, settings, "finetune", fast=args.fast))


# ---- running ----------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    """``diffusionclip finetune``: checks, loads, fine-tunes, then writes the adapter and the validation's files."""
    # 1. Check everything before any work: output, images, model, device, validation, tracker, settings
    loading.check_output(args.output)
    registered = loading.check_model(args.model, args.clip)
    loading.check_source("--clip-2", args.clip_2)
    loading.check_device(args.device)
    images, files = _training_images(args, registered)
    validation = _validation_options(args)
    config = _config(args, sampling=images is None)
    loading.set_threads_for(args, registered)

    # 2. Load, then fine-tune
    pipe = loading.load_pipeline(args.model, args.clip, args.device, clip_2=args.clip_2)
    loading.ensure_clip(pipe, args.clip)
    if images is None:
        reason = getattr(args, "sampling_reason", None)
        what = f"no --images, and {reason}" if reason else "no --images"
        hint = "--images or --render PROMPT" if registered is not None and registered.render else "--images"
        output.note(args, f"{what}: sampling {config.num_sampled_images} training images from the model, of whatever "
                          f"it generates ({hint} to choose them)")  # fmt: skip
    else:
        output.say_resolution(args, pipe, images, files)
    output.progress(pipe, args, "fine-tuning")
    start = time.perf_counter()
    result = pipe.finetune(args.src, args.tar, images=images, config=config, **validation)
    num_held_out = len(validation.get("validation_images", []))
    _report(args, pipe, config, result, time.perf_counter() - start, num_held_out)


def _report(args: argparse.Namespace, pipe, config, result, elapsed: float, num_held_out: int) -> None:
    """The adapter, written only now that training is done (atomically), and the validation's table and grid."""
    try:
        path = pipe.save_lora_weights(args.output)
    except OSError as error:
        raise CLIError(f"cannot write the adapter to {args.output}: {error.strerror or one_line(error)}") from error
    args.written.append(path)
    losses = result.loss_history
    print(f"saved {path} (loss {losses[0]:.4f} -> {losses[-1]:.4f}; {output.count(config.num_epochs, 'epoch')}, "
          f"{output.count(len(losses), 'step')} in {output.duration(elapsed)})")  # fmt: skip
    if result.validation:
        output.write_text(args, output.csv_text(result.validation), os.path.join(args.output, "validation.csv"))
        output.save_image(args, result.validation_grid, os.path.join(args.output, "validation.png"))
        print(f"\nvalidation on {output.count(num_held_out, 'held-out image')}:\n"
              f"{output.markdown_table(result.validation)}")  # fmt: skip
        kept = result.best_epoch or result.validation[-1]["epoch"]
        why = f"the best by --keep-best {args.keep_best}" if args.keep_best else "the last"
        if result.best_epoch and not args.keep_best:
            why = f"the best by early stopping's {args.early_stopping_metric or 's_dir'}"
        print(
            f"kept the adapter of epoch {kept} ({why}); wrote validation.csv and validation.png (rows: held-out "
            f"images as the model sees them, then their edit after each validated epoch) to {args.output}"
        )
    if result.stopped_early:
        print(f"stopped before the last epoch: {result.stop_reason}; kept the adapter of epoch {result.best_epoch}")
    if args.report_to is not None:
        print(f"{args.report_to} logs in {os.path.join(args.output, 'logs')}")


COMMAND = RegisteredCommand(
    help="train a LoRA adapter for a text edit and save it", add_arguments=add_arguments, run=run, sets_threads=True
)
