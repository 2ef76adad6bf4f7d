"""Time to quality (issue 34): held-out edit success after every epoch, against fine-tuning wall time and UNet
forward + backward count, one line per recipe.

For each (test-bed kind, recipe, pair, data seed ``s``): fine-tune on 16 rendered source images of seed ``s`` and,
after every epoch (`finetune`'s validation, through ``callback_on_epoch_end``), score the edits of 32 others of seed
``s + 1`` with the shape-aware `testbed.world.edit_success`, as `testbed.demo.run_edit_experiment` does. The
per-epoch edit is the validation's: the run's ``t0`` and ``num_train_steps`` DDIM steps from the held-out images'
latents (the run's own inversion, or its forward noise). After the last epoch the adapter is also scored with the
edit its recipe publishes (``final_edit``: the test-bed's recommended DDIM edit, or the fast 6-step edit), the figure
comparable with docs/testbed.md and docs/fast.md. The training images are scored too each epoch (the early-stopping
proxy, ``early_stopping_on="training"`` with a patience that never stops), for the proxy-agreement table.

Time: the run's wall time minus the time spent validating (`logs["validation_seconds"]`) and in this script's
callback: training alone, inversion of the training latents included. Counts per training image: UNet forwards with
gradients (each with its backward), by a forward hook; and the inversion's no-grad forwards
(``num_inversion_steps * (1 + num_fixed_point_iterations)``, 0 for the noise encoding).

``--kind``: the pixel test-bed (default) or the latent one (``load_pipeline(kind="latent")``, the VAE + text-
conditioned UNet of docs/testbed-latent.md). Each recipe's overrides sit on top of the kind's recommended fine-tune
(`testbed.settings.recommended(kind)`); the published edits are the kind's recommended edit (pixel: t0 400, 32 + 32
DDIM steps; latent: t0 500, 40 + 40) and the fast edit (`FAST_EDIT`: forward noise and 6 DDIM steps) from the
recommended edit's t0 (400 for pixels, as published; 500 for latents, the depth the latent adapters need).

Resumable: one JSON-lines file per run, ``<out>/<recipe>-<pair>-seed<s>.jsonl`` for the pixel test-bed and
``<out>/<recipe>-<pair>-seed<s>-latent.jsonl`` for the latent one (one line per epoch, then a final line), written
atomically when the run ends; runs whose file exists are skipped. ``--report`` prints the tables, one set per kind,
and draws the figure (lines drawn with PIL: matplotlib is not a dependency) from whatever files exist: one PNG per
kind, the latent one at the ``--figure`` path with ``-latent`` before the extension.

    OMP_NUM_THREADS=1 python benchmarks/bench_time_to_quality.py --recipes today one_step --seeds 5 0
    OMP_NUM_THREADS=1 python benchmarks/bench_time_to_quality.py --kind latent --recipes today one_step --seeds 5
    python benchmarks/bench_time_to_quality.py --report --figure docs/time-to-quality.png
    python benchmarks/bench_time_to_quality.py --list
    python benchmarks/bench_time_to_quality.py --tiny --out /tmp/ttq         # smoke run (the tests)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np
import torch

# name: (finetune overrides over the kind's recommended fine-tune, the final edit, second CLIP)
NOISE_ONE_STEP = {"scheme": "one_step", "encoding": "noise"}
RECIPES = {
    "today": ({}, "recommended", True),
    "one_step": ({**NOISE_ONE_STEP, "learning_rate": 2e-3}, "fast", True),  # FAST_FINETUNE
    "full_chain": ({"scheme": "full_chain"}, "recommended", True),
    "today_noise": ({"encoding": "noise"}, "recommended", True),
    "steps3_noise_1clip": ({"encoding": "noise", "num_train_steps": 3}, "recommended", False),
    "one_step_lr1e-3_b2": ({**NOISE_ONE_STEP, "learning_rate": 1e-3, "batch_size": 2}, "fast", True),
    # one optimizer step per batch instead of 6 (the CLIP loss and Adam once per batch): the rate scaled by 6
    "full_chain_lr3e-3_noise": (
        {"scheme": "full_chain", "encoding": "noise", "learning_rate": 3e-3},
        "recommended",
        True,
    ),
}
NUM_TRAIN, NUM_TEST = 16, 32
KINDS = ("pixel", "latent")


def _pair(spec: str) -> tuple[str, str, str]:
    source, target, shape = spec.split(":")
    return source, target, shape


class UNetCounter:
    """Images through the UNet with gradients (forward + backward in training), by a forward hook."""

    def __init__(self, unet):
        self.with_grad = 0
        self.handle = unet.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if torch.is_grad_enabled():
            self.with_grad += int(args[0].shape[0])


def _arrays(images01: torch.Tensor) -> list[np.ndarray]:
    return [np.asarray(a) for a in (images01.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]


def _success(sources: list[np.ndarray], edited: list[np.ndarray], target: str) -> dict:
    from diffusionclip_pipeline.testbed import world

    reports = [world.edit_success(s, e, target_colour=target) for s, e in zip(sources, edited)]
    keys = [k for k in reports[0] if k.endswith("_ok")]
    return {
        "success": float(np.mean([r["success"] for r in reports])),
        "criteria": {k: float(np.mean([bool(r[k]) for r in reports])) for k in keys},
        "mean_background": float(np.mean([r["background"] for r in reports])),
    }


def published_edits(testbed: str) -> dict[str, dict]:
    """The two published edits of the ``testbed`` kind: its recommended DDIM edit, and the fast edit (`FAST_EDIT`:
    forward noise, 6 DDIM steps) from the recommended edit's t0 (pixel: 400, both as published)."""
    from diffusionclip_pipeline.testbed.settings import FAST_EDIT, recommended

    _, edit = recommended(testbed)
    return {"recommended": edit, "fast": {**FAST_EDIT, "t0": edit["t0"]}}


