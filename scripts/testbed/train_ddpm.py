"""Train the test-bed's tiny unconditional DDPM (diffusers ``UNet2DModel``, epsilon prediction) on one CPU thread.

Data is rendered on the fly from :mod:`diffusionclip_pipeline.testbed.world` (about 1 ms per batch). Choices
made for wall-clock speed on one CPU thread:

- a 4-level UNet (16/32/64/128 channels at 32/16/8/4 px, one ResNet per block, attention at 8x8, 4x4 and in
  the mid block; 2.74 M parameters): 0.28 s per fwd+bwd of a batch of 32 vs 0.39 s for the 32/64/128
  3-level net, and the 4x4 level gives global context (one colour per blob, white background);
- bf16 autocast + channels-last (the CPU has AMX/AVX512-bf16);
- min-SNR-gamma loss weighting (gamma = 5, Hang et al. 2023), which spends less effort on nearly clean
  timesteps;
- AdamW with warmup, constant LR, then cosine decay over the last `--decay-frac` of the run, where the run's
  length is `--max-steps` or the wall-clock `--budget-minutes`, whichever runs out first (so a run that
  shares the CPU still finishes its LR decay in time; with a budget the schedule is not bit-reproducible);
- EMA of the weights (decay 0.999 with the usual (1 + n) / (10 + n) warm-up); evaluation and export use it.

Scheduler: ``DDPMScheduler`` linear betas 1e-4 .. 0.02, 1000 steps (as google/ddpm-celebahq-256).

Outputs under ``--out`` (default ``build/testbed/ddpm``): ``ckpt.pt`` (resumable: model, EMA, optimizer, RNG
states, step), ``ema_unet/`` and ``scheduler/`` (diffusers layout, refreshed at every evaluation),
``log.jsonl`` (loss and evaluations), ``samples_<step>.png``.

Evaluation every `--eval-every` steps: 64 unconditional DDIM samples (50 steps, clip_sample=False, fixed seed)
scored with ``world.is_clean_shape`` (clean fraction, clean counts per colour / shape, failure reasons), plus
the DDIM invert -> regenerate MAE (t0 = 500, 40 + 40 steps) on 16 fresh images.

Run time (measured on this 2-core Xeon with AMX, 1 thread): about 0.30 s per step with batch 32, about 25 s
per evaluation; the long run of 20 000 steps is about 1 h 50 min.

``kill -TERM <pid>`` finishes the current step, checkpoints, evaluates and exits.

Usage::

    python scripts/testbed/train_ddpm.py --max-steps 25000 --budget-minutes 120   # fresh run
    python scripts/testbed/train_ddpm.py --max-steps 40000 --budget-minutes 240 --resume
    # --resume continues from ckpt.pt; the LR schedule is re-computed from the new limits (the budget counts
    # the wall-clock time of earlier runs too)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402,I001
    Stopper, WallClock, add_schedule_args, batch_to_tensor, ddim_sample, invert_regenerate, jsonl_logger, lr_at,
    progress, restore_checkpoint, save_checkpoint, save_grid, score_samples, set_lr, tensor_to_uint8, world,
)  # fmt: skip


def build_unet(size: int, arch: str = "shipped"):
    """``shipped``: the package's test-bed UNet. ``heldout``: the held-out world model of docs/transfer.md, a
    different network (24/48/96/96 channels, attention only at 4 x 4 and in the mid block, scale-shift time
    conditioning, GroupNorm in groups of 8; 2.53 M parameters) trained with another seed, so that recipes chosen on the
    shipped model can be measured on a model they were not chosen on."""
    from diffusers import UNet2DModel

    if arch == "heldout":
        return UNet2DModel(
            sample_size=size,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(24, 48, 96, 96),
            down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=24,
            resnet_time_scale_shift="scale_shift",
            add_attention=True,
        )
    if arch != "shipped":
        raise ValueError(f"`arch` must be 'shipped' or 'heldout', got {arch!r}.")
    return UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32, 64, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
        add_attention=True,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
        variance_type="fixed_small",
    )


@torch.no_grad()
def ema_update(ema, model, decay):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def optimise(model, ema, opt, args, step: int, xt, t, noise, weight, **model_kwargs) -> torch.Tensor:
    """One epsilon-prediction update (bf16 autocast unless ``args.no_bf16``, per-timestep ``weight``, gradient norm
    clipped to 1, then the EMA with its warm-up at the new ``step``); returns the per-sample MSE (detached). Shared by
    this script and ``train_latent.py``."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
        eps = model(xt, t, **model_kwargs).sample
    per = (eps.float() - noise).pow(2).mean(dim=(1, 2, 3))
    loss = (per * weight[t]).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
    return per.detach()


