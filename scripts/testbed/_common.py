"""Shared helpers for the test-bed training / evaluation scripts (DDIM sampling, inversion, scoring).

Not part of the package: the pipeline has its own DDIM code. These helpers exist so that training logs and
`evaluate.py` measure the models the same way.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from diffusionclip_pipeline.testbed import world  # noqa: E402

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_value(text: str):
    """A command-line setting's value: JSON where it parses (numbers, ``true``, lists), else the string itself."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(items, option: str = "--set") -> dict:
    """``["name=value", ...]`` (e.g. ``--set learning_rate=1e-3``) -> ``{name: parse_value(value)}``.

    Raises:
        `ValueError`: an item without ``=`` or without a name, naming ``option``.
    """
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{option} takes NAME=VALUE, got {item!r}")
        out[name] = parse_value(value)
    return out


def jsonl_logger(out_dir: str):
    """A ``log(dict)`` that appends the record, time-stamped, to ``out_dir/log.jsonl`` and prints it."""
    import json
    import time

    os.makedirs(out_dir, exist_ok=True)
    logf = open(os.path.join(out_dir, "log.jsonl"), "a")

    def log(d):
        d["time"] = time.strftime("%H:%M:%S")
        logf.write(json.dumps(d) + "\n")
        logf.flush()
        print(json.dumps(d), flush=True)

    return log


def batch_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def alphas(scheduler) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(torch.float64)


@torch.no_grad()
def ddim_sample(unet, scheduler, n: int, seed: int, num_steps: int = 50, batch: int = 64) -> torch.Tensor:
    """Unconditional deterministic DDIM (eta=0, clip_sample=False) on a uniform grid; returns x in [-1, 1]."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler.from_config(scheduler.config, clip_sample=False)
    sch.set_timesteps(num_steps)
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, size, size, generator=g)
    outs = []
    for i in range(0, n, batch):
        x = noise[i : i + batch]
        for t in sch.timesteps:
            eps = unet(x, t).sample
            x = sch.step(eps, t, x).prev_sample
        outs.append(x)
    return torch.cat(outs)


def _ddim_move(x, eps, a_from, a_to):
    # DDIM eq. (12) with eta = 0, used in both directions
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


@torch.no_grad()
def invert_regenerate(
    unet,
    scheduler,
    x0: torch.Tensor,
    t0: int = 500,
    n_inv: int = 40,
    n_gen: int = 40,
    batch: int = 64,
    fixed_point: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffusionCLIP-style round trip: deterministic DDIM inversion 0 -> t0 (UNet at the *source* timestep),
    then deterministic DDIM generation t0 -> 0. Grids are ``round(linspace(0, t0, n + 1))``; the image is
    taken as x at t = 0 (alpha_cumprod[0]), as in DiffusionCLIP. ``fixed_point`` refines every inversion step
    ``x_t <- move(x_s, eps(x_t, t))`` (the pipeline's ``num_fixed_point_iterations``). Returns (x_t0, regenerated)."""
    a = alphas(scheduler).float()
    inv = np.rint(np.linspace(0, t0, n_inv + 1)).astype(int)
    gen = np.rint(np.linspace(0, t0, n_gen + 1)).astype(int)[::-1]
    lat, rec = [], []
    for i in range(0, len(x0), batch):
        x = x0[i : i + batch].float()
        for s, t in zip(inv[:-1], inv[1:]):
            eps = unet(x, int(s)).sample
            x_s, x = x, _ddim_move(x, eps, a[s], a[t])
            for _ in range(fixed_point):
                x = _ddim_move(x_s, unet(x, int(t)).sample, a[s], a[t])
        lat.append(x)
        for t, s in zip(gen[:-1], gen[1:]):
            eps = unet(x, int(t)).sample
            x = _ddim_move(x, eps, a[t], a[s])
        rec.append(x)
    return torch.cat(lat), torch.cat(rec)


def score_samples(imgs_uint8: np.ndarray) -> dict:
    """Clean-shape statistics of a batch of uint8 images."""
    reps = [world.clean_shape_report(im) for im in imgs_uint8]
    clean = [r["clean"] for r in reps]
    colours = Counter(r["colour"] for r in reps if r["clean"])
    shapes = Counter(world.classify_shape(im)[0] for im, r in zip(imgs_uint8, reps) if r["clean"])
    return {
        "n": len(reps),
        "clean_frac": float(np.mean(clean)),
        "clean_colours": {c: colours.get(c, 0) for c in world.COLOURS},
        "clean_shapes": {s: shapes.get(s, 0) for s in world.SHAPES},
        "fail_blob": int(sum(not r["one_blob"] for r in reps)),
        "fail_colour": int(sum(not r["one_colour"] for r in reps)),
        "fail_background": int(sum(not r["white_background"] for r in reps)),
    }


def save_grid(imgs_uint8: np.ndarray, path: str, ncol: int = 8) -> None:
    from PIL import Image

    n, h, w, _ = imgs_uint8.shape
    nrow = (n + ncol - 1) // ncol
    grid = np.full((nrow * (h + 2), ncol * (w + 2), 3), 128, np.uint8)
    for k, im in enumerate(imgs_uint8):
        r, c = divmod(k, ncol)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = im
    Image.fromarray(grid).save(path)