def _final_edit(pipe, test, target, kind: str, seed: int, testbed: str = "pixel") -> dict:
    """The test-bed's two published edits (`published_edits`) on the held-out images, with the adapter as it is now;
    ``*_final`` are the recipe's own (``kind``)."""
    from diffusionclip_pipeline.training.state import frozen

    out = {"final_edit": kind}
    for name, settings in published_edits(testbed).items():
        settings = dict(settings)
        if settings.get("encoding") == "noise":
            settings["generator"] = torch.Generator().manual_seed(seed)
        unet = pipe.denoiser
        training = unet.training
        unet.eval()
        try:
            with frozen(unet.parameters()), torch.random.fork_rng():
                edited = pipe.edit(test, output_type="pt", **settings).images
        finally:
            unet.train(training)
        scores = _success([np.asarray(im) for im in test], _arrays(edited), target)
        out.update({f"{k}_{name}": v for k, v in scores.items()})
        if name == kind:
            out.update({f"{k}_final": v for k, v in scores.items()})
    return out


def run_path(out_dir: str, recipe: str, pair: str, seed: int, testbed: str = "pixel") -> str:
    """A run's file: ``<recipe>-<pair>-seed<s>.jsonl`` (pixel, the names of the first runs) or ``...-latent.jsonl``."""
    suffix = "" if testbed == "pixel" else f"-{testbed}"
    return os.path.join(out_dir, f"{recipe}-{pair.replace(':', '-')}-seed{seed}{suffix}.jsonl")


