"""A fine-tuning step's wall time against its floor: the bare forward + backward of the UNet call it makes.

Issue 34 ("overhead against the floor"), as `bench_edit.py` measures `edit()` against its bare loop. The step is the
library's own (`pipe.finetune`, the step-wise ``"efficient"`` scheme: one UNet forward with gradients, the loss on
that step's x0_hat, the backward into the LoRA and the Adam step), timed between consecutive
`Trainer.backward_and_step` returns. Between two steps, outside the timed intervals, the same process times on the
same UNet and a batch of the same shape, at the step's timestep:

- **floor**: the UNet with its adapters disabled, forward + backward to its input (every activation gradient, no
  weight gradient: what the step's backward must do through the UNet);
- **+ LoRA**: the same call with the new adapter on, backward into the LoRA weights only (as the step);
- **loss**: the step's objective alone (`build_losses` of the run's settings: each CLIP's views of x0_hat and of the
  source, the L1) forward + backward on an x0_hat that needs a gradient.

So the rounds interleave, and a machine whose load changes affects the step and its floor alike. The overhead is
step / floor; "rest" = step - (+ LoRA) - loss is the scheduler step, Adam and the bookkeeping. Models:

- ``testbed``: the shipped 32 px test-bed pipeline with the test-bed's recommended recipe (two tiny CLIPs, global
  CLIP term, rank 8), 4 rendered images, batch 4;
- ``celeba256``: google/ddpm-celebahq-256's UNet architecture (random weights, no download: as `bench_edit.py`) with
  a ViT-B/16-sized CLIP (random weights, `bench_sdxl.py`'s), the library's default recipe (one CLIP, 4 views, L1,
  rank 4), 1 image, batch 1;
- ``tiny``: a toy UNet and the test-bed CLIP (the smoke run).

Timestep grid: t0 500, ``--steps`` generation steps. Training latents by forward noise (the one-off inversion is
not part of a step). Medians over the timed steps (the first ``--warmup`` skipped).

    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py                          # testbed, then celeba256
    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py --models celeba256 --steps 2 --epochs 3
    python benchmarks/bench_overhead.py --tiny                                     # smoke run (the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODELS = ("testbed", "celeba256", "tiny")


def build(model: str):
    """``(pipe, images, finetune settings)`` of ``model`` (see the module docstring)."""
    from diffusers import DDPMScheduler

    from diffusionclip_pipeline import DiffusionCLIPPipeline
    from diffusionclip_pipeline.testbed import load_pipeline, world
    from diffusionclip_pipeline.testbed.settings import RECOMMENDED_FINETUNE

    if model == "testbed":
        pipe = load_pipeline()
        images, _ = world.render_dataset(4, seed=0, size=pipe.resolution, shape="circle", colour="red")
        return pipe, images, dict(RECOMMENDED_FINETUNE, batch_size=4)
    from bench_finetune import build_unet
    from bench_sdxl import _loss_clip, _tokenizer

    tiny = model == "tiny"
    unet = build_unet("tiny" if tiny else model)
    tokenizer = _tokenizer(16 if tiny else 77)
    pipe = DiffusionCLIPPipeline(
        unet=unet, scheduler=DDPMScheduler(beta_schedule="linear"), clip_model=_loss_clip(tokenizer, tiny),
        clip_tokenizer=tokenizer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    size = unet.config.sample_size
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))  # [0, 1], as diffusers reads
    return pipe, images, dict(batch_size=1)


class Floors:
    """The floor, the floor with LoRA and the loss alone, each timed once per call, on the run's own modules."""

    def __init__(self, pipe, x: torch.Tensor, loss_fn, source):
        self.pipe, self.x, self.loss_fn, self.source = pipe, x, loss_fn, source
        self.times: dict[str, list[float]] = {"floor": [], "lora": [], "loss": []}
        self.gradient = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def _timed(self, name: str, fn) -> None:
        start = time.perf_counter()
        fn()
        self.times[name].append(time.perf_counter() - start)

    def __call__(self, t: int, params: list[torch.nn.Parameter]) -> None:
        from diffusionclip_pipeline.loaders.lora_state import adapters_disabled
        from diffusionclip_pipeline.training.state import GradFlags

        unet, timestep = self.pipe.denoiser, torch.tensor(t)

        def floor():
            x = self.x.clone().requires_grad_(True)
            flags = GradFlags(params)  # peft's disabling also clears the adapter's requires_grad
            with adapters_disabled(unet):
                (unet(x, timestep).sample * self.gradient).sum().backward()
            flags.restore()

        def lora():
            (unet(self.x, timestep).sample * self.gradient).sum().backward()

        def loss():
            x0_hat = self.x.clone().requires_grad_(True)
            self.loss_fn(self.source, x0_hat).backward()

        grads = [p.grad for p in params]  # None between steps: what the step left, put back exactly
        for name, fn in (("floor", floor), ("lora", lora), ("loss", loss)):
            self._timed(name, fn)
        for p, grad in zip(params, grads):
            p.grad = grad