def evaluate(ema, scheduler, step, args, log):
    t0 = time.time()
    ema.eval()
    samples = tensor_to_uint8(ddim_sample(ema, scheduler, args.eval_samples, seed=1234, num_steps=50))
    stats = score_samples(samples)
    save_grid(samples, os.path.join(args.out, f"samples_{step:06d}.png"))
    imgs, _ = world.render_dataset(16, seed=999, size=args.size)
    x0 = batch_to_tensor(np.stack([np.asarray(i) for i in imgs]))
    _, rec = invert_regenerate(ema, scheduler, x0, t0=500, n_inv=40, n_gen=40)
    stats["inv_mae"] = float(((rec.clamp(-1, 1) - x0).abs() / 2).mean())
    stats.update(step=step, kind="eval", eval_s=round(time.time() - t0, 1))
    log(stats)
    ema.save_pretrained(os.path.join(args.out, "ema_unet"))
    scheduler.save_pretrained(os.path.join(args.out, "scheduler"))
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="build/testbed/ddpm")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    add_schedule_args(p, lr=1e-3, warmup=300, max_steps=20000, budget_help=None)  # --budget-minutes: below
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR-gamma weighting; 0 disables")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=0,
        help="wall-clock budget (cumulative over resumes, evaluations included); the LR decay and the end "
        "of the run follow whichever of steps / budget runs out first; 0 = steps only",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=("shipped", "heldout"), default="shipped", help="see build_unet")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    log = jsonl_logger(args.out)

    torch.manual_seed(args.seed)
    model = build_unet(args.size, args.arch)
    scheduler = build_scheduler()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    rng = np.random.default_rng(args.seed)
    step, train_s, wall_prev = 0, 0.0, 0.0
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ck = restore_checkpoint(ckpt_path, args.resume, model, opt, ema=ema, rng=rng)
    if ck is not None:
        step, train_s, wall_prev = ck["step"], ck.get("train_s", 0.0), ck.get("wall_s", train_s)
        log({"kind": "resume", "step": step, "wall_min": round(wall_prev / 60, 2), "args": vars(args)})
    else:
        log({"kind": "start", "args": vars(args), "params": sum(q.numel() for q in model.parameters())})

    model = model.to(memory_format=torch.channels_last).train()
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight = torch.clamp(snr, max=args.snr_gamma) / snr if args.snr_gamma > 0 else torch.ones_like(snr)

    def checkpoint():
        save_checkpoint(ckpt_path, model, opt, ema=ema, rng=rng, step=step, args=args, train_s=train_s,
                        wall_s=wall())  # fmt: skip

    stopper, wall = Stopper(), WallClock(wall_prev)  # kill -TERM / -INT: finish the step, checkpoint, evaluate, exit
    run_loss, run_n, t_last = 0.0, 0, time.time()
    while progress(step, wall(), args) < 1:
        t_step = time.time()
        set_lr(opt, lr_at(step, progress(step, wall(), args), args))
        x0 = batch_to_tensor(world.render_batch(world.sample_batch(rng, args.batch, args.size), args.size))
        x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (args.batch,))
        xt = scheduler.add_noise(x0, noise, t)
        step += 1
        per = optimise(model, ema, opt, args, step, xt, t, noise, weight)
        train_s += time.time() - t_step
        run_loss += float(per.mean())
        run_n += 1
        if step % 100 == 0:
            log(
                {
                    "kind": "train",
                    "step": step,
                    "mse": round(run_loss / run_n, 5),
                    "lr": opt.param_groups[0]["lr"],
                    "s_per_step": round((time.time() - t_last) / run_n, 4),
                    "train_min": round(train_s / 60, 2),
                }
            )
            run_loss, run_n, t_last = 0.0, 0, time.time()
        stop = stopper.flag or progress(step, wall(), args) >= 1
        if step % args.ckpt_every == 0 or stop:
            checkpoint()
        if step % args.eval_every == 0 or stop:
            evaluate(ema, scheduler, step, args, log)
            t_last = time.time()
        if stop:
            break
    checkpoint()
    log({"kind": "done", "step": step, "wall_min": wall.minutes(), "interrupted": stopper.flag})


if __name__ == "__main__":
    main()
