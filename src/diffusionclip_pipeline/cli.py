"""The ``diffusionclip`` command: ``finetune | edit | translate | demo``, mirroring the Python API.

``--model`` takes a hub id (``google/ddpm-celebahq-256``; needs the internet), a local pipeline or DDPM folder, or
``testbed`` (the small offline world shipped with the package). Bad arguments end with one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

import PIL.Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class CLIError(Exception):
    """A user error: printed as one line."""


# ---- shared helpers (also used by the examples) ----------------------------------------------------------------


def read_images(paths: list[str]) -> tuple[list[PIL.Image.Image], list[str]]:
    """Images from files and folders (sorted), converted to RGB; returns the images and their file names."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise CLIError(f"no such image file or folder: {path}")
    if not files:
        raise CLIError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {paths}")
    images = []
    for f in files:
        try:
            images.append(PIL.Image.open(f).convert("RGB"))
        except (OSError, PIL.UnidentifiedImageError) as error:
            raise CLIError(f"cannot read image {f}: {error}") from error
    return images, [os.path.basename(f) for f in files]


def load_pipeline(model: str, clip: str | None = None, device: str | None = None, clip_2: str | None = None):
    """A `DiffusionCLIPPipeline` from a hub id, a folder, or ``"testbed"``; ``clip_2`` sets its second CLIP."""
    from .pipeline_diffusionclip import DiffusionCLIPPipeline

    if model == "testbed":
        from .testbed import load_pipeline as load_testbed

        pipe = load_testbed()
    else:
        pipe = DiffusionCLIPPipeline.from_pretrained(model, clip_model_name_or_path=clip)
    if clip_2:
        try:
            pipe.load_clip(clip_2, second=True)
        except OSError as error:
            raise CLIError(f"cannot load --clip-2 {clip_2!r}: {error}") from error
    if device:
        pipe.to(device)
    return pipe


def image_grid(rows: list[list[PIL.Image.Image]], pad: int = 2) -> PIL.Image.Image:
    """Pastes rows of equally sized images into one white-padded grid image."""
    if not rows or not rows[0]:
        raise ValueError("`rows` must hold at least one image.")
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = PIL.Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((w, h)), (pad + j * (w + pad), pad + i * (h + pad)))
    return grid


def save_atomic(image: PIL.Image.Image, path: str) -> None:
    tmp = path + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, path)


# ---- sub-commands ------------------------------------------------------------------------------------------------


def _with_testbed_defaults(model: str, settings: dict, recommended: str) -> dict:
    """The options given (``None``: not given) over the test-bed's ``recommended`` settings for ``--model testbed``."""
    settings = {k: v for k, v in settings.items() if v is not None}
    if model != "testbed":
        return settings
    from . import testbed

    return {**getattr(testbed, recommended), **settings}


def _finetune(args) -> None:
    images = read_images(args.images)[0] if args.images else None
    pipe = load_pipeline(args.model, args.clip, args.device, clip_2=args.clip_2)
    settings = dict(
        t0=args.t0, num_inversion_steps=args.num_inversion_steps, num_train_steps=args.num_train_steps,
        num_epochs=args.num_epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
        lora_rank=args.lora_rank, l1_loss_weight=args.l1_loss_weight, scheme=args.scheme, seed=args.seed,
        num_fixed_point_iterations=args.num_fixed_point_iterations,
    )  # fmt: skip
    if args.lora_rank is not None:  # keep the LoRA scale alpha / r at 1, as the defaults and the test-bed's settings
        settings["lora_alpha"] = float(args.lora_rank)
    settings = _with_testbed_defaults(args.model, settings, "RECOMMENDED_FINETUNE")
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
    settings = _with_testbed_defaults(args.model, settings, "RECOMMENDED_EDIT")
    os.makedirs(args.output, exist_ok=True)
    rows = []
    for start in range(0, len(images), args.batch_size):
        batch = images[start : start + args.batch_size]
        edited = pipe.edit(batch, strength=args.strength, **settings).images
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


