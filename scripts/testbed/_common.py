"""Shared helpers for the test-bed training / evaluation / export scripts.

Not part of the package: the pipeline has its own DDIM code. These helpers exist so that training logs and
`evaluate.py` measure the models the same way (DDIM sampling, inversion, scoring), and so that the training scripts
share one copy of their run plumbing (stop on ``kill -TERM``, the wall-clock budget over resumes, progress lines,
atomic checkpoints) and the export scripts one copy of staging, METRICS.md and shipping.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from collections import Counter

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from diffusionclip_pipeline.testbed import world  # noqa: E402

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_value(text: str):
    """A command-line setting's value: JSON where it parses (numbers, ``true``, lists), else the string itself."""
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


def save_edits(folder: str, name: str, sources, edited) -> None:
    """Edits kept to score again without fine-tuning (`rescore.py`): ``sources`` / ``edited`` (images) as uint8
    arrays ``sources`` and ``edited`` in ``folder/name.npz``."""
    os.makedirs(folder, exist_ok=True)
    np.savez_compressed(
        os.path.join(folder, f"{name}.npz"),
        sources=np.stack([np.asarray(im) for im in sources]), edited=np.stack([np.asarray(im) for im in edited]),
    )  # fmt: skip


def jsonl_logger(out_dir: str):
    """A ``log(dict)`` that appends the record, time-stamped, to ``out_dir/log.jsonl`` and prints it."""
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


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float images in [0, 1] (a pipeline's ``output_type="np"``) -> uint8."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


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


# ------------------------------------------------------------------------------------------------ training runs
BUDGET_HELP = "wall-clock budget over resumes; 0 = steps only"


def add_schedule_args(p, *, lr, warmup: int, max_steps, lr_help=None, max_steps_help=None, budget_help=BUDGET_HELP):
    """The options `lr_at` and `progress` read, in this order: ``--lr``, ``--min-lr-frac``, ``--warmup``,
    ``--decay-frac``, ``--max-steps`` and (unless ``budget_help`` is None) ``--budget-minutes``."""
    p.add_argument("--lr", type=float, default=lr, help=lr_help)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--decay-frac", type=float, default=0.3)
    p.add_argument("--max-steps", type=int, default=max_steps, help=max_steps_help)
    if budget_help is not None:
        p.add_argument("--budget-minutes", type=float, default=0, help=budget_help)


def progress(step: int, wall_s: float, args) -> float:
    """Fraction of the run done: by steps, or by wall-clock budget if that is reached first."""
    f = step / args.max_steps
    if args.budget_minutes > 0:
        f = max(f, wall_s / 60 / args.budget_minutes)
    return f


def lr_at(step: int, frac: float, args) -> float:
    """Linear warmup, constant, then cosine decay to `min_lr_frac` over the last `decay_frac` of the run."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    start = 1 - args.decay_frac
    if frac < start:
        return args.lr
    p = min(1.0, (frac - start) / args.decay_frac)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


class Stopper:
    """``kill -TERM`` / ``-INT`` sets ``flag``; the training loop finishes its step, checkpoints and exits (the
    DDPM script evaluates first)."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._on)
        signal.signal(signal.SIGINT, self._on)

    def _on(self, signum, frame):
        self.flag = True


class WallClock:
    """Wall-clock seconds of the whole run: ``prev_s`` (the earlier runs', from the checkpoint) + this process's
    since construction. Calling it gives the seconds; ``minutes()`` the logged ``wall_min``."""

    def __init__(self, prev_s: float = 0.0):
        self.prev_s, self.start = prev_s, time.time()

    def __call__(self) -> float:
        return self.prev_s + time.time() - self.start

    def minutes(self) -> float:
        return round(self() / 60, 2)


class LossWindow:
    """The losses since the last progress line and when that line was written (for ``s_per_step``)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.values, self.t_last = [], time.time()

    def add(self, value: float) -> None:
        self.values.append(float(value))

    def restart_clock(self) -> None:
        """After an evaluation: the next line's ``s_per_step`` leaves its time out."""
        self.t_last = time.time()

    def record(self, step: int, loss_name: str, wall: WallClock, *, stage=None, lr=None) -> dict:
        """The ``{"kind": "train", ...}`` progress record: mean loss rounded to 5 digits, s/step to 3, wall_min."""
        rec = {"kind": "train"} | ({"stage": stage} if stage is not None else {})
        rec |= {"step": step, loss_name: round(float(np.mean(self.values)), 5)}
        rec |= {"lr": lr} if lr is not None else {}
        return rec | {"s_per_step": round((time.time() - self.t_last) / len(self.values), 3),
                      "wall_min": wall.minutes()}  # fmt: skip


def save_ckpt(path: str, **state) -> None:
    """``torch.save(state)`` to a temporary sibling, then renamed over ``path``: a kill never leaves half a file."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: str, model, opt, *, step: int, args, ema=None, gen=None, rng=None, **extra) -> None:
    """The test-beds' checkpoint, saved atomically: ``model``, [``ema``], ``opt``, [``gen`` (a torch.Generator's
    state)], [``np_rng`` and ``torch_rng`` (a numpy Generator's and torch's global state)], ``step``, ``extra`` (e.g.
    ``wall_s``), ``args`` (``vars(args)``)."""
    state = {"model": model.state_dict()}
    if ema is not None:
        state["ema"] = ema.state_dict()
    state["opt"] = opt.state_dict()
    if gen is not None:
        state["gen"] = gen.get_state()
    if rng is not None:
        state |= {"np_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}
    save_ckpt(path, **state, step=step, **extra, args=vars(args))


def restore_checkpoint(path: str, resume: bool, model, opt, *, ema=None, gen=None, rng=None) -> dict | None:
    """With ``resume`` and a checkpoint at ``path``: load it into the parts `save_checkpoint` saved and return it
    (the caller reads ``step``, ``wall_s``, ...). Otherwise None: a fresh start."""
    if not (resume and os.path.exists(path)):
        return None
    ck = torch.load(path, weights_only=False)
    model.load_state_dict(ck["model"])
    if ema is not None:
        ema.load_state_dict(ck["ema"])
    opt.load_state_dict(ck["opt"])
    if gen is not None:
        gen.set_state(ck["gen"])
    if rng is not None:
        rng.bit_generator.state = ck["np_rng"]
        torch.set_rng_state(ck["torch_rng"])
    return ck


# ------------------------------------------------------------------------------------------------------- exports
def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def subfolder_bytes(folder: str) -> dict:
    """``{subfolder: bytes}`` of ``folder``'s sub-folders, sorted by name."""
    return {d: dir_bytes(os.path.join(folder, d)) for d in sorted(os.listdir(folder))
            if os.path.isdir(os.path.join(folder, d))}  # fmt: skip


