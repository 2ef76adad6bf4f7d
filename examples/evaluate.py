"""Evaluate an adapter: directional CLIP similarity of its edits, and the reconstruction error of the base model.

    python examples/evaluate.py --model google/ddpm-celebahq-256 --lora smile/ --src face --tar "smiling face" \
        --images faces/ --device cuda
    python examples/evaluate.py --testbed          # offline: a freshly fine-tuned red -> blue adapter, test-bed
Sweep mode: the edit over edit strength x inversion depth (one table row and one grid row per setting):
    python examples/evaluate.py --model ... --lora smile/ --src face --tar "smiling face" --images faces/ \
        --sweep --t0s 300 400 500 --edit-strengths 0.5 1 1.5 --output sweep/
    python examples/evaluate.py --testbed --sweep --output sweep/

Prints a table: S_dir (mean cosine between the CLIP image change and the text change; DiffusionCLIP Sec. 4),
reconstruction MAE (on [0, 1]) and SSIM of invert -> regenerate without the adapter, and the edit's own MAE/SSIM
against its input (how much of the image it kept). With --sweep: per setting, s_dir, mae, ssim and clip_score
(`evaluation.sweep`), and with --output the grid (grid.png: inputs, then one row per setting) and metrics.csv.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from diffusionclip_pipeline.commands import checked

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or folder (real models)")
    parser.add_argument("--lora", default=None, help="adapter folder or file")
    parser.add_argument("--src", default=None)
    parser.add_argument("--tar", default=None)
    parser.add_argument("--images", nargs="*")
    parser.add_argument("--t0", type=int, default=500)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default=None)
    parser.add_argument("--testbed", action="store_true", help="offline run on the shipped test-bed")
    parser.add_argument("--sweep", action="store_true", help="sweep edit strength x t0 (see --t0s, --edit-strengths)")
    parser.add_argument("--t0s", nargs="+", type=int, default=[300, 400, 500], help="inversion depths to sweep")
    parser.add_argument("--edit-strengths", nargs="+", type=float, default=[0.5, 1.0, 1.5], help="strengths to sweep")
    parser.add_argument("--output", default=None, help="folder for grid.png and metrics.csv (--sweep)")
    parser.add_argument("--threads", type=int, default=None, action=checked("check_positive_int"),
                        help="CPU threads (default: OMP_NUM_THREADS, else 1 with --testbed, whose models are tiny, "
                             "else torch's default); on a busy machine fewer threads are faster")  # fmt: skip
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from diffusionclip_pipeline import CLIPDirectionalLoss, DiffusionCLIPPipeline
    from diffusionclip_pipeline.commands import set_num_threads
    from diffusionclip_pipeline.evaluation import directional_clip_similarity, mean_absolute_error, ssim
    from diffusionclip_pipeline.image_io import read_images

    args = parse_args(argv)
    set_num_threads(args.threads, recommended=1 if args.testbed else None)
    if args.testbed:
        from diffusionclip_pipeline import testbed
        from diffusionclip_pipeline.testbed import RECOMMENDED_EDIT, RECOMMENDED_FINETUNE, render_dataset

        pipe = testbed.load_pipeline()
        src, tar = "red circle", "blue circle"
        train, _ = render_dataset(16, seed=0, shape="circle", colour="red")
        images, _ = render_dataset(8, seed=1, shape="circle", colour="red")
        pipe.finetune(src, tar, images=train, **RECOMMENDED_FINETUNE)
        kwargs = dict(RECOMMENDED_EDIT)
    else:
        if not (args.model and args.lora and args.src and args.tar and args.images):
            raise SystemExit("error: pass --model, --lora, --src, --tar and --images (or --testbed)")
        pipe = DiffusionCLIPPipeline.from_pretrained(args.model)
        if args.device:
            pipe.to(args.device)
        pipe.load_lora_weights(args.lora)
        src, tar, images = args.src, args.tar, read_images(args.images)[0]
        kwargs = dict(t0=args.t0, num_inversion_steps=args.steps, num_inference_steps=args.steps)
    if args.sweep:
        return run_sweep(pipe, images, src, tar, kwargs, args)
    edited = pipe.edit(images, **kwargs).images
    pipe.disable_lora()
    reconstructed = pipe.edit(images, **kwargs).images
    pipe.enable_lora()
    pipe.require_clip()
    loss_fn = CLIPDirectionalLoss(pipe.clip_model, pipe.clip_tokenizer).to(pipe.device)
    results = {
        "S_dir (edit)": directional_clip_similarity(loss_fn, images, edited, src, tar),
        "MAE (reconstruction)": mean_absolute_error(reconstructed, images),
        "SSIM (reconstruction)": ssim(reconstructed, images),
        "MAE (edit vs input)": mean_absolute_error(edited, images),
        "SSIM (edit vs input)": ssim(edited, images),
    }
    print(f"\n'{src}' -> '{tar}' on {len(images)} images, t0 {kwargs.get('t0', 500)}\n")
    print("| metric | value |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.4f} |")
    return results


def run_sweep(pipe, images, src: str, tar: str, kwargs: dict, args) -> list[dict]:
    """`evaluation.sweep` over ``--t0s`` x ``--edit-strengths`` (the other edit settings as in the single mode)."""
    import csv
    import os

    from diffusionclip_pipeline.evaluation import sweep

    kwargs = {k: v for k, v in kwargs.items() if k != "t0"}
    out = sweep(pipe, images, src, tar, edit_strengths=args.edit_strengths, t0s=args.t0s, **kwargs)
    columns = list(out.table[0])
    print(f"\n'{src}' -> '{tar}' on {len(images)} images\n")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in out.table:
        print("| " + " | ".join(f"{row[k]:.4f}" if k not in ("t0", "edit_strength") else f"{row[k]:g}"
                                for k in columns) + " |")  # fmt: skip
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        out.grid.save(os.path.join(args.output, "grid.png"))
        with open(os.path.join(args.output, "metrics.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(out.table)
        print(f"wrote grid.png (inputs, then one row per setting) and metrics.csv to {args.output}")
    return out.table


if __name__ == "__main__":
    main()
    sys.exit(0)
