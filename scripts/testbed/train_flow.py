"""Train the flow-matching test-bed: a tiny ``SD3Transformer2DModel`` of the shapes world (issue 32).

A rectified-flow transformer in Stable Diffusion 3's layout, on the latent test-bed's autoencoder, conditioned on two
shipped test-bed CLIPs' text towers, sampled by the **stock** ``StableDiffusion3Pipeline``. Seeded, resumable
(``--resume``), stoppable (``kill -TERM`` checkpoints and exits), one torch thread, a ``--budget-minutes`` wall clock
over resumes (evaluations included).

- **Autoencoder**: the latent test-bed's ``AutoencoderKL`` (``weights_latent/vae``: 32 px -> 8 x 8 x 4), reused
  unchanged except for its config: SD3's pipeline decodes ``latents / scaling_factor + shift_factor``, so
  ``shift_factor`` = the mean of the sampled latents of 2048 fresh images and ``scaling_factor`` = 1 / std of the
  shifted latents (as SD3 computes them).
- **Text encoders**: ``text_encoder`` / ``text_encoder_2`` = the text towers + ``text_projection`` of the pixel
  test-bed's two CLIPs (``weights/clip``, ``weights/clip_2``) as frozen ``CLIPTextModelWithProjection``; no T5
  (``text_encoder_3=None``). The pipeline gives the transformer the two penultimate hidden states side by side (16
  tokens x 128) followed by ``max_sequence_length`` (default 256) all-zero "T5" tokens, and the two projected pooled
  embeddings side by side (128).
- **Transformer**: ``SD3Transformer2DModel`` with patch 2 on the 8 x 8 x 4 latents (16 image tokens), ``--layers``
  joint blocks of ``--heads`` x ``--head-dim``, ``joint_attention_dim`` = ``pooled_projection_dim`` = 128.
- **The 256 zero tokens, cheaply**: context tokens carry no position embedding, so identical input tokens stay
  identical through every block; m identical keys/values are exactly one key whose attention logit is raised by
  log(m). Training therefore uses the pipeline's embeddings with ``max_sequence_length=1`` (16 + 1 context tokens)
  and an attention processor that adds log(256) to that last key (``ZeroTokensAttnProcessor``): the same function as
  the stock call with 256 zero tokens, at 33 instead of 288 tokens per sample. The smoke check
  ``--check-equivalence`` compares the two; evaluation always samples through the stock pipeline (288 tokens).
- **Objective**: rectified flow, ``x_sigma = (1 - sigma) x0 + sigma noise``, target ``v = noise - x0``, plain MSE.
  ``sigma`` is drawn logit-normal (``sigmoid(N(0, 1))``, SD3's choice) with probability 0.8 and uniform otherwise (to
  keep training at the ends of the path, where sampling starts and where inversion ends), and fed as the stock
  scheduler gives it (``timestep = sigma * 1000``). Training never sees the scheduler's ``shift``: it only places the
  sampling grid, so it can be chosen after training (``--shift`` for the evaluations, default 3.0, SD3's).
- Captions: ``world.TEMPLATES`` over the 12 "colour shape" pairs, replaced by the empty prompt with probability
  ``--uncond-prob`` (0.1). EMA 0.999, AdamW, warm-up then cosine decay (train_ddpm.lr_at).

Evaluation (every ``--eval-every`` steps and at the end, on the EMA weights): the stock ``StableDiffusion3Pipeline``
(``--eval-steps`` 28, guidance 1) draws 64 captioned samples (cycling over the 12 pairs; right = one clean shape of
that colour and, by ``world.classify_shape``, that shape) and 64 with the empty prompt (clean = one clean shape);
a flow round trip (Euler up the shifted grid to t0 600 and back, 28 + 28 steps, empty prompt) on 16 fresh images.
Logged to ``--out/log.jsonl``; sample grids ``samples_<step>.png``; EMA weights ``ema_transformer/``.

Run time (2-core shared Xeon, 1 thread): encoding the latents once (``latents.pt``, cached) ~3 min; see
docs/testbed-flow.md for the step rate and the curve.

Usage::

    python scripts/testbed/train_flow.py --check-equivalence                    # smoke: the zero-token trick
    python scripts/testbed/train_flow.py --max-steps 40 --eval-every 20 --out build/testbed/flow_smoke
    python scripts/testbed/train_flow.py --budget-minutes 90 --max-steps 100000  # the real run
    python scripts/testbed/train_flow.py --budget-minutes 100 --max-steps 100000 --resume   # longer, same run

``scripts/testbed/export_flow.py`` turns ``--out`` into the shipped folder ``testbed/weights_flow/``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402,I001
    LossWindow, Stopper, WallClock, add_schedule_args, batch_to_tensor, jsonl_logger, lr_at, progress,
    restore_checkpoint, save_checkpoint, save_ckpt, save_grid, score_samples, set_lr, to_uint8, world,
)  # fmt: skip
from train_ddpm import ema_update  # noqa: E402
from train_latent import all_captions, latent_dataset  # noqa: E402

from diffusionclip_pipeline.testbed.pipeline import LATENT_WEIGHTS_DIR, WEIGHTS_DIR  # noqa: E402

T5_TOKENS = 256  # the stock pipeline's default max_sequence_length: that many all-zero context tokens
PAIRS = [(c, s) for c in world.COLOURS for s in world.SHAPES]


def build_transformer(layers: int = 5, heads: int = 4, head_dim: int = 32):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=128,  # two CLIP hidden states of 64, side by side
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=128,  # two projected pooled embeddings of 64
        out_channels=4,
        pos_embed_max_size=4,  # 8 x 8 latents / patch 2
    )


def build_scheduler(shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def load_text_encoders(weights_dir: str = WEIGHTS_DIR):
    """The two shipped test-bed CLIPs' text towers as frozen ``CLIPTextModelWithProjection`` (+ tokenizers)."""
    from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = []
    for clip_dir, tok_dir in (("clip", "tokenizer"), ("clip_2", "tokenizer_2")):
        clip = CLIPModel.from_pretrained(os.path.join(weights_dir, clip_dir), dtype=torch.float32)
        cfg = copy.deepcopy(clip.config.text_config)
        cfg.projection_dim = clip.config.projection_dim
        text = CLIPTextModelWithProjection(cfg)
        text.text_model.load_state_dict(clip.text_model.state_dict())
        text.text_projection.load_state_dict(clip.text_projection.state_dict())
        out += [text.eval().requires_grad_(False), CLIPTokenizer.from_pretrained(os.path.join(weights_dir, tok_dir))]
    return out


