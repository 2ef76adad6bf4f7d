"""Train the latent test-bed: a tiny ``AutoencoderKL`` and a text-conditioned ``UNet2DConditionModel`` of the world.

Two stages, each seeded, resumable (``--resume``) and stoppable (``kill -TERM`` checkpoints and exits):

``--stage vae``: an ``AutoencoderKL`` (channels 32/64/64, one ResNet per block, 0.95 M parameters) that maps a
32 px image to an 8 x 8 x 4 latent (factor 4, as SD's VAE has 4 channels at factor 8). Loss: L1 + 1e-6 KL on
world batches rendered on the fly. Why 8 x 8 and not 16 x 16: the UNet then runs on 256 numbers per image instead of
1024 (4x cheaper per step) and the world is simple enough that 8 x 8 x 4 reconstructs it (MAE target <= 0.02; the
measured value is in docs/testbed-latent.md). At the end the ``scaling_factor`` is set, as for SD, to
``1 / std`` of the sampled latents of 2048 fresh images.

``--stage unet``: a ``UNet2DConditionModel`` (channels 48/96, 2.38 M parameters, cross-attention in both levels and
the mid block) on the frozen VAE's latents (``latent_dist.sample() * scaling_factor``), conditioned on the frozen
text encoder of the shipped test-bed CLIP (``CLIPTextModel``, last hidden state, as SD uses OpenAI CLIP's).
Captions are the world's (``world.TEMPLATES`` over "colour shape"), replaced by the empty prompt with probability
``--uncond-prob`` (default 0.1) so the empty prompt gives unconditional samples. Epsilon prediction, the DDPM
test-bed's linear beta schedule, min-SNR-5 weighting, EMA 0.999, bf16 autocast.

Evaluation (every ``--eval-every`` steps, on the EMA weights): 64 caption-conditioned DDIM samples (50 steps, no
guidance; captions cycle over the 12 colour x shape pairs), 64 unconditional ones, scored with the world's
measurements; DDIM invert -> regenerate (t0 500, 40 + 40 steps, empty prompt) MAE on 16 fresh images.

Run time (this 2-core Xeon, 1 thread): see the ``--budget-minutes`` defaults and docs/testbed-latent.md.

Outputs under ``--out`` (default ``build/testbed/latent``): ``vae/ckpt.pt``, ``vae/export/`` (diffusers
folder), ``unet/ckpt.pt``, ``unet/ema_unet/``, ``*/log.jsonl``, ``unet/samples_<step>.png``.
``scripts/testbed/export.py --latent`` turns them into the shipped Stable-Diffusion-layout folder.

Usage::

    python scripts/testbed/train_latent.py --stage vae --budget-minutes 15
    python scripts/testbed/train_latent.py --stage unet --budget-minutes 50
    python scripts/testbed/train_latent.py --stage unet --budget-minutes 70 --resume   # longer, same run
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
    LossWindow, Stopper, WallClock, add_schedule_args, batch_to_tensor, jsonl_logger, lr_at, progress,
    restore_checkpoint, save_checkpoint, save_grid, score_samples, set_lr, tensor_to_uint8, world,
)  # fmt: skip
from train_ddpm import build_scheduler, optimise  # noqa: E402

from diffusionclip_pipeline.testbed.pipeline import WEIGHTS_DIR  # noqa: E402


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(48, 96),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=16,
    )


def load_text_encoder(weights_dir: str = WEIGHTS_DIR):
    """The shipped test-bed CLIP's text tower as a frozen ``CLIPTextModel`` (+ its tokenizer)."""
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(os.path.join(weights_dir, "clip"), dtype=torch.float32)
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())
    tok = CLIPTokenizer.from_pretrained(os.path.join(weights_dir, "tokenizer"))
    return text.eval().requires_grad_(False), tok


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    return text_encoder(ids)[0]


def all_captions() -> list[str]:
    return [t.format(f"{c} {s}") for c in world.COLOURS for s in world.SHAPES for t in world.TEMPLATES]


# ----------------------------------------------------------------------------------------------------------- VAE
@torch.no_grad()
def eval_vae(vae, n: int = 256, seed: int = 999) -> float:
    imgs, _ = world.render_dataset(n, seed=seed)
    x = batch_to_tensor(np.stack([np.asarray(i) for i in imgs]))
    rec = torch.cat([vae.decode(vae.encode(x[i : i + 64]).latent_dist.mode()).sample for i in range(0, n, 64)])
    return float(((rec.clamp(-1, 1) - x).abs() / 2).mean())


