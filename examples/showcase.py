"""The paper's showcase edits with real DDPMs (needs the internet and, realistically, a GPU).

    python examples/showcase.py --edit smiling --images faces/ --output out/      # google/ddpm-celebahq-256
    python examples/showcase.py --edit gothic --images churches/ --output out/    # google/ddpm-church-256
    python examples/showcase.py --edit smiling --testbed --output out/            # offline, on the test-bed

Presets follow DiffusionCLIP's released settings where it published them (t0 601 for Pixar / Neanderthal, the
README's 40 inversion / 6 training / 40 test steps), with our LoRA learning rate. ``--testbed`` swaps the real model
for the shipped shapes world and the prompts for a colour edit of the same kind, so the script runs offline in
about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

PRESETS = {
    # name: (model id, source text, target text, t0)
    "smiling": ("google/ddpm-celebahq-256", "face", "smiling face", 500),
    "pixar": ("google/ddpm-celebahq-256", "Human", "3D render in the style of Pixar", 601),
    "neanderthal": ("google/ddpm-celebahq-256", "Human", "Neanderthal", 601),
    "gothic": ("google/ddpm-church-256", "Church", "Gothic church", 500),
    "bedroom": ("google/ddpm-bedroom-256", "Bedroom", "Wooden bedroom", 500),
}
REAL_SETTINGS = dict(num_inversion_steps=40, num_train_steps=6, num_epochs=5, learning_rate=1e-4, batch_size=1,
                     l1_loss_weight=0.3, global_clip_loss_weight=0.0)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    from diffusionclip_pipeline.commands import checked

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edit", choices=sorted(PRESETS), required=True)
    parser.add_argument("--images", nargs="*", help="training/test image files or folders (real models)")
    parser.add_argument("--num-train", type=int, default=30, help="images used for fine-tuning (rest are edited)")
    parser.add_argument("--output", required=True, help="folder for the adapter and the before/after grid")
    parser.add_argument("--device", default=None, help="e.g. cuda")
    parser.add_argument("--testbed", action="store_true", help="run offline on the shipped test-bed instead")
    parser.add_argument("--threads", type=int, default=None, action=checked("check_positive_int"),
                        help="CPU threads (default: OMP_NUM_THREADS, else 1 with --testbed, whose models are tiny, "
                             "else torch's default); on a busy machine fewer threads are faster")  # fmt: skip
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from diffusionclip_pipeline import DiffusionCLIPPipeline
    from diffusionclip_pipeline.commands import set_num_threads
    from diffusionclip_pipeline.image_io import image_grid, read_images, save_atomic

    args = parse_args(argv)
    set_num_threads(args.threads, recommended=1 if args.testbed else None)
    model, src, tar, t0 = PRESETS[args.edit]
    if args.testbed:
        from diffusionclip_pipeline import testbed
        from diffusionclip_pipeline.testbed import RECOMMENDED_EDIT, RECOMMENDED_FINETUNE, render_dataset

        pipe = testbed.load_pipeline()
        src, tar = "red circle", "blue circle"
        train, _ = render_dataset(16, seed=0, shape="circle", colour="red")
        test, _ = render_dataset(8, seed=1, shape="circle", colour="red")
        settings, edit_settings = dict(RECOMMENDED_FINETUNE), dict(RECOMMENDED_EDIT)
    else:
        if not args.images:
            raise SystemExit("error: --images is needed with a real model (or pass --testbed)")
        images = read_images(args.images)[0]
        if len(images) <= args.num_train:
            raise SystemExit(f"error: need more than --num-train={args.num_train} images, got {len(images)}")
        train, test = images[: args.num_train], images[args.num_train :]
        pipe = DiffusionCLIPPipeline.from_pretrained(model)
        if args.device:
            pipe.to(args.device)
        settings, edit_settings = dict(REAL_SETTINGS, t0=t0), dict(t0=t0)
    pipe.finetune(src, tar, images=train, **settings)
    edited = pipe.edit(test, **edit_settings).images
    os.makedirs(args.output, exist_ok=True)
    pipe.save_lora_weights(args.output)
    size = edited[0].size
    save_atomic(image_grid([[im.resize(size) for im in test], edited]), os.path.join(args.output, "grid.png"))
    print(f"{args.edit}: '{src}' -> '{tar}', edited {len(test)} images; wrote {args.output}/grid.png and the adapter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