@torch.no_grad()
def load_vae(n: int = 2048, seed: int = 4242):
    """The latent test-bed's VAE (float32) with SD3's ``shift_factor`` / ``scaling_factor`` set from its latents."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.path.join(LATENT_WEIGHTS_DIR, "vae"), dtype=torch.float32).eval()
    vae.requires_grad_(False)
    imgs, _ = world.render_dataset(n, seed=seed)
    x = batch_to_tensor(np.stack([np.asarray(i) for i in imgs]))
    torch.manual_seed(0)
    z = torch.cat([vae.encode(x[i : i + 256]).latent_dist.sample() for i in range(0, n, 256)])
    shift = float(z.mean())
    vae.register_to_config(shift_factor=shift, scaling_factor=float(1.0 / (z - shift).std()))
    return vae


def make_pipeline(transformer, vae, text_encoders, scheduler):
    from diffusers import StableDiffusion3Pipeline

    te, tok, te2, tok2 = text_encoders
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te,
                                    tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=None,
                                    tokenizer_3=None)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


class ZeroTokensAttnProcessor:
    """``JointAttnProcessor2_0`` whose last context token stands for ``multiplicity`` identical ones (log-bias)."""

    def __init__(self, multiplicity: int = T5_TOKENS):
        self.log_m = math.log(multiplicity)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n = hidden_states.shape[:2]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q = heads(torch.cat([attn.to_q(hidden_states), attn.add_q_proj(encoder_hidden_states)], 1))
        k = heads(torch.cat([attn.to_k(hidden_states), attn.add_k_proj(encoder_hidden_states)], 1))
        v = heads(torch.cat([attn.to_v(hidden_states), attn.add_v_proj(encoder_hidden_states)], 1))
        bias = torch.zeros(k.shape[2], dtype=q.dtype)
        bias[-1] = self.log_m
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        hidden_states, encoder_hidden_states = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return attn.to_out[1](attn.to_out[0](hidden_states)), encoder_hidden_states


@torch.no_grad()
def caption_embeddings(pipe, prompts: list[str], max_sequence_length: int = 1):
    """The stock pipeline's (prompt_embeds, pooled) for ``prompts`` (guidance off)."""
    emb, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                           do_classifier_free_guidance=False,
                                           max_sequence_length=max_sequence_length)  # fmt: skip
    return emb, pooled


def check_equivalence(args, log) -> None:
    """Smoke check: the training call (17 tokens + log-bias) == the stock call (16 + 256 zero tokens)."""
    torch.manual_seed(0)
    model = build_transformer(args.layers, args.heads, args.head_dim)
    for p in model.parameters():  # random non-zero weights everywhere (zero-initialised AdaLN would hide bugs)
        torch.nn.init.normal_(p, std=0.05)
    pipe = make_pipeline(model, load_vae(64), load_text_encoders(), build_scheduler())
    caps = ["a red circle", "", "a photo of a blue square"]
    full, pooled = caption_embeddings(pipe, caps, T5_TOKENS)
    short, _ = caption_embeddings(pipe, caps, 1)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([900.0, 500.0, 30.0])
    with torch.no_grad():
        ref = model(x, timestep=t, encoder_hidden_states=full, pooled_projections=pooled).sample
        fast_model = copy.deepcopy(model)
        fast_model.set_attn_processor(ZeroTokensAttnProcessor())
        fast = fast_model(x, timestep=t, encoder_hidden_states=short, pooled_projections=pooled).sample
    log({"kind": "check", "max_abs_diff": float((ref - fast).abs().max()), "ref_abs_mean": float(ref.abs().mean())})


