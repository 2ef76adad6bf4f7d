"""`edit()` wall time against the floor: a bare loop of the same UNet calls on the same tensors.

`edit(image, t0, S_inv, S_gen)` makes S_inv + S_gen UNet evaluations (inversion with adapters bypassed, generation
with them). The floor runs exactly those evaluations with the same timesteps, the same batch and the same UNet
(LoRA attached), with no scheduler arithmetic, no input checks, no pre/post-processing. Target: edit <= 1.05 x floor.

    python benchmarks/bench_edit.py                     # the test-bed UNet (+ a LoRA adapter), batch 1 and 8
    python benchmarks/bench_edit.py --model celeba64    # the 64 px CelebA-HQ-like UNet of bench_finetune.py
    python benchmarks/bench_edit.py --tiny              # smoke run (used by the tests)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_finetune import build_unet  # noqa: E402


def build_pipeline(model: str, device: str):
    from diffusers import DDPMScheduler

    from diffusionclip_pipeline import DiffusionCLIPPipeline
    from diffusionclip_pipeline.loaders.lora_state import LoraSettings, add_adapter

    unet = build_unet(model).eval()
    add_adapter(unet, LoraSettings(), "bench")  # edits run with an adapter, as a user's do
    pipe = DiffusionCLIPPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="linear"))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, repeats: int, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(pipe, batch: int, t0: int, steps: int, repeats: int) -> tuple[float, float]:
    from diffusionclip_pipeline.loaders.lora_state import adapters_disabled
    from diffusionclip_pipeline.scheduling_ddim_grid import ddim_timesteps

    device = pipe.device
    size = pipe.unet.config.sample_size
    image = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    grid = ddim_timesteps(t0, steps)
    inv_labels = [max(t, 0) for t in [-1] + grid[:-1]]
    gen_labels = grid[::-1]

    @torch.no_grad()
    def floor():
        x = image
        with adapters_disabled(pipe.unet):
            for t in inv_labels:
                x = pipe.unet(x, torch.tensor(t, device=device)).sample
        for t in gen_labels:
            x = pipe.unet(x, torch.tensor(t, device=device)).sample
        return x

    def edit():
        return pipe.edit(image, t0=t0, num_inversion_steps=steps, num_inference_steps=steps, output_type="pt")

    return time_it(edit, repeats, device), time_it(floor, repeats, device)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed", help="testbed, celeba64, celeba128, celeba256 or tiny")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--t0", type=int, default=500)
    parser.add_argument("--steps", type=int, default=40, help="S_inv = S_gen")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="smoke run")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.batches, args.steps, args.repeats = "tiny", [1, 2], 3, 1
    torch.set_num_threads(args.threads)
    pipe = build_pipeline(args.model, args.device)
    rows = []
    for batch in args.batches:
        edit_s, floor_s = measure(pipe, batch, args.t0, args.steps, args.repeats)
        rows.append(dict(batch=batch, edit_s=edit_s, floor_s=floor_s))
    print(f"\nedit() vs bare UNet loop: model {args.model}, {args.device}, {args.threads} threads, t0 {args.t0}, "
          f"{args.steps}+{args.steps} steps, median of {args.repeats}\n")  # fmt: skip
    print("| batch | edit s | floor s | edit / floor | images/s | throughput vs batch 1 |")
    print("|---|---|---|---|---|---|")
    base = rows[0]["batch"] / rows[0]["edit_s"]
    for r in rows:
        rate = r["batch"] / r["edit_s"]
        print(f"| {r['batch']} | {r['edit_s']:.3f} | {r['floor_s']:.3f} | {r['edit_s'] / r['floor_s']:.3f} | "
              f"{rate:.2f} | {rate / base:.2f} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
