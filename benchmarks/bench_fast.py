"""Four fine-tune + edit schemes side by side: UNet calls (counted by a forward hook), time and peak memory.

Schemes (each a `FinetuneConfig` plus `edit` keywords; the loss, optimizer step and scheme functions are the
package's own: `training.losses.build_losses`, `training.trainer.Trainer`, `training.trainer.TRAINING_SCHEMES`,
`pipe.invert`, `pipe.edit`):

  official  DiffusionCLIP's README run (`shared/reference/official.md` 2.4-2.5; gwang-kim/DiffusionCLIP
            `clip_finetune_eff`): all UNet weights, Adam lr 8e-6, batch 1, step-wise loss on x0_hat over 6 steps
            from t0 500, latents by 40-point DDIM inversion started as the official code does (39 calls), 5
            epochs, CLIP weight 3 in the -log((1 + cos) / 2) form, L1 1, one CLIP, no views; edit from t0 500 with
            40 + 40 points (39 + 40 calls), inverting with a second, original UNet as `edit_one_image` does
  today     `testbed.settings.RECOMMENDED_FINETUNE` / `RECOMMENDED_EDIT`: LoRA, step-wise, 15 epochs, batch 4,
            inversion with one fixed-point iteration (80 calls); edit from t0 400 with 32 + 32 steps
  fast      `testbed.settings.FAST_FINETUNE` / `FAST_EDIT`: LoRA, one_step scheme, noise encoding (0 calls);
            edit by forward noise + 6 DDIM steps from t0 400
  effdiff   EffDiff's README run (quickjkee/eff-diff-edit `main.py --clip_finetune --fast_noising_train 1
            --fast_noising_test 1 --n_iter 5 --t_0 350 --n_test_step 6 --lr_clip_finetune 6e-6 --clip_loss_w 3
            --l1_loss_w 1.0`; `effdiff.py` trains all weights, one UNet call per image at t0 with grad): all
            weights, one_step, noise encoding, t0 350, batch 1, 5 epochs; edit by forward noise + 6 DDIM steps

Every configuration runs in a fresh subprocess (peak RSS per process, on CPU): the edit first (its peak RSS is
read right after), then the fine-tuning (the process's peak is then the larger of the two); "above loaded" is the
peak minus the RSS with the models and data loaded (the official edit's second UNet is part of the edit's share).
Training images are random tensors (the cost does not depend on them) and the loss uses the test-bed's tiny
CLIP(s), one for official / effdiff, two for today / fast as the test-bed recipe does: a real ViT-B/16 would add
the same cost per loss call.

Models: the test-bed UNet (32 px, shipped weights, `testbed.load_pipeline()`) runs every scheme end to end. The
`google/ddpm-celebahq-256` architecture (random weights, 256 px) is far too slow for that on a CPU (a forward takes
~8 s on one thread), so there every step count is cut to the fewest that make a UNet call; each phase's time per
UNet call (inversion, training, edit) is measured and multiplied by the full scheme's hook-counted calls (from the
test-bed rows: the counts depend on the settings only). Memory does not depend on the step counts (the step-wise and
one-step schemes hold one UNet call's graph at a time), so the 256 px peak RSS is measured as is.

    OMP_NUM_THREADS=1 python benchmarks/bench_fast.py        # test-bed + celeba256 (~10 min on a busy 2-core CPU)
    python benchmarks/bench_fast.py --models testbed          # the test-bed only (~1-2 min)
    python benchmarks/bench_fast.py --tiny                    # seconds-long smoke run, in-process (used by the tests)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_finetune  # noqa: E402
from bench_finetune import _current_rss, build_unet, fmt_bytes  # noqa: E402

PROMPTS = ("red circle", "blue circle")  # words the test-bed's CLIP tokenizer knows

# the official code's loss and optimizer settings, shared by its two schemes (official.md 2.3-2.5)
_OFFICIAL_LOSS = dict(clip_loss_weight=3.0, clip_loss_type="neg_log", l1_loss_weight=1.0, clip_num_augmentations=0)


def schemes() -> dict[str, dict]:
    """name -> trainable ("full" | "lora"), FinetuneConfig keywords, edit keywords, and how the code around them
    runs: ``inversion_start`` of the training latents, ``second_clip`` (the test-bed's two CLIPs in the loss) and
    ``original_copy`` (edit with a second, untouched UNet for the inversion, as the official `edit_one_image`)."""
    from diffusionclip_pipeline.testbed import settings

    # fmt: off
    return {
        "official": dict(
            trainable="full",
            finetune=dict(
                scheme="efficient", t0=500, num_inversion_steps=40, num_train_steps=6, num_epochs=5, batch_size=1,
                learning_rate=8e-6, **_OFFICIAL_LOSS,
            ),
            edit=dict(t0=500, num_inversion_steps=40, num_inference_steps=40, inversion_start="official"),
            inversion_start="official", second_clip=False, original_copy=True,
        ),
        "today": dict(
            trainable="lora", finetune=dict(settings.RECOMMENDED_FINETUNE), edit=dict(settings.RECOMMENDED_EDIT),
            inversion_start="clean", second_clip=True, original_copy=False,
        ),
        "fast": dict(
            trainable="lora", finetune=dict(settings.FAST_FINETUNE), edit=dict(settings.FAST_EDIT),
            inversion_start="clean", second_clip=True, original_copy=False,
        ),
        "effdiff": dict(
            trainable="full",
            finetune=dict(
                scheme="one_step", encoding="noise", t0=350, num_train_steps=6, num_epochs=5, batch_size=1,
                learning_rate=6e-6, **_OFFICIAL_LOSS,
            ),
            edit=dict(t0=350, encoding="noise", num_inference_steps=6),
            inversion_start="clean", second_clip=False, original_copy=False,
        ),
    }
    # fmt: on


SCHEME_NAMES = ("official", "today", "fast", "effdiff")


class UNetCalls:
    """Counts UNet forwards in images (the summed batch sizes), with and without gradients, by a forward hook."""

    def __init__(self, *unets):
        self.grad = self.no_grad = 0
        self.handles = [u.register_forward_hook(self._hook, with_kwargs=True) for u in unets]

    def _hook(self, module, args, kwargs, output):
        import torch

        sample = args[0] if args else kwargs["sample"]
        if torch.is_grad_enabled():
            self.grad += sample.shape[0]
        else:
            self.no_grad += sample.shape[0]

    def take(self) -> tuple[int, int]:
        """(with grad, without) since the last call."""
        counts = (self.grad, self.no_grad)
        self.grad = self.no_grad = 0
        return counts

    def remove(self):
        for h in self.handles:
            h.remove()


def build_pipeline(model: str, second_clip: bool):
    """The test-bed pipeline (shipped weights), or a random-weight UNet of ``model`` with the test-bed's CLIP(s)."""
    from diffusers import DDPMScheduler

    from diffusionclip_pipeline import DiffusionCLIPPipeline
    from diffusionclip_pipeline.testbed import load_pipeline

    testbed = load_pipeline(second_clip=second_clip)
    if model == "testbed":
        return testbed
    clips = {k: getattr(testbed, k) for k in ("clip_model", "clip_tokenizer", "clip_model_2", "clip_tokenizer_2")}
    # google/ddpm-celebahq-256's scheduler: linear betas 1e-4 .. 0.02 over 1000 steps
    pipe = DiffusionCLIPPipeline(unet=build_unet(model), scheduler=DDPMScheduler(beta_schedule="linear"), **clips)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _capped(settings: dict, cap: bool, official_start: bool, keys=("num_inversion_steps", "num_inference_steps")):
    """``settings`` with each step count in ``keys`` cut to the fewest that make a UNet call when ``cap``: 1, or 2
    grid points for an inversion started the official way (its first point costs no call)."""
    out = dict(settings)
    if cap:
        for key in keys:
            out[key] = 2 if (key == "num_inversion_steps" and official_start) else 1
    return out


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(cfg: dict) -> dict:
    """One (model, scheme) configuration, in this (fresh) process."""
    import torch
    from accelerate import Accelerator

    from diffusionclip_pipeline import DiffusionCLIPPipeline
    from diffusionclip_pipeline.loaders.lora_state import adapter_parameters, add_adapter
    from diffusionclip_pipeline.scheduling_ddim_grid import GridDDIMScheduler, ddim_timesteps
    from diffusionclip_pipeline.training.config import FinetuneConfig
    from diffusionclip_pipeline.training.losses import build_losses
    from diffusionclip_pipeline.training.trainer import TRAINING_SCHEMES, Trainer

    torch.set_num_threads(cfg["threads"])
    spec = schemes()[cfg["scheme"]]
    cap = cfg["cap"]
    official_start = spec["inversion_start"] == "official"
    ft_settings = _capped(spec["finetune"], cap, official_start, ("num_inversion_steps", "num_train_steps"))
    if cfg.get("batch_size"):  # --batch-size: every scheme at one batch size (the recipes' own differ)
        ft_settings["batch_size"] = cfg["batch_size"]
    config = FinetuneConfig(**ft_settings)
    edit_settings = _capped(spec["edit"], cap, spec["edit"].get("inversion_start") == "official")
    pipe = build_pipeline(cfg["model"], spec["second_clip"])
    unet = pipe.unet
    n, size = cfg["images"], pipe.resolution
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(n, 3, size, size, generator=gen) * 2 - 1

    # 0. What is trained: a fresh LoRA adapter (added first, so the edit runs with it, as a user's does) or all weights
    if spec["trainable"] == "lora":
        add_adapter(unet, config.lora, "bench")
        unet.requires_grad_(False)
        params = adapter_parameters(unet, "bench")
    else:
        params = list(unet.parameters())
    unet.eval()
    base_rss = _current_rss()  # models, data and Python, before any UNet call (and before the official's copy)
    original = None
    if spec["original_copy"]:  # the official edit holds the original UNet for the inversion next to the tuned one
        original = DiffusionCLIPPipeline(unet=copy.deepcopy(unet), scheduler=pipe.scheduler)
        original.set_progress_bar_config(disable=True)
    calls = UNetCalls(unet, *([original.unet] if original is not None else []))
    with torch.no_grad():  # warm-up (allocator, kernels); not timed, not counted
        unet(x0[:1], 10)
    calls.take()

    # 1. Edit: single images, as the official and EffDiff test loops (bs_test 1); the first is a warm-up
    def edit(i):
        kwargs = dict(edit_settings, output_type="pt")
        if kwargs.get("encoding") == "noise":
            kwargs["generator"] = torch.Generator().manual_seed(i)
        with warnings.catch_warnings():  # full-weight schemes edit with no adapter: the warning is expected
            warnings.filterwarnings("ignore", message="No adapter is active")
            if original is not None:
                start = kwargs.pop("inversion_start")
                latents = original.invert(
                    x0[i % n : i % n + 1], t0=kwargs["t0"], num_inversion_steps=kwargs.pop("num_inversion_steps"),
                    inversion_start=start,
                ).x_t0  # fmt: skip
                return pipe.edit(latents=latents, **kwargs)
            return pipe.edit(x0[i % n : i % n + 1], **kwargs)

    edit_times = []
    for i in range(cfg["edits"] + cfg["warmup"]):
        calls.take()
        start = time.perf_counter()
        edit(i)
        edit_times.append(time.perf_counter() - start)
        edit_calls = sum(calls.take())
    edit_times = edit_times[cfg["warmup"] :]
    edit_peak = _rss_peak()
    if original is not None:
        calls.remove()
        del original
        calls = UNetCalls(unet)

    # 2. Fine-tuning: the latents x_t0 of every image (once, no grad, with the original weights), then epochs
    accelerator = Accelerator(cpu=True)
    loss_fn = build_losses(pipe, config, *PROMPTS, device=accelerator.device)
    bs = config.batch_size
    calls.take()
    start = time.perf_counter()
    x_t0 = torch.cat([
        pipe.invert(
            x0[b : b + bs], t0=config.t0, num_inversion_steps=config.num_inversion_steps,
            num_fixed_point_iterations=config.num_fixed_point_iterations, encoding=config.encoding,
            inversion_start=spec["inversion_start"], generator=gen, return_dict=False,
        )[0]
        for b in range(0, n, bs)
    ])  # fmt: skip
    encode_s = time.perf_counter() - start
    encode_calls = calls.take()

    unet.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    step = Trainer(pipe, params, config, accelerator, pipe.encode_prompt(config.conditioning_prompt, bs))
    scheduler = GridDDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(timesteps=ddim_timesteps(config.t0, config.num_train_steps, pipe.num_train_timesteps))
    scheme = TRAINING_SCHEMES[config.scheme]
    unet.train()
    epoch_times, epoch_calls = [], (0, 0)
    for _ in range(cfg["epochs"] + cfg["warmup"]):
        calls.take()
        start = time.perf_counter()
        for b in range(0, n, bs):
            for loss, _ in scheme(step, loss_fn, scheduler, x_t0[b : b + bs], loss_fn.source_batch(x0[b : b + bs])):
                step.backward_and_step(loss, "bench")
        epoch_times.append(time.perf_counter() - start)
        epoch_calls = calls.take()
    step.close()
    epoch_times = epoch_times[cfg["warmup"] :]
    return {
        **cfg,
        "trainable": sum(p.numel() for p in params),
        "edit_s": statistics.median(edit_times),
        "edit_calls": edit_calls,
        "edit_peak": edit_peak,
        "encode_s": encode_s,
        "encode_calls": encode_calls[1],
        "epoch_s": statistics.median(epoch_times),
        "epoch_calls": epoch_calls,  # (with grad, without)
        "peak": _rss_peak(),
        "base_rss": base_rss,
        "batch": min(bs, n),
        "num_epochs": spec["finetune"]["num_epochs"],
    }


def run_config(cfg: dict, in_process: bool) -> dict:
    return bench_finetune.run_config(cfg, in_process, run=worker, script=__file__)


def per_image(r: dict, full: dict) -> dict:
    """Per-image figures of row ``r`` at the full scheme's call counts ``full`` (a row of the same scheme run with
    its full settings; ``r`` itself unless ``r`` was capped): measured time per UNet call times calls."""
    n = r["images"]
    grad_epoch = full["epoch_calls"][0] / full["images"]
    encode = full["encode_calls"] / full["images"]
    edit_calls = full["edit_calls"]
    if r["cap"]:
        epoch_s = r["epoch_s"] / (r["epoch_calls"][0] / n) * grad_epoch
        encode_s = r["encode_s"] / r["encode_calls"] * encode if r["encode_calls"] else r["encode_s"] / n
        edit_s = r["edit_s"] / r["edit_calls"] * edit_calls
    else:
        epoch_s, encode_s, edit_s = r["epoch_s"] / n, r["encode_s"] / n, r["edit_s"]
    return dict(
        grad_epoch=grad_epoch, nograd_epoch=full["epoch_calls"][1] / full["images"], encode=encode,
        edit_calls=edit_calls, epoch_s=epoch_s, encode_s=encode_s, finetune_s=encode_s + r["num_epochs"] * epoch_s,
        edit_s=edit_s,
    )  # fmt: skip


def _ratio(value: float, base: float) -> str:
    if not base:
        return "-" if not value else "inf"
    return f"{value / base:.2f}" if value / base >= 0.01 else f"{value / base:.3f}"


def _num(x: float) -> str:
    return f"{x:.0f}" if x == int(x) else f"{x:.2f}"


def _secs(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def print_tables(rows: list[dict], args) -> list[dict]:
    """Prints the fine-tuning and editing tables; returns the per-image figures of every row."""
    full_rows = {r["scheme"]: r for r in rows if not r["cap"]}
    figures = []
    for r in rows:
        full = full_rows.get(r["scheme"], r)
        figures.append({**r, **per_image(r, full), "counted_on": full["model"]})
    print(f"\nfour schemes side by side on {args.device}, {args.threads} thread(s); ratios against `official` of "
          f"the same model; time: median of {args.edits} edit(s) and {args.epochs} epoch(s) after one warm-up each "
          "(celeba256: one each, no warm-up, per UNet call x the full scheme's calls); 1-min load average "
          f"{args.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")  # fmt: skip
    head = ("model", "scheme", "weights", "trained params", "batch", "grad fwd / img / epoch", "no-grad fwd / img "
            "(latents)", "s / epoch / img", "x off", "epochs", "fine-tune s / img (latents + epochs)", "x off",
            "peak RSS", "above loaded", "x off")  # fmt: skip
    print("Fine-tuning\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for f in figures:
        o = next(g for g in figures if g["model"] == f["model"] and g["scheme"] == "official")
        approx = "~" if f["cap"] else ""
        cells = (
            f["model"], f["scheme"], "LoRA" if f["scheme"] in ("today", "fast") else "all", f"{f['trainable']:,}",
            str(f["batch"]), _num(f["grad_epoch"]), _num(f["encode"] + f["nograd_epoch"]),
            approx + _secs(f["epoch_s"]), _ratio(f["epoch_s"], o["epoch_s"]), str(f["num_epochs"]),
            approx + _secs(f["finetune_s"]), _ratio(f["finetune_s"], o["finetune_s"]),
            fmt_bytes(f["peak"]), fmt_bytes(f["peak"] - f["base_rss"]),
            _ratio(f["peak"] - f["base_rss"], o["peak"] - o["base_rss"]),
        )  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    head = ("model", "scheme", "edit", "UNet calls / img", "x off", "s / img", "x off", "peak RSS", "above loaded",
            "x off")  # fmt: skip
    print("\nEditing (one image per call)\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for f in figures:
        o = next(g for g in figures if g["model"] == f["model"] and g["scheme"] == "official")
        e = schemes()[f["scheme"]]["edit"]
        how = f"{'noise' if e.get('encoding') == 'noise' else e['num_inversion_steps']} + {e['num_inference_steps']}"
        cells = (
            f["model"], f["scheme"], f"t0 {e['t0']}, {how}", _num(f["edit_calls"]),
            _ratio(f["edit_calls"], o["edit_calls"]), ("~" if f["cap"] else "") + _secs(f["edit_s"]),
            _ratio(f["edit_s"], o["edit_s"]), fmt_bytes(f["edit_peak"]), fmt_bytes(f["edit_peak"] - f["base_rss"]),
            _ratio(f["edit_peak"] - f["base_rss"], o["edit_peak"] - o["base_rss"]),
        )  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    return figures


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["testbed", "celeba256"], help="testbed, celeba256, tiny")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEME_NAMES), choices=list(SCHEME_NAMES))
    parser.add_argument("--images", type=int, default=8, help="training images (test-bed and tiny)")
    parser.add_argument("--images-256", type=int, default=2, help="training images at 256 px")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (test-bed; after a warm-up one)")
    parser.add_argument("--edits", type=int, default=5, help="timed single-image edits (test-bed; after a warm-up)")
    parser.add_argument("--batch-size", type=int, help="fine-tune every scheme at this batch (default: its own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu only: no GPU measurement in this script")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny UNet, in-process, 2 images, 1 epoch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return []
    if args.tiny:
        args.models, args.images, args.epochs, args.edits = ["tiny"], 2, 1, 1
    if "official" not in args.schemes:
        parser.error("`--schemes` must include `official` (the ratios are against it).")
    args.load_start = os.getloadavg()[0]
    rows = []
    for model in args.models:
        cap = model == "celeba256"
        for scheme in [s for s in SCHEME_NAMES if s in args.schemes]:
            cfg = dict(
                model=model, scheme=scheme, cap=cap, images=args.images_256 if cap else args.images,
                epochs=1 if cap else args.epochs, edits=1 if cap else args.edits,
                warmup=0 if (cap or args.tiny) else 1, threads=args.threads, batch_size=args.batch_size,
            )  # fmt: skip
            start = time.perf_counter()
            rows.append(run_config(cfg, in_process=args.tiny))
            print(f"  done {model} {scheme} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if any(r["cap"] for r in rows) and not any(not r["cap"] for r in rows):
        # the capped rows need the full schemes' call counts: count them on the tiny UNet (settings-only)
        for scheme in {r["scheme"] for r in rows}:
            cfg = dict(model="tiny", scheme=scheme, cap=False, images=2, epochs=1, edits=1, warmup=0, threads=1)
            rows.insert(0, run_config(cfg, in_process=False))
    figures = print_tables(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