@torch.no_grad()
def round_trip(transformer, z0, cond, pooled, shift: float, t0: int = 600, n: int = 28) -> torch.Tensor:
    """Euler up the shifted grid to ``t0`` (velocity at the lower point) and back down (at the upper point)."""
    s = np.arange(n + 1) * t0 / n / 1000
    sig = shift * s / (1 + (shift - 1) * s)

    def vel(z, sigma):
        t = torch.full((len(z),), float(sigma) * 1000)
        return transformer(z, timestep=t, encoder_hidden_states=cond, pooled_projections=pooled).sample

    z = z0
    for k in range(n):
        z = z + float(sig[k + 1] - sig[k]) * vel(z, sig[k])
    for k in range(n, 0, -1):
        z = z - float(sig[k] - sig[k - 1]) * vel(z, sig[k])
    return z


def score_captioned(imgs: np.ndarray, pairs: list) -> tuple[list[bool], list[bool]]:
    """Per image: right (one clean shape of the pair's colour and classified shape) and clean."""
    right, clean = [], []
    for im, (colour, shape) in zip(imgs, pairs):
        rep = world.clean_shape_report(im)
        clean.append(bool(rep["clean"]))
        right.append(bool(rep["clean"] and rep["colour"] == colour and world.classify_shape(im)[0] == shape))
    return right, clean


@torch.no_grad()
def evaluate(ema, vae, text_encoders, args, step, log):
    """Stock-pipeline samples (64 captioned, 64 unconditional) and the flow round trip, on the EMA weights."""
    t_start = time.time()
    pipe = make_pipeline(ema.eval(), vae, text_encoders, build_scheduler(args.shift))
    pairs = [PAIRS[k % len(PAIRS)] for k in range(args.eval_n)]
    cond = to_uint8(pipe([world.caption(*p) for p in pairs], num_inference_steps=args.eval_steps,
                         guidance_scale=1.0, output_type="np",
                         generator=torch.Generator().manual_seed(1234)).images)  # fmt: skip
    uncond = to_uint8(pipe([""] * args.eval_n, num_inference_steps=args.eval_steps, guidance_scale=1.0,
                           output_type="np", generator=torch.Generator().manual_seed(4321)).images)  # fmt: skip
    right, clean = score_captioned(cond, pairs)
    stats = {"kind": "eval", "step": step, "shift": args.shift, "cond_right": float(np.mean(right)),
             "cond_clean": float(np.mean(clean)), "uncond": score_samples(uncond)}  # fmt: skip
    imgs, _ = world.render_dataset(16, seed=999)
    x = batch_to_tensor(np.stack([np.asarray(i) for i in imgs]))
    sf, sh = vae.config.scaling_factor, vae.config.shift_factor
    z0 = (vae.encode(x).latent_dist.mean - sh) * sf
    emb, pooled = caption_embeddings(pipe, [""] * 16, T5_TOKENS)
    rec = vae.decode(round_trip(ema, z0, emb, pooled, args.shift) / sf + sh).sample
    stats["round_trip_mae"] = float(((rec.clamp(-1, 1) - x).abs() / 2).mean())
    stats["eval_s"] = round(time.time() - t_start, 1)
    save_grid(np.concatenate([cond[:32], uncond[:32]]), os.path.join(args.out, f"samples_{step:06d}.png"))
    ema.save_pretrained(os.path.join(args.out, "ema_transformer"))
    log(stats)
    return stats


def load_latents(vae, args, log):
    """Latent means / stds / ids of ``--num-latents`` world scenes, encoded once and cached in ``latents.pt``."""
    path = os.path.join(args.out, "latents.pt")
    if os.path.exists(path):
        return torch.load(path)
    t = time.time()
    data = latent_dataset(vae, args.num_latents, seed=args.seed + 1)
    save_ckpt(path, **dict(zip(("means", "stds", "shape_ids", "colour_ids"), data)))
    log({"kind": "data", "n": len(data[0]), "s": round(time.time() - t, 1)})
    return torch.load(path)


def sample_sigmas(n: int, gen, uniform_prob: float = 0.2) -> torch.Tensor:
    """Logit-normal(0, 1) sigmas (SD3), a share ``uniform_prob`` of them uniform on (0, 1) instead."""
    logit_normal = torch.sigmoid(torch.randn(n, generator=gen))
    uniform = torch.rand(n, generator=gen)
    return torch.where(torch.rand(n, generator=gen) < uniform_prob, uniform, logit_normal)