def export_folder(args, stage) -> str:
    """The folder an export measures: ``--out`` as it is with ``--measure-only``, else ``--stage`` rebuilt from
    scratch by ``stage()``."""
    if args.measure_only:
        return args.out
    if os.path.exists(args.stage):
        shutil.rmtree(args.stage)
    stage()
    return args.stage


def read_log(path: str) -> list[dict] | None:
    """The records of a training ``log.jsonl``; None without the file."""
    if not os.path.exists(path):
        return None
    return [json.loads(line) for line in open(path) if line.strip()]


def done_record(rows: list[dict]) -> dict:
    """A training log's last ``"done"`` record, else its last record."""
    return next((r for r in reversed(rows) if r.get("kind") == "done"), rows[-1])


def met(targets: dict, key: str, value: float) -> bool:
    op, target = targets[key]
    return value <= target if op == "<=" else value >= target


def metrics_table(res: dict, labels: dict, targets: dict, ok: dict) -> list[str]:
    """METRICS.md's table of measurements against targets and its "All targets met" line."""
    return [
        "| measurement | value | target | ok |",
        "|---|---|---|---|",
        *(f"| {labels[k]} | {v:.4f} | {targets[k][0]} {targets[k][1]} | {'yes' if ok[k] else 'NO'} |"
          for k, v in res.items()),
        "",
        f"All targets met: **{all(ok.values())}**.",
    ]  # fmt: skip


def command_line(script: str, argv) -> str:
    """How ``script`` was run (``argv``, else the process's), for METRICS.md."""
    return "python " + " ".join([os.path.relpath(script)] + (argv if argv is not None else sys.argv[1:]))


def write_metrics(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    print(text)


def ship(args, ok: dict) -> None:
    """Copy the staged folder over ``--out`` when every target is met (or ``--force``); nothing with
    ``--measure-only``."""
    if args.measure_only:
        return
    if not (all(ok.values()) or args.force):
        raise SystemExit(f"targets missed; staged in {args.stage}, not copied (use --force to ship anyway)")
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    shutil.copytree(args.stage, args.out)
    print(f"exported to {args.out}")