def run_one(
    recipe: str, pair: str, seed: int, out_dir: str, tiny: bool = False, edit_epochs=(), testbed: str = "pixel"
) -> str:
    """One run on the ``testbed`` kind ("pixel" or "latent"); returns its file (already there: skipped). The recipe's
    published edit scores the adapter after the last epoch and after each of ``edit_epochs``."""
    from diffusionclip_pipeline.testbed import load_pipeline, world
    from diffusionclip_pipeline.testbed.settings import recommended
    from diffusionclip_pipeline.utils.io import atomic_write_text

    if testbed not in KINDS:
        raise ValueError(f"`testbed` must be one of {KINDS}, got {testbed!r}.")
    path = run_path(out_dir, recipe, pair, seed, testbed)
    if os.path.exists(path):
        return path
    overrides, final_kind, second_clip = RECIPES[recipe]
    recommended_finetune, _ = recommended(testbed)
    settings = {**recommended_finetune, **overrides}
    num_train, num_test = (4, 4) if tiny else (NUM_TRAIN, NUM_TEST)
    if tiny:
        settings.update(num_epochs=2, num_inversion_steps=4, num_train_steps=2)
    source, target, shape = _pair(pair)
    pipe = load_pipeline(second_clip=second_clip, kind=testbed)
    train, _ = world.render_dataset(num_train, seed=seed, size=pipe.resolution, shape=shape, colour=source)
    test, _ = world.render_dataset(num_test, seed=seed + 1, size=pipe.resolution, shape=shape, colour=source)
    test_arrays = [np.asarray(im) for im in test]
    counter = UNetCounter(pipe.denoiser)
    records, spent = [], {"callback": 0.0}
    num_epochs = settings["num_epochs"]
    inversion = 0 if settings.get("encoding") == "noise" else settings.get("num_inversion_steps", 40) * (
        1 + settings.get("num_fixed_point_iterations", 0)
    )  # fmt: skip
    load = os.getloadavg()[0]

    def callback(pipe, epoch, logs):
        start = time.perf_counter()
        train_s = start - begin - logs["validation_seconds"] - spent["callback"]
        record = {
            "kind": testbed, "recipe": recipe, "pair": pair, "seed": seed, "epoch": epoch,
            "train_s": round(train_s, 3),
            "fwd_bwd_per_image": counter.with_grad / num_train, "inversion_fwd_per_image": inversion,
            "loss": logs["loss"], **_success(test_arrays, _arrays(logs["validation_images"]), target),
            "held_out": logs["validation"], "training": logs["training_scores"],
            "validation_s": round(logs["validation_seconds"], 3), "callback_s": round(spent["callback"], 3),
        }  # fmt: skip
        if epoch == num_epochs or epoch in edit_epochs:
            record.update(_final_edit(pipe, test, target, final_kind, seed, testbed))
        records.append(record)
        print(
            f"  {testbed} {recipe} {pair} seed {seed} epoch {epoch}: {record['success']:.0%} at {train_s:.1f} s",
            flush=True,
        )
        spent["callback"] += time.perf_counter() - start

    begin = time.perf_counter()
    out = pipe.finetune(
        f"{source} {shape}", f"{target} {shape}", images=train, validation_images=test, **settings,
        early_stopping_patience=10**6, early_stopping_on="training", callback_on_epoch_end=callback,
    )  # fmt: skip
    meta = {"final": True, "kind": testbed, "recipe": recipe, "pair": pair, "seed": seed,
            "settings": _jsonable(settings),
            "second_clip": second_clip, "load_at_start": load, "baseline": out.baseline,
            "flat_warning": out.flat_warning, "num_train": num_train, "num_test": num_test,
            "published_edits": published_edits(testbed)}  # fmt: skip
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in [*records, meta]))
    return path


