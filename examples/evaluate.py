"""Evaluate an adapter: directional CLIP similarity of its edits, and the reconstruction error of the base model.

    python examples/evaluate.py --model google/ddpm-celebahq-256 --lora smile/ --src face --tar "smiling face" \
        --images faces/ --device cuda
    python examples/evaluate.py --testbed          # offline: a freshly fine-tuned red -> blue adapter, test-bed

Prints a table: S_dir (mean cosine between the CLIP image change and the text change; DiffusionCLIP Sec. 4),
reconstruction MAE (on [0, 1]) and SSIM of invert -> regenerate without the adapter, and the edit's own MAE/SSIM
against its input (how much of the image it kept).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from diffusionclip_pipeline.cli import checked

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
    parser.add_argument("--threads", type=int, default=None, action=checked("check_positive_int"),
                        help="CPU threads (default: OMP_NUM_THREADS, else 1 with --testbed, whose models are tiny, "
                             "else torch's default); on a busy machine fewer threads are faster")  # fmt: skip
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from diffusionclip_pipeline import CLIPDirectionalLoss, DiffusionCLIPPipeline
    from diffusionclip_pipeline.cli import set_num_threads
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


if __name__ == "__main__":
    main()
    sys.exit(0)