def train(args, log):
    os.makedirs(args.out, exist_ok=True)
    vae = load_vae()
    text_encoders = load_text_encoders()
    sf, sh = vae.config.scaling_factor, vae.config.shift_factor
    torch.manual_seed(args.seed)
    model = build_transformer(args.layers, args.heads, args.head_dim)
    ema = copy.deepcopy(model).requires_grad_(False)  # stock processors: the stock pipeline samples it
    model.set_attn_processor(ZeroTokensAttnProcessor())
    pipe = make_pipeline(ema, vae, text_encoders, build_scheduler(args.shift))
    cap_emb, cap_pooled = caption_embeddings(pipe, all_captions())  # (72, 17, 128), (72, 128)
    empty_emb, empty_pooled = caption_embeddings(pipe, [""])
    n_t = len(world.TEMPLATES)
    data = load_latents(vae, args, log)
    means, stds, shape_ids, colour_ids = data["means"], data["stds"], data["shape_ids"], data["colour_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed + 2)
    step, wall_prev = 0, 0.0
    ckpt = os.path.join(args.out, "ckpt.pt")
    ck = restore_checkpoint(ckpt, args.resume, model, opt, ema=ema, gen=gen)
    if ck is not None:
        step, wall_prev = ck["step"], ck["wall_s"]
        log({"kind": "resume", "step": step, "wall_min": round(wall_prev / 60, 2)})
    else:
        log({"kind": "start", "args": vars(args), "params": sum(p.numel() for p in model.parameters()),
             "vae_shift_factor": sh, "vae_scaling_factor": sf})  # fmt: skip
    stopper, wall = Stopper(), WallClock(wall_prev)

    def checkpoint():
        save_checkpoint(ckpt, model, opt, ema=ema, gen=gen, step=step, args=args, wall_s=wall())

    model.train()
    window, last = LossWindow(), None
    while progress(step, wall(), args) < 1 and not stopper.flag:
        set_lr(opt, lr_at(step, progress(step, wall(), args), args))
        idx = torch.randint(0, len(means), (args.batch,), generator=gen)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen) - sh) * sf
        cap_idx = (colour_ids[idx] * len(world.SHAPES) + shape_ids[idx]) * n_t + torch.randint(
            0, n_t, (args.batch,), generator=gen
        )
        cond, pooled = cap_emb[cap_idx].clone(), cap_pooled[cap_idx].clone()
        drop = torch.rand(args.batch, generator=gen) < args.uncond_prob
        cond[drop], pooled[drop] = empty_emb[0], empty_pooled[0]
        noise = torch.randn(z0.shape, generator=gen)
        sigma = sample_sigmas(args.batch, gen, args.uniform_prob)
        s = sigma.view(-1, 1, 1, 1)
        zt = (1 - s) * z0 + s * noise  # rectified flow: the straight path
        v = model(zt, timestep=sigma * 1000, encoder_hidden_states=cond, pooled_projections=pooled).sample
        loss = F.mse_loss(v, noise - z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        window.add(loss.detach())
        if step % 100 == 0:
            log(window.record(step, "mse", wall, lr=opt.param_groups[0]["lr"]))
            window.reset()
        if step % args.ckpt_every == 0:
            checkpoint()
        if step % args.eval_every == 0:
            last = evaluate(ema, vae, text_encoders, args, step, log)
            window.restart_clock()
    checkpoint()
    if stopper.flag:  # kill -TERM: checkpoint and exit now, no evaluation
        log({"kind": "stopped", "step": step, "wall_min": wall.minutes()})
        return
    stats = last if last is not None and last["step"] == step else evaluate(ema, vae, text_encoders, args, step, log)
    vae.save_pretrained(os.path.join(args.out, "vae"))  # the latent test-bed's VAE with SD3's shift / scale
    log({"kind": "done", "step": step, "wall_min": wall.minutes(), "interrupted": stopper.flag, "final": stats})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="build/testbed/flow")
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    add_schedule_args(p, lr=5e-4, warmup=200, max_steps=100000)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--uniform-prob", type=float, default=0.2, help="share of uniform (not logit-normal) sigmas")
    p.add_argument("--shift", type=float, default=3.0, help="the scheduler's shift for the evaluations")
    p.add_argument("--num-latents", type=int, default=32768)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-n", type=int, default=64)
    p.add_argument("--eval-steps", type=int, default=28)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--check-equivalence", action="store_true", help="smoke check of the zero-token trick, then exit")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = jsonl_logger(args.out)
    if args.check_equivalence:
        check_equivalence(args, log)
        return
    train(args, log)


if __name__ == "__main__":
    main()