def _jsonable(settings: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def read_runs(out_dir: str) -> list[dict]:
    """Every finished run: ``{"meta": final line, "epochs": [epoch lines]}``; files written before ``--kind`` existed
    are the pixel test-bed's (``meta["kind"]`` is filled in)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*.jsonl"))):
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        meta = {"kind": "pixel", **lines[-1]}
        runs.append({"meta": meta, "epochs": lines[:-1]})
    return runs


def report_by_kind(runs: list[dict]) -> str:
    """`report` once per test-bed kind present, each under its own heading."""
    parts = []
    for kind in KINDS:
        of_kind = [r for r in runs if r["meta"]["kind"] == kind]
        if of_kind:
            parts.append(f"## {kind} test-bed\n\n" + report(of_kind, heading="####"))
    return "\n".join(parts)


def figure_path(path: str, kind: str) -> str:
    """The figure of ``kind``: ``path`` itself for pixels, ``-latent`` before the extension for latents."""
    if kind == "pixel":
        return path
    root, ext = os.path.splitext(path)
    return f"{root}-{kind}{ext}"


def _published(epochs: list[dict]) -> str:
    """The published edit's success at each epoch it was scored: "97 %" (the last only) or "e3 81 %, e15 97 %"."""
    scored = [e for e in epochs if "success_final" in e]
    if len(scored) == 1:
        return _pct(scored[0]["success_final"])
    return ", ".join(f"e{e['epoch']} {_pct(e['success_final'])} ({e['train_s']:.0f} s)" for e in scored) or "-"


def _both(epochs: list[dict]) -> str:
    """Both published edits' success at each epoch they were scored (files written before 18:50 have the recipe's
    own only)."""
    scored = [e for e in epochs if "success_fast" in e]
    return (
        ", ".join(f"e{e['epoch']} {_pct(e['success_recommended'])} / {_pct(e['success_fast'])}" for e in scored) or "-"
    )


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _pearson(a: list[float], b: list[float]) -> float:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def report(runs: list[dict], heading: str = "###") -> str:
    """The markdown tables (each under a ``heading`` title): each run's curve, its time to reach success levels, and
    the proxy's agreement."""
    lines = ["| recipe | pair | seed | epoch | train s | fwd+bwd / image | success | bg ok | held-out s_dir | "
             "training s_dir |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    summary = ["| recipe | pair | seed | epochs | train s | fwd+bwd / img | inversion fwd / img | best success "
               "(epoch, s) | first >= 90 % (epoch, s) | last | published edit | its success (epoch, s) | "
               "recommended / fast edit |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    agreement = ["| recipe | pair | seed | epochs | r(training s_dir, held-out s_dir) | r(training s_dir, success) | "
                 "r(held-out s_dir, success) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        m, epochs = run["meta"], run["epochs"]
        for e in epochs:
            lines.append(
                f"| {m['recipe']} | {m['pair']} | {m['seed']} | {e['epoch']} | {e['train_s']:.1f} | "
                f"{e['fwd_bwd_per_image']:.0f} | {e['success']:.0%} | {e['criteria'].get('background_ok', 0):.0%} | "
                f"{e['held_out']['s_dir']:.3f} | {e['training']['s_dir']:.3f} |"
            )
        best = max(epochs, key=lambda e: (e["success"], -e["epoch"]))
        first = next((e for e in epochs if e["success"] >= 0.9), None)
        last = epochs[-1]
        summary.append(
            f"| {m['recipe']} | {m['pair']} | {m['seed']} | {last['epoch']} | {last['train_s']:.1f} | "
            f"{last['fwd_bwd_per_image']:.0f} | {last['inversion_fwd_per_image']:.0f} | {best['success']:.0%} ("
            f"{best['epoch']}, {best['train_s']:.0f} s) | "
            + (f"{first['success']:.0%} ({first['epoch']}, {first['train_s']:.0f} s)" if first else "never")
            + f" | {last['success']:.0%} | {last.get('final_edit', '-')} | {_published(epochs)} | {_both(epochs)} |"
        )
        train_dir = [e["training"]["s_dir"] for e in epochs]
        held_dir = [e["held_out"]["s_dir"] for e in epochs]
        success = [e["success"] for e in epochs]
        agreement.append(
            f"| {m['recipe']} | {m['pair']} | {m['seed']} | {len(epochs)} | {_pearson(train_dir, held_dir):.2f} | "
            f"{_pearson(train_dir, success):.2f} | {_pearson(held_dir, success):.2f} |"
        )
    stopping = early_stopping_table(runs)
    h = heading
    return "\n".join([f"{h} Summary", "", *summary, "", f"{h} Success by epoch", "", *curve_table(runs), "",
                      f"{h} Proxy agreement (Pearson r over epochs)", "", *agreement, "",
                      f"{h} Early stopping, replayed on the curves", "", *stopping, "", f"{h} Every epoch", "",
                      *lines]) + "\n"  # fmt: skip


def curve_table(runs: list[dict]) -> list[str]:
    """One row per run: the validation edit's success (%) after each epoch, the training seconds and UNet forward +
    backward passes per image at the end, and both published edits (recommended / fast) where they were scored."""
    rows = ["| recipe | pair | seed | validation-edit success by epoch, % (1, 2, ...) | train s | fwd+bwd / img | "
            "recommended / fast edit (epoch: %, s) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        m, epochs = run["meta"], run["epochs"]
        curve = " ".join(f"{100 * e['success']:.0f}" for e in epochs)
        edits = "; ".join(
            f"e{e['epoch']}: {_pct(e['success_recommended'])} / {_pct(e['success_fast'])}, {e['train_s']:.0f} s"
            for e in epochs
            if "success_fast" in e
        )
        rows.append(
            f"| {m['recipe']} | {m['pair']} | {m['seed']} | {curve} | {epochs[-1]['train_s']:.1f} | "
            f"{epochs[-1]['fwd_bwd_per_image']:.0f} | {edits or '-'} |"
        )
    return rows


def _replay(epochs: list[dict], scores: str, patience: int, metric: str = "s_dir") -> tuple[dict, dict]:
    """`EarlyStopping` (the library's rule) replayed on a run's per-epoch ``scores`` ("held_out" or "training"):
    ``(the epoch it stops after, the best epoch it keeps)``; the last epoch if it never stops."""
    from diffusionclip_pipeline.training.callbacks import EarlyStopping

    rule = EarlyStopping(patience=patience, threshold=0.0, metric=metric)
    stop = next((e for e in epochs if rule(e[scores]) is not None), epochs[-1])
    seen = [e for e in epochs if e["epoch"] <= stop["epoch"]]
    sign = 1.0 if metric != "mae" else -1.0  # mae: the smallest wins, as `keep_best`
    best = max(seen, key=lambda e: (sign * e[scores][metric], -e["epoch"]))
    return stop, best


def early_stopping_table(runs: list[dict], patience: int = 3) -> list[str]:
    """Where early stopping (patience ``patience``, threshold 0, on ``s_dir`` or ``mae``) would have stopped each run,
    on the held-out scores and on the training-set proxy, and the held-out success of the epoch it keeps."""
    rows = [f"| recipe | pair | seed | on (patience {patience}) | stops after epoch (train s) | keeps epoch | its "
            "success | last epoch's success |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        m, epochs = run["meta"], run["epochs"]
        for metric in ("s_dir", "mae"):
            for scores in ("held_out", "training"):
                stop, best = _replay(epochs, scores, patience, metric)
                rows.append(
                    f"| {m['recipe']} | {m['pair']} | {m['seed']} | {scores} `{metric}` | {stop['epoch']} "
                    f"({stop['train_s']:.0f} s) | {best['epoch']} | {best['success']:.0%} | "
                    f"{epochs[-1]['success']:.0%} |"
                )
    return rows


COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def _panel(draw, box, curves, x_key: str, x_label: str, title: str, font) -> None:
    """One chart in ``box`` = (left, top, right, bottom): success (0-100 %) against ``x_key``, a line per curve (the
    validation edit's, every epoch) and a hollow square where the recommended edit was scored (``--edit-epochs``)."""
    left, top, right, bottom = box
    x_max = max((e[x_key] for _, _, epochs in curves for e in epochs), default=1.0) * 1.05 or 1.0
    draw.rectangle(box, outline=(0, 0, 0))
    for frac in (0.25, 0.5, 0.75, 1.0):
        y = bottom - frac * (bottom - top)
        draw.line((left, y, right, y), fill=(225, 225, 225))
        draw.text((left - 34, y - 6), f"{frac:.0%}", fill=(0, 0, 0), font=font)
    for i in range(5):
        x = left + i / 4 * (right - left)
        value = i / 4 * x_max
        draw.text((x - 8, bottom + 4), f"{value:.0f}" if x_max >= 20 else f"{value:.1f}", fill=(0, 0, 0), font=font)
    draw.text(((left + right) / 2 - 40, bottom + 18), x_label, fill=(0, 0, 0), font=font)
    draw.text((left, top - 16), title, fill=(0, 0, 0), font=font)
    for _, colour, epochs in curves:
        points = [(left + e[x_key] / x_max * (right - left), bottom - e["success"] * (bottom - top)) for e in epochs]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        for e in epochs:
            if "success_recommended" in e:
                x = left + e[x_key] / x_max * (right - left)
                y = bottom - e["success_recommended"] * (bottom - top)
                draw.rectangle((x - 5, y - 5, x + 5, y + 5), outline=colour, width=2)


def figure(runs: list[dict], path: str, kind: str = "pixel") -> None:
    """Success against training seconds and against forward + backward passes per image, one panel pair per
    (pair, seed), one line per recipe (the validation edit) with squares for the recommended edit where it was
    scored, drawn with PIL; ``kind`` names the test-bed in the titles (latent only: the pixel titles are unchanged)."""
    import PIL.Image
    import PIL.ImageDraw
    import PIL.ImageFont

    from diffusionclip_pipeline.image_io import save_atomic

    recipes = sorted({r["meta"]["recipe"] for r in runs})
    colour_of = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(recipes)}
    groups = sorted({(r["meta"]["pair"], r["meta"]["seed"]) for r in runs})
    width, height = 1000, 300 * len(groups) + 60
    image = PIL.Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = PIL.ImageDraw.Draw(image), PIL.ImageFont.load_default()
    for g, (pair, seed) in enumerate(groups):
        curves = [(r["meta"]["recipe"], colour_of[r["meta"]["recipe"]], r["epochs"]) for r in runs
                  if (r["meta"]["pair"], r["meta"]["seed"]) == (pair, seed)]  # fmt: skip
        top = 40 + g * 300
        source, target, shape = _pair(pair)
        testbed = "" if kind == "pixel" else f"{kind} test-bed, "
        title = f"{testbed}{source} -> {target} {shape}, data seed {seed}: held-out success (validation edit)"
        _panel(draw, (60, top + 20, 480, top + 240), curves, "train_s", "fine-tuning seconds", title, font)
        _panel(draw, (560, top + 20, 980, top + 240), curves, "fwd_bwd_per_image",
               "UNet forward+backward per training image", "", font)  # fmt: skip
    for i, name in enumerate(recipes):
        x = 60 + i * 150
        draw.line((x, 15, x + 20, 15), fill=colour_of[name], width=3)
        draw.text((x + 25, 9), name, fill=(0, 0, 0), font=font)
    note = "lines + dots: the validation edit, every epoch; hollow squares: the recommended edit, where scored"
    draw.text((60, 24), note, fill=(90, 90, 90), font=font)
    save_atomic(image, path)


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["today", "one_step", "full_chain"], choices=list(RECIPES))
    parser.add_argument("--pairs", nargs="+", default=["red:blue:circle"], help="source:target:shape")
    parser.add_argument("--seeds", nargs="+", type=int, default=[5], help="data seeds (held-out: seed + 1)")
    parser.add_argument("--out", default=os.path.join("build", "ttq"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="print the tables of the finished runs")
    parser.add_argument("--figure", help="with --report: draw the PNG here")
    parser.add_argument("--list", action="store_true", help="print the recipes")
    parser.add_argument("--edit-epochs", nargs="*", type=int, default=[],
                        help="also score the published edit after these epochs (the last always)")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="smoke run: 4 + 4 images, 2 epochs")
    parser.add_argument("--kind", choices=KINDS, default="pixel",
                        help="the test-bed: pixel (default) or latent (VAE + text-conditioned UNet)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.list:
        for name, (overrides, final, second_clip) in RECIPES.items():
            print(f"{name}: {overrides}; final edit {final}; {'two CLIPs' if second_clip else 'one CLIP'}")
        return []
    if args.report:
        runs = read_runs(args.out)
        print(report_by_kind(runs))
        written = []
        if args.figure:
            for kind in KINDS:
                of_kind = [r for r in runs if r["meta"]["kind"] == kind]
                if of_kind:
                    figure(of_kind, figure_path(args.figure, kind), kind)
                    written.append(figure_path(args.figure, kind))
        return written
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    paths = []
    for seed in args.seeds:  # seed outer: every recipe at the choosing seed first
        for pair in args.pairs:
            for recipe in args.recipes:
                paths.append(run_one(recipe, pair, seed, args.out, args.tiny, tuple(args.edit_epochs), args.kind))
    return paths


if __name__ == "__main__":
    main()