def measure(model: str, steps: int, epochs: int, warmup: int) -> dict:
    """One model's row: the step's and the floors' median seconds per UNet call, and their ratios."""
    from diffusionclip_pipeline.training import FinetuneConfig
    from diffusionclip_pipeline.training.losses import build_losses
    from diffusionclip_pipeline.training.trainer import Trainer

    pipe, images, settings = build(model)
    config = FinetuneConfig.from_kwargs(
        **{**settings, "t0": 500, "num_train_steps": steps, "num_epochs": epochs, "encoding": "noise"}
    )
    x = pipe.prepare_image(images, name="images")
    loss_fn = build_losses(pipe, config, "red circle", "blue circle")
    floors = Floors(pipe, x, loss_fn, loss_fn.source_batch(x))
    stamps: list[tuple[float, float]] = []  # (step start, step end) in perf_counter seconds
    original = Trainer.backward_and_step
    resumed = [time.perf_counter()]

    def timed(self, loss, where):
        original(self, loss, where)
        stamps.append((resumed[0], time.perf_counter()))
        floors(int(where.rsplit(" ", 1)[-1]), self.params)  # "epoch e, batch b, timestep t"
        resumed[0] = time.perf_counter()

    Trainer.backward_and_step = timed
    try:
        pipe.finetune("red circle", "blue circle", images=images, config=config)
    finally:
        Trainer.backward_and_step = original
    step = statistics.median(end - start for start, end in stamps[warmup:])
    row = {"model": model, "steps_timed": len(stamps) - warmup, "batch": config.batch_size, "step_s": step}
    for name, times in floors.times.items():
        row[f"{name}_s"] = statistics.median(times[warmup:])
    row["step_over_floor"] = step / row["floor_s"]
    row["lora_over_floor"] = row["lora_s"] / row["floor_s"]
    row["rest_s"] = step - row["lora_s"] - row["loss_s"]
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["testbed", "celeba256"], choices=MODELS)
    parser.add_argument("--steps", type=int, default=6, help="generation steps per image (UNet calls per batch)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the images")
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed at the start")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also append the rows here (JSON lines)")
    parser.add_argument("--tiny", action="store_true", help="smoke run")
    args = parser.parse_args(argv)
    if args.tiny:
        args.models, args.steps, args.epochs, args.warmup = ["tiny"], 2, 2, 1
    torch.set_num_threads(args.threads)
    rows = []
    for model in args.models:
        rows.append(measure(model, args.steps, args.epochs, args.warmup))
        print(f"  done {model}: step {rows[-1]['step_s']:.3f} s", file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**rows[-1], "threads": args.threads}) + "\n")
    print(f"\nfine-tuning step vs its floor (one UNet forward + backward), CPU, {args.threads} thread(s), "
          f"t0 500, {args.steps} steps per image, median per step\n")  # fmt: skip
    print(
        "| model | batch | steps timed | step s | floor s | step / floor | + LoRA s | LoRA / floor | loss s | rest s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['steps_timed']} | {r['step_s']:.3f} | {r['floor_s']:.3f} | "
              f"**{r['step_over_floor']:.2f}** | {r['lora_s']:.3f} | {r['lora_over_floor']:.2f} | "
              f"{r['loss_s']:.3f} | {r['rest_s']:.3f} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
