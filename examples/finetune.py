"""Fine-tune a DiffusionCLIP LoRA adapter and save it.

Single process:
    python examples/finetune.py --model google/ddpm-celebahq-256 --src face --tar "smiling face" \
        --images faces/ --output smile/
    ... --clip-2 openai/clip-vit-base-patch32     # average the CLIP loss over two CLIPs (B/16 + B/32)
Validate on held-out images after every epoch and keep the best one (scores in the table it prints; with
--report-to tensorboard also in OUTPUT/logs):
    ... --validation-images held_out/ --keep-best s_dir --keep-best-min-ssim 0.6 --report-to tensorboard
Data-parallel over the training images (the same script, unchanged):
    accelerate launch --multi_gpu --num_processes 4 examples/finetune.py ...    # GPUs
    torchrun --nproc_per_node 2 examples/finetune.py ...                         # CPU (accelerate MULTI_CPU, gloo)
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import torch


def parse_args(argv=None) -> argparse.Namespace:
    from diffusionclip_pipeline.commands import checked

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Pipeline folder, DDPM repository id/folder, or 'testbed'.")
    parser.add_argument("--clip", default=None, help="CLIP id or folder when the model folder has none.")
    parser.add_argument("--clip-2", default=None, help="A second CLIP (id or folder); the CLIP loss averages both.")
    parser.add_argument("--src", required=True, help="Source text, e.g. 'face'.")
    parser.add_argument("--tar", required=True, help="Target text, e.g. 'smiling face'.")
    parser.add_argument("--images", nargs="*", default=None, help="Image files or folders (default: sample).")
    parser.add_argument("--output", required=True, help="Folder for pytorch_lora_weights.safetensors.")
    parser.add_argument("--t0", type=int, default=None)
    parser.add_argument("--num-inversion-steps", type=int, default=None)
    parser.add_argument("--num-train-steps", type=int, default=None)
    parser.add_argument("--num-epochs", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--l1-loss-weight", type=float, default=None)
    parser.add_argument("--scheme", choices=("efficient", "full_chain"), default=None)
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None)
    parser.add_argument("--num-sampled-images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="Folder caching the inverted latents.")
    parser.add_argument("--validation-images", nargs="+", default=None, help="Held-out image files or folders.")
    parser.add_argument("--validation-epochs", type=int, default=1, help="Validate after every K-th epoch.")
    parser.add_argument("--keep-best", default=None, choices=("s_dir", "s_dir_2", "clip_score", "mae", "ssim"),
                        help="Keep the adapter of the best validated epoch by this score.")  # fmt: skip
    parser.add_argument("--keep-best-min-ssim", type=float, default=None, help="Identity floor for --keep-best.")
    parser.add_argument("--report-to", default=None, help="An accelerate tracker, e.g. tensorboard (OUTPUT/logs).")
    parser.add_argument("--threads", type=int, default=None, action=checked("check_positive_int"),
                        help="CPU threads per process (default: OMP_NUM_THREADS, else 1 for --model testbed, else "
                             "torch's default); on a busy machine fewer threads are faster")  # fmt: skip
    return parser.parse_args(argv)


def adapter_digest(pipe, adapter_name: str) -> str:
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(pipe.unet, adapter_name=adapter_name)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + state[key].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def main(argv=None) -> int:
    import os

    from accelerate import PartialState

    from diffusionclip_pipeline.commands import load_pipeline, set_num_threads  # load: hub ids, folders, 'testbed'
    from diffusionclip_pipeline.image_io import read_images
    from diffusionclip_pipeline.training import FinetuneConfig, finetune

    args = parse_args(argv)
    set_num_threads(args.threads, recommended=1 if args.model == "testbed" else None)
    state = PartialState(cpu=not torch.cuda.is_available())
    pipe = load_pipeline(args.model, args.clip, clip_2=args.clip_2)
    pipe.set_progress_bar_config(disable=not state.is_main_process)
    images = read_images(args.images)[0] if args.images else None
    settings = dict(
        t0=args.t0, num_inversion_steps=args.num_inversion_steps, num_train_steps=args.num_train_steps,
        num_epochs=args.num_epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
        lora_rank=args.lora_rank, l1_loss_weight=args.l1_loss_weight, scheme=args.scheme,
        mixed_precision=args.mixed_precision, num_sampled_images=args.num_sampled_images, seed=args.seed,
    )  # fmt: skip
    if args.lora_rank is not None:
        settings["lora_alpha"] = float(args.lora_rank)
    settings = {k: v for k, v in settings.items() if v is not None}  # unset: FinetuneConfig's defaults
    validation = dict(
        validation_images=read_images(args.validation_images)[0] if args.validation_images else None,
        validation_epochs=args.validation_epochs, keep_best=args.keep_best,
        keep_best_min_ssim=args.keep_best_min_ssim, report_to=args.report_to,
        logging_dir=os.path.join(args.output, "logs") if args.report_to else None,
    )  # fmt: skip
    output = finetune(
        pipe, args.src, args.tar, images=images, config=FinetuneConfig(**settings), cache_dir=args.cache_dir,
        **validation,
    )  # fmt: skip
    digest = adapter_digest(pipe, output.adapter_name)
    print(f"rank {state.process_index}/{state.num_processes} adapter-sha256 {digest}", flush=True)
    if state.is_main_process:
        path = pipe.save_lora_weights(args.output)
        print(f"saved {path}; loss {output.loss_history[0]:.4f} -> {output.loss_history[-1]:.4f}")
        for entry in output.validation:
            print("validation " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in entry.items()))  # fmt: skip
        if output.best_epoch is not None:
            print(f"kept epoch {output.best_epoch} (best by {args.keep_best})")
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