def _demo(args) -> None:
    from .testbed.demo import run_demo

    run_demo(output_dir=args.output, source=args.source, target=args.target, num_test=args.num_test, seed=args.seed)


def _transpose(rows: list[list[PIL.Image.Image]]) -> list[list[PIL.Image.Image]]:
    return [list(column) for column in zip(*rows)] if rows else rows


# ---- argument parsing ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusionclip",
        description="DiffusionCLIP (CVPR 2022) text-driven image editing with LoRA-fine-tuned diffusers DDPMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{finetune,edit,translate,demo}")

    def model_args(p):
        p.add_argument("--model", required=True, help="hub id, pipeline/DDPM folder, or 'testbed' (offline)")
        p.add_argument("--clip", default=None, help="CLIP id or folder if the model has none")
        p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")

    p = sub.add_parser("finetune", help="train a LoRA adapter for a text edit and save it")
    model_args(p)
    p.add_argument("--src", required=True, help="source text, e.g. 'face'")
    p.add_argument("--tar", required=True, help="target text, e.g. 'smiling face'")
    p.add_argument("--images", nargs="*", help="training image files/folders (default: sampled from the model)")
    p.add_argument("--output", required=True, help="folder for pytorch_lora_weights.safetensors")
    p.add_argument("--clip-2", default=None,
                   help="a second CLIP (id or folder): the CLIP loss is averaged over both (e.g. ViT-B/32 + B/16)")
    for flag, kind in [
        ("--t0", int), ("--num-inversion-steps", int), ("--num-train-steps", int), ("--num-epochs", int),
        ("--learning-rate", float), ("--batch-size", int), ("--lora-rank", int), ("--l1-loss-weight", float),
        ("--seed", int), ("--num-fixed-point-iterations", int),
    ]:  # fmt: skip
        note = "; LoRA alpha is set to it (scale 1)" if flag == "--lora-rank" else ""
        p.add_argument(flag, type=kind, default=None, help=f"see FinetuneConfig (default: its value){note}")
    p.add_argument("--scheme", choices=("efficient", "full_chain"), default=None)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("edit", help="edit images with one or more adapters; writes edited images and a grid")
    model_args(p)
    p.add_argument("--images", nargs="+", required=True, help="image files/folders")
    p.add_argument("--lora", nargs="*", help="adapter folders/files (mixed with --lora-weights)")
    p.add_argument("--lora-weights", nargs="*", type=float, help="one weight per --lora adapter")
    p.add_argument("--output", required=True)
    for flag in ("--t0", "--num-inversion-steps", "--num-inference-steps", "--num-fixed-point-iterations"):
        p.add_argument(flag, type=int, default=None, help="see `edit` (default: its value; testbed: RECOMMENDED_EDIT)")
    p.add_argument("--strength", type=float, default=1.0, help="edit strength r (0: reconstruction, 1: full edit)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_edit)

    p = sub.add_parser("translate", help="pull out-of-domain images (strokes) onto the model's domain, then edit")
    model_args(p)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--lora", nargs="*", help="adapter(s) for the final edit (none: domain translation only)")
    p.add_argument("--output", required=True)
    p.add_argument("--t0", type=int, default=500)
    p.add_argument("--edit-t0", type=int, default=None)
    p.add_argument("--n-iter", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_translate)

    p = sub.add_parser("demo", help="offline: fine-tune the test-bed for a colour edit, edit held-out images")
    p.add_argument("--output", default="diffusionclip-demo", help="folder for the grid and the adapter")
    p.add_argument("--source", default="red", help="source colour (red, green, blue, yellow)")
    p.add_argument("--target", default="blue", help="target colour (blue <-> yellow fail: README)")
    p.add_argument("--num-test", type=int, default=16, help="held-out images to edit")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"diffusionclip {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
