"""Fine-tuning cost: the original DiffusionCLIP schemes against ours (LoRA, step-wise), on the same UNet.

Schemes (DiffusionCLIP, arXiv 2110.02711; `shared/reference/official.md` section 2):
  original       all UNet weights, Adam, backprop through the whole S_gen chain, loss on the final image
  original_eff   all UNet weights, Adam, one step per generation step with the loss on x0_hat (GPU-efficient)
  lora_eff       ours: LoRA (rank 4, default targets), step-wise as original_eff; also with gradient checkpointing
                 and with a larger batch

Every configuration runs in a fresh subprocess (peak RSS on CPU is per process; CUDA max_memory_allocated on GPU),
on random precomputed latents (the one-off inversion is not part of an epoch), with the directional CLIP + L1 loss
of the test-bed's tiny CLIP (the real ViT-B/16 adds the same cost to every scheme). Time per epoch is the median of
``--epochs`` epochs after one warm-up epoch.

    python benchmarks/bench_finetune.py                      # test-bed UNet, 64 px and 128 px CelebA-HQ-like UNets
    python benchmarks/bench_finetune.py --models celeba256   # the full 256 px architecture (GPU)
    python benchmarks/bench_finetune.py --tiny               # a seconds-long smoke run (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SCHEMES = {
    # name: (trainable, scheme, gradient checkpointing, batch size multiplier, bf16 autocast)
    "original": ("full", "full_chain", False, 1, False),
    "original_eff": ("full", "efficient", False, 1, False),
    "lora_eff": ("lora", "efficient", False, 1, False),
    "lora_eff_gc": ("lora", "efficient", True, 1, False),
    "lora_eff_b4": ("lora", "efficient", False, 4, False),
    "lora_eff_b4_bf16": ("lora", "efficient", False, 4, True),
}

# google/ddpm-celebahq-256's block structure; `div` scales the channels down for the CPU-sized variants.
CELEBA_BLOCKS = dict(
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    layers_per_block=2,
)


def build_unet(model: str):
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    if model == "testbed":
        from diffusionclip_pipeline.testbed.pipeline import WEIGHTS_DIR

        config = UNet2DModel.load_config(os.environ.get("TESTBED_UNET", os.path.join(WEIGHTS_DIR, "unet")))
        return UNet2DModel.from_config(config)  # the test-bed architecture (random weights: cost only)
    if model == "tiny":
        return UNet2DModel(
            sample_size=16, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
            layers_per_block=1,
        )  # fmt: skip
    size, div = {"celeba64": (64, 4), "celeba128": (128, 4), "celeba256": (256, 1)}[model]
    channels = tuple(c // div for c in (128, 128, 256, 256, 512, 512))
    return UNet2DModel(sample_size=size, block_out_channels=channels, norm_num_groups=32 // div, **CELEBA_BLOCKS)


def build_clip(image_size: int):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=599),
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           image_size=32, patch_size=4),
        projection_dim=64,
    )  # fmt: skip
    return CLIPModel(config).eval()


def worker(cfg: dict) -> dict:
    """One configuration, in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    from diffusionclip_pipeline.loaders.lora_file import save_adapter
    from diffusionclip_pipeline.loaders.lora_state import LoraSettings, adapter_parameters, add_adapter
    from diffusionclip_pipeline.scheduling_ddim_grid import GridDDIMScheduler, ddim_timesteps
    from diffusionclip_pipeline.training.losses import direction_loss

    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    trainable, scheme, gc, batch_mult, bf16 = SCHEMES[cfg["scheme"]]
    unet = build_unet(cfg["model"]).to(device)
    clip = build_clip(unet.config.sample_size).to(device).requires_grad_(False)
    if trainable == "lora":
        unet.requires_grad_(False)
        add_adapter(unet, LoraSettings(), "bench")
        params = adapter_parameters(unet, "bench")
    else:
        params = list(unet.parameters())
    if gc:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.Adam(params, lr=1e-5)
    scheduler = GridDDIMScheduler(clip_sample=False)
    grid = ddim_timesteps(500, cfg["steps"])
    scheduler.set_timesteps(timesteps=grid)
    batch = cfg["batch"] * batch_mult
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(cfg["images"], 3, size, size, generator=gen) * 2 - 1).to(device)
    latents = torch.randn(cfg["images"], 3, size, size, generator=gen).to(device)
    text_direction = F.normalize(torch.randn(clip.config.projection_dim, generator=gen), dim=0).to(device)

    def embed(images):
        pixels = F.interpolate((images + 1) / 2, size=32, mode="bicubic", antialias=True)
        out = clip.get_image_features(pixel_values=pixels)
        return F.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)

    def loss_on(src, pred):
        with torch.no_grad():
            e_src = embed(src)
        return direction_loss(embed(pred) - e_src, text_direction).mean() + 0.6 * (src - pred).abs().mean()

    def predict(x, t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return unet(x, t).sample.float()

    def epoch():
        for start in range(0, cfg["images"], batch):
            x, src = latents[start : start + batch], x0[start : start + batch]
            if scheme == "efficient":
                for t in grid[::-1]:
                    step = scheduler.step(predict(x, t), t, x)
                    loss = loss_on(src, step.pred_original_sample)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    x = step.prev_sample.detach()
            else:
                for t in grid[::-1]:
                    x = scheduler.step(predict(x, t), t, x).prev_sample
                loss_on(src, x).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start_bytes = torch.cuda.memory_allocated() if device.type == "cuda" else _current_rss()
    times = []
    for _ in range(cfg["epochs"] + 1):
        start = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        if trainable == "lora":
            path = save_adapter(unet, tmp, "bench")
        else:
            from safetensors.torch import save_file

            path = os.path.join(tmp, "unet.safetensors")
            save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, path)
        artefact = os.path.getsize(path)
    peak = (
        torch.cuda.max_memory_allocated() if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )  # fmt: skip
    return {
        **cfg,
        "epoch_s": statistics.median(times[1:]),
        "peak_bytes": peak,
        "train_bytes": peak - start_bytes,
        "trainable": sum(p.numel() for p in params),
        "artefact_bytes": artefact,
    }


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_config(cfg: dict, in_process: bool, run=None, script: str = __file__) -> dict:
    """One configuration's row: ``run(cfg)`` here (default: this script's `worker`), or ``script --worker cfg`` in a
    fresh process, so that each configuration's peak RSS is its own (bench_fast.py passes its worker and path)."""
    if in_process:
        return (run or worker)(cfg)
    out = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(cfg)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"configuration {cfg} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["testbed", "celeba64", "celeba128"])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--steps", nargs="+", type=int, default=[6], help="S_gen values (memory vs S_gen)")
    parser.add_argument("--images", type=int, default=4, help="images per epoch")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny UNet, in-process, 1 epoch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return []
    if args.tiny:
        args.models, args.schemes, args.images, args.epochs, args.steps = ["tiny"], ["original", "lora_eff"], 2, 1, [2]
    rows = []
    for model in args.models:
        for steps in args.steps:
            for scheme in args.schemes:
                cfg = dict(model=model, scheme=scheme, steps=steps, images=args.images, batch=args.batch,
                           epochs=args.epochs, threads=args.threads, device=args.device)  # fmt: skip
                rows.append(run_config(cfg, in_process=args.tiny))
                print(f"  done {model} S_gen={steps} {scheme}: {rows[-1]['epoch_s']:.2f} s/epoch", file=sys.stderr)
    print_table(rows, args)
    return rows


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def print_table(rows: list[dict], args) -> None:
    import platform

    memory = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS"
    machine = platform.processor() or platform.machine()
    print(f"\nfine-tuning cost on {args.device} ({machine}, {args.threads} threads); {args.images} images/epoch, "
          f"batch {args.batch} (x4 for *_b4*); median of {args.epochs} epochs after a warm-up one")  # fmt: skip
    print("training part = peak minus the memory held before the first epoch (models, data, Python)\n")
    head = ("model", "S_gen", "scheme", "s/epoch", "x orig", "x eff", memory, "training part", "x orig", "trainable",
            "artefact")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        base = {s["scheme"]: s for s in rows if s["model"] == r["model"] and s["steps"] == r["steps"]}
        o, e = base.get("original"), base.get("original_eff")
        cells = (
            r["model"], str(r["steps"]), r["scheme"], f"{r['epoch_s']:.3f}",
            f"{r['epoch_s'] / o['epoch_s']:.2f}" if o else "-", f"{r['epoch_s'] / e['epoch_s']:.2f}" if e else "-",
            fmt_bytes(r["peak_bytes"]), fmt_bytes(r["train_bytes"]),
            f"{r['train_bytes'] / o['train_bytes']:.2f}" if o else "-",
            f"{r['trainable']:,}", fmt_bytes(r["artefact_bytes"]),
        )  # fmt: skip
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