def train_vae(args, log):
    out = os.path.join(args.out, "vae")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(args.seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    rng = np.random.default_rng(args.seed)
    step, wall_prev = 0, 0.0
    ckpt = os.path.join(out, "ckpt.pt")
    ck = restore_checkpoint(ckpt, args.resume, vae, opt, rng=rng)
    if ck is not None:
        step, wall_prev = ck["step"], ck["wall_s"]
        log({"kind": "resume", "stage": "vae", "step": step})
    else:
        log({"kind": "start", "stage": "vae", "args": vars(args), "params": sum(p.numel() for p in vae.parameters())})
    stopper, wall = Stopper(), WallClock(wall_prev)

    def checkpoint():
        save_checkpoint(ckpt, vae, opt, rng=rng, step=step, args=args, wall_s=wall())

    vae.train()
    window = LossWindow()
    while progress(step, wall(), args) < 1 and not stopper.flag:
        set_lr(opt, lr_at(step, progress(step, wall(), args), args))
        x = batch_to_tensor(world.render_batch(world.sample_batch(rng, args.batch)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        l1 = (rec.float() - x).abs().mean()
        loss = l1 + args.kl_weight * post.kl().mean()  # kl(): summed over the latent's elements
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        window.add(l1.detach())
        if step % 100 == 0:
            log(window.record(step, "l1", wall, stage="vae"))
            window.reset()
        if step % args.ckpt_every == 0:
            checkpoint()
        if step % args.eval_every == 0:
            vae.eval()
            log({"kind": "eval", "stage": "vae", "step": step, "rec_mae": round(eval_vae(vae), 5)})
            vae.train()
    checkpoint()
    vae.eval()
    # scaling factor as for SD: 1 / std of the sampled latents
    with torch.no_grad():
        imgs, _ = world.render_dataset(2048, seed=4242)
        x = batch_to_tensor(np.stack([np.asarray(i) for i in imgs]))
        torch.manual_seed(0)
        z = torch.cat([vae.encode(x[i : i + 256]).latent_dist.sample() for i in range(0, len(x), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(os.path.join(out, "export"))
    log({"kind": "done", "stage": "vae", "step": step, "rec_mae": round(eval_vae(vae), 5),
         "latent_std": float(z.std()), "latent_mean": float(z.mean()), "scaling_factor": vae.config.scaling_factor,
         "wall_min": wall.minutes(), "interrupted": stopper.flag})  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- UNet
@torch.no_grad()
def latent_dataset(vae, n: int, seed: int, batch: int = 256):
    """Latent-distribution means and stds and the (shape, colour) ids of ``n`` world scenes."""
    rng = np.random.default_rng(seed)
    means, stds, shape_ids, colour_ids = [], [], [], []
    for i in range(0, n, batch):
        p = world.sample_batch(rng, min(batch, n - i))
        dist = vae.encode(batch_to_tensor(world.render_batch(p))).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        shape_ids.append(torch.from_numpy(p["shape_id"]))
        colour_ids.append(torch.from_numpy(p["colour_id"]))
    return torch.cat(means), torch.cat(stds), torch.cat(shape_ids), torch.cat(colour_ids)


@torch.no_grad()
def ddim_latent_sample(unet, scheduler, cond: torch.Tensor, seed: int, num_steps: int = 50) -> torch.Tensor:
    from diffusers import DDIMScheduler

    sch = DDIMScheduler.from_config(scheduler.config, clip_sample=False, set_alpha_to_one=False)
    sch.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(cond), 4, 8, 8, generator=g)
    for t in sch.timesteps:
        z = sch.step(unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
    return z


@torch.no_grad()
def latent_round_trip(unet, scheduler, z0, cond, t0=500, n=40):
    a = scheduler.alphas_cumprod.float()
    grid = np.rint(np.linspace(0, t0, n + 1)).astype(int)

    def move(x, eps, a_from, a_to):
        return a_to.sqrt() * (x - (1 - a_from).sqrt() * eps) / a_from.sqrt() + (1 - a_to).sqrt() * eps

    z = z0
    for s, t in zip(grid[:-1], grid[1:]):
        z = move(z, unet(z, int(s), encoder_hidden_states=cond).sample, a[s], a[t])
    for t, s in zip(grid[::-1][:-1], grid[::-1][1:]):
        z = move(z, unet(z, int(t), encoder_hidden_states=cond).sample, a[t], a[s])
    return z


@torch.no_grad()
def eval_unet(ema, vae, scheduler, text_encoder, tokenizer, step, out, log):
    t_start = time.time()
    sf = vae.config.scaling_factor
    pairs = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    caps = [world.caption(*pairs[k % len(pairs)]) for k in range(64)]
    cond = encode_prompts(text_encoder, tokenizer, caps)
    empty = encode_prompts(text_encoder, tokenizer, [""] * 64)

    def decode(z):
        return tensor_to_uint8(vae.decode(z / sf).sample)

    cond_imgs = decode(ddim_latent_sample(ema, scheduler, cond, seed=1234))
    reps = [world.clean_shape_report(im) for im in cond_imgs]
    right = [
        r["clean"] and r["colour"] == pairs[k % len(pairs)][0] and world.classify_shape(im)[0] == pairs[k % 12][1]
        for k, (im, r) in enumerate(zip(cond_imgs, reps))
    ]
    uncond_imgs = decode(ddim_latent_sample(ema, scheduler, empty, seed=4321))
    stats = {"kind": "eval", "stage": "unet", "step": step, "cond_right": float(np.mean(right)),
             "cond_clean": float(np.mean([r["clean"] for r in reps])),
             "uncond": score_samples(uncond_imgs)}  # fmt: skip
    imgs, _ = world.render_dataset(16, seed=999)
    x = batch_to_tensor(np.stack([np.asarray(i) for i in imgs]))
    z0 = vae.encode(x).latent_dist.mean * sf
    rec = vae.decode(latent_round_trip(ema, scheduler, z0, empty[:16]) / sf).sample
    stats["inv_mae"] = float(((rec.clamp(-1, 1) - x).abs() / 2).mean())
    stats["eval_s"] = round(time.time() - t_start, 1)
    save_grid(np.concatenate([cond_imgs[:32], uncond_imgs[:32]]), os.path.join(out, f"samples_{step:06d}.png"))
    log(stats)
    ema.save_pretrained(os.path.join(out, "ema_unet"))
    return stats


def train_unet(args, log):
    from diffusers import AutoencoderKL

    out = os.path.join(args.out, "unet")
    os.makedirs(out, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(os.path.join(args.out, "vae", "export")).eval().requires_grad_(False)
    sf = vae.config.scaling_factor
    text_encoder, tokenizer = load_text_encoder()
    captions = all_captions()
    cap_emb = encode_prompts(text_encoder, tokenizer, captions)  # (72, L, 64): colour-major, shape, template
    empty_emb = encode_prompts(text_encoder, tokenizer, [""])[0]
    n_t = len(world.TEMPLATES)

    torch.manual_seed(args.seed)
    model = build_unet()
    ema = copy.deepcopy(model).requires_grad_(False)
    scheduler = build_scheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    t_data = time.time()
    means, stds, shape_ids, colour_ids = latent_dataset(vae, args.num_latents, seed=args.seed + 1)
    log({"kind": "data", "n": len(means), "s": round(time.time() - t_data, 1)})
    gen = torch.Generator().manual_seed(args.seed + 2)
    step, wall_prev = 0, 0.0
    ckpt = os.path.join(out, "ckpt.pt")
    ck = restore_checkpoint(ckpt, args.resume, model, opt, ema=ema, gen=gen)
    if ck is not None:
        step, wall_prev = ck["step"], ck["wall_s"]
        log({"kind": "resume", "stage": "unet", "step": step})
    else:
        log({"kind": "start", "stage": "unet", "args": vars(args),
             "params": sum(p.numel() for p in model.parameters())})  # fmt: skip
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight = torch.clamp(snr, max=args.snr_gamma) / snr
    stopper, wall = Stopper(), WallClock(wall_prev)

    def checkpoint():
        save_checkpoint(ckpt, model, opt, ema=ema, gen=gen, step=step, args=args, wall_s=wall())

    model.train()
    window = LossWindow()
    while progress(step, wall(), args) < 1 and not stopper.flag:
        set_lr(opt, lr_at(step, progress(step, wall(), args), args))
        idx = torch.randint(0, len(means), (args.batch,), generator=gen)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * sf
        cap_idx = (colour_ids[idx] * len(world.SHAPES) + shape_ids[idx]) * n_t + torch.randint(
            0, n_t, (args.batch,), generator=gen
        )
        cond = cap_emb[cap_idx]
        drop = torch.rand(args.batch, generator=gen) < args.uncond_prob
        cond[drop] = empty_emb
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        step += 1
        per = optimise(model, ema, opt, args, step, zt, t, noise, weight, encoder_hidden_states=cond)
        window.add(per.mean())
        if step % 100 == 0:
            log(window.record(step, "mse", wall, stage="unet", lr=opt.param_groups[0]["lr"]))
            window.reset()
        if step % args.ckpt_every == 0:
            checkpoint()
        if step % args.eval_every == 0:
            eval_unet(ema.eval(), vae, scheduler, text_encoder, tokenizer, step, out, log)
            window.restart_clock()
    checkpoint()
    stats = eval_unet(ema.eval(), vae, scheduler, text_encoder, tokenizer, step, out, log)
    scheduler.save_pretrained(os.path.join(out, "scheduler"))
    log({"kind": "done", "stage": "unet", "step": step, "wall_min": wall.minutes(), "interrupted": stopper.flag,
         "final": stats})  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("vae", "unet"), required=True)
    p.add_argument("--out", default="build/testbed/latent")
    p.add_argument("--batch", type=int, default=64)
    add_schedule_args(p, lr=None, warmup=200, max_steps=None, lr_help="default: 1e-3 (vae), 5e-4 (unet)",
                      max_steps_help="default: 4000 (vae), 12000 (unet)")  # fmt: skip
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--num-latents", type=int, default=65536)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-3 if args.stage == "vae" else 5e-4
    if args.max_steps is None:
        args.max_steps = 4000 if args.stage == "vae" else 12000
    torch.set_num_threads(args.threads)
    log = jsonl_logger(os.path.join(args.out, args.stage))
    (train_vae if args.stage == "vae" else train_unet)(args, log)


if __name__ == "__main__":
    main()
